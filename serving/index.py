"""The FAISS index: a derived, rebuildable view of the store's embeddings for one model.

Inner product over L2-normalised vectors is cosine similarity. Four kinds:

- ``flat`` (default): ``IndexIDMap2(IndexFlatIP)``, exact.
- ``ivf``: ``IndexIVFFlat``, coarse lists trained on a random sample of the vectors, ``nprobe``
  lists visited per query; it holds the face ids itself (a hash-table direct map lets it
  reconstruct and remove by id).
- ``hnsw``: ``IndexHNSWFlat`` (a graph; no training, so it is used at any size). Building is
  slow (40 s for 100k 512-d faces, 200 s for 300k, on 2 quiet cores) and on the benchmark's data
  its recall@1 drops with size (1.0 at 100k, 0.77 at 300k with efSearch 128, 0.95 with 512):
  ``ivfpq`` is the kind for large galleries.
- ``ivfpq``: IVF with 4-bit product-quantised codes scanned with SIMD (``IVF…,PQ{m}x4fs``), then
  the best ``pq_rerank`` candidates re-scored exactly from float16 copies of the vectors (PQ
  distances alone cannot order the few near-duplicates of one person). ``pq_rerank=0`` keeps only
  the codes (about 50 B a face instead of about 1.1 KiB) and gives up that exactness.

Neither ``hnsw`` nor ``ivfpq`` removes a vector in place (an HNSW graph cannot drop a node; FAISS
1.15's fast-scan lists corrupt codes added after a ``remove_ids``). A removed face becomes a
tombstone instead: its bit is cleared in a bitmap of live nodes that every search hands FAISS as an
``IDSelector``, so a removed face is never returned (a graph search may still route through it).
Past ``REBUILD_DEAD_SHARE`` tombstones the index is rebuilt from the live vectors (``ivfpq`` with
``pq_rerank=0`` keeps none: its tombstones stay until the next build).

The IVF kinds need training vectors: with fewer than ``IVF_MIN_POINTS_PER_LIST`` per list the index
is exact instead, a warning says so and ``kind`` reports ``flat`` (``requested`` keeps the asked
kind, ``fallback`` the reason). Vectors added after a build join whatever index was built; the
next build (the gallery's load) picks the kind again.

Sizing (``ivf_params``), when ``nlist``/``nprobe`` are not given: ``nlist = 4 * sqrt(N)``,
``nprobe = AUTO_NPROBE_FRACTION * nlist``. The fraction is large because of what a face gallery
holds: several faces per person whose mutual differences are noise, spread by that noise over
different lists; recall@1 at the *face* level (the very face exact search ranks first) needs the
query's lists to cover most of them (benchmarks/identify_scale.py measures the curve). The
person is found with far fewer lists; the face-level bound is the one we hold.

On a GPU (faiss-gpu and a device present, and asked for) ``flat`` and ``ivf`` searches run on a
GPU clone; GPU indexes cannot remove ids, so the CPU index stays the master, every write goes to it
and the clone is re-made before the next search. ``hnsw`` and ``ivfpq`` (fast-scan) have no GPU
clone and search on the CPU.

All methods are thread-safe (one lock; FAISS searches themselves use OpenMP threads).
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

log = logging.getLogger("cdface.serving.index")

IndexKind = Literal["flat", "ivf", "hnsw", "ivfpq"]

IVF_MIN_POINTS_PER_LIST = 39  # FAISS's own floor for k-means; fewer and exact search is better anyway
IVF_TRAIN_POINTS_PER_LIST = 40  # training sample: k-means cost grows with it, centroids hardly improve past it
AUTO_NPROBE_FRACTION = 0.5  # see the module docstring: face-level recall@1 >= 0.99 on the benchmark's data
REBUILD_DEAD_SHARE = 0.2  # hnsw, ivfpq: rebuild past this share of tombstones (under the lock: searches wait)


@dataclass(frozen=True)
class IndexSpec:
    kind: IndexKind = "flat"
    nlist: int = 0  # ivf, ivfpq: lists; 0 = 4 * sqrt(N)
    nprobe: int = 0  # ivf, ivfpq: lists visited per query; 0 = AUTO_NPROBE_FRACTION * nlist
    gpu: bool = False
    hnsw_m: int = 32  # hnsw: links per node
    hnsw_ef_search: int = 128  # hnsw: candidate list length per search (raised to k when smaller)
    hnsw_ef_construction: int = 40
    pq_m: int = 64  # ivfpq: sub-quantisers (4 bits each); must divide the dimension
    pq_rerank: int = 32  # ivfpq: candidates re-scored exactly (float16 copies); 0 = codes only


def ivf_params(n: int, spec: IndexSpec) -> tuple[int, int]:
    """(nlist, nprobe) for ``n`` vectors: the spec's where given, else the rule of the module docstring."""
    nlist = spec.nlist or max(1, int(4 * math.sqrt(max(n, 1))))
    nprobe = spec.nprobe or max(1, math.ceil(AUTO_NPROBE_FRACTION * nlist))
    return nlist, min(nprobe, nlist)


