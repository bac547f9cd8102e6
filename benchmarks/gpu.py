"""The GPU figures, in one prepared run: what a lent GPU machine measures for the README.

Three parts, each written to its own JSON in ``--results-dir`` (``benchmarks/results`` by default):

1. Training (``train_step``'s harness, in a child process): IR-50 images/s with bf16 autocast and
   channels_last at ``--batch``, and the refined branch's overhead there (ERB+RRB block / ERB block,
   median of 6 rounds).
2. Inference, IR-50, uint8 NHWC crops in and L2-normalised embeddings out, host to host (the copy
   to and from the GPU is part of every arm, as it is of a served request): torch eager fp32, torch
   bf16 channels_last, ``torch.compile`` of the latter, and ONNX Runtime with the CUDA and TensorRT
   (fp16) execution providers where the installed onnxruntime has them. Arms interleaved, rotated,
   median and spread over ``--rounds``; every arm's cosine to eager fp32 is recorded.
3. Exact search at 1M (the clustered face-like vectors of ``identify_scale``): faiss-gpu's flat index
   when faiss has GPU support, else a torch matrix product + top-k on the GPU (what a flat GPU index
   computes), named as such in the JSON. Per-query p50/p99 at batch 1, and recall@1 against the CPU
   truth computed on the same vectors.

A part whose requirement is missing (no CUDA, no provider) is recorded as skipped with the reason,
never silently dropped.

    python -m benchmarks.gpu                      # on a GPU machine with `pip install -e .[train,export]`
    python -m benchmarks.gpu --quick --device cpu --parts inference search   # the harness alone (a test runs it)

The lent H200 machines reach no network; their image holds torch with CUDA, onnx, onnxruntime (CPU
providers only) and most of what training needs, but not pydantic, pydantic-settings, onnxslim or
cryptography. Download those wheels here (pydantic pydantic-core annotated-types typing-inspection
typing-extensions pydantic-settings python-dotenv onnxslim cryptography cffi pycparser, for cp312
manylinux x86-64) with cdface's own (``pip wheel --no-deps .``) into an ignored ``.whl/`` that the run
carries, then:

    pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
    CDFACE_BENCH_COMMIT=<commit> PYTHONPATH=/tmp/site:$PWD PYTHONSAFEPATH=1 python3 -m benchmarks.gpu

(``PYTHONSAFEPATH``: the source tree's ``cdface/`` must not shadow the installed package, whose
``cdface.training`` lives in ``training/`` here; the machine's copy of ``.git`` may be stale, hence the
commit named.) The results land in ``benchmarks/results/``: copy them to ``$OUT``.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from benchmarks.onnx_vs_torch import ChannelsLastEmbedding, _cosines, _measure
from benchmarks.results import RESULTS_DIR, write_result

REPO = Path(__file__).resolve().parent.parent
Run = Callable[[np.ndarray], np.ndarray]


def part_training(args: argparse.Namespace) -> dict:
    """train_step's harness in a child process: it writes its own two JSONs with its own command."""
    command = [sys.executable, "-m", "benchmarks.train_step", "--device", args.device, "--backbones", args.backbone,
               "--batch", str(args.batch), "--rounds", "6"]
    if args.device == "cuda":
        command += ["--amp", "bf16"]
    if args.quick:
        command.append("--quick")
    started = time.monotonic()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr[-4000:], file=sys.stderr, flush=True)  # the child's traceback: the machine is not ours long
        return {"skipped": f"train_step exited {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"}
    tag = f"{args.backbone}{'_w025' if args.quick else ''}_{args.device}{'_bf16' if args.device == 'cuda' else ''}"
    if args.results_dir.resolve() != RESULTS_DIR.resolve():  # a device run brings back only its results folder
        for name in (f"train_rrb_overhead_{tag}.json", f"train_throughput_{tag}.json"):
            shutil.copy2(RESULTS_DIR / name, args.results_dir / name)
    return {"command": " ".join(["python", *command[1:]]), "wall_s": time.monotonic() - started,
            "printed": done.stdout.strip().splitlines()[-1:]}


