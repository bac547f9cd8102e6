"""The sharded margin head (Partial FC) against the replicated head, on real gloo process groups.

Each test spawns 2 or 3 CPU processes; the replicated reference runs in the test process on the
same global batch. The sharded head's embedding gradient is W times the gradient of the global
mean loss (DDP averages the backbone over W ranks), i.e. what a replicated head gives each rank
for its local batch.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cdface.training.checkpoint import load_checkpoint
from cdface.training.heads import MARGINS, MarginHead
from cdface.training.partial_fc import ShardedMarginHead, shard_bounds
from tests.training.test_trainer import free_port, write_preset
from tests.training.trainer_support import ddp_worker, write_tiny_folder_dataset

D, C, N, NP = 16, 23, 12, 5


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return write_tiny_folder_dataset(tmp_path_factory.mktemp("data") / "train")


def _init_group(rank: int, world_size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)


def _global_batch(seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (N,), generator=g)
    labels[:4] = torch.tensor([0, C - 1, 7, 7])  # classes at the shard edges, and a repeated one
    return torch.randn(N, D, generator=g), labels


def _head_worker(rank: int, world_size: int, port: int, kind: str, out: str) -> None:
    _init_group(rank, world_size, port)
    torch.manual_seed(0)
    head = ShardedMarginHead(D, C, MARGINS[kind](), scale=32.0, num_hard_negatives=NP)
    embeddings, labels = _global_batch()
    b = N // world_size
    mine = slice(rank * b, (rank + 1) * b)
    x = embeddings[mine].clone().requires_grad_(True)
    result = head(x, labels[mine], negatives_for=torch.arange(b))
    result.loss.backward()
    centres = head.centres(result.hard_negatives)
    torch.save({"loss": result.loss.detach(), "x_grad": x.grad, "w_grad": head.weight.grad,
                "target_cos": result.target_cos, "negatives": result.hard_negatives, "centres": centres,
                "full": head.full_state_dict(), "bytes": head.comm.bytes_sent}, Path(out) / f"{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("kind", ["arcface", "cosface"])
def test_sharded_loss_gradients_and_negatives_equal_the_replicated_head(kind, world_size, tmp_path):
    mp.spawn(_head_worker, args=(world_size, free_port(), kind, str(tmp_path)), nprocs=world_size)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(world_size)]

    torch.manual_seed(0)
    reference = MarginHead(D, C, MARGINS[kind](), scale=32.0, num_hard_negatives=NP)
    embeddings, labels = _global_batch()
    x = embeddings.clone().requires_grad_(True)
    expected = reference(x, labels, negatives_for=torch.arange(N))
    expected.loss.backward()

    b = N // world_size
    for r, got in enumerate(ranks):
        torch.testing.assert_close(got["loss"], expected.loss.detach(), atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(got["x_grad"], world_size * x.grad[r * b:(r + 1) * b], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got["target_cos"], expected.target_cos[r * b:(r + 1) * b], atol=1e-6, rtol=0)
        assert torch.equal(got["negatives"], expected.hard_negatives[r * b:(r + 1) * b])
        assert torch.equal(got["centres"], reference.weight.detach()[got["negatives"]])  # fetched from owners
        assert got["bytes"] > 0
    bounds = shard_bounds(C, world_size)
    assert [g["w_grad"].shape[0] for g in ranks] == [b - a for a, b in zip(bounds, bounds[1:])]
    torch.testing.assert_close(torch.cat([g["w_grad"] for g in ranks]), reference.weight.grad, atol=1e-5, rtol=1e-4)
    # The checkpointed head is the replicated one: gathered on rank 0 only.
    assert torch.equal(ranks[0]["full"]["weight"], reference.weight.detach())
    assert all(g["full"] == {} for g in ranks[1:])


# Exact unit vectors (entries 0 or +-1/2, four of them non-zero): every cosine is an exact multiple
# of 1/4, so many centres tie, and duplicated centres sit on different shards.
def _tied_vectors(count: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = torch.zeros(count, 8)
    for i in range(count):
        columns = torch.randperm(8, generator=g)[:4]
        rows[i, columns] = 0.5 * (torch.randint(0, 2, (4,), generator=g) * 2 - 1).float()
    return rows


def _tied_worker(rank: int, world_size: int, port: int, out: str) -> None:
    _init_group(rank, world_size, port)
    centres = _tied_vectors(10, seed=1).repeat(3, 1)  # 30 classes, each vector three times
    embeddings, labels = _tied_vectors(6, seed=2), torch.tensor([0, 10, 29, 5, 14, 22])
    head = ShardedMarginHead(8, 30, MARGINS["arcface"](), num_hard_negatives=7)
    with torch.no_grad():
        head.weight.copy_(head.shard(centres))
    b = 6 // world_size
    mine = slice(rank * b, (rank + 1) * b)
    result = head(embeddings[mine], labels[mine], negatives_for=torch.arange(b))
    torch.save(result.hard_negatives, Path(out) / f"{rank}.pt")
    dist.destroy_process_group()


def test_cross_shard_top_negatives_equal_brute_force_with_ties(tmp_path):
    mp.spawn(_tied_worker, args=(3, free_port(), str(tmp_path)), nprocs=3)
    got = torch.cat([torch.load(tmp_path / f"{r}.pt") for r in range(3)])

    centres = _tied_vectors(10, seed=1).repeat(3, 1)
    embeddings, labels = _tied_vectors(6, seed=2), torch.tensor([0, 10, 29, 5, 14, 22])
    cos = embeddings @ centres.t()
    for i in range(6):
        # Brute force: every column, by cosine then by index (a stable sort of index order).
        order = torch.sort(cos[i], descending=True, stable=True).indices.tolist()
        brute = [c for c in order if c != int(labels[i])][:7]
        assert got[i].tolist() == brute
        assert len(set(cos[i, brute].tolist())) < 7  # the answer crosses ties
    assert int(labels[1]) not in got[1].tolist()


def test_sampling_keeps_every_positive_and_is_seeded():
    def sampled(seed: int, labels: torch.Tensor, step: int = 0) -> set[int]:
        torch.manual_seed(123)  # the global RNG plays no part: (seed, step, rank) decide the sample
        head = ShardedMarginHead(D, 1000, MARGINS["arcface"](), num_hard_negatives=NP, sample_rate=0.1, seed=seed)
        head.step = step
        head(torch.randn(labels.shape[0], D), labels).loss.backward()
        return set(torch.nonzero(head.weight.grad.abs().sum(dim=1)).flatten().tolist())

    labels = torch.tensor([3, 3, 999, 500, 0, 77])
    first = sampled(0, labels)
    assert set(labels.tolist()) <= first and len(first) == math.ceil(0.1 * 1000)
    assert sampled(0, labels) == first  # seeded: run.seed and the step
    assert sampled(1, labels) != first and sampled(0, labels, step=1) != first
    many = torch.arange(0, 1000, 5)  # 200 positives > the 100 the rate allows: all of them still kept
    assert sampled(0, many) == set(many.tolist())


def _train(world_size: int, preset: Path, overrides: list[str], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    mp.spawn(ddp_worker, args=(world_size, free_port(), overrides + [f"run.output={out}"], str(preset), str(out)),
             nprocs=world_size)


def _assert_same_training(a: dict, b: dict) -> None:
    for name, value in a["model"].items():
        torch.testing.assert_close(b["model"][name], value, atol=2e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(b["head"]["weight"], a["head"]["weight"], atol=2e-5, rtol=1e-4)


BN_FREE = {"backbone": "test_nonorm", "width": 1.0, "dropout": 0.0}


def test_sharded_training_equals_replicated_training_with_refined_branch_steps(tiny_data, tmp_path):
    preset = write_preset(tmp_path / "p.yaml", tiny_data, tmp_path / "unused", model=BN_FREE)
    common = ["run.max_steps=5", "method.interval=2", "data.flip=false", "optim.grad_clip=0.5"]
    _train(2, preset, common, tmp_path / "replicated")
    _train(2, preset, common + ["head.sharded=true"], tmp_path / "sharded")
    a = load_checkpoint(tmp_path / "replicated" / "model.pt")
    b = load_checkpoint(tmp_path / "sharded" / "model.pt")
    _assert_same_training(a, b)
    torch.testing.assert_close(b["bank"]["scores"], a["bank"]["scores"], atol=1e-5, rtol=1e-4)
    steps = [line for line in (tmp_path / "sharded" / "metrics.jsonl").read_text().splitlines()
             if "loss_diversity" in line]
    assert len(steps) == 3  # steps 0, 2, 4 ran the refined branch


def test_sharded_checkpoint_resumes_on_three_ranks_and_on_one(tiny_data, tmp_path):
    preset = write_preset(tmp_path / "p.yaml", tiny_data, tmp_path / "unused", model=BN_FREE,
                          optim={"batch_size": 12, "epochs": 2, "lr": 0.05, "milestones": [1]})
    common = ["run.stage=pretrain", "head.sharded=true", "run.checkpoint_every=100"]
    _train(2, preset, common + ["run.max_steps=7"], tmp_path / "straight")
    _train(2, preset, common + ["run.max_steps=3"], tmp_path / "first")
    for name, ranks in (("three", 3), ("one", 1)):
        shutil.copytree(tmp_path / "first", tmp_path / name)
        _train(ranks, preset, common + ["run.max_steps=7"], tmp_path / name)
    straight = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    for name in ("three", "one"):
        resumed = load_checkpoint(tmp_path / name / "checkpoints" / "last.pt")
        assert resumed["progress"]["step"] == straight["progress"]["step"] == 7
        _assert_same_training(straight, resumed)
        slot = resumed["optimizer"]["state"]
        momentum = [s["momentum_buffer"] for s in slot.values() if s["momentum_buffer"].shape == (8, 16)]
        reference = [s["momentum_buffer"] for s in straight["optimizer"]["state"].values()
                     if s["momentum_buffer"].shape == (8, 16)]
        torch.testing.assert_close(momentum[0], reference[0], atol=2e-5, rtol=1e-4)  # momentum re-sharded


def test_presets_paper_stays_replicated_and_glint360k_shards():
    from cdface.training.config import load_config

    paper, glint = load_config("paper"), load_config("glint360k")
    assert not paper.head.sharded and paper.head.sample_rate == 1.0
    assert glint.head.sharded and glint.method == paper.method and glint.head.num_hard_negatives == 500
    with pytest.raises(Exception, match="head.sharded=true"):
        load_config("paper", ["head.sample_rate=0.1"])


def test_benchmark_smoke_run_measures_both_arms():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "benchmarks.sharded_head", "--quick"], capture_output=True,
                          text=True, timeout=600, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "20000 identities: head memory 0.06 vs 0.12 GB per rank" in proc.stdout


def test_sampled_sharded_training_resumes_exactly(tiny_data, tmp_path):
    preset = write_preset(tmp_path / "p.yaml", tiny_data, tmp_path / "unused", model=BN_FREE)
    common = ["head.sharded=true", "head.sample_rate=0.5", "data.flip=false", "run.checkpoint_every=100"]
    _train(2, preset, common + ["run.max_steps=4"], tmp_path / "straight")
    _train(2, preset, common + ["run.max_steps=2"], tmp_path / "resumed")
    _train(2, preset, common + ["run.max_steps=4"], tmp_path / "resumed")
    straight = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    resumed = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert straight["progress"]["step"] == resumed["progress"]["step"] == 4
    _assert_same_training(straight, resumed)
