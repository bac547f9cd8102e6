"""The recipe of docs/recipes.md: serve an ArcFace-style ONNX model (insightface's w600k_r50.onnx kind) via ``export wrap``.

Such a model takes float [1, 3, 112, 112] (a batch fixed at 1, as insightface's files have),
pixels as ``(x - 127.5) / 127.5`` applied *outside* the graph, in RGB (insightface feeds
``cv2.dnn.blobFromImages(..., swapRB=True)``) or BGR for other exports, and returns an unnormalised
512-d feature. The test builds one itself: a small IResNet exported with torch.onnx under a
third-party input name. It wraps it through the installed CLI with the recipe's flags and checks
the wrapped model on a real aligned crop (YuNet + the serving alignment) against the original
fed by hand, at batch 1, the way insightface runs it.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

CDFACE = Path(sys.executable).parent / "cdface"
torch = pytest.importorskip("torch")


def _arcface_style_onnx(path: Path, seed: int = 0) -> Path:
    """A float NCHW [1, 3, 112, 112] -> [1, 512] model, preprocessing left to the caller (as insightface ships)."""
    from cdface.training.backbones import create_backbone

    torch.manual_seed(seed)
    backbone = create_backbone("ir18", width=0.125).eval()
    with torch.no_grad():  # trained-looking BN statistics, so channels are not interchangeable
        for module in backbone.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.normal_(1.0, 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(backbone, (torch.zeros(1, 3, 112, 112),), str(path), input_names=["input.1"],
                          output_names=["fc1"], opset_version=17, dynamo=False)
    return path


def _original(session: ort.InferenceSession, crop: np.ndarray, order: str) -> np.ndarray:
    """What an insightface user does by hand: channel order, (x - 127.5) / 127.5, NCHW, one image, then L2."""
    pixels = crop[..., ::-1] if order == "BGR" else crop
    blob = ((pixels.astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1)[None]
    feature = session.run(None, {"input.1": blob})[0][0]
    return feature / np.linalg.norm(feature)


@pytest.fixture(scope="module")
def aligned_crops(face_photos, yunet_onnx) -> np.ndarray:
    from cdface.core.detection import Detector, extract_faces
    from cdface.core.imaging import read_image

    detector = Detector(yunet_onnx, instances=1)
    return np.stack([extract_faces(read_image(face_photos[name]), "detect", detector=detector)[0].crop
                     for name in ("obama", "obama2", "biden")])


@pytest.mark.parametrize("order", ["RGB", "BGR"])
def test_wrapped_arcface_style_model_equals_the_original(tmp_path, aligned_crops, order):
    src = _arcface_style_onnx(tmp_path / "w600k_style.onnx")
    out = tmp_path / "wrapped"
    wrapped = subprocess.run(
        [str(CDFACE), "export", "wrap", str(src), "--out", str(out), "--name", "arcface-r18", "--layout", "NCHW",
         "--order", order, "--mean", "127.5", "--std", "127.5", "--licence", "test model (built in the test)"],
        capture_output=True, text=True, timeout=300)
    assert wrapped.returncode == 0, wrapped.stderr

    original = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    assert original.get_inputs()[0].shape == [1, 3, 112, 112]  # a fixed batch, as the published files have
    served = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = served.run(["embedding"], {"images": aligned_crops})[0]  # uint8 RGB crops, the whole batch at once
    expected = np.stack([_original(original, crop, order) for crop in aligned_crops])
    assert got.shape == (3, 512)
    np.testing.assert_allclose(got, expected, atol=1e-5)

    # The recipe's flags matter: the other channel order gives another model.
    other = "BGR" if order == "RGB" else "RGB"
    wrong = np.stack([_original(original, crop, other) for crop in aligned_crops])
    assert float(np.min(np.sum(got * wrong, axis=1))) < 0.9999
