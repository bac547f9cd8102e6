"""Re-embedding throughput (faces/s) and peak memory of ``cdface gallery reembed`` at 10k and 100k faces.

One run starts one real tritonserver serving two versions of one model (``face:1`` and ``face:2``: the
near-free stand-in of ``benchmarks.gateway_overhead``, wrapped with the real preprocessing, Python
backend + ONNX Runtime, so what is measured is the re-embedding's own cost: reading and opening sealed
crops, PNG decoding, the Triton round trips, the store transactions). For each gallery size it fills a
fresh SQLite gallery with that many faces enrolled by ``face:1`` (random unit embeddings, a sealed PNG
crop each), then runs the real command as its own process::

    cdface gallery reembed --to face:2 --batch B

and records its wall time and its peak RSS (``wait4``'s ``ru_maxrss`` of that process alone). A second
run on the re-embedded gallery has nothing to do: its wall time is the command's fixed cost (start-up,
imports, connecting), subtracted for the steady rate. Streaming means the peak RSS must not grow with
the gallery: compare the arms.

    python -m benchmarks.reembed --faces 10k           # about 35 s on 2 cores
    python -m benchmarks.reembed --faces 100k          # about 4 minutes and ~250 MB of disk
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.gateway_overhead import _tiny_model
from benchmarks.identify_scale import label, parse_size
from benchmarks.results import write_result
from cdface.core.imaging import encode_png
from cdface.serving.crop_cipher import CropCipher, new_key
from cdface.serving.store import ModelKey, NewFace, SQLiteStore

REPO = Path(__file__).resolve().parents[1]
MODEL = "face"  # the Triton model; its manifests name the embeddings tiny:1 and tiny:2
PER_IDENTITY = 1000  # faces per identity and per enrolment transaction while filling the gallery


def synthetic_crop(rng: np.random.Generator) -> np.ndarray:
    """A 112x112 crop of 14x14 colour blocks: distinct per face, and a PNG of under 1 kB (random pixels would take
    37 kB each, 3.7 GB at 100k, which would measure the disk rather than the re-embedding)."""
    blocks = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return np.repeat(np.repeat(blocks, 14, axis=0), 14, axis=1)


def fill(path: Path, faces: int, crop_keys: str, dim: int) -> int:
    """A gallery of ``faces`` faces enrolled by tiny:1, each with its crop sealed; returns the crops' bytes."""
    store = SQLiteStore(path)
    store.use_crop_cipher(CropCipher.from_setting(crop_keys))
    rng = np.random.default_rng(0)
    crop_bytes = 0
    try:
        for start in range(0, faces, PER_IDENTITY):
            n = min(PER_IDENTITY, faces - start)
            vectors = rng.standard_normal((n, dim)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            pngs = [encode_png(synthetic_crop(rng)) for _ in range(n)]
            crop_bytes += sum(len(p) for p in pngs)
            person = store.create_identity(None, None, {})
            store.add_faces(person.id, [NewFace(v, ModelKey("tiny", 1), png) for v, png in zip(vectors, pngs)])
    finally:
        store.close()
    return crop_bytes


def run_reembed(db: Path, repo: Path, grpc_url: str, batch: int, env: dict) -> tuple[dict, float, float]:
    """(the command's JSON result, wall seconds, peak RSS in MiB) of one ``cdface gallery reembed`` process."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "cdface.serving.cli", "gallery", "reembed", "--to", f"{MODEL}:2",
                             "--db", str(db), "--model-repository", str(repo), "--triton-url", grpc_url,
                             "--batch", str(batch)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # this process's own rusage, not the Triton server's
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"gallery reembed failed with exit status {proc.returncode}")
    return json.loads(out), wall, usage.ru_maxrss / 1024  # Linux: kilobytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=parse_size, action="append",
                        help="Gallery size (10k, 100k); repeat for several arms. Default: 10k.")
    parser.add_argument("--batch", type=int, default=64, help="--batch of gallery reembed (crops per Triton call).")
    args = parser.parse_args()
    sizes = args.faces or [10_000]

    from cdface.devtools.triton_local import TritonServer
    from cdface.export.triton_repo import add_model_version
    from cdface.export.wrap import wrap_onnx

    with tempfile.TemporaryDirectory(prefix="cdface-reembed-") as tmp_name:
        tmp = Path(tmp_name)
        onnx = _tiny_model(tmp / "tiny.onnx")
        for version in (1, 2):
            wrap_onnx(onnx, tmp / f"v{version}", name="tiny", version=version, input_layout="NCHW",
                      channel_order="RGB", mean=0.0, std=1.0, licence="generated for this benchmark")
            add_model_version(tmp / "repo", MODEL, tmp / f"v{version}", backend="python", max_batch_size=64,
                              version_policy="all")
        crop_keys = new_key()
        env = {**os.environ, "CDFACE_SERVE_CROP_KEYS": crop_keys}
        with TritonServer(tmp / "repo", log_path=tmp / "triton.log") as server:
            for faces in sizes:
                db = tmp / f"gallery-{label(faces)}.db"
                filling = time.perf_counter()
                crop_bytes = fill(db, faces, crop_keys, 128)
                fill_s = time.perf_counter() - filling
                result, wall, rss = run_reembed(db, tmp / "repo", server.grpc_url, args.batch, env)
                nothing, fixed, idle_rss = run_reembed(db, tmp / "repo", server.grpc_url, args.batch, env)
                if result["reembedded"] != faces or result["coverage"] != 1.0 or nothing["reembedded"] != 0:
                    raise SystemExit(f"unexpected results: {result}, then {nothing}")
                rate, steady = faces / wall, faces / max(wall - fixed, 1e-9)
                details = {
                    "faces": faces, "batch": args.batch, "wall_s": round(wall, 2),
                    "fixed_cost_s": round(fixed, 2), "faces_per_s_steady": round(steady, 1),
                    "peak_rss_mib": round(rss, 1), "peak_rss_mib_with_nothing_to_do": round(idle_rss, 1),
                    "gallery_db_mib": round(db.stat().st_size / 2**20, 1),
                    "crops_mib": round(crop_bytes / 2**20, 1), "fill_s": round(fill_s, 1),
                    "model": "a near-free 128-d stand-in (mean colour, projected), two versions, Triton Python "
                             "backend + ONNX Runtime; synthetic 112x112 block crops, sealed (AES-GCM) PNGs",
                    "store": "SQLite (WAL, synchronous=FULL), one transaction per batch",
                }
                print(f"{label(faces):>5}: {rate:.0f} faces/s ({steady:.0f} steady), wall {wall:.1f} s "
                      f"(fixed {fixed:.1f} s), peak RSS {rss:.0f} MiB ({idle_rss:.0f} MiB with nothing to do)")
                write_result(f"reembed_{label(faces)}", "faces re-embedded per second by `cdface gallery reembed` "
                             "(wall time of the command, start-up included)", round(rate, 1), None,
                             "peak_rss_mib does not grow with the gallery (streaming): compare the 10k and 100k "
                             "arms", details)
                db.unlink(missing_ok=True)  # 100k faces take about 250 MB


if __name__ == "__main__":
    main()
