"""/v1/embeddings with aligned crops at concurrency 1, 8, 32 vs direct tritonclient calls to the same Triton.

One run starts the real tritonserver (wrapped SFace, Python backend + ONNX Runtime) and the gateway
(its own process, auth off, SQLite in a temporary directory), then measures, level by level and
interleaved, requests of one aligned 112x112 crop each: through the gateway (HTTP, JSON/base64)
and straight to Triton (async gRPC). Target: gateway throughput >= 0.8x direct at concurrency 8.

    python -m benchmarks.gateway_embeddings --quick
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.results import write_result
from cdface.core.contract import INPUT_NAME

REPO = Path(__file__).resolve().parents[1]


def _crops(n: int) -> tuple[np.ndarray, list[str]]:
    """``n`` aligned crops of real faces (the stock photos, each face slightly re-lit per copy): the
    gateway's face check on every crop passes them, as it does a client's real crops."""
    from PIL import Image

    from cdface.core import assets
    from cdface.core.detection import Detector, extract_faces
    from cdface.core.imaging import read_image

    detector = Detector(assets.yunet_onnx())
    faces = [face.crop for path in assets.photos().values()
             for face in extract_faces(read_image(path), "detect_all", detector=detector)]
    rng = np.random.default_rng(0)
    arrays = np.stack([np.clip(faces[i % len(faces)] * rng.uniform(0.9, 1.1), 0, 255).astype(np.uint8)
                       for i in range(n)])
    encoded = []
    for a in arrays:
        out = io.BytesIO()
        Image.fromarray(a).save(out, format="PNG")
        encoded.append(base64.b64encode(out.getvalue()).decode())
    return arrays, encoded


async def _drive(call, concurrency: int, seconds: float) -> dict:
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        i = w
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            await call(i)
            latencies.append(time.perf_counter() - started)
            i += concurrency

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    wall = time.perf_counter() - started
    lat = np.array(latencies) * 1e3
    return {"requests": len(latencies), "throughput": len(latencies) / wall, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99))}


async def _measure(gateway_url: str, grpc_url: str, levels: list[int], seconds: float) -> dict:
    import httpx
    import tritonclient.grpc.aio as grpcaio
    from tritonclient.grpc import InferInput

    arrays, encoded = _crops(64)
    direct = grpcaio.InferenceServerClient(grpc_url)
    http = httpx.AsyncClient(base_url=gateway_url, timeout=60, limits=httpx.Limits(max_connections=64))

    async def via_gateway(i: int) -> None:
        r = await http.post("/v1/embeddings", json={"images": [{"data": encoded[i % 64], "mode": "aligned"}]})
        r.raise_for_status()

    async def via_triton(i: int) -> None:
        tensor = InferInput(INPUT_NAME, [1, 112, 112, 3], "UINT8")
        tensor.set_data_from_numpy(arrays[i % 64: i % 64 + 1])
        await direct.infer("face", [tensor])

    await _drive(via_gateway, 4, 1.0)  # warm-up both paths
    await _drive(via_triton, 4, 1.0)
    out = {}
    for c in levels:
        out[c] = {"direct": await _drive(via_triton, c, seconds), "gateway": await _drive(via_gateway, c, seconds)}
        print(f"concurrency {c:>2}: gateway {out[c]['gateway']['throughput']:7.1f} req/s "
              f"(p50 {out[c]['gateway']['p50_ms']:.1f} ms, p99 {out[c]['gateway']['p99_ms']:.1f} ms)   "
              f"direct {out[c]['direct']['throughput']:7.1f} req/s (p50 {out[c]['direct']['p50_ms']:.1f} ms, "
              f"p99 {out[c]['direct']['p99_ms']:.1f} ms)", flush=True)
    await http.aclose()
    await direct.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seconds", type=float, default=None)
    args = parser.parse_args()
    seconds = args.seconds or (4.0 if args.quick else 15.0)
    levels = [1, 8, 32]

    import httpx

    from cdface.core import assets
    from cdface.devtools.triton_local import TritonServer, free_port
    from cdface.export.triton_repo import add_model_version
    from cdface.export.wrap import wrap_onnx

    with tempfile.TemporaryDirectory(prefix="cdface-bench-") as tmp:
        tmp = Path(tmp)
        wrap_onnx(assets.sface_onnx(), tmp / "sface", name="sface", version=1, input_layout="NCHW",
                  channel_order="RGB", mean=0.0, std=1.0, licence=assets.SFACE_LICENCE)
        add_model_version(tmp / "repo", "face", tmp / "sface", backend="python", max_batch_size=32,
                          preferred=[8, 32], queue_delay_us=2_000)
        with TritonServer(tmp / "repo", log_path=tmp / "triton.log") as server:
            port = free_port()
            env = {**os.environ, "CDFACE_SERVE_PORT": str(port), "CDFACE_SERVE_DB_PATH": str(tmp / "g.db"),
                   "CDFACE_SERVE_CREATE_DB": "1",
                   "CDFACE_SERVE_TRITON_URL": server.grpc_url, "CDFACE_SERVE_MODEL_REPOSITORY": str(tmp / "repo"),
                   "CDFACE_SERVE_AUTH": "false", "CDFACE_SERVE_LOG_LEVEL": "warning",
                   # one client address sends far more than the default rate limit (600/minute) allows
                   "CDFACE_SERVE_RATE_LIMIT": "none"}
            gateway = subprocess.Popen([sys.executable, "-m", "cdface.serving.cli", "serve"], cwd=REPO, env=env,
                                       stdout=subprocess.DEVNULL, stderr=open(tmp / "gateway.log", "wb"))
            try:
                url = f"http://127.0.0.1:{port}"
                for _ in range(300):
                    try:
                        if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    time.sleep(0.1)
                results = asyncio.run(_measure(url, server.grpc_url, levels, seconds))
            finally:
                gateway.terminate()
                gateway.wait(timeout=20)
    c8 = results[8]
    write_result("gateway_embeddings_vs_direct_c8",
                 "aligned-crop requests/s at concurrency 8 (baseline: direct Triton gRPC)",
                 c8["gateway"]["throughput"], c8["direct"]["throughput"], "ratio >= 0.8",
                 {"levels": {str(k): v for k, v in results.items()}, "seconds_per_level": seconds,
                  "model": "wrapped SFace (128-d), Triton Python backend + ONNX Runtime", "quick": args.quick})


if __name__ == "__main__":
    main()
