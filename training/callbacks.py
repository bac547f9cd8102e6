"""What the training loop does around its steps: log, evaluate, checkpoint.

Plain classes whose ``on_step_end`` / ``on_epoch_end`` / ``on_train_end`` the trainer calls
explicitly, in the order ``Trainer.fit`` lists them (as insightface's arcface_torch ``train_v2.py``
does with its logging and verification callbacks).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import torch.nn as nn

from cdface.training import distributed
from cdface.training.checkpoint import save_checkpoint
from cdface.training.config import RunConfig
from cdface.training.metrics import MetricsLog

if TYPE_CHECKING:
    from cdface.training.trainer import FaceModel, Trainer


class MetricsLogging:
    """Every ``run.log_every`` steps (and at the last): the means of the step values since the last
    time, with lr, epoch and images/s, to metrics.jsonl and TensorBoard; the progress bar. Writes on
    the main rank only."""

    def __init__(self, run: RunConfig, is_main: bool, total: int, initial_step: int, description: str):
        self.log_every, self.total = run.log_every, total
        self.metrics = MetricsLog(run.output, tensorboard=run.tensorboard) if is_main else None
        self.bar = None
        if is_main and run.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial_step, unit="step", dynamic_ncols=True, desc=description)
        self._new_window()

    def _new_window(self) -> None:
        self._window_start, self._window_images = time.perf_counter(), 0
        self._window: dict[str, tuple[float, int]] = {}  # name -> (sum, count) since the last log line

    def on_step_end(self, step: int, values: dict[str, float], images: int, lr: float, epoch: int) -> None:
        """``images``: how many the step trained on over all ranks."""
        for key, value in values.items():
            total, count = self._window.get(key, (0.0, 0))
            self._window[key] = (total + value, count + 1)
        self._window_images += images
        if step % self.log_every == 0 or step == self.total:
            # Means over the window: RRB losses exist only on every interval-th step.
            elapsed = time.perf_counter() - self._window_start
            means = {key: total / count for key, (total, count) in self._window.items()}
            means.update(lr=lr, epoch=epoch, images_per_s=self._window_images / max(elapsed, 1e-9))
            self._new_window()
            if self.metrics:
                self.metrics.log(step, means)
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{means['loss']:.3f}", img_s=f"{means['images_per_s']:.0f}")
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.metrics:
            self.metrics.close()


class Evaluation:
    """``evaluate(backbone)`` every ``every_epochs`` epochs, and at the end unless it has run already;
    main rank only. Its figures go to the metrics log as kind "eval"."""

    def __init__(self, evaluate: Optional[Callable[[nn.Module], dict]], model: FaceModel, is_main: bool,
                 every_epochs: int, metrics: Optional[MetricsLog]):
        self.evaluate, self.model, self.is_main = evaluate, model, is_main
        self.every_epochs, self.metrics = every_epochs, metrics
        self.report: dict = {}  # the latest

    def on_epoch_end(self, epoch: int, step: int) -> None:
        if self.evaluate and epoch % self.every_epochs == 0:
            self.report = self._run(step)

    def on_train_end(self, step: int) -> dict:
        if self.evaluate and not self.report:
            self.report = self._run(step)
        return self.report

    def _run(self, step: int) -> dict:
        if not self.is_main or self.evaluate is None:
            return {}
        self.model.eval()
        report = self.evaluate(self.model.backbone)
        self.model.train()
        if self.metrics:
            flat = {f"{r['dataset']}/{r['metric']}": r["value"] for r in report.get("results", [])
                    if isinstance(r.get("value"), (int, float))}
            self.metrics.log(step, flat, kind="eval")
        return report


class Checkpointing:
    """checkpoints/last.pt (everything a resume needs) every ``run.checkpoint_every`` steps, at each
    epoch end and at the last step; model.pt (weights, score bank, evaluation) when training ends."""

    def __init__(self, trainer: "Trainer", total: int):
        self.trainer, self.total = trainer, total
        self.every = trainer.cfg.run.checkpoint_every
        self.last = trainer.last_checkpoint

    def due(self, step: int, epoch_done: bool) -> bool:
        return step % self.every == 0 or epoch_done or step >= self.total

    def on_step_end(self, step: int, epoch_done: bool) -> None:
        if self.due(step, epoch_done):
            self.save_last()

    def save_last(self) -> Path:
        trainer = self.trainer
        trainer.bank.sync()  # every rank holds the same bank; rank 0 writes it
        state = trainer.state()  # on every rank: a sharded head is gathered
        if trainer.env.is_main:
            save_checkpoint(self.last, state)
        distributed.barrier()
        return self.last

    def on_train_end(self, evaluation: dict) -> None:
        final = self.trainer.state(full=False)  # on every rank: a sharded head is gathered
        if self.trainer.env.is_main:
            final["evaluation"] = evaluation
            save_checkpoint(self.trainer.output / "model.pt", final)
        # Every rank leaves together: a rank tearing down its process group while rank 0 (which
        # hosts the rendezvous store) is still writing can abort in gloo's threads.
        distributed.barrier()