def _host_to_host(module: torch.nn.Module, device: torch.device, dtype: Optional[torch.dtype]) -> Run:
    def run(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32,
                                                    enabled=dtype is not None):
            out = module(torch.from_numpy(images).to(device, non_blocking=True))
        return out.float().cpu().numpy()  # .cpu() waits for the GPU: the timing covers the whole call

    return run


def _ort_arms(onnx_path: Path, want: dict[str, dict]) -> tuple[dict[str, Run], dict[str, str]]:
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    arms: dict[str, Run] = {}
    skipped: dict[str, str] = {}
    for name, (provider, options) in want.items():
        if provider not in available:
            skipped[name] = f"onnxruntime {ort.__version__} has no {provider} here (has: {sorted(available)})"
            continue
        session_options = ort.SessionOptions()
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        fallback = ["CPUExecutionProvider"] if provider != "CPUExecutionProvider" else []
        session = ort.InferenceSession(str(onnx_path), sess_options=session_options,
                                       providers=[(provider, options)] + fallback)
        arms[name] = (lambda s: lambda images: s.run(None, {s.get_inputs()[0].name: images})[0])(session)
    return arms, skipped


def part_inference(args: argparse.Namespace, device: torch.device) -> dict:
    import tempfile

    from cdface.export.onnx_export import EmbeddingModel, export_module
    from cdface.training.backbones import create_backbone

    width = 0.25 if args.quick else 1.0
    torch.manual_seed(0)
    backbone = create_backbone(args.backbone, width=width).eval()
    eager = EmbeddingModel(backbone).eval()
    try:
        onnx_bytes: Optional[bytes] = export_module(eager)[0]  # on the CPU, with its parity gate
        export_failure = ""
    except Exception as exc:  # a GPU image's torch/onnx pair may not export: the torch arms still run
        onnx_bytes, export_failure = None, f"ONNX export failed here: {type(exc).__name__}: {exc}"[:300]
    low = torch.bfloat16 if device.type == "cuda" else None
    channels_last = ChannelsLastEmbedding(copy.deepcopy(backbone).eval()).eval().to(device)
    arms: dict[str, Run] = {
        "torch_eager_fp32": _host_to_host(copy.deepcopy(eager).to(device), device, None),
        "torch_channels_last" + ("_bf16" if low else ""): _host_to_host(channels_last, device, low),
        "torch_compile" + ("_bf16" if low else ""): _host_to_host(torch.compile(channels_last, dynamic=False),
                                                                  device, low),
    }
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        wanted = {
            "ort_cuda_fp32": ("CUDAExecutionProvider", {}),
            "ort_tensorrt_fp16": ("TensorrtExecutionProvider", {"trt_fp16_enable": True,
                                                                "trt_engine_cache_enable": True,
                                                                "trt_engine_cache_path": tmp}),
        } if device.type == "cuda" else {"ort_cpu_fp32": ("CPUExecutionProvider", {})}
        if onnx_bytes is None:
            skipped = {name: export_failure for name in wanted}
        else:
            onnx_path.write_bytes(onnx_bytes)
            ort_arms, skipped = _ort_arms(onnx_path, wanted)
            arms.update(ort_arms)
        rng = np.random.default_rng(0)
        # The check batch is the largest measured one: torch.compile (static shapes) compiles once per batch size.
        check = rng.integers(0, 256, size=(max(args.inference_batches), 112, 112, 3), dtype=np.uint8)
        reference = arms["torch_eager_fp32"](check)
        cosines = {}
        for name, run in list(arms.items()):
            try:  # the first call compiles or builds an engine: an arm the machine cannot build is skipped, named
                cosines[name] = round(float(_cosines(run(check), reference).min()), 5)
            except Exception as exc:
                skipped[name] = f"failed on its first call: {type(exc).__name__}: {exc}"[:300]
                del arms[name]
        results: dict = {"backbone": args.backbone, "width": width, "rounds": args.rounds, "skipped": skipped,
                         "cosine_to_eager_fp32_min": cosines}
        for batch in args.inference_batches:
            images = rng.integers(0, 256, size=(batch, 112, 112, 3), dtype=np.uint8)
            speeds = _measure(arms, images, args.rounds, calls=1 if batch > 1 else 20, warmup=3)
            best = max(speeds, key=lambda n: speeds[n]["median"])
            results[f"batch{batch}"] = {"images_per_s": speeds, "best": best}
            print(f"inference batch {batch}: " + ", ".join(f"{n} {s['median']:.0f}" for n, s in speeds.items())
                  + f" img/s; best {best}", flush=True)
    return results


