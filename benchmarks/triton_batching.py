"""Triton's dynamic batcher vs no batching: throughput for single-image requests at concurrency 16.

One real ``tritonserver`` (the nvidia-pytriton build, Python backend + ONNX Runtime) serves the same
small exported face model twice from one repository: ``face-batched`` with ``dynamic_batching`` and
``face-unbatched`` without it; everything else (one instance, one ONNX Runtime thread) is equal.
A closed-loop client keeps 16 single-image requests in flight against one model at a time; rounds
alternate between the two so machine noise hits both alike. The figure is the ratio of the median
throughputs (target >= 2x), written to ``benchmarks/results/triton_batching.json``.

Clients: ``perf_analyzer`` (default; Triton's C++ load generator from the ``tritonclient==2.51.0``
wheel, fetched once into the cdface cache) or ``python`` (an asyncio gRPC client with tritonclient).
On a 2-core machine the Python client's own CPU cost caps both models at the same rate, hiding the
batcher; the C++ client leaves the cores to the server.

    python -m benchmarks.triton_batching            # ~2 minutes
    python -m benchmarks.triton_batching --quick    # under a minute
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from cdface.core.contract import INPUT_NAME, OUTPUT_NAME

BATCHED, UNBATCHED = "face-batched", "face-unbatched"


def export_small_model(out_dir: Path, width: float) -> Path:
    """A randomly initialised IR-18 at ``width``, exported through the project's own exporter."""
    import torch

    from cdface.export.onnx_export import export_checkpoint
    from cdface.training.backbones import create_backbone
    from cdface.training.checkpoint import save_checkpoint

    torch.manual_seed(0)
    spec = {"name": "ir18", "kwargs": {"width": width}}
    checkpoint = out_dir / "bench.pt"
    save_checkpoint(checkpoint, {"backbone": spec, "model": create_backbone(spec["name"], **spec["kwargs"]).state_dict()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_checkpoint(checkpoint, out_dir / "export", name="bench-face", version=1)
    return out_dir / "export"


def build_repo(repo: Path, export_dir: Path, max_batch_size: int, queue_delay_us: int) -> None:
    from cdface.export.triton_repo import add_model_version

    add_model_version(repo, BATCHED, export_dir, backend="python", max_batch_size=max_batch_size,
                      preferred=[max_batch_size], queue_delay_us=queue_delay_us, instances=1, ort_threads=1)
    add_model_version(repo, UNBATCHED, export_dir, backend="python", max_batch_size=max_batch_size,
                      dynamic_batching=False, instances=1, ort_threads=1)


async def closed_loop(url: str, model: str, concurrency: int, seconds: float, warmup_s: float) -> dict:
    """``concurrency`` workers, each sending its next request as soon as the last one returns."""
    import tritonclient.grpc.aio as grpcclient

    images = np.random.default_rng(0).integers(0, 256, size=(64, 1, 112, 112, 3), dtype=np.uint8)
    client = grpcclient.InferenceServerClient(url)
    latencies: list[float] = []
    start = time.perf_counter()
    measure_from, stop_at = start + warmup_s, start + warmup_s + seconds

    async def worker(seed: int) -> None:
        i = seed
        while True:
            tensor = grpcclient.InferInput(INPUT_NAME, [1, 112, 112, 3], "UINT8")
            tensor.set_data_from_numpy(images[i % len(images)])
            sent = time.perf_counter()
            if sent >= stop_at:
                return
            result = await client.infer(model, [tensor])
            done = time.perf_counter()
            assert result.as_numpy(OUTPUT_NAME).shape[0] == 1
            if sent >= measure_from:
                latencies.append(done - sent)
            i += concurrency

    try:
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
    finally:
        await client.close()
    return {
        "requests": len(latencies),
        "throughput": len(latencies) / seconds,
        "p50_ms": 1000 * float(np.percentile(latencies, 50)),
        "p99_ms": 1000 * float(np.percentile(latencies, 99)),
    }


PERF_ANALYZER_WHEEL = "tritonclient==2.51.0"  # the release matching the bundled tritonserver 2.51


def ensure_perf_analyzer() -> tuple[Path, dict[str, str]]:
    """perf_analyzer's binary and the environment it runs in, fetched once per machine."""
    import zipfile

    from filelock import FileLock

    from cdface.core.paths import cache_dir
    from cdface.devtools.triton_env import ensure_server_env

    env = ensure_server_env()
    libs = env.site_packages / "nvidia_pytriton.libs"
    root = cache_dir() / "triton" / "perf_analyzer-2.51.0"
    binary = root / "perf_analyzer"
    with FileLock(str(root) + ".lock"):
        if not binary.exists():
            shutil.rmtree(root, ignore_errors=True)
            (root / "lib").mkdir(parents=True)
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(root),
                            PERF_ANALYZER_WHEEL], check=True)
            wheel = next(root.glob("tritonclient-2.51.0-*.whl"))
            with zipfile.ZipFile(wheel) as zf, open(root / "perf_analyzer.tmp", "wb") as out:
                out.write(zf.read("tritonclient-2.51.0.data/data/bin/perf_analyzer"))
            wheel.unlink()
            os.chmod(root / "perf_analyzer.tmp", 0o755)
            os.replace(root / "perf_analyzer.tmp", binary)
        # It links against libb64.so.0d and libcudart.so.12, which the pytriton wheel carries under
        # auditwheel's hashed names; plain-named links make the loader find them.
        for wanted, pattern in (("libb64.so.0d", "libb64-*.so.0d"), ("libcudart.so.12", "libcudart-*.so.12*")):
            link = root / "lib" / wanted
            if not link.exists():
                link.symlink_to(next(libs.glob(pattern)))
    environ = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join([str(root / "lib"), str(libs)]))
    return binary, environ