def _faiss():
    import faiss

    return faiss


def gpu_available() -> bool:
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _serialised_bytes(index) -> int:
    """Size of ``index`` as FAISS writes it, counted chunk by chunk (no copy of a large index)."""
    faiss = _faiss()
    total = 0

    def count(chunk: bytes) -> int:
        nonlocal total
        total += len(chunk)
        return len(chunk)

    faiss.write_index(index, faiss.PyCallbackIOWriter(count))
    return total


def _list_ids(ivf) -> np.ndarray:
    faiss = _faiss()
    invlists = ivf.invlists
    out = []
    for list_no in range(ivf.nlist):
        size = invlists.list_size(list_no)
        if size:
            out.append(faiss.rev_swig_ptr(invlists.get_ids(list_no), size).copy())
    return np.sort(np.concatenate(out)).astype(np.int64) if out else np.zeros(0, np.int64)


def _train_sample(vectors: np.ndarray, nlist: int) -> np.ndarray:
    n = len(vectors)
    size = IVF_TRAIN_POINTS_PER_LIST * nlist
    if n <= size:
        return vectors
    return vectors[np.sort(np.random.default_rng(0).choice(n, size, replace=False))]


class _Flat:
    kind: IndexKind = "flat"

    def __init__(self, dim: int) -> None:
        faiss = _faiss()
        self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.index.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> int:
        return int(self.index.remove_ids(ids))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(queries, k)

    def ids(self) -> np.ndarray:
        return np.sort(_faiss().vector_to_array(self.index.id_map).astype(np.int64))

    def reconstruct(self, face_id: int) -> np.ndarray:
        return self.index.reconstruct(face_id)

    def memory_bytes(self) -> int:
        return _serialised_bytes(self.index)


