"""The trainer end to end: DDP equivalence, exact resume after a kill, refusals of bad input."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml

from cdface.core.errors import CdfaceError
from cdface.training.checkpoint import load_checkpoint
from cdface.training.config import load_config
from cdface.training.trainer import train
from tests.training.trainer_support import ddp_worker, write_tiny_folder_dataset

CDFACE = [sys.executable, "-m", "cdface.cli"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return write_tiny_folder_dataset(tmp_path_factory.mktemp("data") / "train")


def write_preset(path: Path, data: Path, output: Path, **sections) -> Path:
    preset = {
        "model": {"backbone": "ir18", "width": 0.125, "embedding_size": 16},
        "head": {"num_hard_negatives": 4},
        "method": {"identities": 4, "num_easy": 3, "num_hard": 1, "interval": 2, "bank_sync_every": 2},
        "data": {"path": str(data), "workers": 0},
        "optim": {"batch_size": 16, "epochs": 2, "lr": 0.05, "milestones": [1]},
        "run": {"output": str(output), "progress": False, "tensorboard": False, "threads": 1,
                "checkpoint_every": 2, "log_every": 1},
    }
    for section, values in sections.items():
        preset[section].update(values)
    path.write_text(yaml.safe_dump(preset))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_rank_ddp_equals_one_process_on_the_same_global_batch(tiny_data, tmp_path):
    preset = write_preset(tmp_path / "p.yaml", tiny_data, tmp_path / "unused",
                          model={"backbone": "test_nonorm", "width": 1.0, "dropout": 0.0})
    common = ["run.stage=pretrain", "run.max_steps=4", "method.bank_sync_every=3", "data.flip=false"]
    single = train(load_config(str(preset), common + [f"run.output={tmp_path / 'one'}"]))
    assert single.steps == 4

    out = tmp_path / "ddp"
    out.mkdir()
    mp.spawn(ddp_worker, args=(2, free_port(), common + [f"run.output={out}"], str(preset), str(out)), nprocs=2)

    one = load_checkpoint(tmp_path / "one" / "checkpoints" / "last.pt")
    two = load_checkpoint(out / "checkpoints" / "last.pt")
    for name, value in one["model"].items():
        torch.testing.assert_close(two["model"][name], value, atol=2e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(two["head"]["weight"], one["head"]["weight"], atol=2e-5, rtol=1e-4)

    # The score bank: the ranks agree with each other and with the single process.
    banks = [torch.load(out / f"rank{r}.pt")["bank"] for r in range(2)]
    assert torch.equal(banks[0], banks[1])
    assert (banks[0] != 0).sum() == 4 * 16  # every sample of the 4 global batches was scored
    torch.testing.assert_close(banks[0], single.bank, atol=1e-5, rtol=1e-4)


def test_two_rank_joint_stage_splits_mining_and_syncs_the_bank(tiny_data, tmp_path):
    preset = write_preset(tmp_path / "p.yaml", tiny_data, tmp_path / "ddp")
    out = tmp_path / "ddp"
    out.mkdir()
    overrides = ["run.max_steps=4", f"run.output={out}"]
    mp.spawn(ddp_worker, args=(2, free_port(), overrides, str(preset), str(out)), nprocs=2)
    banks = [torch.load(out / f"rank{r}.pt")["bank"] for r in range(2)]
    assert torch.equal(banks[0], banks[1]) and (banks[0] != 0).any()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert any("loss_closeness" in line and "loss_diversity" in line for line in lines)


def _run_cli(preset: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(CDFACE + ["train", "--preset", str(preset), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_kill_mid_epoch_and_resume_is_bit_identical(tiny_data, tmp_path):
    # Joint stage with dropout: the resume must restore the miner's position, the score bank,
    # the optimizer, the schedule, the data order and the RNG state, or the parameters drift.
    settings = dict(model={"dropout": 0.2}, optim={"batch_size": 8, "epochs": 3, "lr": 0.05, "milestones": [1, 2]},
                    run={"checkpoint_every": 3, "progress": False, "tensorboard": False, "threads": 1,
                         "log_every": 1})
    straight = write_preset(tmp_path / "straight.yaml", tiny_data, tmp_path / "straight", **settings)
    killed = write_preset(tmp_path / "killed.yaml", tiny_data, tmp_path / "killed", **settings)
    total = 3 * (64 // 8)

    proc = _run_cli(straight)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()

    proc = _run_cli(killed)
    checkpoint = tmp_path / "killed" / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    state = load_checkpoint(checkpoint)  # a killed run never leaves a half-written checkpoint
    killed_at = state["progress"]["step"]
    assert 0 < killed_at < total and state["progress"]["batch_in_epoch"] != 0  # killed mid-epoch

    proc = _run_cli(killed)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()
    a = load_checkpoint(tmp_path / "straight" / "model.pt")
    b = load_checkpoint(tmp_path / "killed" / "model.pt")
    assert a["progress"]["step"] == b["progress"]["step"] == total
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    assert torch.equal(a["head"]["weight"], b["head"]["weight"])
    assert torch.equal(a["bank"]["scores"], b["bank"]["scores"])


def test_checkpoint_from_another_backbone_is_refused(tiny_data, tmp_path):
    preset = write_preset(tmp_path / "p.yaml", tiny_data, tmp_path / "a")
    train(load_config(str(preset), ["run.stage=pretrain", "run.max_steps=1"]))
    other = load_config(str(preset), ["model.backbone=ir34", f"run.output={tmp_path / 'b'}",
                                      f"run.init_from={tmp_path / 'a' / 'checkpoints' / 'last.pt'}"])
    with pytest.raises(CdfaceError, match="backbone"):
        train(other)


@pytest.mark.parametrize("override, message", [
    (["method.identities=9"], "exceeds the 8 identities"),
    (["method.num_easy=1"], "num_easy"),
    (["optim.batch_size=128"], "fewer than one global batch"),
    (["method.identities=32"], "exceeds the batch size"),
])
def test_bad_configuration_is_refused(tiny_data, tmp_path, override, message):
    preset = write_preset(tmp_path / "p.yaml", tiny_data, tmp_path / "run")
    with pytest.raises(CdfaceError, match=message):
        train(load_config(str(preset), override))


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    preset = write_preset(tmp_path / "p.yaml", empty, tmp_path / "run")
    for args in (["--preset", str(preset)], ["--preset", "nope"], ["--preset", str(preset), "--set", "optim.lr=-1"]):
        proc = subprocess.run(CDFACE + ["train", *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("cdface: error:"), proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_corrupt_image_in_a_worker_is_one_line_and_exit_2(tmp_path):
    data = write_tiny_folder_dataset(tmp_path / "data", identities=4, per_identity=4)
    (data / "id002" / "001.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    preset = write_preset(tmp_path / "p.yaml", data, tmp_path / "run", method={"identities": 2},
                          optim={"batch_size": 16, "epochs": 1})
    preset.write_text(preset.read_text().replace("workers: 0", "workers: 1"))
    proc = subprocess.run(CDFACE + ["train", "--preset", str(preset), "--set", "run.stage=pretrain"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "Warning" not in line
             and not line.startswith("  ")]
    assert len(lines) == 1 and "001.jpg" in lines[0], proc.stderr


def test_torchrun_two_processes_train_and_resume(tiny_data, tmp_path):
    """The real launcher: two gloo ranks through torchrun, then a resume on one process."""
    preset = write_preset(tmp_path / "p.yaml", tiny_data, tmp_path / "run")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(free_port()), "-m", "cdface.cli", "train", "--preset", str(preset)]
    proc = subprocess.run(torchrun + ["--set", "run.max_steps=3"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["progress"]["step"] == 3
    # One checkpoint for all ranks: the same run continues on a single process.
    proc = subprocess.run(CDFACE + ["train", "--preset", str(preset), "--set", "run.max_steps=5"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_checkpoint(tmp_path / "run" / "model.pt")["progress"]["step"] == 5
