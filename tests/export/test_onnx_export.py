"""ONNX export of a tiny IR-18: the graph contract, parity with PyTorch, the manifest, refusals, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from cdface.core.digest import sha256_file
from cdface.core.errors import CdfaceError
from cdface.core.manifest import config_digest, read_manifest, verify_onnx_hash
from cdface.export.onnx_export import PARITY_MIN_COSINE, export_checkpoint
from cdface.training.backbones import create_backbone
from cdface.training.checkpoint import load_backbone, save_checkpoint
from cdface.training.preprocess import to_model_input

REPO = Path(__file__).resolve().parents[2]
CDFACE = Path(sys.executable).parent / "cdface"
CONFIG = {"model": {"backbone": "ir18", "width": 0.125}, "optim": {"lr": 0.1, "milestones": [10, 18, 22]}}


def _tiny_state(seed: int = 0) -> dict:
    """IR-18 at width 1/8 with every BN given non-trivial statistics and affine terms.

    Fresh BN layers (mean 0, var 1, gain 1 / 0 for the zero-initialised bn3) are nearly the
    identity, so a broken export of them could still pass; these make every layer count.
    """
    torch.manual_seed(seed)
    model = create_backbone("ir18", width=0.125)
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.normal_(0.0, 0.2, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
            m.weight.data.uniform_(0.5, 1.5, generator=g)
            m.bias.data.normal_(0.0, 0.1, generator=g)
        elif isinstance(m, torch.nn.PReLU):
            m.weight.data.uniform_(0.1, 0.4, generator=g)
    return model.state_dict()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, {"backbone": {"name": "ir18", "kwargs": {"width": 0.125}}, "model": _tiny_state(), "config": CONFIG})
    return path


@pytest.fixture(scope="module")
def eval_report(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("report") / "report.json"
    path.write_text(json.dumps({"results": [{"benchmark": "lfw", "accuracy": 0.61}],
                                "thresholds": {"1e-3": 0.42, "1e-4": 0.51}}))
    return path


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, eval_report, tmp_path_factory):
    return export_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("plain"), name="tiny", version=3,
                             eval_report=eval_report)


@pytest.fixture(scope="module")
def exported_flip(tiny_checkpoint, tmp_path_factory):
    return export_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("flip"), name="tiny-flip", flip=True)


@pytest.fixture(scope="module")
def backbone(tiny_checkpoint):
    model, _ = load_backbone(tiny_checkpoint)
    return model


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _crops(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 112, 112, 3), dtype=np.uint8)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_graph_contract(exported):
    model = onnx.load(str(exported.onnx_path))
    onnx.checker.check_model(model, full_check=True)
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "images" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert out.name == "embedding" and out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    in_dims = inp.type.tensor_type.shape.dim
    assert in_dims[0].dim_param and not in_dims[0].dim_value  # a named, dynamic batch
    assert [d.dim_value for d in in_dims[1:]] == [112, 112, 3]
    out_dims = out.type.tensor_type.shape.dim
    assert out_dims[0].dim_param == in_dims[0].dim_param and out_dims[1].dim_value == 512


@pytest.mark.parametrize("batch", [1, 8, 32])
def test_onnx_runtime_matches_pytorch(exported, backbone, batch):
    images = _crops(batch, seed=batch)
    images[0] = 0  # the extremes are where a folded normalisation goes wrong first
    if batch > 1:
        images[-1] = 255
    got = _session(exported.onnx_path).run(["embedding"], {"images": images})[0]
    with torch.inference_mode():
        want = F.normalize(backbone(to_model_input(torch.from_numpy(images))), dim=1).numpy()
    assert got.shape == (batch, 512) and got.dtype == np.float32
    assert _cosine(got, want).min() >= PARITY_MIN_COSINE
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_manifest_describes_the_export(exported, tiny_checkpoint):
    manifest = read_manifest(exported.manifest_path.parent)
    assert manifest == exported.manifest
    verify_onnx_hash(manifest, exported.onnx_path)
    assert (manifest.name, manifest.version, manifest.backbone, manifest.embedding_size) == ("tiny", 3, "ir18", 512)
    assert manifest.input.layout == "NHWC" and manifest.input.dtype == "uint8" and manifest.input.shape == [-1, 112, 112, 3]
    assert manifest.normalisation.mean == [127.5] * 3 and manifest.normalisation.std == [127.5] * 3
    assert manifest.output.shape == [-1, 512] and manifest.flip_augmented is False
    assert manifest.config_digest == config_digest(CONFIG)
    assert manifest.source.kind == "checkpoint" and manifest.source.sha256 == sha256_file(tiny_checkpoint)
    assert manifest.evaluation.threshold_at(1e-3) == 0.42
    assert manifest.evaluation.results[0]["benchmark"] == "lfw"


def test_hash_check_catches_a_changed_model_file(exported, tmp_path):
    copy = tmp_path / "model.onnx"
    data = bytearray(exported.onnx_path.read_bytes())
    data[-1] ^= 0xFF
    copy.write_bytes(bytes(data))
    with pytest.raises(CdfaceError, match="does not match its manifest"):
        verify_onnx_hash(exported.manifest, copy)


def test_flip_variant_is_image_plus_mirror(exported_flip, backbone):
    images = _crops(4, seed=7)
    session = _session(exported_flip.onnx_path)
    got = session.run(["embedding"], {"images": images})[0]
    with torch.inference_mode():
        x = to_model_input(torch.from_numpy(images))
        want = F.normalize(backbone(x) + backbone(torch.flip(x, dims=[3])), dim=1).numpy()
    assert _cosine(got, want).min() >= PARITY_MIN_COSINE
    # A flip-augmented embedding cannot tell an image from its mirror.
    mirrored = session.run(["embedding"], {"images": np.ascontiguousarray(images[:, :, ::-1])})[0]
    assert _cosine(got, mirrored).min() >= PARITY_MIN_COSINE
    assert exported_flip.manifest.flip_augmented is True


def test_refuses_when_parity_fails(tiny_checkpoint, tmp_path):
    # PLANTED FAULT: the PyTorch reference is nudged, as a subtly wrong export would be.
    def planted_fault(embeddings: torch.Tensor) -> torch.Tensor:
        return embeddings + 0.05 * torch.randn(embeddings.shape, generator=torch.Generator().manual_seed(0))

    out = tmp_path / "never"
    with pytest.raises(CdfaceError, match="ONNX Runtime and PyTorch disagree.*nothing was written"):
        export_checkpoint(tiny_checkpoint, out, name="tiny", reference_fault=planted_fault)
    assert not out.exists()


def test_refuses_a_truncated_checkpoint(tiny_checkpoint, tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(tiny_checkpoint.read_bytes()[:5000])
    out = tmp_path / "never"
    with pytest.raises(CdfaceError, match="corrupt"):
        export_checkpoint(broken, out, name="tiny")
    assert not out.exists()


def test_refuses_weights_for_another_backbone(tmp_path):
    wrong = tmp_path / "wrong.pt"
    save_checkpoint(wrong, {"backbone": {"name": "ir34", "kwargs": {"width": 0.125}}, "model": _tiny_state(), "config": {}})
    out = tmp_path / "never"
    with pytest.raises(CdfaceError, match="does not fit backbone ir34"):
        export_checkpoint(wrong, out, name="tiny")
    assert not out.exists()


def test_refuses_a_bad_evaluation_report(tiny_checkpoint, tmp_path):
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"results": [], "thresholds": {"often": 0.3}}))
    with pytest.raises(CdfaceError, match="not a false accept rate"):
        export_checkpoint(tiny_checkpoint, tmp_path / "never", name="tiny", eval_report=report)
    assert not (tmp_path / "never").exists()


def test_read_manifest_rejects_garbage(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"name": "x", "version": 0}))
    with pytest.raises(CdfaceError, match="invalid"):
        read_manifest(tmp_path)
    with pytest.raises(CdfaceError, match="not found"):
        read_manifest(tmp_path / "elsewhere.json")


def test_cli_exports_and_reports_errors_in_one_line(tiny_checkpoint, eval_report, tmp_path):
    out = tmp_path / "cli"
    done = subprocess.run([str(CDFACE), "export", "onnx", str(tiny_checkpoint), "--out", str(out), "--name", "tiny",
                           "--version", "2", "--eval-report", str(eval_report), "--no-simplify"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    manifest = read_manifest(out)
    verify_onnx_hash(manifest, out / "model.onnx")
    assert manifest.version == 2 and manifest.evaluation.thresholds == {"1e-3": 0.42, "1e-4": 0.51}

    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    done = subprocess.run([str(CDFACE), "export", "onnx", str(broken), "--out", str(tmp_path / "never"), "--name", "x"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "corrupt" in done.stderr
    assert not (tmp_path / "never").exists()
