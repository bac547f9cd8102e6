"""10-fold verification accuracy (the LFW protocol, as used for LFW, CFP-FP and AgeDB-30 ``.bin`` files).

The pairs are split into 10 contiguous folds (insightface's ``KFold(n_splits=10, shuffle=False)``). For each
fold the threshold is chosen on the other 9 folds only, then accuracy is measured on the held-out fold. The
reported accuracy is the mean (and std) over the 10 held-out folds.

Scores are similarities (cosine similarity of normalised embeddings): a pair is declared "same" when
``score > threshold``. To evaluate distances, pass ``-distance``.

Unlike insightface, which scans a fixed grid of distance thresholds (step 0.01), the default scan here is
exact: every threshold that separates two distinct training scores is tried (the midpoints between
consecutive distinct scores, plus "accept all" and "reject all"), so the result does not depend on a grid
step. A fixed grid can still be passed as ``thresholds``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cdface.core.errors import CdfaceError
from cdface.core.matching import is_match


@dataclass
class VerificationResult:
    accuracy: float                 # mean held-out accuracy over the folds
    accuracy_std: float
    fold_accuracies: list[float]
    fold_thresholds: list[float]    # the threshold each fold chose on its training folds
    best_threshold: float           # the threshold that is best over all pairs (for reporting and plots)
    scores: np.ndarray = field(repr=False)   # float [P] similarity of every pair
    issame: np.ndarray = field(repr=False)   # bool [P]

    def summary(self) -> dict[str, Any]:
        """The JSON-safe part (no score arrays)."""
        return {
            "accuracy": self.accuracy,
            "accuracy_std": self.accuracy_std,
            "fold_accuracies": self.fold_accuracies,
            "fold_thresholds": self.fold_thresholds,
            "best_threshold": self.best_threshold,
        }


def kfold_indices(num_pairs: int, num_folds: int = 10) -> list[tuple[np.ndarray, np.ndarray]]:
    """Contiguous folds without shuffling: the first ``num_pairs % num_folds`` folds get one extra pair.

    Same split as sklearn's ``KFold(n_splits, shuffle=False)`` that insightface uses. Returns
    ``[(train_indices, test_indices), ...]``.
    """
    if num_folds < 2:
        raise ValueError("need at least 2 folds")
    if num_pairs < num_folds:
        raise CdfaceError(f"{num_pairs} pairs cannot be split into {num_folds} folds: a verification set needs "
                          f"at least {num_folds} pairs")
    sizes = np.full(num_folds, num_pairs // num_folds, dtype=np.int64)
    sizes[: num_pairs % num_folds] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    all_indices = np.arange(num_pairs)
    folds = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        test = all_indices[start:stop]
        train = np.concatenate([all_indices[:start], all_indices[stop:]])
        folds.append((train, test))
    return folds


def candidate_thresholds(scores: np.ndarray) -> np.ndarray:
    """Every threshold that gives a different decision on ``scores`` (with the rule ``score > threshold``).

    Midpoints between consecutive distinct scores, one value below the minimum (accept everything) and the
    maximum itself (reject everything). Midpoints rather than the scores themselves, so a chosen threshold
    sits in the gap between the training scores and is not tied with any of them.
    """
    distinct = np.unique(scores.astype(np.float64))
    below_all = np.nextafter(distinct[0], -np.inf)
    midpoints = (distinct[:-1] + distinct[1:]) / 2.0
    return np.concatenate([[below_all], midpoints, [distinct[-1]]])


def accuracies_at_thresholds(scores: np.ndarray, issame: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Accuracy of ``score > t`` for every ``t`` in ``thresholds``, in O((P + T) log P)."""
    scores = scores.astype(np.float64)
    positive = np.sort(scores[issame])
    negative = np.sort(scores[~issame])
    # positives accepted: score > t  ->  count - (number <= t); negatives rejected: score <= t.
    true_accepts = positive.size - np.searchsorted(positive, thresholds, side="right")
    true_rejects = np.searchsorted(negative, thresholds, side="right")
    return (true_accepts + true_rejects) / scores.size


