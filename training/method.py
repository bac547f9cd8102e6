"""The refined representation branch (RRB) loss of a step, from its mined samples.

The soft miner picks K identities of the batch with NE easy and NH hard samples each; their
embeddings come out of the backbone identity by identity, easy first (``MinedBatch.sample_indices``),
from a forward pass of their own (``method.separate_pass``, the authors' way: their own BatchNorm
statistics) or from the batch's. The step's loss is then

    L = L_erb + lambda1 * L_closeness(easy) + lambda2 * L_diversity(hard, hard negative prototypes)

The hard negative prototypes come from the ERB's top-NP search, one row per mined identity (a batch
sample of it), and are formed in one of two ways (``method.prototypes``):
  * ``shared`` (the authors' code): the union of every mined identity's top-NP classes, with every
    mined identity removed, is one set that each hard sample of the step is pushed away from;
  * ``per_sample``: each hard sample against its own identity's top-NP (own class excluded).
The diversity loss's scale follows the head's s unless set (``method.diversity_scale``).
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch
import torch.nn as nn

from cdface.training.config import TrainConfig
from cdface.training.losses import closeness_loss, diversity_loss
from cdface.training.mining import MinedBatch

log = logging.getLogger("cdface.train")


class _CentreSource(Protocol):
    def centres(self, indices: torch.Tensor) -> torch.Tensor: ...


def hard_negative_prototypes(head: _CentreSource, hard_negatives: torch.Tensor, identities: torch.Tensor,
                             mode: str) -> torch.Tensor:
    """The prototypes the diversity loss pushes the hard samples from, detached.

    hard_negatives: [K, NP] class indices (the head's top-NP of a batch sample of each mined identity,
    its own class excluded); identities: [K] the mined classes. ``per_sample``: [K, NP, D] centres;
    ``shared``: [P, D] the centres of the union minus every mined identity, in ascending class order
    (P may be 0). With a sharded head this is a collective (the centres come from their owners):
    every rank calls it on the same steps.
    """
    if mode == "per_sample":
        return head.centres(hard_negatives)
    if mode != "shared":
        raise ValueError(f"unknown prototype mode {mode!r}")
    union = torch.unique(hard_negatives)
    union = union[~torch.isin(union, identities.to(union.device))]
    return head.centres(union)


class RefinedBranchLoss:
    def __init__(self, num_easy: int, num_hard: int, lambda_closeness: float, lambda_diversity: float,
                 diversity_scale: float, prototypes: str = "shared"):
        self.num_easy, self.num_hard = num_easy, num_hard
        self.lambda_closeness, self.lambda_diversity = lambda_closeness, lambda_diversity
        self.diversity_scale = diversity_scale
        self.prototypes = prototypes

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "RefinedBranchLoss":
        method = cfg.method
        scale = cfg.diversity_scale
        if scale != cfg.head.scale:
            # Allowed (an ablation may want it), but it reweighs diversity just as lambda2 does: say so.
            log.warning("method.diversity_scale %g differs from head.scale %g: the diversity loss's weight is not "
                        "the method's", scale, cfg.head.scale)
        return cls(method.num_easy, method.num_hard, method.lambda_closeness, method.lambda_diversity, scale,
                   method.prototypes)

    def terms(self, mined: MinedBatch, embeddings: torch.Tensor,
              prototypes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_closeness, L_diversity), unweighted.

        embeddings: [K * (NE + NH), D] of the mined samples; prototypes: from ``hard_negative_prototypes``
        (the centres are the ERB's to move, so they come detached; the RRB only moves the embeddings).
        """
        ne, nh = self.num_easy, self.num_hard
        k = mined.identities.numel()
        per_identity = embeddings.float().view(k, ne + nh, -1)
        easy = per_identity[:, :ne]
        hard = per_identity[:, ne:].reshape(k * nh, -1)
        loss_close = closeness_loss(easy)
        if prototypes.dim() == 3:  # per sample: each identity's set, once per hard sample of it
            loss_div = diversity_loss(hard, prototypes.repeat_interleave(nh, dim=0), scale=self.diversity_scale)
        elif prototypes.shape[0] == 0:
            # Every top-NP class was itself mined (only with very few identities): nothing to push from.
            loss_div = hard.sum() * 0.0
        else:
            loss_div = diversity_loss(hard, prototypes, scale=self.diversity_scale)
        return loss_close, loss_div

    def __call__(self, loss_erb: torch.Tensor, mined: MinedBatch, embeddings: torch.Tensor,
                 prototypes: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """L (above) and the values to log."""
        loss_close, loss_div = self.terms(mined, embeddings, prototypes)
        loss = loss_erb + self.lambda_closeness * loss_close + self.lambda_diversity * loss_div
        num_prototypes = prototypes.shape[0] if prototypes.dim() == 2 else prototypes.shape[1]
        return loss, {"loss_closeness": float(loss_close.detach()), "loss_diversity": float(loss_div.detach()),
                      "mining_threshold": mined.threshold, "prototypes": float(num_prototypes)}


def gradient_probe(module: nn.Module, terms: dict[str, torch.Tensor]) -> dict[str, float]:
    """The gradient of each (unweighted) loss term over ``module``'s parameters: norms and pairwise cosines.

    Which term dominates a refined-branch step is lambda_i * norm_i; the cosines say whether the terms
    pull together. One backward pass per term, the graph kept for the step's own backward.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    flat = {}
    for name, term in terms.items():
        grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        flat[name] = torch.cat([(g if g is not None else torch.zeros_like(p)).detach().float().reshape(-1)
                                for g, p in zip(grads, params)])
    out = {f"grad_norm_{name}": float(v.norm()) for name, v in flat.items()}
    names = list(flat)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            denominator = float(flat[a].norm() * flat[b].norm())
            out[f"grad_cos_{a}_{b}"] = float(flat[a] @ flat[b]) / denominator if denominator > 0 else 0.0
    return out
