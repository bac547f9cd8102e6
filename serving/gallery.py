"""The gallery: the store of record plus the FAISS index derived from it, kept in step on every write.

Ordering rules that make the guarantees hold:

- enrol: the store commits first, then the vectors enter the index, then the caller is answered.
  A crash between the two loses nothing: the index is rebuilt from the store at start.
- delete: the store commits first, then the vectors leave the index, then the caller is answered;
  a search that runs after the answer cannot see the face. A search racing the delete may still
  hit the id in the index, so search results are filtered through the in-memory face -> identity
  map, which loses the face under the same lock as the index.

Several replicas on one PostgreSQL store: each follows the store's change log (``sync``, driven by
a ``Follower`` thread) so writes made through another replica reach this index. ``applied_seq`` is
the watermark: every change up to it is in the index. Applying a change is idempotent (a face is
added only if absent, re-read from the store), so replaying this replica's own writes is harmless.
Local writes and sync take one write lock, so a sync that read a face cannot re-add it after a
local delete finished.

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

from cdface.core.matching import cosine
from cdface.serving.index import FaceIndex, IndexSpec
from cdface.serving.store import NO_ACTOR, Actor, Face, GalleryStore, Identity, ModelKey, NewFace

log = logging.getLogger("cdface.serving.gallery")


@dataclass(frozen=True)
class Candidate:
    identity_id: str
    face_id: int
    similarity: float


@dataclass(frozen=True)
class SyncLag:
    """How far a replica may be behind its shared store."""

    applied_seq: int  # every change up to here is in the index
    store_seq: int  # the store's newest change
    behind: int
    seconds_since_sync: float | None


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
        self._write_lock = threading.Lock()  # orders local writes against sync (see the module docstring)
        self.loaded = False
        self.load_seconds = 0.0
        self.applied_seq = 0  # every change up to here is in the index
        self.last_sync: float | None = None  # time.monotonic() of the last successful sync

    def load(self) -> None:
        """(Re)build the index from the store: every face the served model made."""
        started = time.perf_counter()
        with self._write_lock:
            # The watermark first: changes committed while loading are replayed by sync (idempotent).
            seq = self.store.last_seq()
            ids, identities, vectors = self.store.load_embeddings(self.model, self.dim)
            with self._lock:
                self.index.build(ids, vectors)
                self._owner = dict(zip(ids.tolist(), identities))
            self.applied_seq, self.last_sync = seq, time.monotonic()
        self.load_seconds = time.perf_counter() - started
        self.loaded = True
        log.info("gallery loaded: %d faces of %s in %.2f s (%s index)", len(ids), self.model, self.load_seconds,
                 self.index.kind)

    # -- writes ---------------------------------------------------------------------------------

    def enroll(self, identity_id: str, embeddings: np.ndarray, crops: Sequence[bytes | None],
               boxes: Sequence[list[float] | None], qualities: Sequence[dict[str, float]],
               actor: Actor = NO_ACTOR) -> list[Face]:
        faces = [NewFace(e, self.model, c, b, q) for e, c, b, q in zip(embeddings, crops, boxes, qualities)]
        with self._write_lock:
            stored = self.store.add_faces(identity_id, faces, actor)  # one transaction, durable on return
            self._add([f.id for f in stored], [identity_id] * len(stored), np.asarray(embeddings, np.float32))
        return stored

    def create_identity(self, external_id: str | None, name: str | None, metadata: dict[str, Any],
                        embeddings: np.ndarray, crops: Sequence[bytes | None], boxes: Sequence[list[float] | None],
                        qualities: Sequence[dict[str, float]], actor: Actor = NO_ACTOR) -> tuple[Identity, list[Face]]:
        """Create an identity with its faces in one transaction (a crash leaves neither); searchable on return."""
        faces = [NewFace(e, self.model, c, b, q) for e, c, b, q in zip(embeddings, crops, boxes, qualities)]
        with self._write_lock:
            identity, stored = self.store.create_identity_with_faces(external_id, name, metadata, faces, actor)
            self._add([f.id for f in stored], [identity.id] * len(stored), np.asarray(embeddings, np.float32))
        return identity, stored

    def delete_face(self, identity_id: str, face_id: int, actor: Actor = NO_ACTOR) -> None:
        with self._write_lock:
            self.store.delete_face(identity_id, face_id, actor)
            self._forget([face_id])

    def delete_identity(self, identity_id: str, actor: Actor = NO_ACTOR) -> list[int]:
        with self._write_lock:
            face_ids = self.store.delete_identity(identity_id, actor)
            self._forget(face_ids)
        return face_ids

    def _add(self, face_ids: Sequence[int], identities: Sequence[str], vectors: np.ndarray) -> None:
        with self._lock:
            fresh = [i for i, face_id in enumerate(face_ids) if face_id not in self._owner]
            if not fresh:
                return
            self.index.add(np.asarray([face_ids[i] for i in fresh], np.int64), vectors[fresh])
            for i in fresh:
                self._owner[face_ids[i]] = identities[i]

    # -- following the change log (several replicas) --------------------------------------------

    def sync(self, batch: int = 1000) -> int:
        """Apply every change after ``applied_seq``; return how many were read."""
        total = 0
        with self._write_lock:
            while True:
                changes = self.store.changes_since(self.applied_seq, batch)
                if not changes:
                    break
                # Net effect per face, in log order: the face's last change decides.
                last: dict[int, str] = {}
                for change in changes:
                    if change.face_id is not None and change.op.startswith("face."):
                        last[change.face_id] = change.op
                gone = [f for f, op in last.items() if op in ("face.delete", "face.reembed") and f in self._owner]
                wanted = [f for f, op in last.items() if op in ("face.add", "face.reembed")]
                self._forget(gone)  # a re-embedded face leaves, then returns with its new vector
                if wanted:
                    # Re-read from the store: a face deleted or re-embedded by a later change (not in
                    # this batch yet) is simply absent, and that later change is applied next.
                    ids, identities, vectors = self.store.embeddings_of(wanted, self.model, self.dim)
                    self._add(ids.tolist(), identities, vectors)
                self.applied_seq = changes[-1].seq
                total += len(changes)
                if len(changes) < batch:
                    break
            self.last_sync = time.monotonic()
        return total

    def lag(self) -> SyncLag:
        """How far this replica may be behind the store: changes not yet applied, seconds since a sync."""
        latest = self.store.last_seq()
        return SyncLag(self.applied_seq, latest, max(0, latest - self.applied_seq),
                       None if self.last_sync is None else round(time.monotonic() - self.last_sync, 3))

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
                        best[identity_id] = Candidate(identity_id, face_id, cosine(score))
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


class Follower:
    """A thread that keeps a gallery in step with a shared store: woken by ``store.wait_for_change``
    (NOTIFY on PostgreSQL), else every ``poll_s``.

    The notification only wakes it; what it applies comes from the change log, so a missed
    notification (or a database restart) delays a change by at most one poll interval.
    """

    def __init__(self, gallery: Gallery, poll_s: float) -> None:
        self.gallery = gallery
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cdface-gallery-follower", daemon=True)
        self.errors = 0

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.gallery.store.wait_for_change(self.poll_s)
                if self._stop.is_set():
                    break
                self.gallery.sync()
            except Exception as exc:  # the database is away: report, back off, keep following
                self.errors += 1
                log.warning("gallery sync failed (%s); retrying in %.1f s", exc, self.poll_s)
                self._stop.wait(self.poll_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.poll_s + 5)
