"""Wrap a third-party face-embedding ONNX model into the project's contract.

Shipped face models each want their own input: NCHW or NHWC, RGB or BGR, pixels scaled one way
or another, and very often a batch fixed at 1. Serving should know none of that. This module
puts a small preprocessing graph in front (uint8 [N, 112, 112, 3] RGB -> whatever the model
wants) and a small postprocessing graph behind (-> ``embedding``, float32 [N, D], L2-normalised),
joins them with ``onnx.compose``, makes the batch dynamic, and proves the result on a check batch:
the wrapped graph must match the original model fed by hand, image by image. The model keeps
its own embedding size D (128 for SFace).

Torch-free: only onnx, onnxruntime and numpy.
"""

from __future__ import annotations

import os
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Sequence

import numpy as np

from cdface.core.contract import INPUT_NAME, INPUT_SIZE, OUTPUT_NAME, PARITY_MIN_COSINE
from cdface.core.digest import sha256_file
from cdface.core.errors import CdfaceError
from cdface.core.manifest import (
    ExportResult,
    Source,
    check_name_version,
    publish_model,
)

if TYPE_CHECKING:
    from onnx import NodeProto, TensorProto

__all__ = ["wrap_onnx", "prepare_source", "ExportResult"]

_PRE = "cdface_pre_"
_POST = "cdface_post_"
_BATCH = "N"

Layout = Literal["NCHW", "NHWC"]
ChannelOrder = Literal["RGB", "BGR"]


def _per_channel(value: float | Sequence[float], what: str) -> list[float]:
    # numpy scalars count as one number too (np.float32 is no float subclass).
    values = [float(value)] * 3 if isinstance(value, (int, float, np.number)) else [float(v) for v in value]
    if len(values) == 1:
        values *= 3
    if len(values) != 3:
        raise CdfaceError(f"{what} must be one number or three (one per channel), got {len(values)}")
    return values


# ----------------------------------------------------------------------------------------------
# cleaning the source model


def _real_inputs(graph) -> list:
    initialisers = {t.name for t in graph.initializer}
    return [i for i in graph.input if i.name not in initialisers]


def prepare_source(src: str | os.PathLike):
    """Load a third-party model and make it batchable: drop graph inputs no node reads (some exports
    list their weights as inputs; ONNX Runtime then demands them) or that are weights, drop unused
    initialisers, name
    the batch dimension, and let shape inference recompute intermediate shapes."""
    import onnx

    src = Path(src)
    try:
        model = onnx.load(str(src))
    except FileNotFoundError:
        raise CdfaceError(f"ONNX model not found: {src}") from None
    except Exception as exc:
        raise CdfaceError(f"{src} is not a readable ONNX model ({type(exc).__name__})") from None
    graph = model.graph
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}

    # Weights listed as graph inputs would be overridable inputs to every client (and Triton
    # would advertise them); as plain initialisers they are constants. Legal from IR version 4 on.
    initialisers = {t.name for t in graph.initializer}
    kept = [i for i in graph.input if i.name in used and i.name not in initialisers]
    del graph.input[:]
    graph.input.extend(kept)
    kept_init = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept_init)

    inputs = _real_inputs(graph)
    if len(inputs) != 1:
        raise CdfaceError(f"{src.name} has {len(inputs)} data inputs ({[i.name for i in inputs]}); "
                          "a face embedder has one")
    if len(inputs[0].type.tensor_type.shape.dim) != 4:
        raise CdfaceError(f"{src.name}'s input {inputs[0].name} is not a 4-d image tensor")
    # Fixed batch sizes are recorded on the input, the outputs and every intermediate value_info.
    for value in (inputs[0], *graph.output):
        dims = value.type.tensor_type.shape.dim
        if len(dims):
            dims[0].Clear()
            dims[0].dim_param = _BATCH
    del graph.value_info[:]
    _free_reshape_batch(model, inputs[0].name)
    if model.ir_version < 4:
        model.ir_version = 4
    return model


def _constant_array(model, name: str) -> tuple[TensorProto, np.ndarray] | None:
    from onnx import numpy_helper

    for tensor in model.graph.initializer:
        if tensor.name == name:
            return tensor, numpy_helper.to_array(tensor)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            for attr in node.attribute:
                if attr.name == "value":
                    return attr.t, numpy_helper.to_array(attr.t)
    return None


