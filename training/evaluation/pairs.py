"""Verification on a user's own pairs: a CSV of ``path1,path2,label`` over aligned 112x112 crops.

``label`` is 1 (same person) or 0 (different); relative paths are resolved against the CSV's folder; a
header line (``path1,path2,label``) is optional. Reports k-fold accuracy (10 folds, fewer for tiny files)
and TAR@FAR.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import numpy as np

from cdface.core.errors import CdfaceError

_TRUE = {"1", "true", "same", "yes"}
_FALSE = {"0", "false", "different", "no"}


def read_pairs_csv(csv_path: str | os.PathLike) -> tuple[list[Path], list[Path], np.ndarray]:
    """(first paths, second paths, labels as bool)."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise CdfaceError(f"pairs file not found: {csv_path}")
    base = csv_path.parent
    first, second, labels = [], [], []
    with open(csv_path, newline="") as f:
        for number, row in enumerate(csv.reader(f), start=1):
            row = [field.strip() for field in row]
            if not row or not any(row) or row[0].startswith("#"):
                continue
            if len(row) != 3:
                raise CdfaceError(f"{csv_path}:{number}: expected path1,path2,label, got {len(row)} fields")
            label = row[2].lower()
            if label not in _TRUE | _FALSE:
                if number == 1:
                    continue  # a header line
                raise CdfaceError(f"{csv_path}:{number}: label must be 1 or 0, got {row[2]!r}")
            first.append(base / row[0])
            second.append(base / row[1])
            labels.append(label in _TRUE)
    if not labels:
        raise CdfaceError(f"{csv_path} lists no pairs")
    return first, second, np.array(labels, dtype=bool)


def evaluate_pairs(
    embedder,
    csv_path: str | os.PathLike,
    flip: bool = True,
    batch_size: int = 64,
    progress: bool = False,
) -> dict[str, Any]:
    """Accuracy (k-fold) and TAR@FAR for the pairs in ``csv_path``; raw ``scores``/``issame`` for plots."""
    from cdface.training.evaluation.embedders import embed_files
    from cdface.training.evaluation.roc import scores_by_label, tar_at_far, tar_at_far_summary
    from cdface.training.evaluation.verification import verification_accuracy

    first, second, labels = read_pairs_csv(csv_path)
    if labels.all() or not labels.any():
        raise CdfaceError(f"{csv_path} needs both same (1) and different (0) pairs")
    if labels.size < 2:
        raise CdfaceError(f"{csv_path} needs at least 2 pairs")

    # Each distinct image is embedded once, however many pairs it appears in.
    unique_paths = sorted(set(first) | set(second))
    row_of = {path: row for row, path in enumerate(unique_paths)}
    embeddings = embed_files(embedder, unique_paths, flip=flip, batch_size=batch_size,
                             progress="pairs" if progress else None)
    a = embeddings[[row_of[p] for p in first]]
    b = embeddings[[row_of[p] for p in second]]
    scores = np.sum(a.astype(np.float64) * b, axis=1)

    result = verification_accuracy(scores, labels, num_folds=min(10, labels.size))
    genuine, impostor = scores_by_label(scores, labels)
    return {
        "dataset": Path(csv_path).stem,
        "pairs": int(labels.size),
        "images": len(unique_paths),
        "flip": flip,
        **result.summary(),
        "tar_at_far": tar_at_far_summary(tar_at_far(genuine, impostor)),
        "scores": result.scores,
        "issame": result.issame,
    }
