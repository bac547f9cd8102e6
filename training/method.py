"""The refined representation branch (RRB) loss of a step, from its mined samples.

The soft miner picks K identities of the batch with NE easy and NH hard samples each; their
embeddings come out of the same backbone forward as the batch, identity by identity, easy first
(``MinedBatch.sample_indices``). The step's loss is then

    L = L_erb + lambda1 * L_closeness(easy) + lambda2 * L_diversity(hard, hard negative prototypes)
"""

from __future__ import annotations

import torch

from cdface.training.config import MethodConfig
from cdface.training.losses import closeness_loss, diversity_loss
from cdface.training.mining import MinedBatch


class RefinedBranchLoss:
    def __init__(self, num_easy: int, num_hard: int, lambda_closeness: float, lambda_diversity: float,
                 diversity_scale: float):
        self.num_easy, self.num_hard = num_easy, num_hard
        self.lambda_closeness, self.lambda_diversity = lambda_closeness, lambda_diversity
        self.diversity_scale = diversity_scale

    @classmethod
    def from_config(cls, method: MethodConfig) -> "RefinedBranchLoss":
        return cls(method.num_easy, method.num_hard, method.lambda_closeness, method.lambda_diversity,
                   method.diversity_scale)

    def __call__(self, loss_erb: torch.Tensor, mined: MinedBatch, embeddings: torch.Tensor,
                 prototypes: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """L (above) and the values to log.

        embeddings: [K * (NE + NH), D] of the mined samples; prototypes: [K, NP, D] the class centres
        of each identity's hard negatives: the ERB's top-NP for one of its batch samples (the centres
        are the ERB's to move, so they come detached; the RRB only moves the embeddings).
        """
        ne, nh = self.num_easy, self.num_hard
        k = mined.identities.numel()
        per_identity = embeddings.float().view(k, ne + nh, -1)
        easy = per_identity[:, :ne]
        hard = per_identity[:, ne:].reshape(k * nh, -1)
        loss_close = closeness_loss(easy)
        loss_div = diversity_loss(hard, prototypes.repeat_interleave(nh, dim=0), scale=self.diversity_scale)
        loss = loss_erb + self.lambda_closeness * loss_close + self.lambda_diversity * loss_div
        return loss, {"loss_closeness": float(loss_close.detach()), "loss_diversity": float(loss_div.detach()),
                      "mining_threshold": mined.threshold}