def _free_reshape_batch(model, input_name: str) -> None:
    """A Reshape of activations to a constant shape starting with 1 is a batch hard-coded at export
    time (``x.view(1, -1)``); rewrite the 1 as 0, ONNX's "copy this dimension from the input"."""
    from onnx import numpy_helper

    graph = model.graph
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    downstream, queue = {input_name}, deque([input_name])
    while queue:
        for node in consumers.get(queue.popleft(), []):
            for out in node.output:
                if out not in downstream:
                    downstream.add(out)
                    queue.append(out)
    for node in graph.node:
        if node.op_type != "Reshape" or node.input[0] not in downstream:
            continue
        found = _constant_array(model, node.input[1])
        if found is None:
            continue
        tensor, shape = found
        if shape.ndim == 1 and len(shape) >= 2 and shape[0] == 1:
            if len(consumers.get(node.input[1], [])) > 1:
                continue  # shared with another node: leave it, the batch check below will tell
            shape = shape.copy()
            shape[0] = 0
            tensor.CopyFrom(numpy_helper.from_array(shape, tensor.name))


# ----------------------------------------------------------------------------------------------
# the pre- and postprocessing graphs


def _default_opset(model) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    raise CdfaceError("the model imports no default-domain operator set")


def _preprocess_graph(model_input: str, *, layout: Layout, order: ChannelOrder, mean: list[float],
                      std: list[float], input_size: int, elem_type: int):
    from onnx import TensorProto, helper, numpy_helper

    nodes: list[NodeProto] = []
    inits: list[TensorProto] = []
    x = INPUT_NAME

    def step(op: str, inputs: list[str], **attrs) -> str:
        out = f"{_PRE}{len(nodes)}_{op.lower()}"
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def const(tag: str, array: np.ndarray) -> str:
        name = f"{_PRE}{tag}"
        inits.append(numpy_helper.from_array(array, name))
        return name

    x = step("Cast", [x], to=TensorProto.FLOAT)
    if order == "BGR":
        x = step("Gather", [x, const("bgr", np.array([2, 1, 0], dtype=np.int64))], axis=3)
    # mean/std arrive in the model's channel order, and broadcast over the last (channel) axis here.
    if any(m != 0.0 for m in mean):
        x = step("Sub", [x, const("mean", np.array(mean, dtype=np.float32))])
    if any(s != 1.0 for s in std):
        x = step("Div", [x, const("std", np.array(std, dtype=np.float32))])
    if input_size != INPUT_SIZE:
        scale = input_size / INPUT_SIZE
        roi = const("roi", np.zeros(0, dtype=np.float32))
        x = step("Resize", [x, roi, const("scales", np.array([1, scale, scale, 1], dtype=np.float32))],
                 mode="linear", coordinate_transformation_mode="half_pixel")
    if layout == "NCHW":
        x = step("Transpose", [x], perm=[0, 3, 1, 2])
    if elem_type != TensorProto.FLOAT:
        x = step("Cast", [x], to=elem_type)
    nodes.append(helper.make_node("Identity", [x], [model_input], name=f"{_PRE}out"))
    graph = helper.make_graph(
        nodes, "cdface_preprocess",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, [_BATCH, INPUT_SIZE, INPUT_SIZE, 3])],
        [helper.make_tensor_value_info(model_input, elem_type, None)],
        initializer=inits,
    )
    return graph


