"""Synthetic identities: deterministic, identity-bearing, with the requested share of hard samples."""

from __future__ import annotations

import json

import numpy as np

from cdface.training.data.binfile import decode_bin_images
from cdface.training.data.dataset import open_dataset
from cdface.training.data.synthetic import (
    SyntheticSpec,
    identity_of,
    iter_training_samples,
    render_sample,
    verification_pairs,
    write_folder,
    write_verification_bin,
)


def test_deterministic_for_a_seed():
    spec = SyntheticSpec(identities=3, per_identity=3, hard_share=0.3, seed=5)
    first = [image for _, image, _ in iter_training_samples(spec)]
    second = [image for _, image, _ in iter_training_samples(spec)]
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    other = [image for _, image, _ in iter_training_samples(SyntheticSpec(3, 3, 0.3, seed=6))]
    assert not np.array_equal(first[0], other[0])
    # Any sample renders the same on its own, in any order.
    assert np.array_equal(render_sample(5, 2, 1, hard=False), render_sample(5, 2, 1, hard=False))


def test_identities_differ_more_than_samples_of_one_identity():
    identities, per_identity = 12, 6
    spec = SyntheticSpec(identities, per_identity, hard_share=0.0, seed=1)
    images = np.stack([image for _, image, _ in iter_training_samples(spec)]).astype(np.float32)
    # The central face region; background and clothing are nuisance by design.
    faces = images[:, 28:92, 28:84].reshape(identities, per_identity, -1)
    within = np.mean([np.abs(s[i] - s[j]).mean() for s in faces for i in range(per_identity) for j in range(i)])
    means = faces.mean(axis=1)
    between = np.mean([np.abs(means[a] - means[b]).mean() for a in range(identities) for b in range(a)])
    within_means = np.mean([np.abs(s - s.mean(axis=0)).mean() for s in faces])
    assert between > 1.5 * within_means, (between, within_means, within)


def test_hard_samples_come_in_the_requested_share_and_are_degraded():
    spec = SyntheticSpec(identities=8, per_identity=10, hard_share=0.25, seed=2)
    samples = list(iter_training_samples(spec))
    hard = np.array([h for _, _, h in samples])
    assert hard.sum() == 20
    # Hard samples are darker/blurrier/occluded: further from their identity's easy mean.
    images = np.stack([image for _, image, _ in samples]).astype(np.float32).reshape(8, 10, -1)
    hard = hard.reshape(8, 10)
    distance_hard, distance_easy = [], []
    for identity in range(8):
        easy_mean = images[identity][~hard[identity]].mean(axis=0)
        for j in range(10):
            d = np.abs(images[identity, j] - easy_mean).mean()
            (distance_hard if hard[identity, j] else distance_easy).append(d)
    assert np.mean(distance_hard) > 1.3 * np.mean(distance_easy)


def test_folder_writer_and_manifest(tmp_path):
    spec = SyntheticSpec(identities=3, per_identity=4, hard_share=0.5, seed=0)
    write_folder(tmp_path, spec)
    dataset = open_dataset(tmp_path)
    assert len(dataset) == 12 and dataset.num_classes == 3
    manifest = json.loads((tmp_path / "synthetic.json").read_text())
    expected_hard = [i for i, (_, _, h) in enumerate(iter_training_samples(spec)) if h]
    assert manifest["hard_samples"] == expected_hard and len(expected_hard) == 6


def test_verification_identities_are_disjoint_and_pairs_balanced(tmp_path):
    images, issame = verification_pairs(seed=0, identities=5, pairs=10, hard_share=0.0)
    assert images.shape == (20, 112, 112, 3) and issame.sum() == 5
    assert identity_of(0, 0).skin.tolist() != identity_of(0, 0, role=1).skin.tolist()
    write_verification_bin(tmp_path / "val.bin", seed=0, identities=5, pairs=10, hard_share=0.0)
    decoded, flags = decode_bin_images(tmp_path / "val.bin")
    assert flags.tolist() == issame.tolist()
    assert np.abs(decoded.astype(int) - images.astype(int)).mean() < 4  # JPEG q90
