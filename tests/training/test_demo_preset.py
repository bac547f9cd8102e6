"""The demo preset, as `make demo` runs it, learns: held-out identities verify well above chance."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cdface.training.checkpoint import load_checkpoint

CDFACE = [sys.executable, "-m", "cdface.cli"]


def run(*args: str) -> str:
    proc = subprocess.run(CDFACE + list(args), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_demo_preset_verifies_held_out_identities(tmp_path):
    data = tmp_path / "data"
    run("data", "synth", "--out", str(data), "--identities", "200", "--per-identity", "16",
        "--val-identities", "100", "--val-pairs", "600", "--format", "recordio")
    common = ["--preset", "demo", "--set", f"data.path={data}", "--set", f"data.val=[{data / 'val.bin'}]",
              "--set", "run.progress=false", "--set", "run.tensorboard=false"]
    out = run("train", *common, "--set", "run.stage=pretrain", "--set", f"run.output={tmp_path / 'pretrain'}")
    assert "eval val: accuracy" in out

    report = load_checkpoint(tmp_path / "pretrain" / "model.pt")["evaluation"]
    accuracy = next(r["value"] for r in report["results"] if r["metric"] == "accuracy")
    assert accuracy >= 0.75, f"demo pretrain reached only {accuracy:.3f} on held-out identities"

    # The joint stage starts from it and runs the refined branch (a short run: the full one is `make demo`).
    run("train", *common, "--set", f"run.output={tmp_path / 'joint'}", "--set", "run.max_steps=10",
        "--set", f"run.init_from={tmp_path / 'pretrain' / 'checkpoints' / 'last.pt'}", "--set", "run.log_every=5")
    lines = (tmp_path / "joint" / "metrics.jsonl").read_text()
    assert "loss_closeness" in lines and "loss_diversity" in lines
    joint = load_checkpoint(tmp_path / "joint" / "model.pt")["evaluation"]
    joint_accuracy = next(r["value"] for r in joint["results"] if r["metric"] == "accuracy")
    assert joint_accuracy >= 0.75