def _postprocess_graph(model_output: str, *, rank: int, elem_type: int, opset: int):
    from onnx import TensorProto, helper, numpy_helper

    nodes, x = [], model_output
    if rank != 2:  # [N, D, 1, 1] and friends
        nodes.append(helper.make_node("Flatten", [x], [f"{_POST}flat"], axis=1))
        x = f"{_POST}flat"
    if elem_type != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", [x], [f"{_POST}float"], to=TensorProto.FLOAT))
        x = f"{_POST}float"
    inits = [numpy_helper.from_array(np.array([1e-12], dtype=np.float32), f"{_POST}eps")]
    if opset >= 18:  # ReduceL2 takes its axes as an input from opset 18 on
        inits.append(numpy_helper.from_array(np.array([1], dtype=np.int64), f"{_POST}axes"))
        nodes.append(helper.make_node("ReduceL2", [x, f"{_POST}axes"], [f"{_POST}norm"], keepdims=1))
    else:
        nodes.append(helper.make_node("ReduceL2", [x], [f"{_POST}norm"], axes=[1], keepdims=1))
    # The epsilon keeps an all-zero embedding finite instead of NaN.
    nodes.append(helper.make_node("Max", [f"{_POST}norm", f"{_POST}eps"], [f"{_POST}safe_norm"]))
    nodes.append(helper.make_node("Div", [x, f"{_POST}safe_norm"], [OUTPUT_NAME]))
    return helper.make_graph(
        nodes, "cdface_postprocess",
        [helper.make_tensor_value_info(model_output, elem_type, None)],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [_BATCH, None])],
        initializer=inits,
    )


# ----------------------------------------------------------------------------------------------
# checks


