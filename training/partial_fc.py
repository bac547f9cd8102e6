"""Partial FC: the class centres split across ranks, with the refined branch's hard negatives over all of them.

Rank r of W owns the centres of a contiguous range of identities (``shard_bounds``). One step:

1. The batch's normalised embeddings and labels are all-gathered: every rank sees the global batch.
2. Each rank computes the cosines of the global batch against its own centres (or a sample of
   them: every centre of a class in the batch, plus random negatives up to ``sample_rate``).
3. The softmax cross-entropy is taken across shards: the row max, the sum of exponentials and the
   target logit are reduced over the process group, so the loss is the full head's on the global
   batch. Its gradient reaches the embeddings through the all-gather's backward (an all-reduce of
   the embedding gradients, each rank keeping its own rows).
4. On the steps that mine, each rank searches its whole shard (never only the sampled centres:
   the search is a separate no-grad product of the mined rows, K x C/W) for the top-NP negatives
   of every mined row, own class excluded. The candidates (cosines and indices) are gathered and
   merged into the global top-NP, ordered by cosine and then index, so the result is what one
   search over the full centre matrix gives, ties included.
5. The diversity loss needs the centres of those negatives (each mined row's, or the union of a
   step's with the mined identities removed: ``method.hard_negative_prototypes``): each rank asks
   for the indices it needs and their owners send the requested rows they hold (never the whole head).

The gradient convention follows DDP: DDP averages the backbone's gradients over W ranks, so the
embedding gradient coming back from the all-gather is multiplied by W (each rank then holds what a
replicated head would give it for its local batch). The head's own gradient needs no reduction:
each rank owns its rows. DDP must be told to leave ``head.weight`` alone.

Checkpoints hold the full centre matrix, gathered on rank 0, so a run resumes on any number of
ranks, sharded or not (``full_state_dict`` / ``load_full_state_dict`` re-shard).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from cdface.core.errors import CdfaceError
from cdface.training.heads import HeadOutput, Margin, init_class_centres, order_by_value_then_index, top_negatives


def shard_bounds(num_classes: int, world_size: int) -> list[int]:
    """Row boundaries of the W shards: contiguous ranges, the first ``C % W`` one class larger."""
    if num_classes < world_size:
        raise CdfaceError(f"a sharded head needs at least one identity per rank: {num_classes} identities, "
                          f"{world_size} ranks")
    base, extra = divmod(num_classes, world_size)
    bounds = [0]
    for r in range(world_size):
        bounds.append(bounds[-1] + base + (1 if r < extra else 0))
    return bounds


class ProcessGroup:
    """The collectives the head uses, counting the bytes this rank puts into them (for benchmarks).

    With one process (no process group) every collective is the identity.
    """

    def __init__(self, group: Optional[Any] = None):
        self.group = group
        self.initialized = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if self.initialized else 0
        self.world_size = dist.get_world_size(group) if self.initialized else 1
        self.bytes_sent = 0

    def _count(self, tensor: torch.Tensor) -> None:
        self.bytes_sent += tensor.numel() * tensor.element_size()

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Equal-shaped tensors of every rank, concatenated along dim 0 in rank order."""
        if self.world_size == 1:
            return tensor
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self._count(tensor)
        dist.all_gather(parts, tensor, group=self.group)
        return torch.cat(parts)

    def all_gather_varying(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's tensor, whose first dimension may differ between ranks."""
        if self.world_size == 1:
            return [tensor]
        sizes = self.all_gather(torch.tensor([tensor.shape[0]], device=tensor.device)).tolist()
        padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        gathered = self.all_gather(padded).view(self.world_size, max(sizes), *tensor.shape[1:])
        return [gathered[r, :n] for r, n in enumerate(sizes)]

    def all_reduce(self, tensor: torch.Tensor, op: Any = None) -> torch.Tensor:
        """In place (and returned)."""
        if self.world_size > 1:
            self._count(tensor)
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op, group=self.group)
        return tensor

    def gather_to_main(self, rows: torch.Tensor, bounds: list[int]) -> Optional[torch.Tensor]:
        """Row shards (sized by ``bounds``) concatenated on rank 0; None on the other ranks."""
        if self.world_size == 1:
            return rows
        longest = max(b - a for a, b in zip(bounds, bounds[1:]))
        padded = rows.new_zeros((longest, *rows.shape[1:]))
        padded[: rows.shape[0]] = rows
        parts = [torch.empty_like(padded) for _ in range(self.world_size)] if self.rank == 0 else None
        self._count(padded)
        dist.gather(padded, parts, dst=0, group=self.group)
        if parts is None:
            return None
        return torch.cat([p[: b - a] for p, a, b in zip(parts, bounds, bounds[1:])])


