"""Margin softmax heads (the ERB of the method): the margins, and the head that holds every class centre.

A head is the class centres W [C, D] and a margin on the target logit (ArcFace or CosFace). Besides
the loss, each forward returns what the method needs from the ERB, read off the cosine matrix it
computes anyway:
  * ``target_cos``: cos(theta_y) per sample, which feeds the difficulty score bank;
  * ``hard_negatives``: for the rows asked for (the refined branch's mined samples, on the steps
    that mine), the indices of the ``num_hard_negatives`` class centres with the highest cosine,
    the sample's own class excluded (the hard negative prototypes).

``MarginHead`` here holds every centre on every rank (DDP averages its gradient);
``partial_fc.ShardedMarginHead`` splits them across ranks with the same interface and results.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

# Centres are drawn row block by row block, so that a rank holding rows [start, end) of a sharded
# head draws exactly the values a replicated head holds there (the stream is consumed in order).
_INIT_STD = 0.01
_INIT_BLOCK_ROWS = 4096


@dataclass
class HeadOutput:
    loss: torch.Tensor
    target_cos: torch.Tensor  # [B], detached
    hard_negatives: Optional[torch.Tensor]  # [R, NP] int64 class indices of the rows asked for, own class excluded


class Margin(Protocol):
    def __call__(self, target_cos: torch.Tensor) -> torch.Tensor: ...


class ArcFaceMargin:
    """cos(theta + m) while theta + m < pi; past that, the usual linear fallback cos(theta) - m sin(m)."""

    def __init__(self, margin: float = 0.5):
        self.margin = margin
        self._cos_m, self._sin_m = math.cos(margin), math.sin(margin)
        self._threshold = math.cos(math.pi - margin)  # theta + m < pi  <=>  cos(theta) > cos(pi - m)
        self._fallback = math.sin(math.pi - margin) * margin

    def __call__(self, target_cos: torch.Tensor) -> torch.Tensor:
        sin = torch.sqrt((1.0 - target_cos * target_cos).clamp_min(0.0))
        with_margin = target_cos * self._cos_m - sin * self._sin_m
        return torch.where(target_cos > self._threshold, with_margin, target_cos - self._fallback)


class CosFaceMargin:
    """cos(theta) - m."""

    def __init__(self, margin: float = 0.4):
        self.margin = margin

    def __call__(self, target_cos: torch.Tensor) -> torch.Tensor:
        return target_cos - self.margin


MARGINS: dict[str, Callable[[float], Margin]] = {"arcface": ArcFaceMargin, "cosface": CosFaceMargin}


def init_class_centres(num_classes: int, embedding_size: int, start: int = 0,
                       end: Optional[int] = None) -> torch.Tensor:
    """Rows [start, end) of the class centres N(0, 0.01^2), drawn from the global RNG in row blocks.

    Every rank draws (and drops) the rows before its own, so its shard is bitwise the rows a
    replicated head would hold, at the memory of one block.
    """
    end = num_classes if end is None else end
    rows = []
    for block in range(0, end, _INIT_BLOCK_ROWS):
        values = torch.empty(min(_INIT_BLOCK_ROWS, num_classes - block), embedding_size).normal_(std=_INIT_STD)
        lo, hi = max(start - block, 0), min(end - block, values.shape[0])
        if lo < hi:
            rows.append(values[lo:hi])
    return torch.cat(rows) if rows else torch.empty(0, embedding_size)


def top_negatives(cos: torch.Tensor, own: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest cosines per row and their column indices, the column ``own`` excluded.

    Ordered by cosine, ties broken by the lower index: a total order, so top-k over a whole row and
    a merge of top-k's over column blocks agree exactly, ties included. ``own`` may be -1 (no column).
    """
    masked = cos.detach().clone()
    rows = torch.arange(cos.shape[0], device=cos.device)
    present = own >= 0
    masked[rows[present], own[present]] = -math.inf
    values, indices = masked.topk(k, dim=1)
    # topk picks arbitrarily among values equal to the k-th; redo those (rare) rows by the order above.
    kth = values[:, -1:]
    for row in torch.nonzero((masked >= kth).sum(dim=1) > k).flatten().tolist():
        candidates = torch.nonzero(masked[row] >= kth[row]).flatten()  # ascending index
        order = torch.sort(masked[row, candidates], descending=True, stable=True).indices[:k]
        indices[row], values[row] = candidates[order], masked[row, candidates[order]]
    return order_by_value_then_index(values, indices)


def order_by_value_then_index(values: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by value (descending), equal values by index (ascending)."""
    by_index = indices.argsort(dim=1)
    values, indices = values.gather(1, by_index), indices.gather(1, by_index)
    by_value = torch.sort(values, dim=1, descending=True, stable=True).indices
    return values.gather(1, by_value), indices.gather(1, by_value)


class MarginHead(nn.Module):
    """Every class centre on every rank: normalised centres, margin on the target logit, softmax loss."""

    def __init__(self, embedding_size: int, num_classes: int, margin: Margin, scale: float = 64.0,
                 num_hard_negatives: int = 500):
        super().__init__()
        self.weight = nn.Parameter(init_class_centres(num_classes, embedding_size))
        self.margin, self.scale = margin, scale
        self.num_classes = num_classes
        self.num_hard_negatives = min(num_hard_negatives, num_classes - 1)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor,
                negatives_for: Optional[torch.Tensor] = None) -> HeadOutput:
        """``negatives_for``: the batch rows whose hard negatives the refined branch needs (None: no search)."""
        # The cosine matrix is computed in float32 even under autocast: the margin arithmetic
        # near cos = +-1 and the softmax over tens of thousands of classes need the range.
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            cos = F.normalize(embeddings.float(), dim=1) @ F.normalize(self.weight.float(), dim=1).t()
            cos = cos.clamp(-1.0, 1.0)
            rows = torch.arange(cos.shape[0], device=cos.device)
            target_cos = cos[rows, labels]
            logits = cos.scatter(1, labels[:, None], self.margin(target_cos)[:, None]) * self.scale
            loss = F.cross_entropy(logits, labels)
            hard_negatives = None
            if negatives_for is not None:
                with torch.no_grad():
                    hard_negatives = top_negatives(cos[negatives_for], labels[negatives_for],
                                                   self.num_hard_negatives)[1]
        return HeadOutput(loss=loss, target_cos=target_cos.detach(), hard_negatives=hard_negatives)

    def centres(self, indices: torch.Tensor) -> torch.Tensor:
        """The (unnormalised, detached) centres of class ``indices``, any shape -> [..., D]."""
        return self.weight.detach()[indices]

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self.state_dict()

    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(state)

