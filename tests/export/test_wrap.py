"""Wrapping third-party ONNX models, on small hand-built graphs with the usual quirks.

The source model here is written with onnx.helper so every quirk is deliberate: NHWC or NCHW,
BGR input, its own mean/std, weights listed as graph inputs, a batch of 1 fixed in the input and
in a ``Reshape(x, [1, -1])``. The expected embedding is computed in plain numpy, independently of
the wrapper.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from cdface.core.errors import CdfaceError
from cdface.core.manifest import read_manifest, verify_onnx_hash
from cdface.export.wrap import wrap_onnx

D = 16
rng = np.random.default_rng(0)
POOL = 8  # average-pool the image to 8x8 so a tiny MatMul sees every pixel region
WEIGHT = rng.normal(size=(3 * POOL * POOL, D)).astype(np.float32)


def _toy_model(path, *, layout: str, size: int = 112, opset: int = 17):
    """[1, 3, S, S] (or [1, S, S, 3]) float -> AveragePool to 8x8 -> Reshape [1, -1] -> MatMul -> [1, D]."""
    shape = [1, 3, size, size] if layout == "NCHW" else [1, size, size, 3]
    x = helper.make_tensor_value_info("data", TensorProto.FLOAT, shape)
    w = helper.make_tensor_value_info("w", TensorProto.FLOAT, list(WEIGHT.shape))  # a weight listed as an input
    y = helper.make_tensor_value_info("feat", TensorProto.FLOAT, [1, D])
    nodes = []
    src = "data"
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", ["data"], ["nchw"], perm=[0, 3, 1, 2]))
        src = "nchw"
    k = size // POOL
    nodes += [
        helper.make_node("AveragePool", [src], ["pooled"], kernel_shape=[k, k], strides=[k, k]),
        helper.make_node("Reshape", ["pooled", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["feat"]),
    ]
    graph = helper.make_graph(
        nodes, "toy", [x, w], [y],
        initializer=[numpy_helper.from_array(WEIGHT, "w"), numpy_helper.from_array(np.array([1, -1], np.int64), "shape")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _expected(images: np.ndarray, *, bgr: bool, mean, std) -> np.ndarray:
    x = images.astype(np.float64)
    if bgr:
        x = x[..., ::-1]
    x = (x - np.asarray(mean)) / np.asarray(std)  # NHWC, the model's channel order
    n, s = len(x), x.shape[1]
    pooled = x.reshape(n, POOL, s // POOL, POOL, s // POOL, 3).mean(axis=(2, 4))  # [n, 8, 8, 3]
    feat = pooled.transpose(0, 3, 1, 2).reshape(n, -1) @ WEIGHT.astype(np.float64)
    return feat / np.linalg.norm(feat, axis=1, keepdims=True)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_wrapped_model_meets_the_contract_at_any_batch(tmp_path, layout):
    src = _toy_model(tmp_path / "toy.onnx", layout=layout)
    mean, std = [104.0, 117.0, 123.0], [58.0, 57.0, 59.0]  # in the model's (BGR) order
    result = wrap_onnx(src, tmp_path / "out", name="toy", version=2, input_layout=layout, channel_order="BGR",
                       mean=mean, std=std, licence="MIT")

    model = onnx.load(str(result.onnx_path))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["images"]  # the weight input is a constant now
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.UINT8
    assert [o.name for o in model.graph.output] == ["embedding"]

    session = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(1).integers(0, 256, size=(5, 112, 112, 3), dtype=np.uint8)
    got = session.run(["embedding"], {"images": images})[0]
    assert got.shape == (5, D) and got.dtype == np.float32
    np.testing.assert_allclose(got, _expected(images, bgr=True, mean=mean, std=std), atol=1e-5)

    manifest = read_manifest(result.manifest_path)
    verify_onnx_hash(manifest, result.onnx_path)
    assert manifest.embedding_size == D and manifest.source.kind == "wrapped" and manifest.source.licence == "MIT"
    assert manifest.normalisation.mean == mean[::-1]  # the manifest speaks RGB


def test_resizes_inside_the_graph_for_other_crop_sizes(tmp_path):
    src = _toy_model(tmp_path / "toy96.onnx", layout="NCHW", size=96)
    result = wrap_onnx(src, tmp_path / "out", name="toy96", input_size=96, licence="MIT")
    session = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    flat = np.full((2, 112, 112, 3), 200, dtype=np.uint8)
    got = session.run(["embedding"], {"images": flat})[0]
    # A flat image stays flat under any resize, so the expected value is exact.
    np.testing.assert_allclose(got[0], _expected(np.full((1, 96, 96, 3), 200, np.uint8), bgr=False, mean=0, std=1)[0], atol=1e-5)
    assert result.manifest.input.shape == [-1, 112, 112, 3]


def test_refuses_a_layout_that_does_not_fit(tmp_path):
    src = _toy_model(tmp_path / "toy.onnx", layout="NCHW")
    with pytest.raises(CdfaceError, match="check --layout"):
        wrap_onnx(src, tmp_path / "out", name="toy", input_layout="NHWC", licence="MIT")
    assert not (tmp_path / "out").exists()


def test_refuses_bad_arguments(tmp_path):
    src = _toy_model(tmp_path / "toy.onnx", layout="NCHW")
    with pytest.raises(CdfaceError, match="licence"):
        wrap_onnx(src, tmp_path / "out", name="toy", licence=" ")
    with pytest.raises(CdfaceError, match="one number or three"):
        wrap_onnx(src, tmp_path / "out", name="toy", mean=[1.0, 2.0], licence="MIT")
    with pytest.raises(CdfaceError, match="not a readable ONNX"):
        (tmp_path / "junk.onnx").write_bytes(b"\x00junk")
        wrap_onnx(tmp_path / "junk.onnx", tmp_path / "out", name="toy", licence="MIT")
    assert not (tmp_path / "out").exists()
