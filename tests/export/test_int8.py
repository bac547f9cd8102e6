"""INT8 variant of an exported model: calibrated static quantisation, and the gates that refuse a damaged one.

A tiny IR-18 with random weights is exported for real, quantised for real by ONNX Runtime and
verified on a small synthetic ``.bin``. Random weights tell held-out identities apart barely
better than chance, so there would be no accuracy to lose; they do tell a face from its noisy copy
(same pairs: a render and the render under +-60 pixel noise; different pairs: two identities), and
that is the skill a damaged quantisation loses. Its BatchNorm statistics are measured on faces, as
training would leave them, so that activations have the ranges of a real network.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from cdface.core.errors import CdfaceError
from cdface.core.manifest import read_manifest, verify_onnx_hash
from cdface.export.onnx_export import export_checkpoint
from cdface.export.quantize import DEFAULT_MAX_ACCURACY_DROP, DEFAULT_MIN_MEAN_COSINE, quantize_export
from cdface.training.backbones import create_backbone
from cdface.training.checkpoint import save_checkpoint
from cdface.training.data.binfile import write_bin
from cdface.training.data.synthetic import encode_jpeg, render_sample, verification_pairs
from cdface.training.preprocess import to_model_input

REPO = Path(__file__).resolve().parents[2]
CDFACE = Path(sys.executable).parent / "cdface"
PAIRS = 100


def _tiny_backbone() -> torch.nn.Module:
    """IR-18 at width 1/8, BatchNorm statistics accumulated over 64 synthetic faces (train mode, no grad)."""
    torch.manual_seed(0)
    model = create_backbone("ir18", width=0.125)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # a plain average over the batches below
            m.reset_running_stats()
    faces = torch.from_numpy(np.stack([render_sample(5, identity, 1, hard=False) for identity in range(64)]))
    model.train()
    with torch.no_grad():
        for start in range(0, len(faces), 16):
            model(to_model_input(faces[start : start + 16]))
    return model.eval()


@pytest.fixture(scope="module")
def fp32_export(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fp32")
    checkpoint = root / "tiny.pt"
    save_checkpoint(checkpoint, {"backbone": {"name": "ir18", "kwargs": {"width": 0.125}},
                                 "model": _tiny_backbone().state_dict()})
    return export_checkpoint(checkpoint, root / "export", name="tiny", version=4).onnx_path.parent


@pytest.fixture(scope="module")
def val_bin(tmp_path_factory) -> Path:
    # Held-out identities (the verification role): never the calibration crops below.
    images, issame = verification_pairs(seed=3, identities=40, pairs=PAIRS, difficulty=0.3)
    rng = np.random.default_rng(0)
    for pair in np.flatnonzero(issame):
        noise = rng.integers(-60, 61, images[2 * pair].shape)
        images[2 * pair + 1] = np.clip(images[2 * pair] + noise, 0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("val") / "val.bin"
    write_bin(path, [encode_jpeg(image) for image in images], issame.tolist())
    return path


@pytest.fixture(scope="module")
def calibration() -> np.ndarray:
    """Aligned crops of training identities, as a user would calibrate on their own aligned faces."""
    return np.stack([render_sample(3, identity, 0, hard=False) for identity in range(48)])


def _write_crops(directory: Path, images: np.ndarray) -> Path:
    directory.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(directory / f"{i:03d}.png")
    return directory


def test_int8_variant_passes_both_gates_and_keeps_the_contract(fp32_export, val_bin, calibration, tmp_path):
    result, report = quantize_export(fp32_export, tmp_path / "int8", val_bin=val_bin, calibration=calibration)

    assert report.accuracy_drop <= DEFAULT_MAX_ACCURACY_DROP and report.mean_cosine >= DEFAULT_MIN_MEAN_COSINE
    assert report.pairs == PAIRS and report.calibration_images == 48 and report.per_channel
    manifest = read_manifest(result.manifest_path)
    verify_onnx_hash(manifest, result.onnx_path)
    assert (manifest.name, manifest.version, manifest.embedding_size) == ("tiny-int8", 4, 512)
    gate = manifest.evaluation.results[-1]
    assert gate["metric"] == "int8_gate" and gate["int8_accuracy"] == report.int8_accuracy
    assert gate["mean_cosine"] == report.mean_cosine and gate["max_accuracy_drop"] == DEFAULT_MAX_ACCURACY_DROP
    graph = onnx.load(str(result.onnx_path)).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # really quantised, not a copy of the fp32 graph
    (inp,), (out,) = graph.input, graph.output
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8 and out.name == "embedding"


def test_accuracy_gate_refuses_a_broken_calibration(fp32_export, val_bin, calibration, tmp_path):
    # PLANTED FAULT: calibration crops at 1/16 of their brightness set every activation range far too
    # narrow, so real faces clip. The cosine bound is switched off: the accuracy gate alone must refuse.
    out = tmp_path / "never"
    with pytest.raises(CdfaceError, match=r"accuracy on val fell .* more than the 0\.10 allowed.*nothing was written"):
        quantize_export(fp32_export, out, val_bin=val_bin, calibration=calibration // 16, min_mean_cosine=-1.0)
    assert not out.exists()


def test_cosine_gate_refuses_a_broken_calibration(fp32_export, val_bin, calibration, tmp_path):
    # PLANTED FAULT: all-black calibration crops; here the accuracy bound is switched off instead.
    out = tmp_path / "never"
    with pytest.raises(CdfaceError, match=r"mean cosine to the fp32 embeddings on val is 0\.\d+ < 0\.99"):
        quantize_export(fp32_export, out, val_bin=val_bin, calibration=np.zeros_like(calibration),
                        max_accuracy_drop=1.0)
    assert not out.exists()


def test_refuses_bad_requests_before_any_work(fp32_export, val_bin, calibration, tmp_path):
    with pytest.raises(CdfaceError, match="needs its own"):
        quantize_export(fp32_export, fp32_export, val_bin=val_bin, calibration=calibration)
    with pytest.raises(CdfaceError, match="verification file not found"):
        quantize_export(fp32_export, tmp_path / "a", val_bin=tmp_path / "missing.bin", calibration=calibration)
    with pytest.raises(CdfaceError, match="too few"):
        quantize_export(fp32_export, tmp_path / "b", val_bin=val_bin, calibration=calibration[:3])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_quantizes_and_refuses_in_one_line(fp32_export, val_bin, calibration, tmp_path):
    good = _write_crops(tmp_path / "crops", calibration)
    out = tmp_path / "int8"
    done = subprocess.run([str(CDFACE), "export", "quantize", str(fp32_export), "--out", str(out),
                           "--val-bin", str(val_bin), "--calib-dir", str(good), "--version", "5"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "mean cosine to fp32" in done.stdout
    manifest = read_manifest(out)
    verify_onnx_hash(manifest, out / "model.onnx")
    assert manifest.version == 5

    black = _write_crops(tmp_path / "black", np.zeros_like(calibration))
    done = subprocess.run([str(CDFACE), "export", "quantize", str(fp32_export), "--out", str(tmp_path / "never"),
                           "--val-bin", str(val_bin), "--calib-dir", str(black)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "INT8 model refused" in done.stderr
    assert not (tmp_path / "never").exists()
