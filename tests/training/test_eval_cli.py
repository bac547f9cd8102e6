"""``cdface eval`` through the installed entry point, and the trainer's in-process evaluation."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cdface.training.backbones import create_backbone
from cdface.training.checkpoint import save_checkpoint
from cdface.training.data.binfile import write_bin
from cdface.training.evaluation import evaluate_checkpoint_model

CDFACE = Path(sys.executable).parent / "cdface"
TINY = {"name": "ir18", "kwargs": {"width": 0.125}}


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A tiny checkpoint and a 20-pair .bin: same pairs are an image and its slightly noisy copy."""
    root = tmp_path_factory.mktemp("eval_cli")
    torch.manual_seed(0)
    model = create_backbone(TINY["name"], **TINY["kwargs"])
    save_checkpoint(root / "tiny.pt", {"backbone": TINY, "model": model.state_dict(), "config": {}})
    rng = np.random.default_rng(0)
    images, issame = [], []
    for pair in range(20):
        first = rng.integers(0, 256, size=(112, 112, 3), dtype=np.uint8)
        same = pair % 2 == 0
        second = (np.clip(first.astype(int) + rng.integers(-2, 3, size=first.shape), 0, 255).astype(np.uint8)
                  if same else rng.integers(0, 256, size=(112, 112, 3), dtype=np.uint8))
        images += [_png(first), _png(second)]
        issame.append(same)
    write_bin(root / "tiny_lfw.bin", images, issame)
    return root


def _cdface(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(CDFACE), "eval", *args], capture_output=True, text=True, timeout=300)


def test_eval_bin_on_a_checkpoint(workdir):
    out, plots = workdir / "report.json", workdir / "plots"
    proc = _cdface("bin", str(workdir / "tiny.pt"), str(workdir / "tiny_lfw.bin"),
                   "--out", str(out), "--plots", str(plots), "--batch-size", "16")
    assert proc.returncode == 0, proc.stderr
    assert "tiny_lfw: accuracy" in proc.stdout
    report = json.loads(out.read_text())
    assert report["model"].endswith("tiny.pt")
    rows = {r["metric"]: r for r in report["results"] if r["dataset"] == "tiny_lfw"}
    assert rows["accuracy"]["value"] == 1.0  # near-duplicates vs unrelated noise
    assert rows["accuracy"]["pairs"] == 20 and rows["accuracy"]["flip"] is True
    # 10 impostor pairs: FAR 1e-1 (one false accept) is measurable, 1e-2 is not.
    assert rows["tar@far=1e-1"]["value"] is not None and rows["tar@far=1e-2"]["value"] is None
    assert set(report["thresholds"]) == {"1e-1"}
    for name in ("tiny_lfw_histogram.png", "roc.png"):
        assert (plots / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("which", ["bin", "model"])
def test_bad_path_is_one_line_and_exit_2(workdir, which):
    model = str(workdir / ("missing.pt" if which == "model" else "tiny.pt"))
    bin_file = str(workdir / ("missing.bin" if which == "bin" else "tiny_lfw.bin"))
    proc = _cdface("bin", model, bin_file)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cdface: error:") and "missing" in lines[0]


def test_evaluate_checkpoint_model_in_process(workdir):
    torch.manual_seed(0)
    model = create_backbone(TINY["name"], **TINY["kwargs"]).train()  # a live training model
    report = evaluate_checkpoint_model(model, [workdir / "tiny_lfw.bin"], batch_size=16)
    assert model.training  # mode restored for the training loop
    accuracy = [r for r in report["results"] if r["metric"] == "accuracy"]
    assert accuracy[0]["value"] == 1.0
    json.dumps(report, allow_nan=False)  # JSON-safe: no arrays left in it
