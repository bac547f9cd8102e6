"""10-fold verification accuracy: separable, random, and the threshold chosen on training folds only."""

import numpy as np
import pytest

from cdface.core.errors import CdfaceError
from cdface.training.evaluation.verification import (
    accuracies_at_thresholds,
    best_threshold,
    candidate_thresholds,
    kfold_indices,
    pair_similarities,
    verification_accuracy,
)


def _pair_embeddings(issame: np.ndarray, dim: int, noise: float, rng: np.random.Generator) -> np.ndarray:
    """2P rows, consecutive rows form a pair: same identity -> same centre plus noise."""
    rows = []
    for same in issame:
        a = rng.normal(size=dim)
        b = a if same else rng.normal(size=dim)
        rows += [a + noise * rng.normal(size=dim), b + noise * rng.normal(size=dim)]
    return np.stack(rows)


def test_folds_are_contiguous_like_sklearn_kfold_without_shuffle():
    folds = kfold_indices(23, 10)
    sizes = [len(test) for _, test in folds]
    assert sizes == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]  # the first 23 % 10 folds get one extra pair
    assert np.array_equal(np.concatenate([test for _, test in folds]), np.arange(23))
    for train, test in folds:
        assert np.all(np.diff(test) == 1)
        assert set(train) | set(test) == set(range(23)) and not set(train) & set(test)


def test_perfectly_separable_embeddings_give_100_percent():
    rng = np.random.default_rng(0)
    issame = np.tile([True, False], 300)
    scores = pair_similarities(_pair_embeddings(issame, dim=64, noise=0.05, rng=rng))
    assert scores[issame].min() > scores[~issame].max()  # the fixture really is separable
    result = verification_accuracy(scores, issame)
    assert result.accuracy == 1.0 and result.accuracy_std == 0.0
    assert len(result.fold_thresholds) == 10
    # Every fold's threshold separates the two classes.
    for t in result.fold_thresholds:
        assert scores[~issame].max() < t < scores[issame].min()


def test_random_embeddings_give_about_50_percent():
    rng = np.random.default_rng(1)
    issame = rng.random(6000) < 0.5
    scores = pair_similarities(rng.normal(size=(12000, 64)))
    result = verification_accuracy(scores, issame)
    assert 0.46 < result.accuracy < 0.54


def test_threshold_is_chosen_on_training_folds_only():
    # 20 pairs, 10 folds of 2. Fold 0 holds two positives scoring low (0.30, 0.35). The training folds
    # (pairs 2..19) are separated perfectly by any threshold in (0.40, 0.80): the exact scan picks 0.60, and
    # both held-out positives fall below it -> fold 0 accuracy 0. Had fold 0 leaked into the choice, the
    # best threshold would drop to 0.25 (19/20 correct) and fold 0 would score 100%.
    scores = [0.30, 0.35]
    issame = [True, True]
    negatives = [0.2] * 8 + [0.4]
    for negative in negatives:
        scores += [0.8, negative]
        issame += [True, False]
    scores, issame = np.array(scores), np.array(issame)

    result = verification_accuracy(scores, issame, num_folds=10)
    assert result.fold_thresholds[0] == pytest.approx(0.60)
    assert result.fold_accuracies[0] == 0.0
    assert result.best_threshold == pytest.approx(0.25)  # the all-pairs optimum, which fold 0 must not see
    # The leaked threshold really would have scored fold 0 perfectly.
    assert np.mean((scores[:2] > result.best_threshold) == issame[:2]) == 1.0


def test_exact_scan_matches_brute_force_and_fixed_grid_is_supported():
    rng = np.random.default_rng(2)
    scores = np.round(rng.normal(size=200), 1)  # many ties
    issame = rng.random(200) < 0.5
    candidates = candidate_thresholds(scores)
    fast = accuracies_at_thresholds(scores, issame, candidates)
    slow = np.array([np.mean((scores > t) == issame) for t in candidates])
    assert np.allclose(fast, slow)
    # No threshold at all beats the exact scan.
    dense = np.linspace(scores.min() - 1, scores.max() + 1, 5001)
    assert fast.max() >= max(np.mean((scores > t) == issame) for t in dense)

    grid = np.arange(-1.0, 1.0, 0.01)
    t = best_threshold(scores, issame, grid)
    assert t in grid
    result = verification_accuracy(scores, issame, thresholds=grid)
    assert all(ft in grid for ft in result.fold_thresholds)


def test_bad_inputs():
    with pytest.raises(ValueError):
        verification_accuracy(np.array([0.1, np.nan] * 10), np.array([True, False] * 10))
    with pytest.raises(ValueError):
        pair_similarities(np.zeros((3, 4)))
    with pytest.raises(CdfaceError, match="needs at least 10 pairs"):  # the CLI's one line, not a traceback
        kfold_indices(5, 10)
