"""Training batches: the DataLoader over the epoch batch sampler, and a one-batch lookahead.

The lookahead shows the next batch a step early, so the refined branch can mine it while the
current step computes (see ``training.mined_images``).
"""

from __future__ import annotations

from typing import Generic, Iterable, Iterator, Optional, TypeVar

import torch
from torch.utils.data import DataLoader

from cdface.training.data.dataset import EpochBatchSampler, FaceDataset

T = TypeVar("T")


def collate(batch: list[tuple[torch.Tensor, int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images, labels, indices = zip(*batch)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long), torch.tensor(indices, dtype=torch.long)


def training_loader(dataset: FaceDataset, sampler: EpochBatchSampler, workers: int, pin_memory: bool,
                    seed: int) -> DataLoader:
    return DataLoader(
        dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate, pin_memory=pin_memory,
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
        # Its own generator: creating an epoch's iterator must not consume the global RNG,
        # or a resumed run would draw different dropout masks than an uninterrupted one.
        generator=torch.Generator().manual_seed(seed),
    )


class Lookahead(Generic[T]):
    """Iterates ``items``; ``peek()`` fetches the next one early (None at the end) without consuming it."""

    def __init__(self, items: Iterable[T]):
        self._items: Iterator[T] = iter(items)
        self._next: list[T] = []  # the peeked item, if any
        self._exhausted = False

    def __iter__(self) -> "Lookahead[T]":
        return self

    def __next__(self) -> T:
        if self._next:
            return self._next.pop()
        if self._exhausted:
            raise StopIteration
        return next(self._items)

    def peek(self) -> Optional[T]:
        if not self._next and not self._exhausted:
            try:
                self._next.append(next(self._items))
            except StopIteration:
                self._exhausted = True
        return self._next[0] if self._next else None
