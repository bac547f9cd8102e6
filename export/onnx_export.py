"""Export a trained checkpoint to the project's ONNX contract, and prove it matches PyTorch.

The exported graph takes what a server has in hand - uint8 [N, 112, 112, 3] RGB aligned crops -
and returns ``embedding``, float32 [N, D], L2-normalised. The layout change and the
``(x - 127.5) / 127.5`` scaling are part of the graph, so no client can get them wrong.

Exporter: the torch.export-based ("dynamo") exporter, opset 20. For these backbones it gives a
clean graph (no Identity/Constant clutter, the embedding size stays a static dimension, the batch
is a named dynamic dimension) and it evaluates the Python-level input checks on symbolic shapes
instead of tracing them as constants, as the TorchScript exporter (``dynamo=False``) does.
Opset 20 is the dynamo exporter's native opset in torch 2.13 (no version conversion pass) and
is read by ONNX Runtime >= 1.16 and TensorRT 10's ONNX parser.

Nothing is written until the final graph (after the optional onnxslim pass) has matched PyTorch
on a check batch in ONNX Runtime; then ``model.onnx`` and ``manifest.json`` land atomically.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cdface.core.contract import INPUT_NAME, INPUT_SIZE, OUTPUT_NAME, PARITY_MIN_COSINE, PIXEL_MEAN, PIXEL_STD
from cdface.core.digest import sha256_file
from cdface.core.errors import CdfaceError
from cdface.core.manifest import (
    ExportResult,
    Source,
    check_name_version,
    config_digest,
    publish_model,
    read_eval_report,
)
from cdface.training.checkpoint import build_backbone_from, load_checkpoint
from cdface.training.preprocess import to_model_input

__all__ = ["EmbeddingModel", "ExportResult", "export_checkpoint", "export_module", "check_batch", "PARITY_MIN_COSINE"]

OPSET = 20


class EmbeddingModel(nn.Module):
    """uint8 NHWC RGB crops -> L2-normalised embeddings: the module that becomes the ONNX graph.

    With ``flip=True`` the embedding is that of the image plus that of its horizontal mirror (the
    usual test-time augmentation), computed as one backbone pass over a doubled batch.
    """

    def __init__(self, backbone: nn.Module, flip: bool = False):
        super().__init__()
        self.backbone = backbone
        self.flip = flip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = to_model_input(images)
        if self.flip:
            both = self.backbone(torch.cat([x, x.flip(3)]))
            emb = both.reshape(2, -1, both.shape[-1]).sum(0)
        else:
            emb = self.backbone(x)
        return F.normalize(emb, dim=1)


def check_batch(count: int = 8, seed: int = 0, size: int = INPUT_SIZE) -> np.ndarray:
    """uint8 [count, size, size, 3]: random crops plus an all-black and an all-white one (the extremes)."""
    if count < 3:
        raise ValueError("the check batch needs at least 3 images")
    rng = np.random.default_rng(seed)
    batch = rng.integers(0, 256, size=(count, size, size, 3), dtype=np.uint8)
    batch[-2] = 0
    batch[-1] = 255
    return batch


def _onnx_to_proto(module: nn.Module, opset: int):
    # An example batch of 2: with 1, torch.export would specialise the batch dimension to a constant.
    example = torch.zeros((2, INPUT_SIZE, INPUT_SIZE, 3), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1)
    # The exporter logs its progress and warns about torchvision ops we never use; keep the CLI quiet.
    for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={INPUT_NAME: {0: batch}},
            optimize=True,
            verbose=False,
        )
    if program is None:  # only the legacy exporter (dynamo=False) returns None
        raise CdfaceError("torch.onnx.export returned no ONNX program although dynamo=True was asked for")
    return program.model_proto


def _simplify(proto):
    import onnxslim

    return onnxslim.slim(proto)


def _ort_session(onnx_bytes: bytes):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(onnx_bytes, sess_options=options, providers=["CPUExecutionProvider"])


def _check_contract(proto) -> int:
    """The graph's signature must be the contract; returns D."""
    import onnx

    inputs, outputs = list(proto.graph.input), list(proto.graph.output)
    if [i.name for i in inputs] != [INPUT_NAME] or [o.name for o in outputs] != [OUTPUT_NAME]:
        raise CdfaceError(f"exported graph has inputs {[i.name for i in inputs]} "
                          f"and outputs {[o.name for o in outputs]}, expected ['{INPUT_NAME}'] and ['{OUTPUT_NAME}']")
    in_type, out_type = inputs[0].type.tensor_type, outputs[0].type.tensor_type
    if in_type.elem_type != onnx.TensorProto.UINT8 or out_type.elem_type != onnx.TensorProto.FLOAT:
        raise CdfaceError("exported graph must take uint8 images and return float32 embeddings")
    in_dims = in_type.shape.dim
    if not in_dims[0].dim_param or [d.dim_value for d in in_dims[1:]] != [INPUT_SIZE, INPUT_SIZE, 3]:
        raise CdfaceError("exported graph input must be [N, 112, 112, 3] with a dynamic batch")
    return int(out_type.shape.dim[1].dim_value)


