"""The gallery: the store of record plus the FAISS index derived from it, kept in step on every write.

Ordering rules that make the guarantees hold:

- enrol: the store commits first, then the vectors enter the index, then the caller is answered.
  A crash between the two loses nothing: the index is rebuilt from the store at start.
- delete: the store commits first, then the vectors leave the index, then the caller is answered;
  a search that runs after the answer cannot see the face. A search racing the delete may still
  hit the id in the index, so search results are filtered through the in-memory face -> identity
  map, which loses the face under the same lock as the index.

Only the served model's embeddings are indexed; faces made by another model are counted as
needing re-enrolment (or ``cdface gallery reembed`` from their retained crops).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from serving.index import FaceIndex, IndexSpec
from serving.store import Face, GalleryStore, ModelKey, NewFace

log = logging.getLogger("cdface.serving.gallery")


@dataclass(frozen=True)
class Candidate:
    identity_id: str
    face_id: int
    similarity: float


@dataclass(frozen=True)
class GalleryStatus:
    model: str
    faces_indexed: int
    faces_other_models: dict[str, int]
    index_kind: str
    on_gpu: bool
    loaded_in_s: float


class Gallery:
    def __init__(self, store: GalleryStore, model: ModelKey, dim: int, spec: IndexSpec = IndexSpec()) -> None:
        self.store = store
        self.model = model
        self.dim = dim
        self.index = FaceIndex(dim, spec)
        self._owner: dict[int, str] = {}  # face id -> identity id, for indexed faces
        self._lock = threading.RLock()  # orders index + owner-map updates
        self.loaded = False
        self.load_seconds = 0.0

    def load(self) -> None:
        """(Re)build the index from the store: every face the served model made."""
        started = time.perf_counter()
        ids, identities, vectors = self.store.load_embeddings(self.model, self.dim)
        with self._lock:
            self.index.build(ids, vectors)
            self._owner = dict(zip(ids.tolist(), identities))
        self.load_seconds = time.perf_counter() - started
        self.loaded = True
        log.info("gallery loaded: %d faces of %s in %.2f s (%s index)", len(ids), self.model, self.load_seconds,
                 self.index.kind)

    # -- writes ---------------------------------------------------------------------------------

    def enroll(self, identity_id: str, embeddings: np.ndarray, crops: Sequence[bytes | None],
               boxes: Sequence[list[float] | None], qualities: Sequence[dict[str, float]]) -> list[Face]:
        faces = [NewFace(e, self.model, c, b, q) for e, c, b, q in zip(embeddings, crops, boxes, qualities)]
        stored = self.store.add_faces(identity_id, faces)  # one transaction, durable on return
        with self._lock:
            self.index.add(np.array([f.id for f in stored], np.int64), np.asarray(embeddings, np.float32))
            for f in stored:
                self._owner[f.id] = identity_id
        return stored

    def delete_face(self, identity_id: str, face_id: int) -> None:
        self.store.delete_face(identity_id, face_id)
        self._forget([face_id])

    def delete_identity(self, identity_id: str) -> list[int]:
        face_ids = self.store.delete_identity(identity_id)
        self._forget(face_ids)
        return face_ids

    def _forget(self, face_ids: Sequence[int]) -> None:
        with self._lock:
            for face_id in face_ids:
                self._owner.pop(face_id, None)
            self.index.remove(np.asarray(face_ids, np.int64))

    # -- reads ----------------------------------------------------------------------------------

    def search(self, queries: np.ndarray, top_k: int) -> list[list[Candidate]]:
        """Per query, the ``top_k`` best identities (an identity scores as its best face)."""
        queries = np.asarray(queries, np.float32).reshape(-1, self.dim)
        # Several faces may belong to one identity: look deeper than top_k faces, then group.
        depth = top_k * 4 + 16
        scores, ids = self.index.search(queries, depth)
        out = []
        with self._lock:
            owner = self._owner
            for row_scores, row_ids in zip(scores, ids):
                best: dict[str, Candidate] = {}
                for score, face_id in zip(row_scores.tolist(), row_ids.tolist()):
                    identity_id = owner.get(face_id) if face_id >= 0 else None
                    if identity_id is None:  # padding, or deleted while this search ran
                        continue
                    if identity_id not in best:
                        best[identity_id] = Candidate(identity_id, face_id, float(score))
                out.append(sorted(best.values(), key=lambda c: -c.similarity)[:top_k])
        return out

    def identity_embeddings(self, identity_id: str) -> np.ndarray:
        return self.store.face_embeddings(identity_id, self.model)

    def status(self) -> GalleryStatus:
        counts = self.store.count_faces_by_model()
        others = {str(k): v for k, v in counts.items() if k != self.model}
        return GalleryStatus(str(self.model), len(self.index), others, self.index.kind, self.index.on_gpu,
                             round(self.load_seconds, 3))

    def check(self) -> dict[str, Any]:
        """Compare the index with the store: the face ids must be the same sets."""
        store_ids, _, _ = self.store.load_embeddings(self.model, self.dim)
        with self._lock:
            index_ids = self.index.ids()
            owner_ids = np.sort(np.fromiter(self._owner.keys(), np.int64, len(self._owner)))
        store_ids = np.sort(store_ids)
        missing = np.setdiff1d(store_ids, index_ids)
        extra = np.setdiff1d(index_ids, store_ids)
        return {"consistent": bool(len(missing) == 0 and len(extra) == 0 and np.array_equal(owner_ids, index_ids)),
                "store_faces": int(len(store_ids)), "index_faces": int(len(index_ids)),
                "missing_from_index": missing[:20].tolist(), "extra_in_index": extra[:20].tolist()}
