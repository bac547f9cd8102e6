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

A gallery indexes one model's embeddings (a face has one per model, side by side). A gateway holds
one gallery per model it may answer with (the active model, a candidate being shadowed, the previous
one kept for a rollback); they share one write lock, and a write that reaches several models
(``also``) changes their indexes together.

Tenants (``cdface.serving.store.base``): each tenant's faces are in an index of their own, made on
first use, so an identification searches only the caller's tenant and can never rank another
tenant's face, whatever the scores. Every face is routed to its tenant's index by the tenant the
store gives with it (load, enrolment, sync), and the owner map (face -> tenant, identity) is
checked again on every hit.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from cdface.core.matching import cosine
from cdface.serving.index import FaceIndex, IndexSpec, gpu_available
from cdface.serving.store import DEFAULT_TENANT, NO_ACTOR, Actor, Face, GalleryStore, Identity, ModelKey, NewFace

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
    faces_other_models: dict[str, int]  # faces embedded by each other model (beside the served one's, or alone)
    faces_not_searchable: int  # faces without the served model's embedding: re-embed or re-enrol them
    index_kind: str
    on_gpu: bool
    loaded_in_s: float


Owner = tuple[str, str]
"""(tenant, identity id) of an indexed face."""
Mirrors = Sequence[tuple["Gallery", np.ndarray]]
"""Other models' galleries and their embeddings of the same faces (float32 [N, their dim])."""


