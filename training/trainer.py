"""The training loop, top to bottom.

Every step runs the elementary branch (ERB): the backbone embeds the batch, the margin head
gives the classification loss, the batch's target cosines (into the score bank) and each
sample's hard negative class centres. In the joint stage, every ``method.interval`` steps the
refined branch (RRB) also runs: the soft miner picks K identities of the batch with NE easy and
NH hard samples each, those images go through the backbone (in a forward pass of their own, as
the authors do, or in the batch's: ``method.separate_pass``), and the closeness and diversity
losses are added:

    L = L_erb + lambda1 * L_closeness + lambda2 * L_diversity

One DDP forward and one backward per step, whatever the branch: DDP then needs no unused-parameter
search, and the RRB costs only its extra images. Those are mined and decoded on a background
thread while the step before computes, wherever that gives exactly what mining at the step's own
start would (``mined_images``). The RRB's loss is ``method``'s; logging, evaluation and
checkpoints are ``callbacks``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, TypeAlias

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from cdface.core.errors import CdfaceError
from cdface.training import distributed
from cdface.training.backbones import create_backbone
from cdface.training.backbones.arcface_torch import load_arcface_torch
from cdface.training.callbacks import Checkpointing, Evaluation, MetricsLogging
from cdface.training.checkpoint import check_compatible, load_checkpoint, rng_state, set_rng_state
from cdface.training.config import TrainConfig
from cdface.training.data.dataset import EpochBatchSampler, open_dataset
from cdface.training.data.loader import Lookahead, training_loader
from cdface.training.heads import MARGINS, MarginHead
from cdface.training.method import RefinedBranchLoss, gradient_probe, hard_negative_prototypes
from cdface.training.mined_images import MinedImageLoader
from cdface.training.mining import ScoreBank, SoftMiner, identities_per_rank
from cdface.training.optim import clip_grad_norm, lr_factor, parameter_groups
from cdface.training.partial_fc import ShardedMarginHead
from cdface.training.preprocess import to_model_input

log = logging.getLogger("cdface.train")


Head: TypeAlias = "MarginHead | ShardedMarginHead"


class FaceModel(nn.Module):
    """Backbone + margin head: the module DDP wraps (a sharded head's centres excepted)."""

    def __init__(self, backbone: nn.Module, head: Head):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor, labels: torch.Tensor, negatives_for: Optional[torch.Tensor] = None,
                mined_images: Optional[torch.Tensor] = None):
        """``images`` past the first ``len(labels)`` are mined RRB samples sharing the batch's pass;
        ``mined_images`` get a pass of their own (inside this one DDP forward: a second DDP forward
        before the backward would upset its gradient reduction)."""
        embeddings = self.backbone(images)
        n = labels.shape[0]
        out = self.head(embeddings[:n], labels, negatives_for)
        rrb_embeddings = embeddings[n:] if mined_images is None else self.backbone(mined_images)
        return out.loss, out.target_cos, out.hard_negatives, rrb_embeddings


@dataclass
class TrainResult:
    output: Path
    steps: int
    checkpoint: Path
    bank: torch.Tensor
    evaluation: dict = field(default_factory=dict)


def backbone_spec(cfg: TrainConfig) -> dict:
    m = cfg.model
    return {"name": m.backbone, "kwargs": {"width": m.width, "embedding_size": m.embedding_size, "dropout": m.dropout}}


def create_head(cfg: TrainConfig, num_classes: int) -> Head:
    """The configured margin head: every centre on every rank, or sharded across the ranks (Partial FC)."""
    h = cfg.head
    margin = MARGINS[h.kind](h.margin)
    if h.sharded:
        return ShardedMarginHead(cfg.model.embedding_size, num_classes, margin, h.scale, h.num_hard_negatives,
                                 h.sample_rate, seed=cfg.run.seed)
    return MarginHead(cfg.model.embedding_size, num_classes, margin, h.scale, h.num_hard_negatives)


