"""1:N identification on a folder of identities: ``root/<identity>/*.jpg`` (aligned 112x112 crops).

The first image (sorted by name) of each identity is enrolled in the gallery; every other image is a probe
searched against the whole gallery. Identities with a single image still enter the gallery, as distractors.
Rank-k accuracy is the fraction of probes whose true identity is among the k most similar gallery entries;
a gallery entry tied with the true one counts against the probe (the pessimistic convention), so a model
that maps everything to one point scores 0 rather than 100%.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from cdface.core.errors import CdfaceError


def read_identity_folders(root: str | os.PathLike) -> tuple[list[str], list[list[Path]]]:
    """(identity names, each identity's sorted image paths); identities without images are skipped."""
    from cdface.training.evaluation.embedders import list_images

    root = Path(root)
    if not root.is_dir():
        raise CdfaceError(f"identity folder not found: {root}")
    names, images = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = list_images(folder)
        if files:
            names.append(folder.name)
            images.append(files)
    if not names:
        raise CdfaceError(f"{root} has no identity folders with images (expected root/<identity>/*.jpg)")
    return names, images


def true_match_ranks(similarities: np.ndarray, true_columns: np.ndarray) -> np.ndarray:
    """1-based rank of the true gallery entry for each probe row (ties count against the probe)."""
    true_scores = similarities[np.arange(similarities.shape[0]), true_columns]
    return np.sum(similarities >= true_scores[:, None], axis=1)


def evaluate_rank(
    embedder,
    root: str | os.PathLike,
    flip: bool = True,
    batch_size: int = 64,
    ranks: tuple[int, ...] = (1, 5),
    progress: bool = False,
) -> dict[str, Any]:
    """Rank-k identification accuracy with one gallery image per identity."""
    from cdface.training.evaluation.embedders import embed_files

    names, images = read_identity_folders(root)
    gallery_paths = [files[0] for files in images]
    probe_paths = [p for files in images for p in files[1:]]
    probe_identity = np.array([i for i, files in enumerate(images) for _ in files[1:]], dtype=np.int64)
    if not probe_paths:
        raise CdfaceError(f"{root}: no identity has a second image to use as a probe")

    embeddings = embed_files(embedder, gallery_paths + probe_paths, flip=flip, batch_size=batch_size,
                             progress="rank" if progress else None)
    gallery, probes = embeddings[: len(gallery_paths)], embeddings[len(gallery_paths) :]
    similarities = probes.astype(np.float64) @ gallery.astype(np.float64).T
    match_ranks = true_match_ranks(similarities, probe_identity)
    return {
        "dataset": Path(root).name,
        "identities": len(names),
        "probes": len(probe_paths),
        "flip": flip,
        **{f"rank{k}": float(np.mean(match_ranks <= k)) for k in ranks},
    }
