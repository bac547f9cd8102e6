"""Margin softmax heads (the ERB of the method): ArcFace and CosFace.

Besides the loss, each forward returns what the method needs from the ERB, read off the cosine
matrix it computes anyway (no second pass over the class centres):
  * ``target_cos``: cos(theta_y) per sample, which feeds the difficulty score bank;
  * ``hard_negatives``: per sample, the indices of the ``num_hard_negatives`` class centres with
    the highest cosine, its own class excluded (the hard negative prototypes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class HeadOutput:
    loss: torch.Tensor
    target_cos: torch.Tensor  # [B], detached
    hard_negatives: torch.Tensor  # [B, NP] int64 class indices, own class excluded


class MarginHead(nn.Module):
    """Normalised class centres W [C, D]; subclasses define the margin on the target logit."""

    def __init__(self, embedding_size: int, num_classes: int, scale: float, num_hard_negatives: int = 500):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.normal_(self.weight, std=0.01)
        self.scale = scale
        self.num_hard_negatives = min(num_hard_negatives, num_classes - 1)

    def normalized_weight(self) -> torch.Tensor:
        return F.normalize(self.weight, dim=1)

    def target_logit(self, target_cos: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> HeadOutput:
        # The cosine matrix is computed in float32 even under autocast: the margin arithmetic
        # near cos = +-1 and the softmax over tens of thousands of classes need the range.
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            cos = F.normalize(embeddings.float(), dim=1) @ self.normalized_weight().float().t()
            cos = cos.clamp(-1.0, 1.0)
            rows = torch.arange(cos.shape[0], device=cos.device)
            target_cos = cos[rows, labels]
            logits = cos.scatter(1, labels[:, None], self.target_logit(target_cos)[:, None]) * self.scale
            loss = F.cross_entropy(logits, labels)
            with torch.no_grad():
                masked = cos.detach().clone()
                masked[rows, labels] = -math.inf  # own class never counts as a negative
                hard_negatives = masked.topk(self.num_hard_negatives, dim=1).indices
        return HeadOutput(loss=loss, target_cos=target_cos.detach(), hard_negatives=hard_negatives)


class ArcFace(MarginHead):
    """cos(theta + m) while theta + m < pi; past that, the usual linear fallback cos(theta) - m sin(m)."""

    def __init__(self, embedding_size: int, num_classes: int, scale: float = 64.0, margin: float = 0.5,
                 num_hard_negatives: int = 500):
        super().__init__(embedding_size, num_classes, scale, num_hard_negatives)
        self.margin = margin
        self._cos_m, self._sin_m = math.cos(margin), math.sin(margin)
        self._threshold = math.cos(math.pi - margin)  # theta + m < pi  <=>  cos(theta) > cos(pi - m)
        self._fallback = math.sin(math.pi - margin) * margin

    def target_logit(self, target_cos: torch.Tensor) -> torch.Tensor:
        sin = torch.sqrt((1.0 - target_cos * target_cos).clamp_min(0.0))
        with_margin = target_cos * self._cos_m - sin * self._sin_m
        return torch.where(target_cos > self._threshold, with_margin, target_cos - self._fallback)


class CosFace(MarginHead):
    """cos(theta) - m."""

    def __init__(self, embedding_size: int, num_classes: int, scale: float = 64.0, margin: float = 0.4,
                 num_hard_negatives: int = 500):
        super().__init__(embedding_size, num_classes, scale, num_hard_negatives)
        self.margin = margin

    def target_logit(self, target_cos: torch.Tensor) -> torch.Tensor:
        return target_cos - self.margin


HEADS = {"arcface": ArcFace, "cosface": CosFace}


def create_head(kind: str, embedding_size: int, num_classes: int, **kwargs) -> MarginHead:
    return HEADS[kind](embedding_size, num_classes, **kwargs)