class Trainer:
    def __init__(self, cfg: TrainConfig, env: distributed.DistEnv):
        self.cfg, self.env = cfg, env
        run, method = cfg.run, cfg.method
        if run.threads:
            torch.set_num_threads(run.threads)
        if run.amp == "fp16" and env.device.type != "cuda":
            raise CdfaceError("run.amp=fp16 needs a CUDA device; use bf16 or none on CPU")
        if cfg.optim.batch_size % env.world_size:
            raise CdfaceError(f"optim.batch_size ({cfg.optim.batch_size}) must divide evenly over "
                              f"{env.world_size} ranks")
        self.joint = run.stage == "joint"
        self.output = Path(run.output)
        self.last_checkpoint = self.output / "checkpoints" / "last.pt"  # for resuming

        self.dataset = open_dataset(cfg.data.path)
        if self.joint and method.identities > self.dataset.num_classes:
            raise CdfaceError(f"method.identities (K={method.identities}) exceeds the {self.dataset.num_classes} "
                              f"identities of the dataset")
        self.local_batch = cfg.optim.batch_size // env.world_size
        self.local_identities = identities_per_rank(method.identities, env.world_size, env.rank)
        if self.joint and self.local_identities > self.local_batch:
            raise CdfaceError(f"each rank mines {self.local_identities} identities but holds only "
                              f"{self.local_batch} samples per batch")

        torch.manual_seed(run.seed)  # identical initial weights on every rank
        backbone = create_backbone(cfg.model.backbone, **backbone_spec(cfg)["kwargs"])
        head = create_head(cfg, self.dataset.num_classes)
        self.model = FaceModel(backbone, head).to(env.device)
        # A sharded head's rows differ per rank and its gradient is complete on each: DDP keeps off it.
        self.sharded = [head.weight] if isinstance(head, ShardedMarginHead) else []
        self.channels_last = run.channels_last if run.channels_last is not None else env.device.type == "cuda"
        if self.channels_last and env.device.type != "cuda":
            raise CdfaceError("run.channels_last is for CUDA: on CPU, torch 2.13 crashes in the backward of a "
                              "strided 1x1 convolution in that layout")
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # stubs lack it
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        if env.distributed and self.sharded:
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.model, ["head.weight"])
        self.ddp = DistributedDataParallel(self.model, device_ids=device_ids) if env.distributed else self.model

        self.optimizer = torch.optim.SGD(parameter_groups(self.model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                         momentum=cfg.optim.momentum)
        self.sampler = EpochBatchSampler(len(self.dataset), self.local_batch, env.world_size, env.rank,
                                         seed=run.seed, flip=cfg.data.flip, drop_last=True)
        self.steps_per_epoch = len(self.sampler)  # the sampler refuses a dataset smaller than one batch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(cfg, self.steps_per_epoch))
        self.scaler = torch.amp.GradScaler("cuda", enabled=run.amp == "fp16")
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(run.amp)
        self.bank = ScoreBank(len(self.dataset), alpha=method.ema_alpha)
        miner = SoftMiner(self.dataset.labels, self.local_identities, method.num_easy, method.num_hard,
                          method.quantile, method.widen_step, seed=run.seed, hard_lower_bound=method.hard_lower_bound)
        self.mined_images = MinedImageLoader(miner, self.dataset, env.rank)
        self.refined_loss = RefinedBranchLoss.from_config(cfg)
        if method.probe_gradients_every and env.distributed:
            raise CdfaceError("method.probe_gradients_every is a single-process diagnostic: its extra backward "
                              "passes would run outside DDP's gradient reduction")
        self.step = 0  # global optimisation steps taken
        self.epoch = 0
        self.batch_in_epoch = 0
        torch.manual_seed(run.seed + env.rank)  # dropout etc. may differ per rank

    # -- state -------------------------------------------------------------------------------
    def state(self, full: bool = True) -> dict[str, Any]:
        """What a checkpoint holds; every rank calls it (a sharded head is gathered), rank 0 writes it."""
        state = {
            "backbone": backbone_spec(self.cfg),
            "config": self.cfg.model_dump(),
            "model": self.model.backbone.state_dict(),
            "head": self.model.head.full_state_dict(),
            "bank": self.bank.state_dict(),
            "num_classes": self.dataset.num_classes,
            "progress": {"stage": self.cfg.run.stage, "step": self.step, "epoch": self.epoch,
                         "batch_in_epoch": self.batch_in_epoch},
        }
        if full:
            state.update(optimizer=self._optimizer_state(), scheduler=self.scheduler.state_dict(),
                         scaler=self.scaler.state_dict(), rng=rng_state())
        return state

    def resume_or_init(self) -> None:
        last = self.last_checkpoint
        if self.cfg.run.resume and last.is_file():
            state = load_checkpoint(last)
            self._check_compatible(state, str(last))
            if state["progress"]["stage"] != self.cfg.run.stage:
                raise CdfaceError(f"{last} belongs to the {state['progress']['stage']} stage; use another "
                                  f"run.output for the {self.cfg.run.stage} stage")
            self._load_weights(state)
            self._load_optimizer_state(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            p = state["progress"]
            self.step, self.epoch, self.batch_in_epoch = p["step"], p["epoch"], p["batch_in_epoch"]
            set_rng_state(state["rng"])
            if self.env.is_main:
                log.info("resumed from %s at step %d (epoch %d, batch %d)", last, self.step, self.epoch,
                         self.batch_in_epoch)
        elif self.cfg.run.init_from:
            state = load_checkpoint(self.cfg.run.init_from)
            self._check_compatible(state, self.cfg.run.init_from)
            if "head" not in state or "bank" not in state:
                raise CdfaceError(f"{self.cfg.run.init_from} has no head or score bank: not a training checkpoint")
            self._load_weights(state)
            if self.env.is_main:
                log.info("initialised model, head and score bank from %s", self.cfg.run.init_from)
        elif self.cfg.model.init_weights:
            load_arcface_torch(self.cfg.model.init_weights, into=self.model.backbone)  # every rank: same weights
            if self.env.is_main:
                log.info("initialised the backbone from arcface_torch weights %s", self.cfg.model.init_weights)
        elif self.joint and self.env.is_main:
            log.warning("joint stage without run.init_from: difficulty scores start at zero, so mining is "
                        "uninformed until the bank fills; the method expects a pretrain stage first")

    def _check_compatible(self, state: dict, path: str) -> None:
        check_compatible(state, path, backbone_spec(self.cfg), self.dataset.num_classes, len(self.dataset))

    def _load_weights(self, state: dict) -> None:
        self.model.backbone.load_state_dict(state["model"])
        self.model.head.load_full_state_dict(state["head"])
        self.bank.load_state_dict(state["bank"])

    # A sharded head's momentum is saved whole (gathered on rank 0) and re-sharded on load, like its
    # centres: checkpoints are the same whatever the number of ranks or the kind of head.
    def _head_slot(self) -> int:
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        return next(i for i, p in enumerate(params) if p is self.model.head.weight)

    def _with_head_momentum(self, state: dict, whole: bool) -> dict:
        """``state`` (an optimizer state dict) with a sharded head's momentum made whole, or re-sharded."""
        head, index = self.model.head, self._head_slot()
        slot = state["state"].get(index)
        if not isinstance(head, ShardedMarginHead) or slot is None or "momentum_buffer" not in slot:
            return state
        momentum = slot["momentum_buffer"]
        converted = {**slot, "momentum_buffer": head.gather_full(momentum) if whole else head.shard(momentum)}
        return {**state, "state": {**state["state"], index: converted}}

    def _optimizer_state(self) -> dict:
        return self._with_head_momentum(self.optimizer.state_dict(), whole=True)

    def _load_optimizer_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(self._with_head_momentum(state, whole=False))

    # -- one step ----------------------------------------------------------------------------
    def mines_at(self, step: int) -> bool:
        return self.joint and step % self.cfg.method.interval == 0

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
                   next_labels: Optional[torch.Tensor] = None) -> dict[str, float]:
        """One optimisation step. ``next_labels``, the following batch's labels, lets that step's
        mining start in the background as soon as this step's scores are in the bank."""
        device, method = self.env.device, self.cfg.method
        mined = negatives_for = separate = None
        if self.mines_at(self.step):
            mined, mined_images = self.mined_images.take(self.bank, labels, self.step)
            if method.separate_pass:
                separate = self._model_input(mined_images)
            else:
                images = torch.cat([images, mined_images])
            negatives_for = mined.batch_positions.to(device)
        x = self._model_input(images)
        labels_dev = labels.to(device, non_blocking=True)
        if isinstance(self.model.head, ShardedMarginHead):
            self.model.head.step = self.step  # seeds its negative-centre sample

        with torch.autocast(device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            loss_erb, target_cos, hard_negatives, rrb_embeddings = self.ddp(x, labels_dev, negatives_for, separate)
        loss = loss_erb
        values = {"loss_erb": float(loss_erb.detach())}
        if mined is not None:
            prototypes = hard_negative_prototypes(self.model.head, hard_negatives, mined.identities, method.prototypes)
            loss, rrb_values = self.refined_loss(loss_erb, mined, rrb_embeddings, prototypes)
            values.update(rrb_values)
            if method.probe_gradients_every and (self.step // method.interval) % method.probe_gradients_every == 0:
                closeness, diversity = self.refined_loss.terms(mined, rrb_embeddings, prototypes)
                values.update(gradient_probe(self.model.backbone, {"erb": loss_erb, "closeness": closeness,
                                                                   "diversity": diversity}))

        # The bank the next step mines from is final once this step's scores are in (and the ranks
        # synchronised, when due): write it before the backward, so that mining runs alongside.
        self.bank.update(indices, target_cos)
        if (self.step + 1) % self.cfg.method.bank_sync_every == 0:
            self.bank.sync()
        if next_labels is not None and self.mines_at(self.step + 1):
            self.mined_images.start(self.bank, next_labels, self.step + 1)

        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.optim.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            clip_grad_norm(self.model.parameters(), self.cfg.optim.grad_clip, sharded=self.sharded)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        if not math.isfinite(values["loss_erb"]):
            raise CdfaceError(f"loss became {values['loss_erb']} at step {self.step}; lower optim.lr or use bf16 "
                              f"instead of fp16")
        values["loss"] = float(loss.detach())
        return values

    def _model_input(self, images: torch.Tensor) -> torch.Tensor:
        x = to_model_input(images.to(self.env.device, non_blocking=True))
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    # -- the loop ----------------------------------------------------------------------------
    def loader(self) -> torch.utils.data.DataLoader:
        return training_loader(self.dataset, self.sampler, self.cfg.data.workers,
                               pin_memory=self.env.device.type == "cuda", seed=self.cfg.run.seed)

    def fit(self, evaluate: Optional[Callable[[nn.Module], dict]] = None) -> TrainResult:
        cfg, env = self.cfg, self.env
        self.resume_or_init()
        total = self.steps_per_epoch * self.cfg.epochs
        if cfg.run.max_steps:
            total = min(total, cfg.run.max_steps)
        metrics_logging = MetricsLogging(cfg.run, env.is_main, total, self.step,
                                         description=f"{cfg.run.stage} {cfg.model.backbone}")
        evaluation = Evaluation(evaluate, self.model, env.is_main, cfg.run.eval_every_epochs, metrics_logging.metrics)
        checkpointing = Checkpointing(self, total)
        loader = self.loader()
        try:
            while self.step < total and self.epoch < cfg.epochs:
                self.sampler.set_epoch(self.epoch, start_batch=self.batch_in_epoch)
                self.model.train()
                batches = Lookahead(loader)
                for images, labels, indices in batches:
                    next_labels = self._labels_to_mine_ahead(batches, checkpointing)
                    values = self.train_step(images, labels, indices, next_labels)
                    self.batch_in_epoch += 1
                    if self.batch_in_epoch == self.steps_per_epoch:
                        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                    epoch_done = self.batch_in_epoch == 0
                    metrics_logging.on_step_end(self.step, values, images.shape[0] * env.world_size,
                                                lr=float(self.scheduler.get_last_lr()[0]), epoch=self.epoch)
                    checkpointing.on_step_end(self.step, epoch_done)
                    if epoch_done:
                        evaluation.on_epoch_end(self.epoch, self.step)
                    if self.step >= total:
                        break
            checkpoint = checkpointing.save_last()
            checkpointing.on_train_end(evaluation.on_train_end(self.step))
        finally:
            metrics_logging.close()
            self.mined_images.close()
        return TrainResult(output=self.output, steps=self.step, checkpoint=checkpoint, bank=self.bank.scores.clone(),
                           evaluation=evaluation.report)

    def _labels_to_mine_ahead(self, batches: Lookahead, checkpointing: Checkpointing) -> Optional[torch.Tensor]:
        """The next batch's labels if its step mines and may mine during this one: not across a
        checkpoint, whose save synchronises the bank that the next step must mine from."""
        following, ends_epoch = self.step + 1, self.batch_in_epoch + 1 == self.steps_per_epoch
        if not self.mines_at(following) or checkpointing.due(following, ends_epoch):
            return None
        upcoming = batches.peek()
        return None if upcoming is None else upcoming[1]


def train(cfg: TrainConfig, evaluate: Optional[Callable[[nn.Module], dict]] = None) -> TrainResult:
    """Run one stage of training as configured; under torchrun every rank calls this."""
    env = distributed.setup(cfg.run.device)
    try:
        return Trainer(cfg, env).fit(evaluate)
    finally:
        distributed.teardown()
