"""The difficulty score bank and the soft mining scheme of the refined branch (RRB).

ScoreBank: an exponential moving average of each training sample's target cosine cos(theta_y),
updated by the ERB on every step. A low score marks a hard sample.

SoftMiner: every ``interval`` steps picks K identities from the current batch and, for each,
NE easy samples (score at or above the bank's 20th-percentile score, the threshold) and NH hard
samples (score in (lower bound, threshold); the authors' code bounds it below by 0, ``None``
leaves it open) from all of that identity's training samples. When an identity has too few on
one side, that side's window widens by ``widen_step`` (the hard window at both ends, as the
authors' code widens it) until it has enough; samples repeat only when the identity has fewer
samples than NE + NH. Choices among eligible samples are random (soft), from
a generator seeded by (seed, step, rank), so a run is reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist


class ScoreBank:
    """Per-sample EMA of cos(theta_y): score <- alpha * score + (1 - alpha) * cos."""

    def __init__(self, num_samples: int, alpha: float = 0.9):
        self.alpha = alpha
        self.scores = torch.zeros(num_samples, dtype=torch.float32)
        self.updates = torch.zeros(num_samples, dtype=torch.int64)
        # Value at the last synchronisation: ranks exchange only what changed since then.
        self._synced = self.scores.clone()
        self._synced_updates = self.updates.clone()
        self.version = 0  # counts writes: whoever mined ahead can tell the bank has not moved since

    def __len__(self) -> int:
        return self.scores.numel()

    @torch.no_grad()
    def update(self, indices: torch.Tensor, target_cos: torch.Tensor) -> None:
        indices = indices.cpu()
        cos = target_cos.detach().float().cpu()
        self.scores[indices] = self.alpha * self.scores[indices] + (1.0 - self.alpha) * cos
        self.updates[indices] += 1
        self.version += 1

    def threshold(self, quantile: float) -> float:
        """The ``quantile`` score of the whole bank (kthvalue: exact, and no size limit as torch.quantile has)."""
        k = max(1, min(len(self), int(math.ceil(quantile * len(self)))))
        return float(self.scores.kthvalue(k).values)

    @torch.no_grad()
    def sync(self) -> None:
        """Make every rank's bank equal.

        Ranks see disjoint samples between two synchronisations, so each rank's change since the
        last one is summed onto the common base: a plain average of the banks would divide every
        rank's fresh scores by the world size.
        """
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            delta = self.scores - self._synced
            count = self.updates - self._synced_updates
            backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            delta, count = delta.to(backend_device), count.to(backend_device)
            dist.all_reduce(delta)
            dist.all_reduce(count)
            self.scores = self._synced + delta.cpu()
            self.updates = self._synced_updates + count.cpu()
        self._mark_synced()

    def _mark_synced(self) -> None:
        self._synced = self.scores.clone()
        self._synced_updates = self.updates.clone()
        self.version += 1

    def state_dict(self) -> dict:
        return {"scores": self.scores.clone(), "updates": self.updates.clone(), "alpha": self.alpha}

    def load_state_dict(self, state: dict) -> None:
        if state["scores"].numel() != len(self):
            raise ValueError(f"score bank has {state['scores'].numel()} samples, the dataset has {len(self)}")
        self.scores = state["scores"].clone().float()
        self.updates = state["updates"].clone()
        self.alpha = state.get("alpha", self.alpha)
        self._mark_synced()


@dataclass
class MinedBatch:
    identities: torch.Tensor  # [K] class labels
    easy: torch.Tensor  # [K, NE] dataset sample indices
    hard: torch.Tensor  # [K, NH] dataset sample indices
    batch_positions: torch.Tensor  # [K] a position in the current batch holding each identity
    threshold: float

    @property
    def sample_indices(self) -> torch.Tensor:
        """Easy then hard samples per identity, flattened: [K * (NE + NH)]."""
        return torch.cat([self.easy, self.hard], dim=1).reshape(-1)


def identities_per_rank(total: int, world_size: int, rank: int) -> int:
    """Each rank mines its share of K identities; the first ``K % world`` ranks take one more."""
    return total // world_size + (1 if rank < total % world_size else 0)


class SoftMiner:
    def __init__(
        self,
        labels: np.ndarray,
        num_identities: int,
        num_easy: int = 7,
        num_hard: int = 1,
        quantile: float = 0.2,
        widen_step: float = 0.05,
        seed: int = 0,
        hard_lower_bound: Optional[float] = None,
    ):
        if num_easy < 2:
            raise ValueError("closeness needs at least two easy samples per identity (NE >= 2)")
        if num_hard < 1:
            raise ValueError("the diversity loss needs at least one hard sample per identity (NH >= 1)")
        labels = np.asarray(labels, dtype=np.int64)
        self.num_identities = num_identities
        self.num_easy, self.num_hard = num_easy, num_hard
        self.quantile, self.widen_step, self.seed = quantile, widen_step, seed
        self.hard_lower_bound = hard_lower_bound
        # Samples grouped by identity (CSR layout): members of class c are order[start[c]:start[c+1]].
        self._order = torch.from_numpy(np.argsort(labels, kind="stable"))
        counts = np.bincount(labels, minlength=int(labels.max()) + 1 if labels.size else 0)
        self._start = torch.from_numpy(np.concatenate([[0], np.cumsum(counts)]))

    def _generator(self, step: int, rank: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 1_009 + rank)

    def _members(self, identities: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded [K, M] sample indices of each identity and the validity mask."""
        starts, ends = self._start[identities], self._start[identities + 1]
        sizes = ends - starts
        cols = torch.arange(int(sizes.max()))
        valid = cols[None, :] < sizes[:, None]
        positions = torch.where(valid, starts[:, None] + cols[None, :], torch.zeros((), dtype=torch.long))
        return self._order[positions], valid

    @staticmethod
    def _pick(keys: torch.Tensor, pool: torch.Tensor, count: int) -> torch.Tensor:
        """``count`` columns with the smallest keys inside ``pool``; repeats pool members if it is too small."""
        masked = torch.where(pool, keys, torch.full_like(keys, math.inf))
        order = masked.argsort(dim=1)[:, :count] if masked.shape[1] >= count else masked.argsort(dim=1)
        available = pool.sum(dim=1).clamp_min(1)
        j = torch.arange(count)[None, :]
        # Repetition is the last resort: cycle through the pool's members only when it is short.
        source = torch.where(j < available[:, None], j, j % available[:, None])
        source = source.clamp_max(order.shape[1] - 1)
        return order.gather(1, source)

    @torch.no_grad()
    def mine(self, bank: ScoreBank, batch_labels: torch.Tensor, step: int, rank: int = 0,
             threshold: float | None = None) -> MinedBatch:
        gen = self._generator(step, rank)
        batch_labels = batch_labels.cpu()
        present = torch.unique(batch_labels)
        k = min(self.num_identities, present.numel())
        identities = present[torch.randperm(present.numel(), generator=gen)[:k]].sort().values
        # First position of each chosen identity in the batch: its hard negatives come from there.
        match = batch_labels[None, :] == identities[:, None]
        batch_positions = match.float().argmax(dim=1)

        t = bank.threshold(self.quantile) if threshold is None else threshold
        members, valid = self._members(identities)
        scores = bank.scores[members]
        keys = torch.rand(members.shape, generator=gen)

        # Hard side: the window (lower, t), widened to (lower - n w, t + n w) with the smallest n that
        # holds NH samples. A sample enters at the widening that first covers it (0 inside the window).
        nh, ne, step_w = self.num_hard, self.num_easy, self.widen_step
        enters = torch.where(scores < t, torch.zeros_like(scores), torch.floor((scores - t) / step_w) + 1)
        if self.hard_lower_bound is not None:
            low = self.hard_lower_bound
            enters = torch.maximum(enters, torch.where(scores > low, torch.zeros_like(scores),
                                                       torch.floor((low - scores) / step_w) + 1))
        enters = torch.where(valid, enters, torch.full_like(enters, math.inf))
        widen_h = enters.sort(dim=1).values[:, min(nh, enters.shape[1]) - 1]
        hard_pool = valid & (enters <= widen_h[:, None])
        hard_cols = self._pick(keys, hard_pool, nh)

        # Easy side, among the rest: widen [t - w, ..] until it holds NE samples.
        taken = torch.zeros_like(valid).scatter_(1, hard_cols, True)
        rest = valid & ~taken
        rest = torch.where(rest.any(dim=1, keepdim=True), rest, valid)  # identity of <= NH samples: reuse
        descending = torch.where(rest, scores, torch.full_like(scores, -math.inf)).sort(dim=1, descending=True).values
        nth_high = descending[:, min(ne, descending.shape[1]) - 1]
        widen_e = torch.where(nth_high >= t, torch.zeros_like(nth_high), torch.ceil((t - nth_high) / step_w - 1e-6))
        easy_pool = rest & (scores >= t - widen_e[:, None] * step_w)
        easy_cols = self._pick(keys, easy_pool, ne)

        return MinedBatch(
            identities=identities,
            easy=members.gather(1, easy_cols),
            hard=members.gather(1, hard_cols),
            batch_positions=batch_positions,
            threshold=t,
        )