class _AllGatherRows(torch.autograd.Function):
    """All-gather in the forward; in the backward every rank's share of the gradient, summed over
    the shards and multiplied by W for DDP's averaging (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: ProcessGroup) -> torch.Tensor:
        ctx.comm, ctx.rows = comm, x.shape[0]
        return comm.all_gather(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        comm: ProcessGroup = ctx.comm
        grad = comm.all_reduce(grad.contiguous().clone())
        mine = grad[comm.rank * ctx.rows: (comm.rank + 1) * ctx.rows]
        return mine * comm.world_size, None


class _ShardedCrossEntropy(torch.autograd.Function):
    """Mean softmax cross-entropy of logits split by columns across ranks.

    ``target`` holds each row's target column in this rank's block, or -1 where another rank owns it.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, comm: ProcessGroup) -> torch.Tensor:
        row_max = comm.all_reduce(logits.max(dim=1).values, dist.ReduceOp.MAX)
        exp = torch.exp(logits - row_max[:, None])
        total = comm.all_reduce(exp.sum(dim=1))
        owned = torch.nonzero(target >= 0).flatten()
        target_logit = logits.new_zeros(logits.shape[0])
        target_logit[owned] = logits[owned, target[owned]]
        comm.all_reduce(target_logit)
        ctx.save_for_backward(exp / total[:, None], target)
        return (torch.log(total) + row_max - target_logit).mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        probabilities, target = ctx.saved_tensors
        out = probabilities.clone()
        owned = torch.nonzero(target >= 0).flatten()
        out[owned, target[owned]] -= 1.0
        return out * (grad / probabilities.shape[0]), None, None


