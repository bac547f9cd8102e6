"""Mining ahead: the refined branch's samples mined and decoded during the step before are exactly
those the step would mine and decode itself."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from cdface.training import distributed
from cdface.training.config import DataConfig, MethodConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig
from cdface.training.data.dataset import open_dataset
from cdface.training.distributed import DistEnv
from cdface.training.mined_images import MinedImageLoader
from cdface.training.mining import ScoreBank, SoftMiner
from cdface.training.trainer import Trainer
from tests.training.test_trainer import free_port
from tests.training.trainer_support import write_tiny_folder_dataset

STEPS = 8


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return write_tiny_folder_dataset(tmp_path_factory.mktemp("data") / "train")


def make_trainer(data: Path, output: Path, env: DistEnv | None = None, batch_size: int = 8,
                 bank_sync_every: int = 3) -> Trainer:
    """A joint-stage run whose only checkpoint is after its last step, so every mining step but
    the first can be mined during the step before."""
    cfg = TrainConfig(
        model=ModelConfig(backbone="ir18", width=0.125, embedding_size=16, dropout=0.2),
        method=MethodConfig(identities=4, num_easy=3, num_hard=1, interval=2, bank_sync_every=bank_sync_every),
        data=DataConfig(path=str(data), workers=0),
        optim=OptimConfig(batch_size=batch_size, epochs=1, lr=0.05, milestones=[1]),
        run=RunConfig(output=str(output), progress=False, tensorboard=False, threads=1, max_steps=STEPS,
                      checkpoint_every=100, log_every=1),
    )
    return Trainer(cfg, env or DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))


def record_loads(trainer: Trainer) -> list[dict]:
    """Every mining of the trainer: its step, samples, images and whether it ran on the training thread."""
    calls, load = [], trainer.mined_images.load

    def recording(bank, labels, step):
        mined, images = load(bank, labels, step)
        calls.append({"step": step, "indices": mined.sample_indices.clone(), "images": images.clone(),
                      "on_main_thread": threading.current_thread() is threading.main_thread()})
        return mined, images

    trainer.mined_images.load = recording
    return calls


def train_at_step(trainer: Trainer) -> None:
    """The run of ``fit`` without its callbacks, each step mining for itself (no next_labels)."""
    trainer.sampler.set_epoch(0)
    for images, labels, indices in trainer.loader():
        if trainer.step == STEPS:
            break
        trainer.train_step(images, labels, indices)


def assert_same_mining_and_result(ahead_calls, at_step_calls, ahead_state, at_step_state) -> None:
    assert [c["step"] for c in ahead_calls] == [c["step"] for c in at_step_calls] == [0, 2, 4, 6]
    # Step 0 has no step before it; every later mining step was mined during the one before.
    assert [c["on_main_thread"] for c in ahead_calls] == [True, False, False, False]
    assert all(c["on_main_thread"] for c in at_step_calls)
    for a, b in zip(ahead_calls, at_step_calls):
        assert torch.equal(a["indices"], b["indices"]), a["step"]
        assert torch.equal(a["images"], b["images"]), a["step"]
    for name, value in ahead_state["model"].items():
        assert torch.equal(value, at_step_state["model"][name]), name
    assert torch.equal(ahead_state["bank"], at_step_state["bank"])


def final_state(trainer: Trainer) -> dict:
    return {"model": trainer.model.state_dict(), "bank": trainer.bank.scores.clone()}


def test_mining_ahead_gives_the_samples_and_pixels_of_mining_at_the_step(tiny_data, tmp_path):
    ahead = make_trainer(tiny_data, tmp_path / "ahead")
    ahead_calls = record_loads(ahead)
    ahead.fit()
    at_step = make_trainer(tiny_data, tmp_path / "at_step")
    at_step_calls = record_loads(at_step)
    train_at_step(at_step)
    assert_same_mining_and_result(ahead_calls, at_step_calls, final_state(ahead), final_state(at_step))


def ddp_mining_worker(rank: int, port: int, data: str, out: str, mine_ahead: bool) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    env = distributed.setup("cpu")
    try:
        # bank_sync_every=2: the ranks synchronise the bank in each step before a mining step, and
        # mining ahead must see the synchronised bank.
        trainer = make_trainer(Path(data), Path(out), env, batch_size=16, bank_sync_every=2)
        calls = record_loads(trainer)
        if mine_ahead:
            trainer.fit()
        else:
            train_at_step(trainer)
        torch.save({"calls": calls, **final_state(trainer)}, Path(out) / f"rank{rank}.pt")
    finally:
        distributed.teardown()


def test_two_ranks_mining_ahead_mine_what_they_would_at_the_step(tmp_path):
    data = write_tiny_folder_dataset(tmp_path / "data", identities=8, per_identity=16)  # 8 steps of 16: one epoch
    runs = {}
    for mine_ahead in (True, False):
        out = tmp_path / ("ahead" if mine_ahead else "at_step")
        out.mkdir()
        mp.spawn(ddp_mining_worker, args=(free_port(), str(data), str(out), mine_ahead), nprocs=2)
        runs[mine_ahead] = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    for ahead, at_step in zip(runs[True], runs[False]):
        assert_same_mining_and_result(ahead["calls"], at_step["calls"], ahead, at_step)


def test_a_bank_write_after_mining_ahead_is_refused(tmp_path):
    dataset = open_dataset(write_tiny_folder_dataset(tmp_path / "data", identities=4, per_identity=4))
    bank = ScoreBank(len(dataset))
    bank.update(torch.arange(len(dataset)), torch.linspace(-0.5, 0.9, len(dataset)))
    loader = MinedImageLoader(SoftMiner(dataset.labels, 2, num_easy=2, num_hard=1), dataset, rank=0)
    labels = torch.tensor([0, 1, 2, 3])
    try:
        loader.start(bank, labels, step=3)
        mined, images = loader.take(bank, labels, step=3)
        expected, expected_images = loader.load(bank, labels, step=3)
        assert torch.equal(mined.sample_indices, expected.sample_indices)
        assert torch.equal(images, expected_images)

        loader.start(bank, labels, step=4)
        bank.update(torch.tensor([0]), torch.tensor([0.1]))  # step 4 would now mine from another bank
        with pytest.raises(RuntimeError, match="score bank changed"):
            loader.take(bank, labels, step=4)
    finally:
        loader.close()
