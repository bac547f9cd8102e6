"""Gallery maintenance from the command line: what the store holds, and re-embedding after a model change."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cdface.core.imaging import decode_image
from cdface.serving.store import GalleryStore, ModelKey
from cdface.serving.triton import TritonEmbedder
from cdface.serving.usecases.images import embed_crops


@dataclass(frozen=True)
class Census:
    faces_by_model: dict[str, int]
    last_change: int  # the change log's newest seq


def census(store: GalleryStore) -> Census:
    return Census({str(k): v for k, v in store.count_faces_by_model().items()}, store.last_seq())


@dataclass(frozen=True)
class Reembedded:
    model: str
    reembedded: int
    need_reenrolment: int  # faces of other models left: enrolled without a retained crop


async def reembed(store: GalleryStore, embedder: TritonEmbedder, target: ModelKey, batch: int = 32) -> Reembedded:
    """Recompute every face made by another model from its retained crop, with ``target`` (``embedder``'s model).

    Each batch is one store transaction; gateways following the change log pick the new embeddings up.
    """
    done = 0
    pending = list(store.faces_to_reembed(target))
    for i in range(0, len(pending), batch):
        chunk = pending[i:i + batch]
        crops = np.stack([decode_image(png, what=f"retained crop of face {face_id}") for face_id, png in chunk])
        vectors = await embed_crops(embedder, crops)
        done += store.replace_embeddings([(face_id, v) for (face_id, _), v in zip(chunk, vectors)], target)
    left = sum(n for model, n in store.count_faces_by_model().items() if model != target)
    return Reembedded(str(target), done, left)