def perf_analyzer_run(tool: tuple[Path, dict[str, str]], url: str, model: str, concurrency: int,
                      seconds: float, workdir: Path) -> dict:
    binary, environ = tool
    report = workdir / f"{model}.csv"
    cmd = [str(binary), "-m", model, "-u", url, "-i", "grpc", "-b", "1",
           "--concurrency-range", str(concurrency), "--measurement-interval", str(int(seconds * 1000)),
           "--stability-percentage", "50", "--max-trials", "3", "-f", str(report)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=environ)
    if proc.returncode != 0:
        raise SystemExit(f"perf_analyzer failed ({proc.returncode}): {(proc.stdout + proc.stderr)[-800:]}")
    row = next(csv.DictReader(report.open()))
    return {
        "throughput": float(row["Inferences/Second"]),
        "p50_ms": float(row["p50 latency"]) / 1000,
        "p99_ms": float(row["p99 latency"]) / 1000,
        "server_queue_ms": float(row["Server Queue"]) / 1000,
        "server_compute_infer_ms": float(row["Server Compute Infer"]) / 1000,
    }


def onnx_runtime_ceiling(onnx_path: Path, batch: int, seconds: float) -> dict[str, float]:
    """Images/s of ONNX Runtime alone (1 thread, as in the server) at batch 1 and at ``batch``.

    Their ratio bounds what batching can win on this CPU once per-request overheads are gone:
    convolutions cost about the same per image whatever the batch.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    rates = {}
    for n in (1, batch):
        images = np.random.default_rng(n).integers(0, 256, size=(n, 112, 112, 3), dtype=np.uint8)
        session.run(None, {INPUT_NAME: images})
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            session.run(None, {INPUT_NAME: images})
            runs += 1
        rates[str(n)] = runs * n / (time.perf_counter() - start)
    return rates


def batch_histogram(http_url: str, model: str) -> dict[int, int]:
    """Executions per batch size, from Triton's own statistics."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(http_url)
    try:
        stats = client.get_inference_statistics(model)["model_stats"]
    finally:
        client.close()
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for s in stats for b in s.get("batch_stats", [])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short rounds: a smoke run, noisier figure")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=None, help="measured seconds per round")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per model (alternating)")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--queue-delay-us", type=int, default=2000)
    parser.add_argument("--client", choices=["perf_analyzer", "python"], default="perf_analyzer")
    parser.add_argument("--width", type=float, default=0.125, help="IR-18 channel width (the tests use 0.125)")
    args = parser.parse_args()
    # perf_analyzer repeats its window until three agree, so its windows can be shorter.
    if args.client == "perf_analyzer":
        seconds = args.seconds or (3.0 if args.quick else 5.0)
    else:
        seconds = args.seconds or (5.0 if args.quick else 15.0)
    rounds = args.rounds or (1 if args.quick else 3)
    warmup = 1.0 if args.quick else 3.0

    from benchmarks.results import write_result
    from cdface.devtools.triton_local import TritonServer

    with tempfile.TemporaryDirectory(prefix="cdface-bench-triton-") as tmp:
        tmp = Path(tmp)
        export_dir = export_small_model(tmp, args.width)
        build_repo(tmp / "repo", export_dir, args.max_batch_size, args.queue_delay_us)
        ceiling = onnx_runtime_ceiling(export_dir / "model.onnx", args.max_batch_size, 1.0 if args.quick else 3.0)
        ceiling_ratio = ceiling[str(args.max_batch_size)] / ceiling["1"]
        print(f"ONNX Runtime alone: {ceiling['1']:.0f} img/s at batch 1, {ceiling[str(args.max_batch_size)]:.0f} at "
              f"batch {args.max_batch_size} ({ceiling_ratio:.2f}x)", flush=True)
        runs: dict[str, list[dict]] = {BATCHED: [], UNBATCHED: []}
        tool = ensure_perf_analyzer() if args.client == "perf_analyzer" else None
        with TritonServer(tmp / "repo", log_path=tmp / "server.log") as server:
            for r in range(rounds):
                for model in (UNBATCHED, BATCHED) if r % 2 == 0 else (BATCHED, UNBATCHED):
                    if tool is not None:
                        run = perf_analyzer_run(tool, server.grpc_url, model, args.concurrency, seconds, tmp)
                    else:
                        run = asyncio.run(closed_loop(server.grpc_url, model, args.concurrency, seconds, warmup))
                    runs[model].append(run)
                    print(f"round {r + 1}/{rounds} {model:15s} {run['throughput']:7.1f} img/s  "
                          f"p50 {run['p50_ms']:6.1f} ms  p99 {run['p99_ms']:6.1f} ms", flush=True)
            histograms = {model: batch_histogram(server.http_url, model) for model in runs}

    batched = statistics.median(r["throughput"] for r in runs[BATCHED])
    unbatched = statistics.median(r["throughput"] for r in runs[UNBATCHED])
    executions = histograms[BATCHED]
    mean_batch = sum(k * n for k, n in executions.items()) / max(1, sum(executions.values()))
    print(f"dynamic batching {batched:.1f} img/s vs none {unbatched:.1f} img/s: {batched / unbatched:.2f}x "
          f"(mean executed batch {mean_batch:.1f})")
    path = write_result(
        "triton_batching",
        metric="throughput_img_per_s",
        value=batched,
        baseline=unbatched,
        target=">= 2.0",
        details={
            "model": f"ir18 width {args.width}, python backend + ONNX Runtime (1 instance, 1 thread)",
            "server": "tritonserver 2.51 (nvidia-pytriton 0.7.0)",
            "client": ("perf_analyzer 2.51 (C++)" if args.client == "perf_analyzer" else "asyncio gRPC (tritonclient)")
                      + ", gRPC, closed loop, single-image requests",
            "concurrency": args.concurrency,
            "seconds_per_round": seconds,
            "rounds": rounds,
            "max_batch_size": args.max_batch_size,
            "queue_delay_us": args.queue_delay_us,
            "runs": runs,
            "batched_executions_by_size": executions,
            "unbatched_executions_by_size": histograms[UNBATCHED],
            "mean_executed_batch": mean_batch,
            "onnxruntime_direct_img_per_s": ceiling,
            "onnxruntime_batch_gain": ceiling_ratio,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
