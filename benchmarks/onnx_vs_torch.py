"""The served ONNX model vs the best PyTorch setup on this CPU, images/s at batch 1 and 32.

Every arm runs the same thing: uint8 NHWC crops in, L2-normalised embeddings out, IR-50 with
random weights (speed does not depend on their values).

Arms:
  ort_fp32             the exported graph; ONNX Runtime tuned: ORT_ENABLE_ALL graph optimisation,
                       intra-op threads = --threads, sequential execution, and no spinning (its idle
                       worker threads would otherwise burn the cores the next arm runs on)
  ort_int8             the same graph quantised by ``cdface.export.quantize`` (static, QDQ, per-channel
                       INT8 weights, calibrated on synthetic aligned crops of training identities),
                       same session options
  torch_eager          the exported module itself, under inference_mode
  torch_channels_last  the module with channels_last weights and input, inference_mode
  torch_jit_freeze     torch.jit.freeze(torch.jit.trace(...)) of the channels_last module
  torch_compile        torch.compile (inductor, freezing on) of the channels_last module, one graph
                       per batch size (dynamic=False)

"Best torch" is the torch arm with the highest median at that batch in this same run; the JSON
records which won. Every torch arm must agree with eager (cosine) before it may win; the INT8
arm's cosine to fp32 is recorded. The headline is the served ONNX variant over the best torch arm
at batch 32 (batch 1 in ``details``): INT8 where its mean cosine to fp32 on the check crops meets
the gate's bound, else fp32. Its verification-accuracy gate needs trained weights: `cdface export
quantize` runs it (tests/export/test_int8.py; on the training demo's model).

Method: warm-up (compilation included) for every arm, then --rounds rounds; in each round every
arm runs once (batch 32: one call; batch 1: --batch1-calls calls), the arms interleaved and their
order rotated from round to round, so a burst of load from a neighbour hits all arms alike. Per arm:
median images/s over the rounds and the spread (min, max, interquartile range). The load average
before and after is recorded: these are shared machines.

    python -m benchmarks.onnx_vs_torch            # IR-50, 5 rounds
    python -m benchmarks.onnx_vs_torch --quick    # IR-50 at width 0.25 (same graph, less arithmetic)
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.results import write_result
from cdface.core.contract import INPUT_NAME, OUTPUT_NAME, PIXEL_MEAN, PIXEL_STD
from cdface.export.onnx_export import EmbeddingModel, export_module
from cdface.export.quantize import DEFAULT_MIN_MEAN_COSINE, quantize_onnx
from cdface.training.backbones import create_backbone
from cdface.training.data.synthetic import render_sample

TARGET = ">= 1.3"
BATCHES = (1, 32)
TORCH_AGREEMENT = 0.9999  # a torch variant that disagrees with eager more than this is broken, not fast

Run = Callable[[np.ndarray], np.ndarray]


class ChannelsLastEmbedding(nn.Module):
    """EmbeddingModel's computation with channels_last activations end to end.

    The NHWC uint8 input permuted to NCHW already has channels_last strides; keeping them (instead
    of ``to_model_input``'s ``.contiguous()``) saves a copy and lets oneDNN pick its NHWC kernels.
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.permute(0, 3, 1, 2).float() - PIXEL_MEAN) / PIXEL_STD
        return F.normalize(self.backbone(x.contiguous(memory_format=torch.channels_last)), dim=1)


def _ort_session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle ORT threads spin for work by default: measured next to torch, they would slow it down.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    return lambda images: session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]


def _torch_run(module: Callable[[torch.Tensor], torch.Tensor]) -> Run:
    def run(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(images)).numpy()

    return run


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def _spread(speeds: list[float]) -> dict:
    q1, median, q3 = np.percentile(speeds, [25, 50, 75])
    return {"median": round(float(median), 3), "min": round(min(speeds), 3), "max": round(max(speeds), 3),
            "iqr": [round(float(q1), 3), round(float(q3), 3)], "rounds": [round(s, 3) for s in speeds]}