def _cosines(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Cosines of unit rows ``x`` against the rows of ``weight``, without a normalised copy of ``weight``.

    Scaling the product's columns by 1 / ||w|| instead of normalising W first keeps autograd from
    holding a second C/W x D matrix and its gradient: the head's peak memory is what shrinks here.
    """
    weight = weight.float()
    inverse_norm = 1.0 / weight.norm(dim=1).clamp_min(1e-12)
    return ((x @ weight.t()) * inverse_norm).clamp(-1.0, 1.0)


class ShardedMarginHead(nn.Module):
    """The margin head with its class centres split across the ranks of ``group`` (default: the world)."""

    def __init__(self, embedding_size: int, num_classes: int, margin: Margin, scale: float = 64.0,
                 num_hard_negatives: int = 500, sample_rate: float = 1.0, seed: int = 0, group: Optional[Any] = None):
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise CdfaceError(f"head.sample_rate must be in (0, 1], got {sample_rate}")
        self.comm = ProcessGroup(group)
        self.bounds = shard_bounds(num_classes, self.comm.world_size)
        self.start, self.end = self.bounds[self.comm.rank], self.bounds[self.comm.rank + 1]
        self.weight = nn.Parameter(init_class_centres(num_classes, embedding_size, self.start, self.end))
        self.margin, self.scale, self.sample_rate = margin, scale, sample_rate
        # The negative sample is drawn from (seed, step, rank) alone, so a resumed run draws the same
        # one; the trainer sets ``step`` before each forward.
        self.seed, self.step = seed, 0
        self.num_classes = num_classes
        self.num_hard_negatives = min(num_hard_negatives, num_classes - 1)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor,
                negatives_for: Optional[torch.Tensor] = None) -> HeadOutput:
        """Every rank calls this with its local batch (the same size on each), at every step."""
        comm = self.comm
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            local_rows = embeddings.shape[0]
            x = _AllGatherRows.apply(F.normalize(embeddings.float(), dim=1), comm)
            all_labels = comm.all_gather(labels)
            column = all_labels - self.start
            owned = (column >= 0) & (column < self.end - self.start)
            classes = self._sample(column[owned])
            if classes is not None:  # the columns are the sampled classes, in ascending order
                column = torch.searchsorted(classes, column.clamp(min=0))
            column = torch.where(owned, column, torch.full_like(column, -1))
            weight = self.weight if classes is None else self.weight[classes]
            cos = _cosines(x, weight)
            rows = torch.nonzero(owned).flatten()
            target_cos = cos[rows, column[rows]]
            logits = cos.index_put((rows, column[rows]), self.margin(target_cos)) * self.scale
            loss = _ShardedCrossEntropy.apply(logits, column, comm)

            all_target_cos = cos.new_zeros(cos.shape[0])
            all_target_cos[rows] = target_cos.detach()
            comm.all_reduce(all_target_cos)
            mine = all_target_cos[comm.rank * local_rows: (comm.rank + 1) * local_rows]
            hard_negatives = None
            if negatives_for is not None:
                hard_negatives = self._hard_negatives(x.detach(), all_labels, negatives_for + comm.rank * local_rows)
        return HeadOutput(loss=loss, target_cos=mine, hard_negatives=hard_negatives)

    def _sample(self, positives: torch.Tensor) -> Optional[torch.Tensor]:
        """Sorted shard columns to score this step: every positive, random negatives up to the rate."""
        if self.sample_rate >= 1.0:
            return None
        size = self.end - self.start
        keep = min(size, max(math.ceil(self.sample_rate * size), int(torch.unique(positives).numel())))
        generator = torch.Generator(device=self.weight.device)
        generator.manual_seed((self.seed * 1_000_003 + self.step) * 1_009 + self.comm.rank)
        scores = torch.rand(size, device=self.weight.device, generator=generator)
        scores[positives] = 2.0  # above any draw: positives are always kept
        return torch.sort(scores.topk(keep).indices).values

    def _hard_negatives(self, x: torch.Tensor, all_labels: torch.Tensor, my_rows: torch.Tensor) -> torch.Tensor:
        """Global top-NP negatives of the global-batch rows ``my_rows`` (this rank's mined samples)."""
        comm, k = self.comm, self.num_hard_negatives
        requested = comm.all_gather_varying(my_rows)
        rows = torch.cat(requested)
        with torch.no_grad():
            cos = _cosines(x[rows], self.weight.detach())
            own = all_labels[rows] - self.start
            own = torch.where((own >= 0) & (own < self.end - self.start), own, torch.full_like(own, -1))
            values, indices = top_negatives(cos, own, min(k, cos.shape[1]))
            indices = indices + self.start
            if values.shape[1] < k:  # a shard smaller than NP: pad with entries that sort last
                pad = k - values.shape[1]
                values = torch.cat([values, values.new_full((values.shape[0], pad), -math.inf)], dim=1)
                indices = torch.cat([indices, indices.new_full((indices.shape[0], pad), self.num_classes)], dim=1)
            every_values = comm.all_gather(values[None]).permute(1, 0, 2).reshape(rows.shape[0], -1)
            every_indices = comm.all_gather(indices[None]).permute(1, 0, 2).reshape(rows.shape[0], -1)
            merged = order_by_value_then_index(every_values, every_indices)[1][:, :k]
        first = sum(r.shape[0] for r in requested[: comm.rank])
        return merged[first: first + my_rows.shape[0]]

    def centres(self, indices: torch.Tensor) -> torch.Tensor:
        """The (unnormalised, detached) centres of class ``indices``, fetched from their owners.

        A collective: every rank calls it on the same steps, with its own indices (possibly none).
        Each owner sends only the requested rows it holds; shards are contiguous in rank order, so
        the parts, concatenated, are the requested rows in ascending class order.
        """
        union = torch.unique(torch.cat(self.comm.all_gather_varying(torch.unique(indices))))
        here = union[(union >= self.start) & (union < self.end)]
        rows = torch.cat(self.comm.all_gather_varying(self.weight.detach()[here - self.start]))
        return rows[torch.searchsorted(union, indices.contiguous())]

    def shard(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a full [C, ...] tensor."""
        if full.shape[0] != self.num_classes:
            raise CdfaceError(f"a head of {full.shape[0]} classes does not fit this run's {self.num_classes}")
        return full[self.start: self.end]

    def gather_full(self, rows: torch.Tensor) -> Optional[torch.Tensor]:
        """The full [C, ...] tensor from every rank's rows, on rank 0 (None elsewhere). A collective."""
        return self.comm.gather_to_main(rows.detach(), self.bounds)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The replicated head's state dict (all centres) on rank 0, empty elsewhere. A collective."""
        weight = self.gather_full(self.weight)
        return {} if weight is None else {"weight": weight}

    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.weight.copy_(self.shard(state["weight"]))