def _parity(onnx_bytes: bytes, reference: Callable[[torch.Tensor], torch.Tensor], batch: np.ndarray) -> float:
    """Lowest per-face cosine between ONNX Runtime and PyTorch; batch 1 is checked too (dynamic batch)."""
    session = _ort_session(onnx_bytes)
    got = session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
    got_one = session.run([OUTPUT_NAME], {INPUT_NAME: batch[:1]})[0]
    with torch.inference_mode():
        want = reference(torch.from_numpy(batch)).float().numpy()
    got = np.concatenate([got, got_one])
    want = np.concatenate([want, want[:1]])
    if got.shape != want.shape:
        raise CdfaceError(f"ONNX output shape {got.shape} differs from PyTorch's {want.shape}")
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1) + 1e-12)
    cos = np.where(np.isfinite(cos), cos, -1.0)
    return float(cos.min())


def export_module(
    model: EmbeddingModel,
    *,
    opset: int = OPSET,
    simplify: bool = True,
    check_size: int = 8,
    reference_fault: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[bytes, int]:
    """Export ``model`` to ONNX bytes that passed the checker and the parity check; returns (bytes, D).

    ``reference_fault`` is a test seam: when given, it is applied to the PyTorch reference
    embeddings before the comparison, so a test can plant a parity failure and watch the export
    refuse. Production callers never pass it.
    """
    import onnx

    model = model.eval()
    try:
        proto = _onnx_to_proto(model, opset)
    except Exception as exc:  # the exporter raises many types; the first line says what failed
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise CdfaceError(f"torch.onnx.export failed ({type(exc).__name__}): {first}") from None
    if simplify:
        proto = _simplify(proto)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise CdfaceError(f"exported ONNX graph fails onnx.checker: {str(exc).splitlines()[0]}") from None
    dim = _check_contract(proto)
    onnx_bytes = proto.SerializeToString()

    def reference(images: torch.Tensor) -> torch.Tensor:
        emb = model(images)
        return reference_fault(emb) if reference_fault is not None else emb

    worst = _parity(onnx_bytes, reference, check_batch(check_size))
    if worst < PARITY_MIN_COSINE:
        raise CdfaceError(
            f"ONNX Runtime and PyTorch disagree on the check batch (lowest cosine {worst:.6f} < {PARITY_MIN_COSINE}); "
            "nothing was written"
        )
    return onnx_bytes, dim


def export_checkpoint(
    checkpoint_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    name: str,
    version: int = 1,
    flip: bool = False,
    simplify: bool = True,
    eval_report: str | os.PathLike | None = None,
    opset: int = OPSET,
    reference_fault: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> ExportResult:
    """Checkpoint -> ``out_dir/model.onnx`` + ``out_dir/manifest.json``, or a CdfaceError and no files.

    ``reference_fault``: see :func:`export_module` (a test seam that plants a parity fault).
    """
    checkpoint_path = Path(checkpoint_path)
    # Everything that can fail on bad input is checked before any work, so no file appears on failure.
    evaluation = read_eval_report(eval_report) if eval_report is not None else None
    check_name_version(name, version)
    state = load_checkpoint(checkpoint_path)
    spec = state["backbone"]
    if not isinstance(spec, dict) or "name" not in spec:
        raise CdfaceError(f"checkpoint {checkpoint_path} has no backbone name")
    try:
        backbone = build_backbone_from(state, checkpoint_path)
    except TypeError as exc:  # kwargs the backbone constructor does not take
        raise CdfaceError(f"checkpoint {checkpoint_path} describes backbone {spec['name']} "
                          f"with bad arguments: {exc}") from None

    onnx_bytes, dim = export_module(
        EmbeddingModel(backbone, flip=flip), opset=opset, simplify=simplify, reference_fault=reference_fault
    )
    config = state.get("config")
    return publish_model(
        out_dir, onnx_bytes, name=name, version=version, backbone=spec["name"], embedding_size=dim,
        mean=[PIXEL_MEAN] * 3, std=[PIXEL_STD] * 3, opset=opset, flip_augmented=flip,
        config_digest=config_digest(config) if isinstance(config, dict) else None, evaluation=evaluation,
        source=Source(kind="checkpoint", path=str(checkpoint_path.resolve()), sha256=sha256_file(checkpoint_path)),
    )
