"""An INT8 variant of an exported model, published only if it verifies as well as the fp32 graph.

Input: an exported model directory (``model.onnx`` + ``manifest.json``, the hash checked), i.e. a
graph that already passed the export's parity gate against PyTorch. Output: the same contract
(uint8 NHWC crops in, L2-normalised float32 embedding out) with INT8 convolutions, in its own
directory, with its own manifest.

Static quantisation is the default: activation scales come from calibration on aligned crops
(MinMax over the batches), weights are signed INT8 *per output channel* (per-tensor scales lose the
small filters of a conv next to its large ones), activations unsigned INT8 (the U8S8 pair that
VNNI and AVX-512 kernels run). The format is QDQ (QuantizeLinear/DequantizeLinear pairs that ONNX
Runtime fuses into QLinearConv; TensorRT reads the same graph). Only Conv and Gemm are quantised:
they are nearly all of the time; PReLU and the pre-activation BatchNorm of each IR block stay
float, and quantising the residual Adds as well only adds rounding on the skip path.

Dynamic quantisation (``mode="dynamic"``: weights only, activation scales computed at run time)
needs no calibration but turns Conv into ConvInteger, which ONNX Runtime's CPU provider runs with
no fast kernel: IR-50 ran at a quarter to a third of the fp32 graph's speed on the 2-core AVX-512
(VNNI) machine the benchmarks use, where the static graph runs 2.3-2.5x faster than fp32
(``benchmarks/results/onnx_vs_torch.json``). It is kept for models whose calibration crops are not
at hand, and for comparison.

The gate, on a verification ``.bin`` (the held-out synthetic pairs, or LFW): the fp32 and INT8
graphs embed the same images under the evaluation protocol (flip augmentation, 10 folds), and the
INT8 model is refused - a ``CdfaceError``, nothing written - when its accuracy falls by more than
``max_accuracy_drop`` (0.001 = 0.1 point), or when its mean cosine to the fp32 embeddings (every
image and its mirror) is below ``min_mean_cosine``. Both figures go into the manifest.

CPUs without VNNI multiply U8S8 with an instruction that can saturate: quantise on (and gate on) a
machine of the kind that will serve the model.
"""

from __future__ import annotations

import logging
import os
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np

from cdface.core.contract import INPUT_NAME, INPUT_SIZE
from cdface.core.errors import CdfaceError
from cdface.core.manifest import (
    Evaluation,
    ExportResult,
    check_name_version,
    publish_model,
    read_manifest,
    verify_onnx_hash,
)

__all__ = ["DEFAULT_MAX_ACCURACY_DROP", "DEFAULT_MIN_MEAN_COSINE", "QuantizationReport", "quantize_export",
           "quantize_onnx", "gate_int8"]

Mode = Literal["static", "dynamic"]

DEFAULT_MAX_ACCURACY_DROP = 0.001  # 0.1 point of 10-fold verification accuracy
# An INT8 IR-50 lands near 0.999 mean cosine to its fp32 graph; a damaged calibration falls well
# below 0.99 long before the accuracy on a few hundred pairs notices.
DEFAULT_MIN_MEAN_COSINE = 0.99
QUANTIZED_OPS = ["Conv", "Gemm"]
CALIBRATION_BATCH = 16
MIN_CALIBRATION_IMAGES = 8


@dataclass(frozen=True)
class QuantizationReport:
    mode: str
    per_channel: bool
    calibration_images: int
    dataset: str
    pairs: int
    flip: bool
    fp32_accuracy: float
    int8_accuracy: float
    accuracy_drop: float  # fp32 - int8, a fraction (0.001 = 0.1 point)
    mean_cosine: float  # to the fp32 embeddings, over every image the gate embedded
    min_cosine: float
    max_accuracy_drop: float
    min_mean_cosine: float

    def as_result(self) -> dict[str, Any]:
        """The manifest's record of this quantisation (an ``evaluation.results`` entry)."""
        return {"dataset": self.dataset, "metric": "int8_gate", **asdict(self)}

    def summary(self) -> str:
        return (f"INT8 {self.mode}{', per-channel weights' if self.per_channel else ''}: accuracy on {self.dataset} "
                f"{self.fp32_accuracy:.4f} -> {self.int8_accuracy:.4f} (drop {100 * self.accuracy_drop:.2f} points, "
                f"bound {100 * self.max_accuracy_drop:.2f}), mean cosine to fp32 {self.mean_cosine:.5f} "
                f"(min {self.min_cosine:.5f}, bound {self.min_mean_cosine})")


@contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """onnxruntime.quantization logs through the root logger (a warning per tensor it leaves float)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _calibration_reader(images: np.ndarray):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter([images[s : s + CALIBRATION_BATCH] for s in range(0, len(images), CALIBRATION_BATCH)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {INPUT_NAME: np.ascontiguousarray(batch)}

    return Reader()


def _check_calibration(images: np.ndarray) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
        raise CdfaceError(f"calibration images must be uint8 [N, {INPUT_SIZE}, {INPUT_SIZE}, 3] aligned crops, "
                          f"got {images.dtype} {list(images.shape)}")
    if len(images) < MIN_CALIBRATION_IMAGES:
        raise CdfaceError(f"{len(images)} calibration images are too few to set activation ranges "
                          f"(need at least {MIN_CALIBRATION_IMAGES}; a few hundred aligned crops is usual)")


def quantize_onnx(
    onnx_path: str | os.PathLike,
    calibration: np.ndarray | None,
    *,
    mode: Mode = "static",
    per_channel: bool = True,
) -> bytes:
    """The INT8 graph of ``onnx_path`` as bytes (not gated: see :func:`gate_int8`).

    ``calibration``: uint8 [N, 112, 112, 3] aligned crops (static mode; ignored by dynamic mode).
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if mode == "static":
        if calibration is None:
            raise CdfaceError("static INT8 quantisation needs calibration crops")
        _check_calibration(calibration)
    elif mode != "dynamic":
        raise CdfaceError(f"unknown quantisation mode {mode!r}; choose static or dynamic")
    with tempfile.TemporaryDirectory(prefix="cdface-int8-") as tmp, _quiet_quantizer():
        pre, out = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        # Shape inference first, so the quantiser knows every tensor's type. The symbolic pass is
        # skipped: the graph's only symbolic dimension is the batch, which ONNX's own pass handles.
        try:
            quant_pre_process(str(onnx_path), str(pre), skip_symbolic_shape=True)
            if mode == "static":
                assert calibration is not None
                quantize_static(str(pre), str(out), _calibration_reader(calibration), quant_format=QuantFormat.QDQ,
                                op_types_to_quantize=QUANTIZED_OPS, per_channel=per_channel,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
            else:
                quantize_dynamic(str(pre), str(out), op_types_to_quantize=QUANTIZED_OPS, per_channel=per_channel,
                                 weight_type=QuantType.QInt8)
        except Exception as exc:  # the quantiser raises whatever its passes raise; say which, in one line
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            raise CdfaceError(f"ONNX Runtime's quantiser failed ({type(exc).__name__}): {first}") from None
        return out.read_bytes()


class _Recording:
    """An embedder that keeps its raw outputs, so the gate gets cosines from the accuracy pass itself."""

    def __init__(self, embedder) -> None:
        self.embedder = embedder
        self.outputs: list[np.ndarray] = []

    def __call__(self, images: np.ndarray) -> np.ndarray:
        out = self.embedder(images)
        self.outputs.append(out)
        return out


def gate_int8(
    fp32_path: str | os.PathLike,
    int8_path: str | os.PathLike,
    val_bin: str | os.PathLike,
    *,
    mode: str = "static",
    per_channel: bool = True,
    calibration_images: int = 0,
    max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP,
    min_mean_cosine: float = DEFAULT_MIN_MEAN_COSINE,
    flip: bool = True,
    batch_size: int = 64,
) -> QuantizationReport:
    """Verify both graphs on ``val_bin``; the report, or a CdfaceError saying which bound failed and by how much."""
    from cdface.training.data.binfile import decode_bin_images
    from cdface.training.evaluation.embedders import OnnxEmbedder, embed_images
    from cdface.training.evaluation.verification import pair_similarities, verification_accuracy

    val_bin = Path(val_bin)
    if not val_bin.is_file():
        raise CdfaceError(f"verification file not found: {val_bin}")
    images, issame = decode_bin_images(val_bin)
    fp32 = _Recording(OnnxEmbedder(fp32_path, batch_size=batch_size))
    int8 = _Recording(OnnxEmbedder(int8_path, batch_size=batch_size))
    accuracy = {}
    for name, embedder in (("fp32", fp32), ("int8", int8)):
        embeddings = embed_images(embedder, images, flip=flip, batch_size=batch_size)  # refuses NaN embeddings
        accuracy[name] = verification_accuracy(pair_similarities(embeddings), issame).accuracy
    a, b = np.concatenate(fp32.outputs), np.concatenate(int8.outputs)
    cosine = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    report = QuantizationReport(
        mode=mode, per_channel=per_channel, calibration_images=calibration_images, dataset=val_bin.stem,
        pairs=int(issame.size), flip=flip, fp32_accuracy=accuracy["fp32"], int8_accuracy=accuracy["int8"],
        accuracy_drop=accuracy["fp32"] - accuracy["int8"], mean_cosine=float(cosine.mean()),
        min_cosine=float(cosine.min()), max_accuracy_drop=max_accuracy_drop, min_mean_cosine=min_mean_cosine,
    )
    # A tolerance of a thousandth of a pair: the folds' mean can differ from the bound in the last bit.
    if report.accuracy_drop > max_accuracy_drop + 1e-3 / max(report.pairs, 1):
        raise CdfaceError(f"INT8 model refused: verification accuracy on {report.dataset} fell "
                          f"{100 * report.accuracy_drop:.2f} points ({report.fp32_accuracy:.4f} -> "
                          f"{report.int8_accuracy:.4f}), more than the {100 * max_accuracy_drop:.2f} allowed; "
                          f"mean cosine to fp32 {report.mean_cosine:.4f}; nothing was written")
    if report.mean_cosine < min_mean_cosine:
        raise CdfaceError(f"INT8 model refused: mean cosine to the fp32 embeddings on {report.dataset} is "
                          f"{report.mean_cosine:.4f} < {min_mean_cosine} (accuracy {report.fp32_accuracy:.4f} -> "
                          f"{report.int8_accuracy:.4f}); nothing was written")
    return report


def quantize_export(
    export_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    val_bin: str | os.PathLike,
    calibration: np.ndarray | None,
    name: str | None = None,
    version: int | None = None,
    mode: Mode = "static",
    per_channel: bool = True,
    max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP,
    min_mean_cosine: float = DEFAULT_MIN_MEAN_COSINE,
) -> tuple[ExportResult, QuantizationReport]:
    """Exported fp32 model directory -> gated INT8 model directory (``model.onnx`` + ``manifest.json``).

    The INT8 manifest keeps the source's description (backbone, normalisation, source checkpoint,
    its evaluation results and thresholds per FAR, which the gates keep within rounding) and adds
    the gate's record (both accuracies, the cosines, the bounds) to ``evaluation.results``.
    """
    import onnx

    from cdface.export.onnx_export import _check_contract

    export_dir, out_dir = Path(export_dir), Path(out_dir)
    source = read_manifest(export_dir)
    fp32_path = export_dir / source.onnx_file
    verify_onnx_hash(source, fp32_path)  # only the graph that passed the export's parity gate
    if out_dir.resolve() == export_dir.resolve():
        raise CdfaceError(f"--out {out_dir} is the fp32 model's directory: the INT8 model needs its own")
    name = name if name is not None else f"{source.name}-int8"
    version = version if version is not None else source.version
    check_name_version(name, version)
    if not Path(val_bin).is_file():
        raise CdfaceError(f"verification file not found: {val_bin}")

    int8_bytes = quantize_onnx(fp32_path, calibration, mode=mode, per_channel=per_channel)
    try:
        proto = onnx.load_from_string(int8_bytes)
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise CdfaceError(f"the INT8 graph fails onnx.checker: {str(exc).splitlines()[0]}") from None
    if _check_contract(proto) != source.embedding_size:
        raise CdfaceError("the INT8 graph's embedding size differs from the fp32 model's")
    with tempfile.TemporaryDirectory(prefix="cdface-int8-") as tmp:
        int8_path = Path(tmp) / "model.onnx"
        int8_path.write_bytes(int8_bytes)
        report = gate_int8(fp32_path, int8_path, val_bin, mode=mode, per_channel=per_channel,
                           calibration_images=0 if calibration is None or mode == "dynamic" else len(calibration),
                           max_accuracy_drop=max_accuracy_drop, min_mean_cosine=min_mean_cosine,
                           flip=True)

    previous = source.evaluation or Evaluation()
    evaluation = Evaluation(results=[*previous.results, report.as_result()], thresholds=previous.thresholds)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), source.opset)
    result = publish_model(
        out_dir, int8_bytes, name=name, version=version, backbone=source.backbone,
        embedding_size=source.embedding_size, mean=source.normalisation.mean, std=source.normalisation.std,
        source=source.source, opset=opset, flip_augmented=source.flip_augmented,
        config_digest=source.config_digest, evaluation=evaluation,
    )
    return result, report
