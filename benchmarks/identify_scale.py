"""Identify latency against gallery size: exact (IndexIDMap2 + flat IP) vs IVF, recall@1 of IVF vs exact.

Synthetic 512-d vectors with face-like structure: identities are clusters (10 faces each), queries
are new samples of enrolled identities, so the nearest neighbour is meaningful. Queries run one at
a time (what a single /v1/identify does). Also measures the gateway's start-up load: faces read from
a SQLite gallery and indexed (``Gallery.load``).

    python -m benchmarks.identify_scale --quick     # 10k, 100k; load time at 100k
    python -m benchmarks.identify_scale             # 10k, 100k, 1M; load time at 1M (needs ~8 GB RAM)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.results import write_result
from cdface.serving.gallery import Gallery
from cdface.serving.index import FaceIndex, IndexSpec
from cdface.serving.store import ModelKey, NewFace, SQLiteStore

DIM = 512
PER_ID = 10
NOISE = 0.045  # per-dimension noise: same-identity cosine ~0.5, like a real face model


def synthetic(n: int, queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = n // PER_ID
    centres = rng.standard_normal((ids, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, DIM), np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        block = centres[np.arange(start, stop) // PER_ID] + NOISE * rng.standard_normal((stop - start, DIM)).astype(np.float32)
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    q = centres[rng.integers(0, ids, queries)] + NOISE * rng.standard_normal((queries, DIM)).astype(np.float32)
    return out, q / np.linalg.norm(q, axis=1, keepdims=True)


def time_queries(exact: FaceIndex, ivf: FaceIndex, queries: np.ndarray):
    """Top-1 ids and per-query times of both indexes, interleaved so machine noise hits both alike."""
    top = {"exact": [], "ivf": []}
    times = {"exact": [], "ivf": []}
    exact.search(queries[:1], 1), ivf.search(queries[:1], 1)  # warm-up
    for q in queries:
        for name, index in (("exact", exact), ("ivf", ivf)):
            started = time.perf_counter()
            _, ids = index.search(q[None], 1)
            times[name].append(time.perf_counter() - started)
            top[name].append(ids[0, 0])
    return np.array(top["exact"]), times["exact"], np.array(top["ivf"]), times["ivf"]


def load_time(n: int) -> float:
    vectors, _ = synthetic(n, 1, seed=1)
    model = ModelKey("synthetic", 1)
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(Path(tmp) / "g.db")
        ident = store.create_identity(None, None, {})
        for start in range(0, n, 20_000):
            store.add_faces(ident.id, [NewFace(v, model) for v in vectors[start:start + 20_000]])
        store.close()
        store = SQLiteStore(Path(tmp) / "g.db")
        gallery = Gallery(store, model, DIM)
        started = time.perf_counter()
        gallery.load()
        seconds = time.perf_counter() - started
        assert len(gallery.index) == n
        store.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--nprobe", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="FAISS OpenMP threads per search (the gateway's default)")
    args = parser.parse_args()
    import faiss

    faiss.omp_set_num_threads(args.threads)
    sizes = [10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000]
    rows = []
    for n in sizes:
        vectors, queries = synthetic(n, args.queries)
        ids = np.arange(n, dtype=np.int64)
        exact = FaceIndex(DIM, IndexSpec("flat"))
        exact.build(ids, vectors)
        started = time.perf_counter()
        ivf = FaceIndex(DIM, IndexSpec("ivf", nlist=int(4 * np.sqrt(n)), nprobe=args.nprobe))
        ivf.build(ids, vectors)
        train_s = time.perf_counter() - started
        truth, t_exact, found, t_ivf = time_queries(exact, ivf, queries)
        row = {"gallery": n, "exact_ms_p50": 1e3 * float(np.median(t_exact)), "ivf_ms_p50": 1e3 * float(np.median(t_ivf)),
               "exact_ms_p99": 1e3 * float(np.percentile(t_exact, 99)), "ivf_ms_p99": 1e3 * float(np.percentile(t_ivf, 99)),
               "recall_at_1": float((found == truth).mean()), "ivf_nlist": int(4 * np.sqrt(n)), "nprobe": args.nprobe,
               "ivf_used": ivf.kind,
               "ivf_build_s": round(train_s, 2)}
        row["speedup"] = row["exact_ms_p50"] / row["ivf_ms_p50"]
        rows.append(row)
        print(f"N={n:>9,}  exact p50 {row['exact_ms_p50']:8.2f} ms  ivf p50 {row['ivf_ms_p50']:7.2f} ms  "
              f"speed-up {row['speedup']:5.1f}x  recall@1 {row['recall_at_1']:.3f}", flush=True)
        del exact, ivf, vectors
    load_n = sizes[-1]
    load_s = load_time(load_n)
    print(f"gallery load at start (SQLite -> exact index) for {load_n:,} faces: {load_s:.2f} s")
    largest = rows[-1]
    write_result(f"identify_ivf_vs_exact_{largest['gallery'] // 1000}k", "identify p50 ms, IVF (baseline: exact)",
                 largest["ivf_ms_p50"], largest["exact_ms_p50"], "ratio <= 0.2 with recall_at_1 >= 0.99 at 1M",
                 {"rows": rows, "load_seconds": load_s, "load_faces": load_n, "dim": DIM, "faces_per_identity": PER_ID,
                  "queries": args.queries, "quick": args.quick,
                  "faiss_threads": args.threads})


if __name__ == "__main__":
    main()
