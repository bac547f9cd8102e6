"""The refined branch's mined samples of a step with their images, mined and decoded ahead of it.

Step t mines from the score bank as it stands after step t-1 has written its scores (and, when
due, synchronised the ranks), with the generator of (seed, t, rank). That bank is final once step
t-1's forward has run: the trainer writes the scores right then (batch t's labels it has taken
from the loader a step early) and starts mining step t on a background thread, decoding the mined
images there too, while step t-1's backward and optimiser step and the loop's logging run. So
step t finds its images decoded instead of mining and decoding them itself.

What step t gets is exactly what mining at its own start would give, provided nothing writes the
bank in between; the trainer never mines ahead across a checkpoint, whose save synchronises the
bank. The bank's version, recorded at the start, is checked when step t takes the result: a write
in between is refused, not silently mined around.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import torch

from cdface.training.data.dataset import FaceDataset
from cdface.training.mining import MinedBatch, ScoreBank, SoftMiner


@dataclass
class _Ahead:
    step: int
    labels: torch.Tensor
    bank: ScoreBank
    bank_version: int
    result: Future


class MinedImageLoader:
    def __init__(self, miner: SoftMiner, dataset: FaceDataset, rank: int):
        self.miner, self.dataset, self.rank = miner, dataset, rank
        self._executor: Optional[ThreadPoolExecutor] = None
        self._ahead: Optional[_Ahead] = None

    def load(self, bank: ScoreBank, labels: torch.Tensor, step: int) -> tuple[MinedBatch, torch.Tensor]:
        """Mine step ``step``'s samples of the batch with ``labels`` and decode their images, here and now."""
        mined = self.miner.mine(bank, labels, step=step, rank=self.rank)
        return mined, self.dataset.load_images(mined.sample_indices.tolist())

    def start(self, bank: ScoreBank, labels: torch.Tensor, step: int) -> None:
        """Begin ``load`` on the background thread; ``take`` at step ``step`` collects it."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cdface-mining")
        self._ahead = _Ahead(step, labels.clone(), bank, bank.version,
                             self._executor.submit(self.load, bank, labels, step))

    def take(self, bank: ScoreBank, labels: torch.Tensor, step: int) -> tuple[MinedBatch, torch.Tensor]:
        """Step ``step``'s mined samples and images: those started ahead for it, else loaded now."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return self.load(bank, labels, step)
        result = ahead.result.result()  # re-raises a decoding error here, at the step that needs the images
        fits = (ahead.step == step and ahead.bank is bank and ahead.bank_version == bank.version
                and torch.equal(ahead.labels, labels))
        if not fits:
            raise RuntimeError(f"samples mined ahead for step {ahead.step} do not fit step {step}: another batch, "
                               f"or the score bank changed since")
        return result

    def close(self) -> None:
        """Wait for a load still running (it reads the bank and the dataset) and stop the thread."""
        self._ahead = None
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
