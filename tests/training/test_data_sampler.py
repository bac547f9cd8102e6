"""EpochBatchSampler: deterministic, DDP-consistent, resumable; FaceDataset loading helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from cdface.training.data.dataset import EpochBatchSampler, open_dataset
from cdface.training.data.recordio import write_face_recordio
from cdface.training.data.synthetic import encode_jpeg


def _epoch(sampler: EpochBatchSampler, epoch: int, start_batch: int = 0) -> list[list[tuple[int, bool]]]:
    sampler.set_epoch(epoch, start_batch)
    return list(sampler)


def test_deterministic_for_a_seed_and_different_across_epochs_and_seeds():
    a = _epoch(EpochBatchSampler(100, 8, seed=3), 1)
    assert a == _epoch(EpochBatchSampler(100, 8, seed=3), 1)
    assert a != _epoch(EpochBatchSampler(100, 8, seed=3), 2)
    assert a != _epoch(EpochBatchSampler(100, 8, seed=4), 1)
    assert len(a) == len(EpochBatchSampler(100, 8)) == 12
    indices = [i for batch in a for i, _ in batch]
    assert len(set(indices)) == len(indices) == 96  # a permutation, the tail dropped


def test_union_of_ranks_is_the_single_process_global_batch():
    world, batch = 4, 5
    single = _epoch(EpochBatchSampler(203, batch * world, seed=7), 2)
    per_rank = [_epoch(EpochBatchSampler(203, batch, world_size=world, rank=r, seed=7), 2) for r in range(world)]
    assert all(len(steps) == len(single) == 10 for steps in per_rank)
    for step, global_batch in enumerate(single):
        ranks = [per_rank[r][step] for r in range(world)]
        assert all(len(b) == batch for b in ranks)
        assert sorted(x for b in ranks for x in b) == sorted(global_batch)
        assert ranks[1] == global_batch[1::world]  # rank r takes entries r::world_size


def test_resume_mid_epoch_yields_exactly_the_remaining_batches():
    full = _epoch(EpochBatchSampler(90, 6, world_size=2, rank=1, seed=11), 5)
    resumed = _epoch(EpochBatchSampler(90, 6, world_size=2, rank=1, seed=11), 5, start_batch=4)
    assert resumed == full[4:]
    sampler = EpochBatchSampler(90, 6, world_size=2, rank=1, seed=11)
    sampler.set_epoch(5, start_batch=len(sampler))
    assert list(sampler) == []


def test_flips_are_deterministic_balanced_and_can_be_disabled():
    first = _epoch(EpochBatchSampler(1000, 50, seed=1), 0)
    again = _epoch(EpochBatchSampler(1000, 50, seed=1), 0)
    flips = [f for batch in first for _, f in batch]
    assert flips == [f for batch in again for _, f in batch]
    assert 0.4 < np.mean(flips) < 0.6
    # A flip belongs to the epoch position, so rank split and resume keep it.
    rank0 = _epoch(EpochBatchSampler(1000, 25, world_size=2, rank=0, seed=1), 0, start_batch=3)
    assert rank0[0] == first[3][0::2]
    no_flip = _epoch(EpochBatchSampler(1000, 50, seed=1, flip=False), 0)
    assert not any(f for batch in no_flip for _, f in batch)
    assert [i for b in no_flip for i, _ in b] == [i for b in first for i, _ in b]


def test_keep_last_pads_so_every_rank_gets_a_batch():
    per_rank = [_epoch(EpochBatchSampler(10, 4, world_size=2, rank=r, drop_last=False), 0) for r in range(2)]
    assert [len(steps) for steps in per_rank] == [2, 2]
    covered = {i for steps in per_rank for b in steps for i, _ in b}
    assert covered == set(range(10))


@pytest.fixture(scope="module")
def tiny_recordio(tmp_path_factory):
    root = tmp_path_factory.mktemp("rec")
    rng = np.random.default_rng(0)
    samples = [(label, encode_jpeg(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8))) for label in [0, 0, 1, 1, 1, 2]]
    write_face_recordio(root, samples)
    return root


def test_dataset_items_flips_and_load_images(tiny_recordio):
    dataset = open_dataset(tiny_recordio)
    plain, label, index = dataset[(2, False)]
    flipped, _, _ = dataset[(2, True)]
    assert plain.dtype == torch.uint8 and plain.shape == (112, 112, 3) and (label, index) == (1, 2)
    assert torch.equal(flipped, plain.flip(1))
    batch = dataset.load_images([5, 2, 2], flips=[False, False, True], workers=3)
    assert batch.shape == (3, 112, 112, 3) and batch.dtype == torch.uint8
    assert torch.equal(batch[1], plain) and torch.equal(batch[2], flipped)
    assert [ix.tolist() for ix in dataset.identity_index()] == [[0, 1], [2, 3, 4], [5]]


def test_dataloader_with_workers_follows_the_sampler(tiny_recordio):
    dataset = open_dataset(tiny_recordio)
    sampler = EpochBatchSampler(len(dataset), 2, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=2)
    for plan, (images, labels, indices) in zip(list(sampler), loader):
        assert indices.tolist() == [i for i, _ in plan]
        assert labels.tolist() == dataset.labels[indices.numpy()].tolist()
        expected = dataset.load_images([i for i, _ in plan], [f for _, f in plan])
        assert torch.equal(images, expected)
