"""The FAISS index: a derived, rebuildable view of the store's embeddings for one model.

Inner product over L2-normalised vectors is cosine similarity. Two kinds:

- ``flat`` (default): ``IndexIDMap2(IndexFlatIP)``, exact.
- ``ivf``: ``IndexIVFFlat`` over inner product, trained from the store's own vectors, ``nprobe``
  lists visited per query; it holds the face ids itself (no id map; a hash-table direct map lets
  it reconstruct and remove by id).

On a GPU (faiss-gpu and a device present, and asked for) searches run on a GPU clone; GPU indexes
cannot remove ids, so the CPU index stays the master, every write goes to it and the clone is
re-made before the next search.

All methods are thread-safe (one lock; FAISS searches themselves use OpenMP threads).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Literal

import numpy as np

log = logging.getLogger("cdface.serving.index")

IndexKind = Literal["flat", "ivf"]


@dataclass(frozen=True)
class IndexSpec:
    kind: IndexKind = "flat"
    nlist: int = 0  # ivf: lists; 0 = about 4 * sqrt(N)
    nprobe: int = 16
    gpu: bool = False


def _faiss():
    import faiss

    return faiss


def gpu_available() -> bool:
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class FaceIndex:
    """Face id -> embedding, searchable by inner product."""

    def __init__(self, dim: int, spec: IndexSpec = IndexSpec()) -> None:
        self.dim = dim
        self.spec = spec
        self._lock = threading.Lock()
        self._cpu = self._make_flat()
        self.kind: IndexKind = "flat"
        self._gpu = None
        self._gpu_dirty = True
        self._gpu_res = None
        if spec.gpu and gpu_available():
            self._gpu_res = _faiss().StandardGpuResources()
        elif spec.gpu:
            log.warning("FAISS on GPU was asked for, but faiss-gpu or a GPU is missing: searching on the CPU")

    def _make_flat(self):
        faiss = _faiss()
        return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))

    @property
    def on_gpu(self) -> bool:
        return self._gpu_res is not None

    # -- building -------------------------------------------------------------------------------

    def build(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Replace the contents with ``vectors`` (float32 [N, dim]) under ``ids`` (int64 [N])."""
        faiss = _faiss()
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        index = self._make_flat()
        kind: IndexKind = "flat"
        if self.spec.kind == "ivf":
            n = len(ids)
            nlist = self.spec.nlist or max(1, int(4 * np.sqrt(max(n, 1))))
            if n < 39 * nlist:  # FAISS wants ~39 training points per list; fewer and exact is better anyway
                log.warning("IVF needs at least %d vectors to train %d lists, the gallery has %d: using exact search",
                            39 * nlist, nlist, n)
            else:
                quantizer = faiss.IndexFlatIP(self.dim)
                ivf = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
                sample = vectors
                if n > 256 * nlist:
                    sample = vectors[np.random.default_rng(0).choice(n, 256 * nlist, replace=False)]
                ivf.train(sample)
                ivf.nprobe = min(self.spec.nprobe, nlist)
                ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
                index, kind = ivf, "ivf"
        if len(ids):
            index.add_with_ids(vectors, ids)
        with self._lock:
            self._cpu, self.kind = index, kind
            self._gpu_dirty = True

    # -- writes ---------------------------------------------------------------------------------

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        with self._lock:
            self._cpu.add_with_ids(vectors, ids)
            self._gpu_dirty = True

    def remove(self, ids: np.ndarray | list[int]) -> int:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if not len(ids):
            return 0
        with self._lock:
            removed = int(self._cpu.remove_ids(ids))
            self._gpu_dirty = True
        return removed

    # -- reads ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._cpu.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities float32 [Q, k], face ids int64 [Q, k]); id -1 where fewer than k faces exist."""
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        with self._lock:
            n = int(self._cpu.ntotal)
            if n == 0 or k <= 0:
                return (np.zeros((len(queries), max(k, 0)), np.float32),
                        np.full((len(queries), max(k, 0)), -1, np.int64))
            index = self._searchable()
            return index.search(queries, min(k, n))

    def _searchable(self):
        if self._gpu_res is None:
            return self._cpu
        if self._gpu_dirty or self._gpu is None:
            self._gpu = _faiss().index_cpu_to_gpu(self._gpu_res, 0, self._cpu)
            self._gpu_dirty = False
        return self._gpu

    def ids(self) -> np.ndarray:
        """Every face id in the index, sorted (for consistency checks against the store)."""
        faiss = _faiss()
        with self._lock:
            if self.kind == "flat":
                return np.sort(faiss.vector_to_array(self._cpu.id_map).astype(np.int64))
            ivf = self._cpu
            invlists = ivf.invlists
            out = []
            for list_no in range(ivf.nlist):
                size = invlists.list_size(list_no)
                if size:
                    out.append(faiss.rev_swig_ptr(invlists.get_ids(list_no), size).copy())
            return np.sort(np.concatenate(out)) if out else np.zeros(0, np.int64)

    def reconstruct(self, face_id: int) -> np.ndarray:
        with self._lock:
            return self._cpu.reconstruct(int(face_id))