class _IVF(_Flat):
    kind: IndexKind = "ivf"

    def __init__(self, dim: int, nlist: int, nprobe: int, sample: np.ndarray) -> None:
        faiss = _faiss()
        self.quantizer = faiss.IndexFlatIP(dim)  # referenced by the IVF index: kept alive with it
        ivf = faiss.IndexIVFFlat(self.quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.train(sample)
        ivf.nprobe = nprobe
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        self.index = ivf

    def ids(self) -> np.ndarray:
        return _list_ids(self.index)


class _Nodes:
    """An index over node numbers 0, 1, ... that cannot (or cannot safely) remove: ``labels`` maps a
    node to its face id, ``alive`` marks the live nodes, and a removed face's node becomes a tombstone
    that every search excludes through an ``IDSelectorBitmap``. A face removed and added again (a
    re-embedding) gets a new node. Past ``REBUILD_DEAD_SHARE`` tombstones the index is rebuilt from
    the live vectors (where it keeps them)."""

    kind: IndexKind

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.index = self._new_index()
        self.labels = np.zeros(0, np.int64)
        self.alive = np.zeros(0, bool)
        self.node: dict[int, int] = {}  # face id -> its live node
        self._bitmap: np.ndarray | None = None  # packed ``alive``, made on the first search after a write

    def _new_index(self) -> Any:
        raise NotImplementedError

    def _add_vectors(self, vectors: np.ndarray, first: int) -> None:
        raise NotImplementedError

    def _vectors(self) -> np.ndarray | None:
        """Every node's vector (tombstones too), or None where the index keeps none to rebuild from."""
        raise NotImplementedError

    @property
    def ntotal(self) -> int:
        return len(self.node)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if not len(ids):
            return
        stale = [self.node[i] for i in ids.tolist() if i in self.node]
        if stale:  # a face added again replaces its old vector
            self.alive[stale] = False
        first = len(self.labels)
        self._add_vectors(vectors, first)
        self.labels = np.concatenate([self.labels, ids])
        self.alive = np.concatenate([self.alive, np.ones(len(ids), bool)])
        self.node.update(zip(ids.tolist(), range(first, first + len(ids))))
        self._bitmap = None

    def remove(self, ids: np.ndarray) -> int:
        nodes = [self.node.pop(i) for i in ids.tolist() if i in self.node]
        if nodes:
            self.alive[nodes] = False
            self._bitmap = None
            if len(self.labels) - len(self.node) > REBUILD_DEAD_SHARE * len(self.labels):
                self._rebuild()
        return len(nodes)

    def _rebuild(self) -> None:
        stored = self._vectors()
        if stored is None:
            return  # tombstones stay (still never returned) until the next build
        keep = np.flatnonzero(self.alive)
        vectors, ids = stored[keep], self.labels[keep]
        log.info("rebuilding the %s index: %d live nodes of %d", self.kind, len(keep), len(self.labels))
        self._reset()
        self.add(ids, np.ascontiguousarray(vectors, dtype=np.float32))

    def _selector(self) -> Any:
        """None without tombstones, else a selector of the live nodes (hold it until the search returns)."""
        if len(self.node) == len(self.labels):
            return None
        if self._bitmap is None:
            self._bitmap = np.packbits(self.alive, bitorder="little")
        return _faiss().IDSelectorBitmap(len(self.alive), _faiss().swig_ptr(self._bitmap))

    def _face_ids(self, nodes: np.ndarray) -> np.ndarray:
        return np.where(nodes >= 0, self.labels[np.maximum(nodes, 0)], -1)

    def ids(self) -> np.ndarray:
        return np.sort(self.labels[self.alive])


class _IVFPQ(_Nodes):
    kind: IndexKind = "ivfpq"

    def __init__(self, dim: int, nlist: int, nprobe: int, pq_m: int, rerank: int, sample: np.ndarray) -> None:
        faiss = _faiss()
        if dim % pq_m:
            raise ValueError(f"pq_m={pq_m} must divide the embedding size {dim}")
        # Tombstones, not remove_ids: FAISS 1.15's fast-scan lists corrupt codes added after a removal.
        self.trained = faiss.index_factory(dim, f"IVF{nlist},PQ{pq_m}x4fs", faiss.METRIC_INNER_PRODUCT)
        self.trained.train(sample)
        self.trained.nprobe = nprobe
        self.dim, self.nprobe, self.rerank = dim, nprobe, rerank
        super().__init__()

    def _new_index(self) -> Any:
        faiss = _faiss()
        self.exact = None
        if self.rerank:
            self.exact = faiss.IndexScalarQuantizer(self.dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        return faiss.clone_index(self.trained)

    def _add_vectors(self, vectors: np.ndarray, first: int) -> None:
        self.index.add_with_ids(vectors, np.arange(first, first + len(vectors), dtype=np.int64))
        if self.exact is not None:
            self.exact.add(vectors)

    def _vectors(self) -> np.ndarray | None:
        return None if self.exact is None else self.exact.reconstruct_n(0, int(self.exact.ntotal))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        faiss = _faiss()
        selector = self._selector()
        params = faiss.SearchParametersIVF(nprobe=self.nprobe, sel=selector)
        if self.exact is None:
            scores, nodes = self.index.search(queries, k, params=params)
            return scores, self._face_ids(nodes)
        _, cand = self.index.search(queries, min(max(k, self.rerank), self.ntotal), params=params)
        del selector
        scores = np.full((len(queries), k), -np.inf, np.float32)
        nodes = np.full((len(queries), k), -1, np.int64)
        for row, (query, found) in enumerate(zip(queries, cand)):
            found = found[found >= 0]
            if not len(found):
                continue
            exact = self.exact.reconstruct_batch(found) @ query
            best = np.argsort(-exact, kind="stable")[:k]
            scores[row, :len(best)], nodes[row, :len(best)] = exact[best], found[best]
        return scores, self._face_ids(nodes)

    def reconstruct(self, face_id: int) -> np.ndarray:
        if self.exact is None:
            raise RuntimeError("an ivfpq index without re-ranking keeps no vectors (pq_rerank=0)")
        return self.exact.reconstruct(self.node[face_id])

    def memory_bytes(self) -> int:
        exact = _serialised_bytes(self.exact) if self.exact is not None else 0
        return _serialised_bytes(self.index) + exact + self.labels.nbytes + self.alive.nbytes


class _HNSW(_Nodes):
    kind: IndexKind = "hnsw"

    def __init__(self, dim: int, m: int, ef_search: int, ef_construction: int) -> None:
        self.dim, self.m, self.ef_search, self.ef_construction = dim, m, ef_search, ef_construction
        super().__init__()

    def _new_index(self) -> Any:
        faiss = _faiss()
        index = faiss.IndexHNSWFlat(self.dim, self.m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = self.ef_construction
        return index

    def _add_vectors(self, vectors: np.ndarray, first: int) -> None:
        self.index.add(vectors)  # HNSW numbers its nodes in order of addition

    def _vectors(self) -> np.ndarray | None:
        return self.index.reconstruct_n(0, int(self.index.ntotal))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        faiss = _faiss()
        selector = self._selector()  # the graph may route through a tombstone, never return it
        params = faiss.SearchParametersHNSW(efSearch=max(self.ef_search, k), sel=selector)
        scores, nodes = self.index.search(queries, k, params=params)
        del selector
        return scores, self._face_ids(nodes)

    def reconstruct(self, face_id: int) -> np.ndarray:
        return self.index.reconstruct(self.node[face_id])

    def memory_bytes(self) -> int:
        return _serialised_bytes(self.index) + self.labels.nbytes + self.alive.nbytes


class FaceIndex:
    """Face id -> embedding, searchable by inner product."""

    def __init__(self, dim: int, spec: IndexSpec = IndexSpec()) -> None:
        self.dim = dim
        self.spec = spec
        self.requested: IndexKind = spec.kind
        self.fallback: str | None = None  # why ``kind`` is not the requested kind
        self._lock = threading.Lock()
        self._backend: Any = self._empty()
        self._gpu = None
        self._gpu_dirty = True
        self._gpu_res = None
        if spec.gpu and gpu_available():
            self._gpu_res = _faiss().StandardGpuResources()
        elif spec.gpu:
            log.warning("FAISS on GPU was asked for, but faiss-gpu or a GPU is missing: searching on the CPU")

    def _empty(self) -> Any:
        """The index before any build: HNSW grows from empty; the IVF kinds need training vectors first."""
        if self.spec.kind == "hnsw":
            return _HNSW(self.dim, self.spec.hnsw_m, self.spec.hnsw_ef_search, self.spec.hnsw_ef_construction)
        if self.spec.kind != "flat":
            self.fallback = "no vectors to train on yet"
        return _Flat(self.dim)

    @property
    def kind(self) -> IndexKind:
        """The kind in use (``flat`` where the requested kind fell back to exact search)."""
        return self._backend.kind

    @property
    def on_gpu(self) -> bool:
        return self._gpu_res is not None and self.kind in ("flat", "ivf")

    # -- building -------------------------------------------------------------------------------

    def build(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Replace the contents with ``vectors`` (float32 [N, dim]) under ``ids`` (int64 [N])."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        n = len(ids)
        backend: Any
        fallback = None
        if self.spec.kind in ("ivf", "ivfpq"):
            nlist, nprobe = ivf_params(n, self.spec)
            if n < IVF_MIN_POINTS_PER_LIST * nlist:
                fallback = (f"{self.spec.kind} needs at least {IVF_MIN_POINTS_PER_LIST * nlist} vectors to train "
                            f"{nlist} lists, the gallery has {n}: exact search")
                log.warning("index: %s", fallback)
                backend = _Flat(self.dim)
            elif self.spec.kind == "ivf":
                backend = _IVF(self.dim, nlist, nprobe, _train_sample(vectors, nlist))
            else:
                backend = _IVFPQ(self.dim, nlist, nprobe, self.spec.pq_m, self.spec.pq_rerank,
                                 _train_sample(vectors, nlist))
        elif self.spec.kind == "hnsw":
            backend = _HNSW(self.dim, self.spec.hnsw_m, self.spec.hnsw_ef_search, self.spec.hnsw_ef_construction)
        else:
            backend = _Flat(self.dim)
        if n:
            backend.add(ids, vectors)
        with self._lock:
            self._backend, self.fallback = backend, fallback
            self._gpu_dirty = True

    # -- writes ---------------------------------------------------------------------------------

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        with self._lock:
            self._backend.add(ids, vectors)
            self._gpu_dirty = True

    def remove(self, ids: np.ndarray | list[int]) -> int:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if not len(ids):
            return 0
        with self._lock:
            removed = int(self._backend.remove(ids))
            self._gpu_dirty = True
        return removed

    # -- reads ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._backend.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities float32 [Q, k], face ids int64 [Q, k]); id -1 where fewer than k faces exist."""
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        with self._lock:
            n = int(self._backend.ntotal)
            if n == 0 or k <= 0:
                return (np.zeros((len(queries), max(k, 0)), np.float32),
                        np.full((len(queries), max(k, 0)), -1, np.int64))
            if self.on_gpu:
                return self._gpu_index().search(queries, min(k, n))
            return self._backend.search(queries, min(k, n))

    def _gpu_index(self):
        if self._gpu_dirty or self._gpu is None:
            self._gpu = _faiss().index_cpu_to_gpu(self._gpu_res, 0, self._backend.index)
            self._gpu_dirty = False
        return self._gpu

    def ids(self) -> np.ndarray:
        """Every face id in the index, sorted (for consistency checks against the store)."""
        with self._lock:
            return self._backend.ids()

    def reconstruct(self, face_id: int) -> np.ndarray:
        with self._lock:
            return self._backend.reconstruct(int(face_id))

    def tune(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Change the search-time knobs of the built index (ivf/ivfpq ``nprobe``, hnsw ``ef_search``); no rebuild."""
        with self._lock:
            backend = self._backend
            if nprobe is not None and isinstance(backend, _IVFPQ):
                backend.nprobe = nprobe
            elif nprobe is not None and isinstance(backend, _IVF):
                backend.index.nprobe = nprobe
            if ef_search is not None and isinstance(backend, _HNSW):
                backend.ef_search = ef_search
            self._gpu_dirty = True

    def memory_bytes(self) -> int:
        """The index's size as FAISS serialises it (vectors or codes, lists, graph links, ids)."""
        with self._lock:
            return int(self._backend.memory_bytes())
