"""TAR@FAR: exact with ties, unavailable levels are None, ROC curve consistent with operating points."""

import numpy as np
import pytest

from cdface.training.evaluation.roc import (
    FAR_LEVELS,
    far_key,
    operating_point,
    roc_curve,
    tar_at_far,
    tar_at_far_summary,
)

# 10 impostors with a three-way tie at 0.5; 5 genuine scores, one tied with the impostors at 0.5.
IMPOSTOR = np.array([0.9, 0.5, 0.5, 0.5, 0.3, 0.2, 0.1, 0.1, 0.0, -0.1])
GENUINE = np.array([0.95, 0.9, 0.6, 0.5, 0.4])


def test_hand_computed_operating_points_with_ties():
    # FAR 0.1 -> at most 1 false accept: threshold = 2nd largest impostor = 0.5; only 0.9 is above it.
    p = operating_point(GENUINE, IMPOSTOR, 0.1)
    assert (p.threshold, p.far, p.tar) == (0.5, 0.1, 0.6)  # genuine 0.95, 0.9, 0.6 accepted; 0.5 is not > 0.5
    # FAR 0.2 -> at most 2 false accepts, but lowering the threshold below 0.5 accepts all three tied
    # impostors (4 in total): the tie forces the same threshold and an achieved FAR of 0.1, below target.
    p = operating_point(GENUINE, IMPOSTOR, 0.2)
    assert (p.threshold, p.far, p.tar) == (0.5, 0.1, 0.6)
    # FAR 0.4 -> 4 false accepts allowed: threshold 0.3 accepts 0.9 and the three 0.5s; all genuine pass.
    p = operating_point(GENUINE, IMPOSTOR, 0.4)
    assert (p.threshold, p.far, p.tar) == (0.3, 0.4, 1.0)


def test_far_below_one_over_negatives_is_unavailable_not_a_number():
    assert operating_point(GENUINE, IMPOSTOR, 0.05) is None  # 0.05 * 10 < 1 false accept
    points = tar_at_far(GENUINE, IMPOSTOR)
    assert list(points) == list(FAR_LEVELS)
    assert all(points[far] is None for far in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2))
    assert points[1e-1].tar == 0.6
    summary = tar_at_far_summary(points)
    assert summary["1e-2"] is None and summary["1e-1"]["threshold"] == 0.5
    # Exactly 1/n is measurable (floating point must not round 1e-3 * 1000 down to zero).
    assert operating_point(GENUINE, np.linspace(-1, 0, 1000), 1e-3) is not None


def test_matches_brute_force_on_heavily_tied_scores():
    rng = np.random.default_rng(0)
    genuine = rng.integers(0, 20, size=300) / 10.0
    impostor = rng.integers(-5, 12, size=2000) / 10.0
    candidates = np.concatenate([[-np.inf], np.unique(np.concatenate([genuine, impostor]))])
    for far in (1e-3, 1e-2, 5e-2, 1e-1):
        allowed = int(np.floor(far * impostor.size + 1e-9))
        valid = [t for t in candidates if np.sum(impostor > t) <= allowed]
        best_tar = max(np.mean(genuine > t) for t in valid)
        p = operating_point(genuine, impostor, far)
        assert p.tar == pytest.approx(best_tar)
        assert p.far <= far
        assert np.sum(impostor > p.threshold) <= allowed < np.sum(impostor >= p.threshold)


def test_roc_curve_is_monotone_and_contains_the_operating_points():
    far, tar, thresholds = roc_curve(GENUINE, IMPOSTOR)
    assert far[0] == 0.0 and tar[0] == 0.0 and far[-1] == 1.0 and tar[-1] == 1.0
    assert np.all(np.diff(far) >= 0) and np.all(np.diff(tar) >= 0) and np.all(np.diff(thresholds) < 0)
    i = int(np.where(thresholds == 0.5)[0][0])
    assert (far[i], tar[i]) == (0.1, 0.6)


def test_far_key_and_bad_inputs():
    assert [far_key(f) for f in FAR_LEVELS] == ["1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1"]
    with pytest.raises(ValueError):
        operating_point(GENUINE, np.array([]), 0.1)
    with pytest.raises(ValueError):
        operating_point(GENUINE, IMPOSTOR, 1.0)
