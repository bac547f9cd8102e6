"""IJB-B / IJB-C style 1:1 template verification.

A *template* is a set of images (stills and video frames) of one subject; images from the same *media*
(one video, or one still) are near-duplicates. Following the IJB protocol as insightface evaluates it, a
template's embedding is the average of its images within each media, then the average of those media
embeddings, L2-normalised; so a 200-frame video counts as much as one photo. Template pairs are scored by
cosine similarity and summarised as TAR@FAR.

Meta files (the layout IJB ships, whitespace separated):

    <prefix>_face_tid_mid.txt        image_name template_id media_id
    <prefix>_template_pair_label.txt template_id_1 template_id_2 label(1 = same subject)

Images are assumed to be aligned 112x112 crops in one folder, named as in the first file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from cdface.core.errors import CdfaceError


def _read_columns(path: str | os.PathLike, expected: int, what: str) -> list[list[str]]:
    path = Path(path)
    if not path.is_file():
        raise CdfaceError(f"{what} file not found: {path}")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < expected:
            raise CdfaceError(f"{path}:{number}: expected {expected} columns ({what}), got {len(fields)}")
        rows.append(fields[:expected])
    if not rows:
        raise CdfaceError(f"{path} is empty")
    return rows


def read_face_tid_mid(path: str | os.PathLike) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``image_name template_id media_id`` lines -> (image names, template ids, media ids)."""
    rows = _read_columns(path, 3, "image template media")
    try:
        templates = np.array([int(r[1]) for r in rows], dtype=np.int64)
        medias = np.array([int(r[2]) for r in rows], dtype=np.int64)
    except ValueError:
        raise CdfaceError(f"{path}: template and media ids must be integers") from None
    return [r[0] for r in rows], templates, medias


def read_template_pairs(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``t1 t2 label`` lines -> (t1, t2, labels as bool)."""
    rows = _read_columns(path, 3, "template pair label")
    try:
        table = np.array([[int(v) for v in r] for r in rows], dtype=np.int64)
    except ValueError:
        raise CdfaceError(f"{path}: template ids and labels must be integers") from None
    return table[:, 0], table[:, 1], table[:, 2].astype(bool)


def _group_mean(values: np.ndarray, group_index: np.ndarray, num_groups: int) -> np.ndarray:
    sums = np.zeros((num_groups, values.shape[1]), dtype=np.float64)
    np.add.at(sums, group_index, values)
    counts = np.bincount(group_index, minlength=num_groups).astype(np.float64)
    return sums / counts[:, None]


def pool_templates(
    embeddings: np.ndarray, template_ids: np.ndarray, media_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-image embeddings -> (sorted unique template ids, L2-normalised template embeddings).

    Mean within each (template, media), then mean over the template's media, then L2 normalisation.
    """
    embeddings = np.asarray(embeddings, dtype=np.float64)
    template_ids = np.asarray(template_ids).reshape(-1)
    media_ids = np.asarray(media_ids).reshape(-1)
    if not (embeddings.shape[0] == template_ids.size == media_ids.size):
        raise ValueError("one template id and one media id per embedding")

    # A media id can in principle appear in several templates: group by the (template, media) pair.
    pairs = np.stack([template_ids, media_ids], axis=1)
    unique_pairs, pair_index = np.unique(pairs, axis=0, return_inverse=True)
    media_embeddings = _group_mean(embeddings, pair_index.reshape(-1), len(unique_pairs))

    unique_templates, template_index = np.unique(unique_pairs[:, 0], return_inverse=True)
    template_embeddings = _group_mean(media_embeddings, template_index.reshape(-1), len(unique_templates))
    norms = np.maximum(np.linalg.norm(template_embeddings, axis=1, keepdims=True), 1e-12)
    return unique_templates, (template_embeddings / norms).astype(np.float32)


def template_pair_scores(
    template_ids: np.ndarray, template_embeddings: np.ndarray, t1: np.ndarray, t2: np.ndarray
) -> np.ndarray:
    """Cosine similarity of each (t1, t2) pair; ``template_ids`` sorted, as ``pool_templates`` returns them."""
    def rows_of(ids: np.ndarray) -> np.ndarray:
        rows = np.searchsorted(template_ids, ids)
        rows = np.clip(rows, 0, len(template_ids) - 1)
        missing = template_ids[rows] != ids
        if np.any(missing):
            raise CdfaceError(f"pair list names template {int(ids[missing][0])}, which has no images")
        return rows

    a = template_embeddings[rows_of(np.asarray(t1))]
    b = template_embeddings[rows_of(np.asarray(t2))]
    return np.sum(a.astype(np.float64) * b, axis=1)


def evaluate_ijb(
    embedder,
    images_dir: str | os.PathLike,
    meta_path: str | os.PathLike,
    pairs_path: str | os.PathLike,
    flip: bool = True,
    batch_size: int = 64,
    progress: bool = False,
    dataset: str | None = None,
) -> dict[str, Any]:
    """1:1 template verification report: ``dataset``, counts, ``tar_at_far``, and raw ``scores``/``labels``."""
    from cdface.training.evaluation.embedders import embed_files
    from cdface.training.evaluation.roc import scores_by_label, tar_at_far, tar_at_far_summary

    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise CdfaceError(f"image folder not found: {images_dir}")
    names, template_ids, media_ids = read_face_tid_mid(meta_path)
    t1, t2, labels = read_template_pairs(pairs_path)
    if labels.all() or not labels.any():
        raise CdfaceError(f"{pairs_path} needs both genuine (1) and impostor (0) pairs")

    dataset = dataset or Path(meta_path).name.replace("_face_tid_mid.txt", "")
    embeddings = embed_files(embedder, [images_dir / n for n in names], flip=flip, batch_size=batch_size,
                             progress=dataset if progress else None)
    unique_templates, template_embeddings = pool_templates(embeddings, template_ids, media_ids)
    scores = template_pair_scores(unique_templates, template_embeddings, t1, t2)
    genuine, impostor = scores_by_label(scores, labels)
    return {
        "dataset": dataset,
        "images": len(names),
        "templates": int(len(unique_templates)),
        "pairs": int(labels.size),
        "flip": flip,
        "tar_at_far": tar_at_far_summary(tar_at_far(genuine, impostor)),
        "scores": scores,
        "issame": labels,
    }
