"""Gallery maintenance from the command line: what the store holds, and re-embedding for another model."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from cdface.core.imaging import decode_image
from cdface.serving.store import GalleryStore, ModelKey
from cdface.serving.triton import TritonEmbedder
from cdface.serving.usecases.images import embed_crops


@dataclass(frozen=True)
class Census:
    faces_total: int
    faces_by_model: dict[str, int]  # faces each model has embedded ("name:version"; a face counts under each)
    active: str | None  # the model pointer (Triton "name:version")
    candidate: str | None
    previous: str | None
    promoted: str | None  # when the active model last changed (UTC ISO)
    last_change: int  # the change log's newest seq


def census(store: GalleryStore) -> Census:
    state = store.model_state()
    by_model = {str(model): n for model, n in store.count_faces_by_model().items()}
    return Census(store.count_faces(), dict(sorted(by_model.items())), _text(state.active), _text(state.candidate),
                  _text(state.previous), state.promoted, store.last_seq())


def _text(model: ModelKey | None) -> str | None:
    return None if model is None else str(model)


@dataclass(frozen=True)
class Reembedded:
    model: str  # the embeddings' model (the manifest's "name:version")
    reembedded: int  # embeddings this run added
    need_reenrolment: int  # faces still without the model's embedding and without a retained crop
    coverage: float  # faces the model has embedded / faces in the gallery (1.0 for an empty gallery)
    faces_total: int


async def reembed(store: GalleryStore, embedder: TritonEmbedder, target_key: ModelKey, batch: int = 32,
                  progress: bool = True) -> Reembedded:
    """Embed, with ``embedder`` (whose model's embeddings are keyed ``target_key``), every face's retained crop
    that ``target_key`` has not embedded yet; the faces' other embeddings stay as they are.

    Streams: one page of ``batch`` crops at a time from the store (``faces_to_reembed``), one Triton call and
    one store transaction (``add_embeddings``) per page, so memory does not grow with the gallery. A run that
    stops (killed, Triton down) keeps every page it committed; the next run finds only the faces still
    missing, and a face embedded meanwhile by a gateway keeps that embedding (inserts are idempotent).
    ``progress``: a bar on stderr with faces/s and the time left.
    """
    done, cursor = 0, 0
    with tqdm(total=store.faces_missing(target_key)[0], unit="face", desc=f"re-embedding for {target_key}",
              file=sys.stderr, disable=not progress, dynamic_ncols=True) as bar:
        while page := store.faces_to_reembed(target_key, after=cursor, limit=batch):
            crops = np.stack([decode_image(png, what=f"the retained crop of face {face_id}") for face_id, png in page])
            vectors = await embed_crops(embedder, crops)
            done += store.add_embeddings([(face_id, v) for (face_id, _), v in zip(page, vectors)], target_key)
            cursor = page[-1][0]
            bar.update(len(page))
    total = store.count_faces()
    covered = store.count_faces_by_model().get(target_key, 0)
    return Reembedded(str(target_key), done, store.faces_missing(target_key)[1],
                      covered / total if total else 1.0, total)