def _session(onnx_bytes: bytes):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(onnx_bytes, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise CdfaceError(f"ONNX Runtime cannot load the model: {str(exc).splitlines()[0][:300]}") from None


def _by_hand(images: np.ndarray, *, layout: Layout, order: ChannelOrder, mean: list[float],
             std: list[float]) -> np.ndarray:
    """The preprocessing the wrapper promises, written in numpy, image by image: the reference."""
    # Plain ndarray: held to float32, numpy's stubs mistype the (float32) arithmetic below as complex128.
    x: np.ndarray = images.astype(np.float32)
    if order == "BGR":
        x = x[..., ::-1]
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    if layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    cos = (a * b).sum(1) / (na * nb + 1e-30)
    cos = np.where((na < 1e-6) & (nb < 1e-6), 1.0, cos)  # both zero (a bias-free model on black): agreement
    return np.where(np.isfinite(cos), cos, -1.0)


# ----------------------------------------------------------------------------------------------


def wrap_onnx(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    name: str,
    version: int = 1,
    input_layout: Layout = "NCHW",
    channel_order: ChannelOrder = "RGB",
    mean: float | Sequence[float] = 0.0,
    std: float | Sequence[float] = 1.0,
    input_size: int = INPUT_SIZE,
    licence: str,
    backbone: str | None = None,
    url: str | None = None,
    output_name: str | None = None,
) -> ExportResult:
    """Wrap ``src`` so it takes uint8 [N, 112, 112, 3] RGB and returns L2-normalised float32 [N, D].

    ``input_layout``/``channel_order``: what the source model expects. ``mean``/``std``: the model
    wants ``(pixel - mean) / std`` on 0..255 values, per channel in the model's own channel order
    (or one number for all). ``input_size``: the model's crop side; other sizes than 112 are
    resized inside the graph. D is read from the model. ``licence`` is recorded in the manifest.
    """
    import onnx
    from onnx import compose, helper

    check_name_version(name, version)
    if input_layout not in ("NCHW", "NHWC"):
        raise CdfaceError(f"input layout must be NCHW or NHWC, got {input_layout!r}")
    if channel_order not in ("RGB", "BGR"):
        raise CdfaceError(f"channel order must be RGB or BGR, got {channel_order!r}")
    if not licence or not licence.strip():
        raise CdfaceError("a wrapped third-party model needs its licence recorded (--licence)")
    mean, std = _per_channel(mean, "mean"), _per_channel(std, "std")
    if any(s == 0 for s in std):
        raise CdfaceError("std must be non-zero")
    src = Path(src)

    model = prepare_source(src)
    graph = model.graph
    model_in = _real_inputs(graph)[0]
    in_dims = [d.dim_value or None for d in model_in.type.tensor_type.shape.dim]
    spatial = in_dims[2:4] if input_layout == "NCHW" else in_dims[1:3]
    channels = in_dims[1] if input_layout == "NCHW" else in_dims[3]
    if channels not in (None, 3) or any(s not in (None, input_size) for s in spatial):
        raise CdfaceError(
            f"{src.name} takes {in_dims[1:]} per image, which is not {input_layout} with {input_size}x{input_size}x3; "
            "check --layout and --input-size"
        )

    outputs = {o.name: o for o in graph.output}
    if output_name is None:
        if len(outputs) != 1:
            raise CdfaceError(f"{src.name} has outputs {list(outputs)}; say which one is the embedding")
        output_name = next(iter(outputs))
    if output_name not in outputs:
        raise CdfaceError(f"{src.name} has no output {output_name!r}; it has {list(outputs)}")
    out_type = outputs[output_name].type.tensor_type
    out_rank = len(out_type.shape.dim) or 2
    # Keep only the embedding output: other heads would dangle after the merge.
    kept = [outputs[output_name]]
    del graph.output[:]
    graph.output.extend(kept)

    opset = _default_opset(model)
    min_ir = helper.find_min_ir_version_for([helper.make_opsetid("", opset)])
    ir_version = max(model.ir_version, min_ir)
    model.ir_version = ir_version
    opsets = list(model.opset_import)

    def as_model(g):
        return helper.make_model(g, opset_imports=opsets, ir_version=ir_version)

    pre = as_model(_preprocess_graph(model_in.name, layout=input_layout, order=channel_order, mean=mean,
                                     std=std, input_size=input_size, elem_type=model_in.type.tensor_type.elem_type))
    post = as_model(_postprocess_graph(output_name, rank=out_rank, elem_type=out_type.elem_type, opset=opset))
    try:
        merged = compose.merge_models(pre, model, io_map=[(model_in.name, model_in.name)])
        merged = compose.merge_models(merged, post, io_map=[(output_name, output_name)])
        merged = onnx.shape_inference.infer_shapes(merged)
        onnx.checker.check_model(merged, full_check=True)
    except Exception as exc:
        raise CdfaceError(f"could not wrap {src.name}: {str(exc).splitlines()[0][:300]}") from None
    wrapped = merged.SerializeToString()

    # The proof: one batched run of the wrapped graph against the original fed image by image.
    images = _check_images()
    session = _session(wrapped)
    got = session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]
    if got.ndim != 2 or got.shape[0] != len(images):
        raise CdfaceError(f"wrapped model returns shape {got.shape} for a batch of {len(images)}")
    dim = int(got.shape[1])
    original = _session(model.SerializeToString())
    feed = _reference_inputs(images, pre, input_layout, channel_order, mean, std, input_size)
    feed = feed.astype(helper.tensor_dtype_to_np_dtype(model_in.type.tensor_type.elem_type))
    want = np.concatenate([original.run([output_name], {model_in.name: feed[i:i + 1]})[0] for i in range(len(images))])
    worst = float(_cosines(got, want).min())
    if worst < PARITY_MIN_COSINE:
        raise CdfaceError(
            f"wrapped {src.name} does not reproduce the original model at batch {len(images)} (lowest cosine "
            f"{worst:.6f}); its graph probably fixes the batch size somewhere; nothing was written"
        )

    # Record what the graph does to pixels in RGB order, as the manifest speaks RGB.
    rgb_mean, rgb_std = (mean[::-1], std[::-1]) if channel_order == "BGR" else (mean, std)
    return publish_model(
        out_dir, wrapped, name=name, version=version, backbone=backbone or src.stem, embedding_size=dim,
        mean=rgb_mean, std=rgb_std, opset=opset,
        source=Source(kind="wrapped", path=src.name, sha256=sha256_file(src), licence=licence.strip(), url=url),
    )


def _check_images(count: int = 6, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(count, INPUT_SIZE, INPUT_SIZE, 3), dtype=np.uint8)
    images[-2], images[-1] = 0, 255
    # A horizontal gradient makes RGB/BGR and layout mistakes visible even where noise averages out.
    images[0] = np.linspace(0, 255, INPUT_SIZE, dtype=np.uint8)[None, :, None]
    return images


def _reference_inputs(images, pre, layout, order, mean, std, input_size) -> np.ndarray:
    if input_size == INPUT_SIZE:
        return _by_hand(images, layout=layout, order=order, mean=mean, std=std)
    # Resizing has no one-line numpy equivalent; use the preprocessing graph on its own.
    return _session(pre.SerializeToString()).run(None, {INPUT_NAME: images})[0]
