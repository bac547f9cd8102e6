"""The `paper` preset against the authors' setting, and the options that make it so (issue 13).

Presets: no clipping, diversity at the head's scale, the hard window bounded below by 0, shared
prototypes, a separate forward pass for the mined images. Then each option on its own: the
warm-up schedule equals its formula, the hard window's lower bound and its widening, the shared
prototype set equals a brute-force search (replicated and sharded heads), and the separate pass
gives the shared pass's losses and step on a model whose forward does not depend on the batch.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cdface.training.config import load_config
from cdface.training.distributed import DistEnv
from cdface.training.heads import MARGINS, MarginHead
from cdface.training.losses import diversity_loss
from cdface.training.method import RefinedBranchLoss, hard_negative_prototypes
from cdface.training.mining import ScoreBank, SoftMiner
from cdface.training.optim import lr_factor
from cdface.training.partial_fc import ShardedMarginHead
from cdface.training.trainer import Trainer
from tests.training.test_trainer import free_port, write_preset
from tests.training.trainer_support import write_tiny_folder_dataset

# -- presets ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["paper", "glint360k"])
def test_paper_preset_settings_are_the_authors(preset):
    cfg = load_config(preset)
    assert cfg.optim.grad_clip == 0.0  # neither the paper nor the authors' code clips
    assert cfg.method.diversity_scale is None and cfg.diversity_scale == cfg.head.scale == 64.0
    assert cfg.method.hard_lower_bound == 0.0
    assert cfg.method.prototypes == "shared"
    assert cfg.method.separate_pass is True
    assert (cfg.method.lambda_closeness, cfg.method.lambda_diversity) == (0.5, 2.0)  # the supplement's
    assert cfg.optim.warmup_epochs == 0.0


def test_demo_diversity_scale_follows_its_head():
    cfg = load_config("demo")
    assert cfg.head.scale == 32.0 and cfg.diversity_scale == 32.0
    assert RefinedBranchLoss.from_config(cfg).diversity_scale == 32.0
    assert load_config("demo", ["head.scale=48"]).diversity_scale == 48.0


def test_an_explicit_diversity_scale_is_kept_and_logged(caplog):
    cfg = load_config("paper", ["method.diversity_scale=32"])
    with caplog.at_level(logging.WARNING, logger="cdface.train"):
        loss = RefinedBranchLoss.from_config(cfg)
    assert loss.diversity_scale == 32.0
    assert "differs from head.scale 64" in caplog.text


# -- the warm-up -----------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["step", "cosine"])
def test_warmup_values_at_the_first_steps_equal_the_formula(schedule):
    # 0.3 epoch of 18 steps: W = 5.4 warm-up steps, where the old ramp read 6 / 5.4 = 1.11 x lr at step 5.
    cfg = load_config("demo", [f"optim.schedule={schedule}", "optim.warmup_epochs=0.3", "optim.lr=0.1"])
    steps_per_epoch, warmup = 18, 0.3 * 18
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=cfg.optim.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, steps_per_epoch))
    read = []
    for _ in range(10):
        read.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [0.1 * min(1.0, (s + 1) / warmup) for s in range(6)]
    assert read[:6] == pytest.approx(expected, rel=1e-12)
    assert read[5] == pytest.approx(0.1) and max(read) <= 0.1 + 1e-12
    if schedule == "step":
        assert read[6:] == pytest.approx([0.1] * 4)
    else:  # the cosine starts from lr once warm-up ends, and only falls
        span = (cfg.epochs - 0.3) * steps_per_epoch
        assert read[6:] == pytest.approx([0.05 * (1 + math.cos(math.pi * (s - warmup) / span)) for s in range(6, 10)])


# -- the hard window -------------------------------------------------------------------------------


def _bank(scores) -> ScoreBank:
    bank = ScoreBank(len(scores))
    bank.scores = torch.tensor(scores, dtype=torch.float32)
    return bank


def test_hard_samples_score_above_the_lower_bound():
    # Identity 0: below the threshold 0.3, scores -0.4, -0.1, 0.0 (all <= 0) and 0.1, 0.2 (inside (0, 0.3)).
    scores = [-0.4, -0.1, 0.0, 0.1, 0.2] + [0.5, 0.6, 0.7, 0.8, 0.9, 0.55, 0.65]
    labels = np.zeros(len(scores), dtype=np.int64)
    bounded = SoftMiner(labels, 1, num_easy=7, num_hard=2, hard_lower_bound=0.0, seed=0)
    open_ = SoftMiner(labels, 1, num_easy=7, num_hard=2, hard_lower_bound=None, seed=0)
    picked_bounded, picked_open = set(), set()
    for step in range(40):
        picked_bounded |= set(bounded.mine(_bank(scores), torch.tensor([0]), step, threshold=0.3).hard[0].tolist())
        picked_open |= set(open_.mine(_bank(scores), torch.tensor([0]), step, threshold=0.3).hard[0].tolist())
    assert picked_bounded == {3, 4}  # (0, 0.3): 0.0 itself is out, as in the authors' code
    assert picked_open == {0, 1, 2, 3, 4}


def test_hard_window_widens_at_both_ends_when_short():
    # Below the threshold 0.3 only scores <= 0: the window (0, 0.3) widens to (-0.05, 0.35), then
    # (-0.1, 0.4): the first widening that holds a sample admits -0.07 (0.38 needs the same step).
    scores = [-0.3, -0.07, 0.38] + [0.5, 0.6, 0.7, 0.8, 0.9, 0.55, 0.65]
    labels = np.zeros(len(scores), dtype=np.int64)
    miner = SoftMiner(labels, 1, num_easy=7, num_hard=1, hard_lower_bound=0.0, widen_step=0.05, seed=0)
    picks = {int(miner.mine(_bank(scores), torch.tensor([0]), step, threshold=0.3).hard[0, 0]) for step in range(40)}
    assert picks == {1, 2}
    only_low = [-0.3, -0.12] + [0.5, 0.6, 0.7, 0.8, 0.9, 0.55, 0.65]
    miner = SoftMiner(np.zeros(len(only_low), dtype=np.int64), 1, num_easy=7, num_hard=1, hard_lower_bound=0.0,
                      widen_step=0.05, seed=0)
    assert int(miner.mine(_bank(only_low), torch.tensor([0]), 0, threshold=0.3).hard[0, 0]) == 1  # at (-0.15, 0.45)


# -- the prototypes --------------------------------------------------------------------------------

D, C, N, NP = 16, 23, 12, 5


def _global_batch(seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (N,), generator=g)
    labels[:4] = torch.tensor([0, C - 1, 7, 7])  # classes at the shard edges, and a repeated one
    return torch.randn(N, D, generator=g), labels


# Rows of the batch the refined branch mines, one per mined identity (the identities 0, 22, 7 and a few more).
MINED_ROWS = torch.tensor([0, 1, 2, 5, 8, 11])


def _brute_force(weight: torch.Tensor, embeddings: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor,
                 mode: str) -> torch.Tensor:
    """The prototypes from a search over every centre, written out plainly."""
    cos = torch.nn.functional.normalize(embeddings, dim=1) @ torch.nn.functional.normalize(weight, dim=1).t()
    per_row = []
    for r in rows.tolist():
        order = torch.sort(cos[r], descending=True, stable=True).indices.tolist()
        per_row.append([c for c in order if c != int(labels[r])][:NP])
    if mode == "per_sample":
        return weight[torch.tensor(per_row)]
    mined = {int(labels[r]) for r in rows.tolist()}
    union = sorted({c for top in per_row for c in top} - mined)
    return weight[torch.tensor(union)]


@pytest.mark.parametrize("mode", ["shared", "per_sample"])
def test_prototypes_of_the_replicated_head_equal_brute_force(mode):
    torch.manual_seed(0)
    head = MarginHead(D, C, MARGINS["arcface"](), scale=32.0, num_hard_negatives=NP)
    embeddings, labels = _global_batch()
    out = head(embeddings, labels, negatives_for=MINED_ROWS)
    got = hard_negative_prototypes(head, out.hard_negatives, labels[MINED_ROWS], mode)
    expected = _brute_force(head.weight.detach(), embeddings, labels, MINED_ROWS, mode)
    assert torch.equal(got, expected)
    if mode == "shared":  # no mined identity is its own or another's negative
        assert not any(torch.equal(row, head.weight.detach()[c]) for row in got for c in labels[MINED_ROWS].tolist())


def _sharded_worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    head = ShardedMarginHead(D, C, MARGINS["arcface"](), scale=32.0, num_hard_negatives=NP)
    embeddings, labels = _global_batch()
    b = N // world_size
    mine = slice(rank * b, (rank + 1) * b)
    local_rows = MINED_ROWS[(MINED_ROWS >= rank * b) & (MINED_ROWS < (rank + 1) * b)] - rank * b
    result = head(embeddings[mine], labels[mine], negatives_for=local_rows)
    got = {mode: hard_negative_prototypes(head, result.hard_negatives, labels[mine][local_rows], mode)
           for mode in ("shared", "per_sample")}
    torch.save({"rows": local_rows + rank * b, **got}, Path(out) / f"{rank}.pt")
    dist.destroy_process_group()


def test_prototypes_of_the_sharded_head_equal_brute_force(tmp_path):
    # Each rank mines its own identities; the centres of their negatives live on both shards.
    mp.spawn(_sharded_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    torch.manual_seed(0)
    weight = MarginHead(D, C, MARGINS["arcface"](), num_hard_negatives=NP).weight.detach()  # the same draw
    embeddings, labels = _global_batch()
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt")
        for mode in ("shared", "per_sample"):
            assert torch.equal(got[mode], _brute_force(weight, embeddings, labels, got["rows"], mode)), (rank, mode)


def test_diversity_loss_against_a_shared_set_equals_the_set_repeated_per_sample():
    g = torch.Generator().manual_seed(1)
    hard, shared = torch.randn(6, D, generator=g), torch.randn(9, D, generator=g)
    torch.testing.assert_close(diversity_loss(hard, shared, scale=32.0),
                               diversity_loss(hard, shared.expand(6, 9, D), scale=32.0))


# -- the separate pass -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return write_tiny_folder_dataset(tmp_path_factory.mktemp("data") / "train")


def _one_refined_step(preset: Path, out: Path, overrides: list[str], eval_mode: bool) -> tuple[dict, dict]:
    cfg = load_config(str(preset), [f"run.output={out}", "data.flip=false", "method.interval=1"] + overrides)
    trainer = Trainer(cfg, DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    trainer.model.train(not eval_mode)
    images, labels, indices = next(iter(trainer.loader()))
    values = trainer.train_step(images, labels, indices)
    return values, {k: v.clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.parametrize("model, eval_mode", [({"backbone": "test_nonorm", "width": 1.0, "dropout": 0.0}, False),
                                              ({"backbone": "ir18", "width": 0.125, "dropout": 0.0}, True)],
                         ids=["bn-free", "ir18-eval-bn"])
def test_separate_pass_gives_the_shared_pass_losses_and_step(tiny_data, tmp_path, model, eval_mode):
    preset = write_preset(tmp_path / "p.yaml", tiny_data, tmp_path / "unused", model=model)
    shared_values, shared_state = _one_refined_step(preset, tmp_path / "shared", ["method.separate_pass=false"],
                                                    eval_mode)
    separate_values, separate_state = _one_refined_step(preset, tmp_path / "separate", ["method.separate_pass=true"],
                                                        eval_mode)
    assert "loss_diversity" in shared_values
    for key in ("loss", "loss_erb", "loss_closeness", "loss_diversity"):
        assert separate_values[key] == pytest.approx(shared_values[key], rel=1e-5, abs=1e-6), key
    for name, value in shared_state.items():  # one SGD step from the same weights: the gradients agreed
        torch.testing.assert_close(separate_state[name], value, atol=1e-6, rtol=1e-5, msg=name)


def test_gradient_probe_logs_each_term(tiny_data, tmp_path):
    preset = write_preset(tmp_path / "p.yaml", tiny_data, tmp_path / "unused",
                          model={"backbone": "test_nonorm", "width": 1.0, "dropout": 0.0})
    values, _ = _one_refined_step(preset, tmp_path / "probe", ["method.probe_gradients_every=1"], eval_mode=False)
    for term in ("erb", "closeness", "diversity"):
        assert values[f"grad_norm_{term}"] > 0
    assert -1.0 <= values["grad_cos_erb_diversity"] <= 1.0
