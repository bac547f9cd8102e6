"""Identify latency while the served model is upgraded, against the same gateway in steady state.

One real tritonserver (explicit model control) and one gateway on a SQLite gallery of ``--faces`` faces
(retained crops). A load of ``--concurrency`` clients sends ``/v1/identify`` (aligned real-face crops)
without pause for the whole run. Rounds alternate two windows:

- ``steady``: ``--steady-s`` seconds of the load alone;
- ``upgrade``: a new version is added to the repository (a stand-in model drawn with another seed) and the
  operator's commands run back to back: ``cdface model candidate`` (Triton loads it, the gateway builds its
  index in the background and shadows ``--shadow-share`` of the requests), ``cdface gallery reembed`` (every
  face, from its crop), ``cdface model promote``, until the gateway answers with the new model.

Per window: p50 and p99 of the requests that started in it, and failed requests. Reported: the median
over rounds (and range) of each, the ratio upgrade p99 / steady p99, and the re-embedding rate. The model
is the near-free stand-in of ``benchmarks.gateway_overhead`` (Triton's share of a request is small, so
what the upgrade costs the gateway shows).

    python -m benchmarks.model_upgrade
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.gateway_embeddings import _crops
from benchmarks.gateway_overhead import REPO, _start_gateway, _tiny_model
from benchmarks.results import write_result


def _version(tmp: Path, repo: Path, version: int) -> None:
    """Add ``face:version`` (a stand-in drawn with seed ``version``) with an evaluation report, as retrain does."""
    from cdface.export.triton_repo import add_model_version
    from cdface.export.wrap import wrap_onnx

    out = tmp / f"export-{version}"
    wrap_onnx(_tiny_model(tmp / f"tiny-{version}.onnx", seed=version), out, name="face", version=version,
              input_layout="NCHW", channel_order="RGB", mean=0.0, std=1.0, licence="generated for this benchmark")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["evaluation"] = {"results": [{"dataset": "bench", "metric": "accuracy", "value": 0.9}],
                              "thresholds": {"1e-3": 0.5}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    add_model_version(repo, "face", out, backend="python", max_batch_size=32, preferred=[8, 32],
                      queue_delay_us=2_000, version_policy="specific:1")


class Load:
    """``concurrency`` clients sending identify requests back to back; each request: (start, ms, status, model)."""

    def __init__(self, url: str, images: list[str], concurrency: int) -> None:
        self.url, self.images = url, images
        self.samples: list[tuple[float, float, int, str]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(w,), daemon=True) for w in range(concurrency)]

    def _run(self, worker: int) -> None:
        import httpx

        with httpx.Client(base_url=self.url, timeout=60) as client:
            i = worker
            while not self.stop.is_set():
                started = time.perf_counter()
                try:
                    r = client.post("/v1/identify", json={"image": {"data": self.images[i % len(self.images)],
                                                                    "mode": "aligned"}, "top_k": 3})
                    status = r.status_code
                    model = r.json()["model"] if status == 200 else {}
                except Exception:
                    status, model = -1, {}
                self.samples.append((started, (time.perf_counter() - started) * 1000, status,
                                     f"{model.get('triton_model')}:{model.get('triton_version')}"))
                i += len(self.threads)

    def window(self, start: float, end: float) -> dict:
        picked = [s for s in list(self.samples) if start <= s[0] < end]
        ms = sorted(s[1] for s in picked)
        return {"requests": len(ms), "failed": sum(s[2] != 200 for s in picked),
                "p50_ms": round(ms[len(ms) // 2], 2), "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 2)}

    def answers_with(self, model: str, after: float) -> bool:
        return any(s[0] >= after and s[3] == model for s in self.samples[-50:])


def _cdface(*args: str, env: dict) -> str:
    done = subprocess.run([sys.executable, "-m", "cdface.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env=env)
    if done.returncode != 0:
        raise SystemExit(f"cdface {' '.join(args)} failed: {done.stderr.strip()[-500:]}")
    return done.stdout


def main() -> None:
    import os

    import httpx

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--steady-s", type=float, default=20.0)
    parser.add_argument("--shadow-share", type=float, default=0.05)
    args = parser.parse_args()

    from cdface.devtools.triton_local import TritonServer

    with tempfile.TemporaryDirectory(prefix="cdface-upgrade-") as tmp_name:
        tmp, repo = Path(tmp_name), Path(tmp_name) / "repo"
        _version(tmp, repo, 1)
        crop_key = _cdface("keys", "crop-key", env=dict(os.environ)).strip()
        with TritonServer(repo, explicit=True, load_models=["face"], log_path=tmp / "triton.log") as server:
            serve_env = {"CDFACE_SERVE_CROP_KEYS": crop_key, "CDFACE_SERVE_SHADOW_SHARE": str(args.shadow_share),
                         "CDFACE_SERVE_RATE_LIMIT": "none", "CDFACE_SERVE_MIN_CROP_FACE_SCORE": "0"}
            proc, url = _start_gateway(sys.executable, REPO, tmp, "gateway", server.grpc_url, repo, serve_env)
            ops = {**os.environ, "CDFACE_SERVE_DB_PATH": str(tmp / "gateway.db"), "CDFACE_SERVE_CROP_KEYS": crop_key,
                   "CDFACE_SERVE_MODEL_REPOSITORY": str(repo), "CDFACE_SERVE_TRITON_URL": server.grpc_url}
            try:
                _, images = _crops(64)
                with httpx.Client(base_url=url, timeout=60) as client:
                    for i in range(args.faces):
                        r = client.post("/v1/identities", json={"images": [{"data": images[i % len(images)],
                                                                            "mode": "aligned"}], "retain_crop": True})
                        if r.status_code != 201:
                            raise SystemExit(f"enrolment failed: {r.status_code} {r.text[:300]}")
                load = Load(url, images, args.concurrency)
                for thread in load.threads:
                    thread.start()
                time.sleep(5)  # warm-up: connections, Triton's instance, the detector pool
                rounds = []
                for r in range(args.rounds):
                    steady_start = time.perf_counter()
                    time.sleep(args.steady_s)
                    steady = load.window(steady_start, time.perf_counter())
                    version = r + 2
                    _version(tmp, repo, version)
                    upgrade_start = time.perf_counter()
                    _cdface("model", "candidate", f"face:{version}", "--triton-url", server.grpc_url, env=ops)
                    started = time.perf_counter()
                    reembed = json.loads(_cdface("gallery", "reembed", "--to", f"face:{version}",
                                                 env=ops).splitlines()[-1])
                    reembed_s = time.perf_counter() - started
                    _cdface("model", "promote", "--triton-url", server.grpc_url, env=ops)
                    while not load.answers_with(f"face:{version}", upgrade_start):
                        time.sleep(0.05)
                    upgrade = load.window(upgrade_start, time.perf_counter())
                    upgrade["seconds"] = round(time.perf_counter() - upgrade_start, 2)
                    upgrade["reembed_faces_per_s"] = round(reembed["reembedded"] / reembed_s, 1)
                    rounds.append({"steady": steady, "upgrade": upgrade})
                    print(f"round {r + 1}/{args.rounds}: steady p99 {steady['p99_ms']} ms, upgrade p99 "
                          f"{upgrade['p99_ms']} ms over {upgrade['seconds']} s, failed {upgrade['failed']}",
                          flush=True)
                load.stop.set()
                for thread in load.threads:
                    thread.join(timeout=60)
            finally:
                proc.terminate()
                proc.wait(timeout=30)

    def summary(window: str, field: str) -> dict:
        values = [r[window][field] for r in rounds]
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    ratios = [r["upgrade"]["p99_ms"] / r["steady"]["p99_ms"] for r in rounds]
    details = {
        "steady_p99_ms": summary("steady", "p99_ms"), "upgrade_p99_ms": summary("upgrade", "p99_ms"),
        "steady_p50_ms": summary("steady", "p50_ms"), "upgrade_p50_ms": summary("upgrade", "p50_ms"),
        "p99_ratio_per_round": [round(x, 3) for x in ratios],
        "failed_requests": sum(r["steady"]["failed"] + r["upgrade"]["failed"] for r in rounds),
        "upgrade_seconds": summary("upgrade", "seconds"),
        "reembed_faces_per_s": summary("upgrade", "reembed_faces_per_s"),
        "rounds": rounds, "faces": args.faces, "concurrency": args.concurrency, "shadow_share": args.shadow_share,
        "model": "a near-free 128-d stand-in per version (benchmarks.gateway_overhead), Triton Python backend",
    }
    print(json.dumps({k: v for k, v in details.items() if k != "rounds"}, indent=1))
    write_result("model_upgrade_identify_p99", "identify p99 during an upgrade / p99 in steady state (median over "
                 "rounds; same gateway, same load)", round(statistics.median(ratios), 3), None, "value <= 2.0",
                 details)


if __name__ == "__main__":
    main()