def _measure(runs: dict[str, Run], images: np.ndarray, rounds: int, calls: int, warmup: int) -> dict[str, dict]:
    """images/s per arm and round: arms interleaved within a round, their order rotated across rounds."""
    for _ in range(warmup):
        for run in runs.values():
            run(images)
    names = list(runs)
    speeds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            run = runs[name]
            start = time.perf_counter()
            for _ in range(calls):
                run(images)
            speeds[name].append(calls * len(images) / (time.perf_counter() - start))
    return {name: _spread(values) for name, values in speeds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="IR-50 at width 0.25 (a smoke run; same graph shape)")
    parser.add_argument("--backbone", default="ir50")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after warm-up (at least 5)")
    parser.add_argument("--batch1-calls", type=int, default=10, help="calls per arm and round at batch 1")
    parser.add_argument("--calibration", type=int, default=64, help="synthetic aligned crops to calibrate INT8 on")
    args = parser.parse_args()
    if args.rounds < 5:
        parser.error("--rounds must be at least 5: fewer cannot show a spread worth reading")

    load_before = [round(x, 2) for x in os.getloadavg()]
    started = time.monotonic()
    width = 0.25 if args.quick else 1.0
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    backbone = create_backbone(args.backbone, width=width).eval()
    eager = EmbeddingModel(backbone).eval()
    print(f"exporting {args.backbone} (width {width}) ...", flush=True)
    onnx_bytes, dim = export_module(eager)  # includes the parity gate against PyTorch

    import onnxruntime as ort

    # Training-role identities: aligned crops the verification pairs never use.
    calibration = np.stack([render_sample(11, identity, 0, hard=False) for identity in range(args.calibration)])
    check = np.stack([render_sample(12, identity, 1, hard=False) for identity in range(32)])
    runs: dict[str, Run] = {}
    with tempfile.TemporaryDirectory(prefix="onnx-vs-torch-") as tmp:
        fp32_path, int8_path = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        fp32_path.write_bytes(onnx_bytes)
        print("quantising (static INT8, per-channel weights) ...", flush=True)
        t = time.monotonic()
        int8_path.write_bytes(quantize_onnx(fp32_path, calibration))
        quantize_s = time.monotonic() - t
        runs["ort_fp32"] = _ort_session(fp32_path, args.threads)  # ORT maps a file faster than bytes
        runs["ort_int8"] = _ort_session(int8_path, args.threads)

    channels_last = ChannelsLastEmbedding(copy.deepcopy(backbone).eval()).eval()
    runs["torch_eager"] = _torch_run(eager)
    runs["torch_channels_last"] = _torch_run(channels_last)
    compiled = torch.compile(channels_last, dynamic=False)
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # weights become constants: conv+BN folding, prepacked oneDNN weights

    details: dict = {
        "backbone": args.backbone, "width": width, "embedding_size": dim, "threads": args.threads,
        "rounds": args.rounds, "batch1_calls_per_round": args.batch1_calls, "quick": args.quick,
        "onnxruntime": ort.__version__, "torch": torch.__version__,
        "ort_options": {"graph_optimization_level": "ORT_ENABLE_ALL", "intra_op_num_threads": args.threads,
                        "execution_mode": "sequential", "session.intra_op.allow_spinning": "0"},
        "int8": {"mode": "static", "format": "QDQ", "ops": ["Conv", "Gemm"], "per_channel_weights": True,
                 "activations": "uint8", "weights": "int8", "calibration_images": len(calibration),
                 "quantize_s": round(quantize_s, 1)},
    }
    reference = runs["torch_eager"](check)
    details["int8"]["cosine_to_fp32_mean"] = round(float(_cosines(runs["ort_int8"](check),
                                                                  runs["ort_fp32"](check)).mean()), 5)
    int8_servable = details["int8"]["cosine_to_fp32_mean"] >= DEFAULT_MIN_MEAN_COSINE
    rng = np.random.default_rng(0)
    for batch in BATCHES:
        images = rng.integers(0, 256, size=(batch, 112, 112, 3), dtype=np.uint8)
        arms = dict(runs)
        print(f"batch {batch}: tracing and compiling ...", flush=True)
        t = time.monotonic()
        with torch.no_grad():
            traced = torch.jit.trace(channels_last, torch.from_numpy(images))
            arms["torch_jit_freeze"] = _torch_run(torch.jit.freeze(traced))
        arms["torch_compile"] = _torch_run(compiled)
        arms["torch_compile"](images)  # the compilation itself, outside the warm-up proper
        prepare_s = time.monotonic() - t
        agreement = {name: round(float(_cosines(arms[name](check[:batch]), reference[:batch]).min()), 6)
                     for name in arms if name.startswith("torch_")}
        calls = 1 if batch > 1 else args.batch1_calls
        print(f"batch {batch}: {args.rounds} rounds x {len(arms)} arms ...", flush=True)
        speeds = _measure(arms, images, args.rounds, calls, warmup=2)
        torch_arms = {n: s for n, s in speeds.items() if n.startswith("torch_") and agreement[n] >= TORCH_AGREEMENT}
        best_torch = max(torch_arms, key=lambda n: torch_arms[n]["median"])
        served = "ort_int8" if int8_servable else "ort_fp32"
        best = speeds[best_torch]["median"]
        details[f"batch{batch}"] = {
            "images_per_s": speeds, "torch_agreement_min_cosine": agreement, "best_torch": best_torch,
            "served": served, "ratio_served_vs_best_torch": round(speeds[served]["median"] / best, 3),
            "ratio_ort_fp32_vs_best_torch": round(speeds["ort_fp32"]["median"] / best, 3),
            "ratio_ort_int8_vs_best_torch": round(speeds["ort_int8"]["median"] / best, 3),
            "ratio_best_torch_vs_eager": round(best / speeds["torch_eager"]["median"], 3),
            "torch_prepare_s": round(prepare_s, 1),
        }
        for name, s in speeds.items():
            print(f"  {name:<20} {s['median']:8.2f} img/s  (min {s['min']:.2f}, max {s['max']:.2f})", flush=True)
        print(f"  best torch: {best_torch}; {served} / best torch = {speeds[served]['median'] / best:.2f}", flush=True)

    details["wall_s"] = round(time.monotonic() - started, 1)
    details["load_average_1_5_15"] = {"before": load_before, "after": [round(x, 2) for x in os.getloadavg()]}
    b32 = details["batch32"]
    served = b32["served"]
    name = "onnx_vs_torch_quick" if args.quick else "onnx_vs_torch"
    path = write_result(name, f"served ONNX Runtime ({served}) images/s at batch 32 (baseline: best PyTorch setup, "
                              f"{b32['best_torch']})",
                        b32["images_per_s"][served]["median"], b32["images_per_s"][b32["best_torch"]]["median"],
                        TARGET, details)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