class Gallery:
    def __init__(self, store: GalleryStore, model: ModelKey, dim: int, spec: IndexSpec = IndexSpec(),
                 write_lock: threading.Lock | None = None) -> None:
        self.store = store
        self.model = model
        self.dim = dim
        self.spec = spec
        self.on_gpu = spec.gpu and gpu_available()
        self._indexes: dict[str, FaceIndex] = {}  # tenant -> the index of its faces, made on first use
        self._owner: dict[int, Owner] = {}  # face id -> (tenant, identity id), for indexed faces
        self._lock = threading.RLock()  # orders index + owner-map updates
        # Orders local writes against sync (see the module docstring); shared by the galleries of one
        # gateway's models, so a write reaching several of them is never interleaved with a sync.
        self.write_lock = write_lock or threading.Lock()
        self.loaded = False
        self.load_seconds = 0.0
        self.applied_seq = 0  # every change up to here is in the index
        self.last_sync: float | None = None  # time.monotonic() of the last successful sync

    def load(self) -> None:
        """(Re)build the index from the store: every face the model made.

        Built outside the write lock, so the gateway keeps enrolling while a candidate model's index is
        built: the watermark is read first, and what was committed after it is replayed by ``sync``
        (idempotent) before this returns.
        """
        started = time.perf_counter()
        seq = self.store.last_seq()
        ids, identities, tenants, vectors = self.store.load_embeddings(self.model, self.dim)
        rows: dict[str, list[int]] = {}
        for row, tenant in enumerate(tenants):
            rows.setdefault(tenant, []).append(row)
        built = {}
        for tenant, picked in rows.items():
            built[tenant] = FaceIndex(self.dim, self.spec)
            built[tenant].build(ids[picked], vectors[picked])
        with self.write_lock:
            with self._lock:
                self._indexes = built
                self._owner = {face_id: (tenant, identity)
                               for face_id, identity, tenant in zip(ids.tolist(), identities, tenants)}
            self.applied_seq, self.last_sync = seq, time.monotonic()
        self.sync()
        self.load_seconds = time.perf_counter() - started
        self.loaded = True
        log.info("gallery loaded: %d faces of %s in %d tenants in %.2f s (%s index)", len(ids), self.model,
                 len(rows), self.load_seconds, self.index_kind)

    def _index(self, tenant: str) -> FaceIndex:
        """``tenant``'s index, made empty on first use (call under ``_lock``)."""
        index = self._indexes.get(tenant)
        if index is None:
            index = self._indexes[tenant] = FaceIndex(self.dim, self.spec)
        return index

    def index_of(self, tenant: str = DEFAULT_TENANT) -> FaceIndex | None:
        """``tenant``'s index (None while it has had no face)."""
        with self._lock:
            return self._indexes.get(tenant)

    @property
    def faces_indexed(self) -> int:
        """Faces in the indexes of all tenants together."""
        with self._lock:
            return sum(len(index) for index in self._indexes.values())

    def faces_by_tenant(self) -> dict[str, int]:
        with self._lock:
            return {tenant: len(index) for tenant, index in sorted(self._indexes.items())}

    @property
    def index_kind(self) -> str:
        """The kind of the tenants' indexes ("flat" with none yet; "flat+ivf" when a small tenant's is exact)."""
        with self._lock:
            kinds = sorted({index.kind for index in self._indexes.values()})
        return "+".join(kinds) or "flat"

    # -- writes ---------------------------------------------------------------------------------

    def enroll(self, identity_id: str, embeddings: np.ndarray, crops: Sequence[bytes | None],
               boxes: Sequence[list[float] | None], qualities: Sequence[dict[str, float]],
               actor: Actor = NO_ACTOR, also: Mirrors = ()) -> list[Face]:
        """Add faces to an identity of ``actor.tenant``; searchable on return.

        ``also``: the same faces as other models embedded them (a candidate model's gallery, with its
        vectors in the same order), stored in the same transaction and indexed there too.
        """
        faces = self._new_faces(embeddings, crops, boxes, qualities, also)
        with self.write_lock:
            # One transaction, durable on return; only an identity of the actor's tenant is found.
            stored = self.store.add_faces(identity_id, faces, actor)
            self._index_new(stored, actor.tenant, identity_id, embeddings, also)
        return stored

    def create_identity(self, external_id: str | None, name: str | None, metadata: dict[str, Any],
                        embeddings: np.ndarray, crops: Sequence[bytes | None], boxes: Sequence[list[float] | None],
                        qualities: Sequence[dict[str, float]], actor: Actor = NO_ACTOR,
                        also: Mirrors = ()) -> tuple[Identity, list[Face]]:
        """Create an identity with its faces in one transaction (a crash leaves neither); searchable on return."""
        faces = self._new_faces(embeddings, crops, boxes, qualities, also)
        with self.write_lock:
            identity, stored = self.store.create_identity_with_faces(external_id, name, metadata, faces, actor)
            self._index_new(stored, actor.tenant, identity.id, embeddings, also)
        return identity, stored

    def _new_faces(self, embeddings: np.ndarray, crops: Sequence[bytes | None], boxes: Sequence[list[float] | None],
                   qualities: Sequence[dict[str, float]], also: Mirrors) -> list[NewFace]:
        return [NewFace(e, self.model, c, b, q, also=tuple((other.model, vectors[i]) for other, vectors in also))
                for i, (e, c, b, q) in enumerate(zip(embeddings, crops, boxes, qualities))]

    def _index_new(self, stored: Sequence[Face], tenant: str, identity_id: str, embeddings: np.ndarray,
                   also: Mirrors) -> None:
        ids, owners = [f.id for f in stored], [(tenant, identity_id)] * len(stored)
        self._add(ids, owners, np.asarray(embeddings, np.float32))
        for other, vectors in also:
            other._add(ids, owners, np.asarray(vectors, np.float32))

    def delete_face(self, identity_id: str, face_id: int, actor: Actor = NO_ACTOR,
                    also: Sequence[Gallery] = ()) -> None:
        """Delete the face from the store, then from this index and those of ``also`` (other models')."""
        with self.write_lock:
            self.store.delete_face(identity_id, face_id, actor)
            for gallery in (self, *also):
                gallery._forget([face_id])

    def delete_identity(self, identity_id: str, actor: Actor = NO_ACTOR, also: Sequence[Gallery] = ()) -> list[int]:
        with self.write_lock:
            face_ids = self.store.delete_identity(identity_id, actor)
            for gallery in (self, *also):
                gallery._forget(face_ids)
        return face_ids

    def _add(self, face_ids: Sequence[int], owners: Sequence[Owner], vectors: np.ndarray) -> None:
        with self._lock:
            fresh: dict[str, list[int]] = {}  # tenant -> rows of faces not indexed yet
            for i, face_id in enumerate(face_ids):
                if face_id not in self._owner:
                    fresh.setdefault(owners[i][0], []).append(i)
            for tenant, rows in fresh.items():
                self._index(tenant).add(np.asarray([face_ids[i] for i in rows], np.int64), vectors[rows])
                for i in rows:
                    self._owner[face_ids[i]] = owners[i]

    # -- following the change log (several replicas) --------------------------------------------

    def sync(self, batch: int = 1000) -> int:
        """Apply every change after ``applied_seq``; return how many were read."""
        total = 0
        with self.write_lock:
            while True:
                changes = self.store.changes_since(self.applied_seq, batch)
                if not changes:
                    break
                # Net effect per face, in log order: the face's last change decides.
                last: dict[int, str] = {}
                for change in changes:
                    if change.face_id is not None and change.op.startswith("face."):
                        last[change.face_id] = change.op
                # face.embed: a model's embedding was added beside the others (re-embedding); face.reembed:
                # an embedding replaced in place (change logs written before schema 3).
                gone = [f for f, op in last.items() if op in ("face.delete", "face.reembed") and f in self._owner]
                wanted = [f for f, op in last.items() if op in ("face.add", "face.embed", "face.reembed")]
                self._forget(gone)  # a replaced embedding leaves, then returns with its new vector
                if wanted:
                    # Re-read from the store: a face deleted or re-embedded by a later change (not in
                    # this batch yet) is simply absent, and that later change is applied next.
                    ids, identities, tenants, vectors = self.store.embeddings_of(wanted, self.model, self.dim)
                    self._add(ids.tolist(), list(zip(tenants, identities)), vectors)
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
            gone: dict[str, list[int]] = {}  # tenant -> its faces to remove
            for face_id in face_ids:
                owner = self._owner.pop(face_id, None)
                if owner is not None:  # the owner map and the indexes change together: unknown = not indexed
                    gone.setdefault(owner[0], []).append(face_id)
            for tenant, ids in gone.items():
                self._indexes[tenant].remove(np.asarray(ids, np.int64))

    # -- reads ----------------------------------------------------------------------------------

    def search(self, queries: np.ndarray, top_k: int, tenant: str = DEFAULT_TENANT) -> list[list[Candidate]]:
        """Per query, the ``top_k`` best identities of ``tenant`` (an identity scores as its best face)."""
        queries = np.asarray(queries, np.float32).reshape(-1, self.dim)
        index = self.index_of(tenant)
        if index is None:  # the tenant has never had a face here
            return [[] for _ in queries]
        # Several faces may belong to one identity: look deeper than top_k faces, then group.
        depth = top_k * 4 + 16
        scores, ids = index.search(queries, depth)
        out = []
        with self._lock:
            owner = self._owner
            for row_scores, row_ids in zip(scores, ids):
                best: dict[str, Candidate] = {}
                for score, face_id in zip(row_scores.tolist(), row_ids.tolist()):
                    found = owner.get(face_id) if face_id >= 0 else None
                    if found is None or found[0] != tenant:  # padding, or deleted while this search ran
                        continue
                    identity_id = found[1]
                    if identity_id not in best:
                        best[identity_id] = Candidate(identity_id, face_id, cosine(score))
                out.append(sorted(best.values(), key=lambda c: -c.similarity)[:top_k])
        return out

    def identity_embeddings(self, identity_id: str, tenant: str = DEFAULT_TENANT) -> np.ndarray:
        return self.store.face_embeddings(identity_id, self.model, tenant=tenant)

    def status(self, tenant: str | None = None) -> GalleryStatus:
        """``tenant``'s gallery (what its admin may see), or every tenant's together (None: the operator's view)."""
        counts = self.store.count_faces_by_model(tenant)
        others = {str(k): v for k, v in counts.items() if k != self.model}
        indexed = self.faces_indexed if tenant is None else self.faces_by_tenant().get(tenant, 0)
        missing = self.store.count_faces(tenant) - counts.get(self.model, 0)
        return GalleryStatus(str(self.model), indexed, others, missing, self.index_kind, self.on_gpu,
                             round(self.load_seconds, 3))

    def check(self, only: str | None = None) -> dict[str, Any]:
        """Compare the indexes with the store, tenant by tenant: each tenant's index must hold exactly the
        store's faces of that tenant, and the owner map exactly the indexed faces. ``only``: that tenant alone."""
        store_ids, _, store_tenants, _ = self.store.load_embeddings(self.model, self.dim)
        with self._lock:
            indexed = {tenant: index.ids() for tenant, index in self._indexes.items()}
            owned: dict[str, list[int]] = {}
            for face_id, (tenant, _) in self._owner.items():
                owned.setdefault(tenant, []).append(face_id)
        stored: dict[str, list[int]] = {}
        for face_id, tenant in zip(store_ids.tolist(), store_tenants):
            stored.setdefault(tenant, []).append(face_id)
        missing, extra, owners_match = [], [], True
        for tenant in sorted(set(stored) | set(indexed) | set(owned)) if only is None else [only]:
            in_store = np.unique(np.asarray(stored.get(tenant, []), np.int64))
            in_index = indexed.get(tenant, np.zeros(0, np.int64))
            missing.append(np.setdiff1d(in_store, in_index))
            extra.append(np.setdiff1d(in_index, in_store))
            owners_match &= np.array_equal(np.unique(np.asarray(owned.get(tenant, []), np.int64)), in_index)
        gone = np.sort(np.concatenate(missing)) if missing else np.zeros(0, np.int64)
        surplus = np.sort(np.concatenate(extra)) if extra else np.zeros(0, np.int64)
        index_faces = sum(len(ids) for ids in indexed.values())
        if only is not None:
            index_faces = len(indexed.get(only, ()))
        store_faces = len(store_ids) if only is None else len(stored.get(only, ()))
        return {"consistent": bool(len(gone) == 0 and len(surplus) == 0 and owners_match),
                "store_faces": int(store_faces), "index_faces": int(index_faces),
                "missing_from_index": gone[:20].tolist(), "extra_in_index": surplus[:20].tolist()}


class Follower:
    """A thread that keeps a gateway in step with a shared store: woken by ``store.wait_for_change``
    (NOTIFY on PostgreSQL), else every ``poll_s``, it runs ``step`` (sync the galleries, follow the
    model pointer).

    The notification only wakes it; what it applies comes from the change log, so a missed
    notification (or a database restart) delays a change by at most one poll interval.
    """

    def __init__(self, store: GalleryStore, step: Callable[[], object], poll_s: float) -> None:
        self.store = store
        self.step = step
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cdface-gallery-follower", daemon=True)
        self.errors = 0

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.store.wait_for_change(self.poll_s)
                if self._stop.is_set():
                    break
                self.step()
            except Exception as exc:  # the database is away: report, back off, keep following
                self.errors += 1
                log.warning("gallery sync failed (%s); retrying in %.1f s", exc, self.poll_s)
                self._stop.wait(self.poll_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.poll_s + 5)