def part_search(args: argparse.Namespace, device: torch.device) -> dict:
    from benchmarks.identify_scale import synthetic

    n = 20_000 if args.quick else 1_000_000
    gallery, queries, _ = synthetic(n, args.queries)
    truth = np.argmax(queries @ gallery.T, axis=1)  # the CPU's exact answer, float32
    engine, search = _gpu_flat(gallery, device)
    for q in queries[:20]:  # warm-up
        search(q[None])
    times, found = [], []
    for _ in range(args.rounds):
        for q in queries:
            started = time.perf_counter()
            ids = search(q[None])
            times.append(time.perf_counter() - started)
            found.append(int(ids[0]))
    ms = 1e3 * np.asarray(times)
    recall = float(np.mean(np.asarray(found[-len(queries):]) == truth))
    return {"engine": engine, "gallery": n, "queries": len(queries), "rounds": args.rounds,
            "p50_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)), "recall_at_1": recall}


def _gpu_flat(gallery: np.ndarray, device: torch.device) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
    try:
        from cdface.serving.index import gpu_available

        use_faiss = device.type == "cuda" and gpu_available()
    except ImportError:
        use_faiss = False
    if use_faiss:
        import faiss

        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, 0, faiss.IndexFlatIP(gallery.shape[1]))
        index.add(gallery)
        return f"faiss-gpu {faiss.__version__} IndexFlatIP", lambda q: index.search(q, 1)[1][0]
    matrix = torch.from_numpy(gallery).to(device, dtype=torch.float16 if device.type == "cuda" else torch.float32)

    def search(q: np.ndarray) -> np.ndarray:
        scores = matrix @ torch.from_numpy(q).to(device, dtype=matrix.dtype).T
        return torch.topk(scores[:, 0], 1).indices.cpu().numpy()

    return f"torch {matrix.dtype} matmul + topk on {device.type} (faiss-gpu not installed here)", search


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="width 0.25, a 20k gallery: the harness only")
    parser.add_argument("--backbone", default="ir50")
    parser.add_argument("--batch", type=int, default=256, help="training batch")
    parser.add_argument("--inference-batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--parts", nargs="+", choices=["training", "inference", "search"],
                        default=["training", "inference", "search"])
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu: no CUDA device here (torch.cuda.is_available() is false); "
                         "--device cpu runs the harness alone")
    device = torch.device(args.device)
    suffix = f"{args.device}{'_quick' if args.quick else ''}"

    def training() -> None:
        print(f"training: {part_training(args)}", flush=True)

    def search() -> None:
        r = part_search(args, device)
        print(write_result(f"gpu_exact_search_{suffix}", f"exact search p50 ms per query, {r['gallery']} faces "
                           f"({r['engine']})", r["p50_ms"], None, "reported", r, results_dir=args.results_dir),
              flush=True)

    def inference() -> None:
        r = part_inference(args, device)
        top = r[f"batch{max(args.inference_batches)}"]
        eager = top["images_per_s"]["torch_eager_fp32"]["median"]
        print(write_result(f"gpu_inference_{args.backbone}_{suffix}",
                           f"images/s at batch {max(args.inference_batches)}, host to host: the fastest arm "
                           f"({top['best']}) vs torch eager fp32", top["images_per_s"][top["best"]]["median"], eager,
                           "reported", r, results_dir=args.results_dir), flush=True)

    # Quickest first (inference compiles), and one part's failure does not cost the others their figures:
    # a lent machine's minutes are not to be spent twice.
    failed = []
    for name, part in (("training", training), ("search", search), ("inference", inference)):
        if name in args.parts:
            try:
                part()
            except Exception:
                traceback.print_exc()
                failed.append(name)
    print(f"load average {os.getloadavg()}", flush=True)
    if failed:
        raise SystemExit(f"benchmarks.gpu: part(s) {', '.join(failed)} failed (traceback above)")


if __name__ == "__main__":
    main()
