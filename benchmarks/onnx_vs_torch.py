"""ONNX Runtime vs PyTorch eager, images/s on CPU, for the exported IR-50 graph.

Both sides run the same thing: uint8 NHWC crops in, L2-normalised embeddings out (the torch side
is the very module that was exported). Random weights: speed does not depend on their values.
Batches 1 and 32; the headline value is the ONNX Runtime / PyTorch ratio at batch 32, the
per-batch figures are in ``details``. Both run in this process with the same thread count,
alternating iteration by iteration, so the ratio holds on a noisy shared machine even when
absolute times drift.

    python -m benchmarks.onnx_vs_torch            # IR-50, a few minutes on 2 cores
    python -m benchmarks.onnx_vs_torch --quick    # IR-50 at width 0.25, seconds
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.results import write_result
from cdface.core.contract import INPUT_NAME, OUTPUT_NAME
from cdface.export.onnx_export import EmbeddingModel, export_module
from cdface.training.backbones import create_backbone

TARGET = ">= 1.5"


def _interleaved(runs: dict, images: np.ndarray, iters: int, warmup: int) -> dict[str, float]:
    """Images/s per runner; the runners alternate every iteration so a neighbour's burst of load
    hits both sides alike instead of whichever happened to be running."""
    for _ in range(warmup):
        for run in runs.values():
            run(images)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(iters):
        for name, run in runs.items():
            start = time.perf_counter()
            run(images)
            times[name].append(time.perf_counter() - start)
    return {name: len(images) / float(np.median(t)) for name, t in times.items()}  # the median shrugs off outliers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="width 0.25 and fewer iterations (a smoke run)")
    parser.add_argument("--backbone", default="ir50")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    width = 0.25 if args.quick else 1.0
    plans = {1: (3, 10), 32: (1, 3) if args.quick else (1, 5)}  # batch: (warmup, iters)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = EmbeddingModel(create_backbone(args.backbone, width=width)).eval()
    print(f"exporting {args.backbone} (width {width}) ...", flush=True)
    onnx_bytes, dim = export_module(model)  # includes the parity check

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    with tempfile.TemporaryDirectory() as tmp:  # ORT maps large models from a file faster than from bytes
        path = Path(tmp) / "model.onnx"
        path.write_bytes(onnx_bytes)
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])

    def run_torch(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(images)).numpy()

    def run_onnx(images: np.ndarray) -> np.ndarray:
        return session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]

    details = {"backbone": args.backbone, "width": width, "embedding_size": dim, "threads": args.threads,
               "onnxruntime": ort.__version__, "torch": torch.__version__, "quick": args.quick}
    rng = np.random.default_rng(0)
    for batch, (warmup, iters) in plans.items():
        images = rng.integers(0, 256, size=(batch, 112, 112, 3), dtype=np.uint8)
        speeds = _interleaved({"torch": run_torch, "onnx": run_onnx}, images, iters, warmup)
        torch_ips, onnx_ips = speeds["torch"], speeds["onnx"]
        details[f"batch{batch}"] = {"torch_images_per_s": round(torch_ips, 2), "onnx_images_per_s": round(onnx_ips, 2),
                                    "ratio": round(onnx_ips / torch_ips, 3), "iters": iters}
        print(f"batch {batch:>2}: torch {torch_ips:7.2f} img/s   onnxruntime {onnx_ips:7.2f} img/s   "
              f"ratio {onnx_ips / torch_ips:.2f}", flush=True)

    # Shared machines: record how busy this one was, to read the figures against.
    details["load_average_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    b32 = details["batch32"]
    name = "onnx_vs_torch_quick" if args.quick else "onnx_vs_torch"
    path = write_result(name, "onnxruntime_images_per_s_batch32", b32["onnx_images_per_s"], b32["torch_images_per_s"],
                        TARGET, details)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
