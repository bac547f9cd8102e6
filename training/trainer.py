"""The training loop, top to bottom.

Every step runs the elementary branch (ERB): the backbone embeds the batch, the margin head
gives the classification loss, the batch's target cosines (into the score bank) and each
sample's hard negative class centres. In the joint stage, every ``method.interval`` steps the
refined branch (RRB) also runs: the soft miner picks K identities of the batch with NE easy and
NH hard samples each, those images go through the backbone in the same forward pass as the
batch, and the closeness and diversity losses are added:

    L = L_erb + lambda1 * L_closeness + lambda2 * L_diversity

One forward and one backward per step, whatever the branch: DDP then needs no unused-parameter
search, and the RRB costs only its extra images.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from cdface.core.errors import CdfaceError
from cdface.training import distributed
from cdface.training.backbones import create_backbone
from cdface.training.checkpoint import load_checkpoint, save_checkpoint
from cdface.training.config import TrainConfig
from cdface.training.data.dataset import EpochBatchSampler, FaceDataset, open_dataset
from cdface.training.heads import create_head
from cdface.training.losses import closeness_loss, diversity_loss
from cdface.training.metrics import MetricsLog
from cdface.training.mining import MinedBatch, ScoreBank, SoftMiner, identities_per_rank
from cdface.training.preprocess import to_model_input

log = logging.getLogger("cdface.train")


class FaceModel(nn.Module):
    """Backbone + margin head: the module DDP wraps."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        embeddings = self.backbone(images)
        n = labels.shape[0]  # the first n images are the batch, the rest the mined RRB samples
        out = self.head(embeddings[:n], labels)
        return out.loss, out.target_cos, out.hard_negatives, embeddings[n:]


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


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Batch-norm parameters get no weight decay (it would only fight their scale invariance)."""
    bn_types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm)
    bn_params = {id(p) for m in model.modules() if isinstance(m, bn_types) for p in m.parameters(recurse=False)}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if id(p) in bn_params else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    o, epochs = cfg.optim, cfg.epochs

    def factor(step: int) -> float:
        epoch = step / steps_per_epoch
        if epoch < o.warmup_epochs:
            return (step + 1) / (o.warmup_epochs * steps_per_epoch)
        if o.schedule == "cosine":
            span = max(epochs - o.warmup_epochs, 1e-8)
            return 0.5 * (1.0 + math.cos(math.pi * min((epoch - o.warmup_epochs) / span, 1.0)))
        return o.gamma ** sum(epoch >= m for m in o.milestones)

    return factor


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def collate(batch: list[tuple[torch.Tensor, int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images, labels, indices = zip(*batch)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long), torch.tensor(indices, dtype=torch.long)


def _check_compatible(state: dict, cfg: TrainConfig, dataset: FaceDataset, path: str) -> None:
    if state["backbone"] != backbone_spec(cfg):
        raise CdfaceError(f"checkpoint {path} holds backbone {state['backbone']}, the configuration asks for "
                          f"{backbone_spec(cfg)}")
    classes = state.get("num_classes")
    if classes is not None and classes != dataset.num_classes:
        raise CdfaceError(f"checkpoint {path} was trained on {classes} identities, the dataset has {dataset.num_classes}")
    bank = state.get("bank")
    if bank is not None and bank["scores"].numel() != len(dataset):
        raise CdfaceError(f"checkpoint {path} has a score bank of {bank['scores'].numel()} samples, "
                          f"the dataset has {len(dataset)}")


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
        self.checkpoint_dir = self.output / "checkpoints"

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
        head = create_head(cfg.head.kind, cfg.model.embedding_size, self.dataset.num_classes,
                           scale=cfg.head.scale, margin=cfg.head.margin,
                           num_hard_negatives=cfg.head.num_hard_negatives)
        self.model = FaceModel(backbone, head).to(env.device)
        self.channels_last = run.channels_last if run.channels_last is not None else env.device.type == "cuda"
        if self.channels_last and env.device.type != "cuda":
            raise CdfaceError("run.channels_last is for CUDA: on CPU, torch 2.13 crashes in the backward of a "
                              "strided 1x1 convolution in that layout")
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ddp = (DistributedDataParallel(self.model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
                    if env.distributed else self.model)

        self.optimizer = torch.optim.SGD(parameter_groups(self.model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                         momentum=cfg.optim.momentum)
        self.sampler = EpochBatchSampler(len(self.dataset), self.local_batch, env.world_size, env.rank,
                                         seed=run.seed, flip=cfg.data.flip, drop_last=True)
        self.steps_per_epoch = len(self.sampler)  # the sampler refuses a dataset smaller than one batch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(cfg, self.steps_per_epoch))
        self.scaler = torch.amp.GradScaler("cuda", enabled=run.amp == "fp16")
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(run.amp)
        self.bank = ScoreBank(len(self.dataset), alpha=method.ema_alpha)
        self.miner = SoftMiner(self.dataset.labels, self.local_identities, method.num_easy, method.num_hard,
                               method.quantile, method.widen_step, seed=run.seed)
        self.step = 0  # global optimisation steps taken
        self.epoch = 0
        self.batch_in_epoch = 0
        torch.manual_seed(run.seed + env.rank)  # dropout etc. may differ per rank

    # -- state -------------------------------------------------------------------------------
    def state(self, full: bool = True) -> dict[str, Any]:
        state = {
            "backbone": backbone_spec(self.cfg),
            "config": self.cfg.model_dump(),
            "model": self.model.backbone.state_dict(),
            "head": self.model.head.state_dict(),
            "bank": self.bank.state_dict(),
            "num_classes": self.dataset.num_classes,
            "progress": {"stage": self.cfg.run.stage, "step": self.step, "epoch": self.epoch,
                         "batch_in_epoch": self.batch_in_epoch},
        }
        if full:
            state.update(optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                         scaler=self.scaler.state_dict(), rng=rng_state())
        return state

    def resume_or_init(self) -> None:
        last = self.checkpoint_dir / "last.pt"
        if self.cfg.run.resume and last.is_file():
            state = load_checkpoint(last)
            _check_compatible(state, self.cfg, self.dataset, str(last))
            if state["progress"]["stage"] != self.cfg.run.stage:
                raise CdfaceError(f"{last} belongs to the {state['progress']['stage']} stage; use another "
                                  f"run.output for the {self.cfg.run.stage} stage")
            self._load_weights(state)
            self.optimizer.load_state_dict(state["optimizer"])
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
            _check_compatible(state, self.cfg, self.dataset, self.cfg.run.init_from)
            if "head" not in state or "bank" not in state:
                raise CdfaceError(f"{self.cfg.run.init_from} has no head or score bank: not a training checkpoint")
            self._load_weights(state)
            if self.env.is_main:
                log.info("initialised model, head and score bank from %s", self.cfg.run.init_from)
        elif self.joint and self.env.is_main:
            log.warning("joint stage without run.init_from: difficulty scores start at zero, so mining is "
                        "uninformed until the bank fills; the method expects a pretrain stage first")

    def _load_weights(self, state: dict) -> None:
        self.model.backbone.load_state_dict(state["model"])
        self.model.head.load_state_dict(state["head"])
        self.bank.load_state_dict(state["bank"])

    def save(self) -> Path:
        self.bank.sync()  # every rank holds the same bank; rank 0 writes it
        path = self.checkpoint_dir / "last.pt"
        if self.env.is_main:
            save_checkpoint(path, self.state())
        distributed.barrier()
        return path

    # -- one step ----------------------------------------------------------------------------
    def mine(self, labels: torch.Tensor) -> MinedBatch:
        return self.miner.mine(self.bank, labels, step=self.step, rank=self.env.rank)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> dict[str, float]:
        method, device = self.cfg.method, self.env.device
        mined = self.mine(labels) if self.joint and self.step % method.interval == 0 else None
        if mined is not None:
            images = torch.cat([images, self.dataset.load_images(mined.sample_indices.tolist())])
        x = to_model_input(images.to(device, non_blocking=True))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        labels_dev = labels.to(device, non_blocking=True)

        with torch.autocast(device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            loss_erb, target_cos, hard_negatives, rrb_embeddings = self.ddp(x, labels_dev)
        loss = loss_erb
        values = {"loss_erb": float(loss_erb.detach())}
        if mined is not None:
            k = mined.identities.numel()
            per_identity = rrb_embeddings.float().view(k, method.num_easy + method.num_hard, -1)
            easy = per_identity[:, : method.num_easy]
            hard = per_identity[:, method.num_easy:].reshape(k * method.num_hard, -1)
            # Hard negative prototypes of each identity: the ERB's top-NP for one of its batch
            # samples. The class centres are the ERB's to move; the RRB only moves the embedding.
            negatives = hard_negatives[mined.batch_positions.to(device)]
            prototypes = self.model.head.weight.detach()[negatives].repeat_interleave(method.num_hard, dim=0)
            loss_close = closeness_loss(easy)
            loss_div = diversity_loss(hard, prototypes, scale=method.diversity_scale)
            loss = loss + method.lambda_closeness * loss_close + method.lambda_diversity * loss_div
            values.update(loss_closeness=float(loss_close.detach()), loss_diversity=float(loss_div.detach()),
                          mining_threshold=mined.threshold)

        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.optim.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.bank.update(indices, target_cos)
        self.step += 1
        if self.step % method.bank_sync_every == 0:
            self.bank.sync()
        if not math.isfinite(values["loss_erb"]):
            raise CdfaceError(f"loss became {values['loss_erb']} at step {self.step}; lower optim.lr or use bf16 "
                              f"instead of fp16")
        values["loss"] = float(loss.detach())
        return values

    # -- the loop ----------------------------------------------------------------------------
    def loader(self) -> torch.utils.data.DataLoader:
        workers = self.cfg.data.workers
        return torch.utils.data.DataLoader(
            self.dataset, batch_sampler=self.sampler, num_workers=workers, collate_fn=collate,
            pin_memory=self.env.device.type == "cuda", persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
            # Its own generator: creating an epoch's iterator must not consume the global RNG,
            # or a resumed run would draw different dropout masks than an uninterrupted one.
            generator=torch.Generator().manual_seed(self.cfg.run.seed),
        )

    def fit(self, evaluate: Optional[Callable[[nn.Module], dict]] = None) -> TrainResult:
        cfg, env = self.cfg, self.env
        self.resume_or_init()
        total = self.steps_per_epoch * self.cfg.epochs
        if cfg.run.max_steps:
            total = min(total, cfg.run.max_steps)
        metrics = MetricsLog(self.output, tensorboard=cfg.run.tensorboard) if env.is_main else None
        bar = None
        if env.is_main and cfg.run.progress:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=self.step, unit="step", dynamic_ncols=True,
                       desc=f"{cfg.run.stage} {cfg.model.backbone}")
        evaluation: dict = {}
        loader = self.loader()
        window_start, window_images, window = time.perf_counter(), 0, {}
        try:
            while self.step < total and self.epoch < cfg.epochs:
                self.sampler.set_epoch(self.epoch, start_batch=self.batch_in_epoch)
                self.model.train()
                for images, labels, indices in loader:
                    for key, value in self.train_step(images, labels, indices).items():
                        total_, count_ = window.get(key, (0.0, 0))
                        window[key] = (total_ + value, count_ + 1)
                    self.batch_in_epoch += 1
                    window_images += images.shape[0] * env.world_size
                    if self.batch_in_epoch == self.steps_per_epoch:
                        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                    if self.step % cfg.run.log_every == 0 or self.step == total:
                        # Means over the window: RRB losses exist only on every interval-th step.
                        elapsed = time.perf_counter() - window_start
                        values = {key: total_ / count_ for key, (total_, count_) in window.items()}
                        values.update(lr=self.scheduler.get_last_lr()[0], epoch=self.epoch,
                                      images_per_s=window_images / max(elapsed, 1e-9))
                        window_start, window_images, window = time.perf_counter(), 0, {}
                        if metrics:
                            metrics.log(self.step, values)
                        if bar is not None:
                            bar.set_postfix(loss=f"{values['loss']:.3f}", img_s=f"{values['images_per_s']:.0f}")
                    if bar is not None:
                        bar.update(1)
                    epoch_done = self.batch_in_epoch == 0
                    if self.step % cfg.run.checkpoint_every == 0 or epoch_done or self.step >= total:
                        self.save()
                    if epoch_done and evaluate and self.epoch % cfg.run.eval_every_epochs == 0:
                        evaluation = self._evaluate(evaluate, metrics)
                    if self.step >= total:
                        break
            checkpoint = self.save()
            if evaluate and not evaluation:
                evaluation = self._evaluate(evaluate, metrics)
            if env.is_main:
                final = self.state(full=False)
                final["evaluation"] = evaluation
                save_checkpoint(self.output / "model.pt", final)
            # Every rank leaves together: a rank tearing down its process group while rank 0 (which
            # hosts the rendezvous store) is still writing can abort in gloo's threads.
            distributed.barrier()
        finally:
            if bar is not None:
                bar.close()
            if metrics:
                metrics.close()
        return TrainResult(output=self.output, steps=self.step, checkpoint=checkpoint, bank=self.bank.scores.clone(),
                           evaluation=evaluation)

    def _evaluate(self, evaluate: Callable[[nn.Module], dict], metrics: Optional[MetricsLog]) -> dict:
        if not self.env.is_main:
            return {}
        self.model.eval()
        report = evaluate(self.model.backbone)
        self.model.train()
        if metrics:
            flat = {f"{r['dataset']}/{r['metric']}": r["value"] for r in report.get("results", [])
                    if isinstance(r.get("value"), (int, float))}
            metrics.log(self.step, flat, kind="eval")
        return report


def train(cfg: TrainConfig, evaluate: Optional[Callable[[nn.Module], dict]] = None) -> TrainResult:
    """Run one stage of training as configured; under torchrun every rank calls this."""
    env = distributed.setup(cfg.run.device)
    try:
        return Trainer(cfg, env).fit(evaluate)
    finally:
        distributed.teardown()
