"""The optimiser's parameter groups and the learning-rate schedule (a factor of optim.lr per step)."""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn as nn

from cdface.training.config import TrainConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Batch-norm parameters get no weight decay (it would only fight their scale invariance)."""
    bn_types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm)
    bn_params = {id(p) for m in model.modules() if isinstance(m, bn_types) for p in m.parameters(recurse=False)}
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if id(p) in bn_params else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """The factor of optim.lr at ``step``: min(1, (step + 1) / W) during a warm-up of W steps (W need not
    be whole), times the schedule's factor (step decay at the milestones, or the cosine after warm-up).

    The warm-up ramp is capped at 1: uncapped, a fractional W (0.3 epoch of 18 steps: W = 5.4) made
    the last warm-up step overshoot to 6 / 5.4 = 1.11 x lr.
    """
    o, epochs = cfg.optim, cfg.epochs
    warmup_steps = o.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        epoch = step / steps_per_epoch
        warm = min(1.0, (step + 1) / warmup_steps) if step < warmup_steps else 1.0
        if o.schedule == "cosine":
            span = max(epochs - o.warmup_epochs, 1e-8)
            progress = min(max(epoch - o.warmup_epochs, 0.0) / span, 1.0)
            return warm * 0.5 * (1.0 + math.cos(math.pi * progress))
        return warm * o.gamma ** sum(epoch >= m for m in o.milestones)

    return factor


def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float, sharded: Iterable[nn.Parameter] = ()) -> None:
    """Scale the gradients so that their global norm is at most ``max_norm``, as ``clip_grad_norm_`` does.

    ``sharded`` parameters hold a different slice on each rank (the sharded head): their share of
    the norm is summed over the ranks, so every rank scales by the same factor.
    """
    params = [p for p in parameters if p.grad is not None]
    split = {id(p) for p in sharded}
    if not split:
        nn.utils.clip_grad_norm_(params, max_norm)
        return
    device = params[0].device if params else torch.device("cpu")
    squares = {True: torch.zeros((), device=device), False: torch.zeros((), device=device)}
    for p in params:
        squares[id(p) in split] += p.grad.detach().float().pow(2).sum()  # type: ignore[union-attr]
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(squares[True])
    factor = torch.clamp(max_norm / (torch.sqrt(squares[True] + squares[False]) + 1e-6), max=1.0)
    for p in params:
        p.grad.detach().mul_(factor)  # type: ignore[union-attr]
