"""The losses of the refined representation branch (RRB): closeness and diversity.

Similarity terms between an embedding x and a prototype w (both unit vectors), as in the
method's supplement; their gradients with respect to x are Eq. 3-5:
  d1 = -||x - w||^2                      dd1/dx = 2 (w - x)
  d2 = x . w                             dd2/dx = w
  d3 = (x . w)^2                         dd3/dx = 2 cos(theta) w
  d3 truncated = max(0, sgn(x . w)) (x . w)^2   zero gradient once cos <= 0
The diversity loss is built on the truncated d3, so the push away from a negative prototype
grows as x approaches it and vanishes once they are orthogonal or beyond.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def truncated_squared_cosine(cos: torch.Tensor) -> torch.Tensor:
    return (cos > 0).to(cos.dtype) * cos * cos


def similarity_terms(x: torch.Tensor, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """The four similarity terms per row of x [N, D] against w [N, D] (no normalisation inside)."""
    cos = (x * w).sum(dim=-1)
    return {
        "d1": -((x - w) ** 2).sum(dim=-1),
        "d2": cos,
        "d3": cos * cos,
        "d3_truncated": truncated_squared_cosine(cos),
    }


def closeness_loss(easy: torch.Tensor) -> torch.Tensor:
    """Mean squared Euclidean distance over all pairs of L2-normalised easy embeddings of an identity.

    easy: [K, NE, D] (K identities, NE easy samples each). ||a - b||^2 = 2 - 2 a.b for unit vectors,
    so one batched Gram matrix gives every pair.
    """
    k, ne, _ = easy.shape
    if ne < 2:
        raise ValueError("closeness needs at least two easy samples per identity")
    z = F.normalize(easy.float(), dim=-1)
    gram = z @ z.transpose(1, 2)  # [K, NE, NE]
    upper = torch.triu(torch.ones(ne, ne, dtype=torch.bool, device=z.device), diagonal=1)
    return (2.0 - 2.0 * gram[:, upper]).mean()


def diversity_loss(hard: torch.Tensor, prototypes: torch.Tensor, scale: float = 64.0) -> torch.Tensor:
    """log(mean_j exp(s * max(0, sgn cos_j) * cos_j^2)), averaged over hard samples.

    hard: [M, D] hard-sample embeddings; prototypes: [M, NP, D] each sample's hard negative class
    centres (own class excluded), or [P, D] one set for every sample (the authors' shared set). Both
    are L2-normalised here.
    """
    x = F.normalize(hard.float(), dim=-1)
    w = F.normalize(prototypes.float(), dim=-1)
    cos = x @ w.t() if w.dim() == 2 else torch.einsum("md,mpd->mp", x, w)
    z = scale * truncated_squared_cosine(cos)
    return (torch.logsumexp(z, dim=1) - math.log(z.shape[1])).mean()