def accuracy_at_threshold(scores: np.ndarray, issame: np.ndarray, threshold: float) -> float:
    return float(np.mean(is_match(scores, threshold) == issame))


def best_threshold(scores: np.ndarray, issame: np.ndarray, thresholds: np.ndarray | None = None) -> float:
    """The threshold with the highest accuracy on these pairs; ties go to the lowest threshold."""
    if thresholds is None:
        thresholds = candidate_thresholds(scores)
    accuracies = accuracies_at_thresholds(scores, issame, np.asarray(thresholds, dtype=np.float64))
    return float(thresholds[int(np.argmax(accuracies))])  # argmax returns the first (lowest) maximum


def verification_accuracy(
    scores: np.ndarray,
    issame: np.ndarray,
    num_folds: int = 10,
    thresholds: np.ndarray | None = None,
) -> VerificationResult:
    """k-fold verification accuracy of similarity ``scores`` with ground truth ``issame``.

    ``thresholds``: a fixed grid to scan (insightface style); default: the exact scan of each training
    split's own candidate thresholds.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    issame = np.asarray(issame, dtype=bool).reshape(-1)
    if scores.shape != issame.shape:
        raise ValueError(f"{scores.size} scores but {issame.size} labels")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or infinity (did the model produce NaN embeddings?)")

    fold_accuracies, fold_thresholds = [], []
    for train, test in kfold_indices(scores.size, num_folds):
        # The threshold is chosen from the training folds alone; the test fold is only measured.
        threshold = best_threshold(scores[train], issame[train], thresholds)
        fold_thresholds.append(threshold)
        fold_accuracies.append(accuracy_at_threshold(scores[test], issame[test], threshold))

    return VerificationResult(
        accuracy=float(np.mean(fold_accuracies)),
        accuracy_std=float(np.std(fold_accuracies)),
        fold_accuracies=[float(a) for a in fold_accuracies],
        fold_thresholds=[float(t) for t in fold_thresholds],
        best_threshold=best_threshold(scores, issame, thresholds),
        scores=scores,
        issame=issame,
    )


def pair_similarities(embeddings: np.ndarray) -> np.ndarray:
    """Cosine similarity of consecutive rows (0,1), (2,3), ...: the ``.bin`` layout of 2P images for P pairs."""
    if embeddings.shape[0] % 2:
        raise ValueError("a verification set has an even number of images (two per pair)")
    normalised = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    return np.sum(normalised[0::2] * normalised[1::2], axis=1)


def evaluate_bin(
    embedder,
    bin_path: str | os.PathLike,
    flip: bool = True,
    batch_size: int = 64,
    progress: bool = False,
) -> dict[str, Any]:
    """Verification report for one ``.bin`` benchmark (LFW, CFP-FP, AgeDB-30, ...).

    Returns a dict: ``dataset``, ``pairs``, ``flip``, the fields of ``VerificationResult.summary()``,
    ``tar_at_far`` (JSON-safe, see ``roc.tar_at_far_summary``), and the raw arrays ``scores`` and ``issame``
    for plots (not JSON-safe; ``report.py`` leaves them out).
    """
    from cdface.training.data.binfile import decode_bin_images
    from cdface.training.evaluation.embedders import embed_images
    from cdface.training.evaluation.roc import scores_by_label, tar_at_far, tar_at_far_summary

    bin_path = Path(bin_path)
    if not bin_path.is_file():
        raise CdfaceError(f"verification file not found: {bin_path}")
    images, issame = decode_bin_images(bin_path)  # validates the file; raises CdfaceError

    dataset = bin_path.stem
    embeddings = embed_images(embedder, images, flip=flip, batch_size=batch_size,
                              progress=dataset if progress else None)
    scores = pair_similarities(embeddings)
    result = verification_accuracy(scores, issame)
    genuine, impostor = scores_by_label(scores, issame)
    return {
        "dataset": dataset,
        "pairs": int(issame.size),
        "flip": flip,
        **result.summary(),
        "tar_at_far": tar_at_far_summary(tar_at_far(genuine, impostor)),
        "scores": result.scores,
        "issame": result.issame,
    }
