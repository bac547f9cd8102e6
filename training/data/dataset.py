"""Face datasets for training (RecordIO or identity folders) and the epoch batch sampler.

Samples come out as uint8 [112, 112, 3] RGB tensors; the trainer turns batches into model input
with ``training.preprocess.to_model_input`` so there is one definition of normalisation.

The sampler yields ``(index, flip)`` pairs rather than bare indices: the flip decision is part of
the deterministic epoch plan, so a resumed run and any DataLoader worker see the same images.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from cdface.core.contract import INPUT_SIZE
from cdface.core.errors import CdfaceError
from cdface.training.data.folder import ImageFolder, decode_image, scan_image_folder
from cdface.training.data.recordio import RecordIOReader, read_layout


class FaceDataset(Dataset):
    """Labelled face images. Subclasses provide ``labels`` and ``_read_bytes``/``_describe``."""

    labels: np.ndarray  # int64 [N], computed at open without decoding images

    def __init__(self, labels: np.ndarray, source: str):
        if len(labels) == 0:
            raise CdfaceError(f"dataset {source} holds no images.")
        if labels.min() < 0:
            raise CdfaceError(f"dataset {source} has a negative label ({int(labels.min())}).")
        self.labels = labels.astype(np.int64, copy=False)
        self.num_classes = int(self.labels.max()) + 1
        self.source = source
        self._identity_index: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def _read_bytes(self, index: int) -> bytes:
        raise NotImplementedError

    def _describe(self, index: int) -> str:
        raise NotImplementedError

    def read_image(self, index: int, flip: bool = False) -> np.ndarray:
        """uint8 [112, 112, 3] RGB; ``flip`` mirrors it left-right."""
        if not 0 <= index < len(self.labels):
            raise IndexError(f"sample {index} is out of range for {len(self.labels)} samples")
        image = decode_image(self._read_bytes(index), self._describe(index))
        if flip:
            return np.ascontiguousarray(image[:, ::-1])
        # The core decoder (Pillow) hands out read-only buffers; torch wants to own a writable one.
        return image if image.flags.writeable else image.copy()

    def __getitem__(self, item: tuple[int, bool] | int) -> tuple[torch.Tensor, int, int]:
        index, flip = (item, False) if isinstance(item, (int, np.integer)) else item
        index = int(index)
        return torch.from_numpy(self.read_image(index, bool(flip))), int(self.labels[index]), index

    def load_images(
        self, indices: Sequence[int] | np.ndarray | torch.Tensor, flips: Sequence[bool] | None = None, workers: int = 4
    ) -> torch.Tensor:
        """uint8 [N, 112, 112, 3] for the given samples, decoded on a thread pool.

        Used for the refined branch's mined samples; ``decode_image`` releases the GIL while decoding.
        """
        indices = [int(i) for i in _as_list(indices)]
        flips = [False] * len(indices) if flips is None else [bool(f) for f in _as_list(flips)]
        if len(flips) != len(indices):
            raise ValueError(f"got {len(flips)} flips for {len(indices)} indices")
        batch = np.empty((len(indices), INPUT_SIZE, INPUT_SIZE, 3), dtype=np.uint8)

        def load(position: int) -> None:
            batch[position] = self.read_image(indices[position], flips[position])

        if workers <= 1 or len(indices) <= 1:
            for position in range(len(indices)):
                load(position)
        else:
            with ThreadPoolExecutor(max_workers=min(workers, len(indices))) as pool:
                # list() re-raises the first worker error here.
                list(pool.map(load, range(len(indices))))
        return torch.from_numpy(batch)

    def identity_index(self) -> list[np.ndarray]:
        """Sample indices of each class (int64 arrays, ascending), computed once."""
        if self._identity_index is None:
            order = np.argsort(self.labels, kind="stable")
            counts = np.bincount(self.labels, minlength=self.num_classes)
            self._identity_index = np.split(order, np.cumsum(counts)[:-1])
        return self._identity_index

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_classes)


def _as_list(values) -> list:
    return values.tolist() if hasattr(values, "tolist") else list(values)


class RecordIODataset(FaceDataset):
    """InsightFace ``train.rec`` + ``train.idx`` (with or without the key-0 header record)."""

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None):
        self.reader = RecordIOReader(rec_path, idx_path)
        layout = read_layout(self.reader)
        self.keys = layout.image_keys
        raw_labels = self.reader.read_labels(self.keys)
        labels = np.round(raw_labels).astype(np.int64)
        not_integer = np.flatnonzero(np.abs(raw_labels - labels) > 1e-3)
        if len(not_integer):
            i = int(not_integer[0])
            raise CdfaceError(
                f"record {int(self.keys[i])} of {self.reader.rec_path} has label {float(raw_labels[i])}, "
                "not a class number."
            )
        super().__init__(labels, str(self.reader.rec_path))

    def _read_bytes(self, index: int) -> bytes:
        return self.reader.read(int(self.keys[index]))[1]

    def _describe(self, index: int) -> str:
        return f"record {int(self.keys[index])} of {self.reader.rec_path}"


class FolderDataset(FaceDataset):
    """``root/<identity>/<image>``; identities sorted by name are labels 0..C-1."""

    def __init__(self, root: str | os.PathLike):
        self.folder: ImageFolder = scan_image_folder(root)
        super().__init__(self.folder.labels, str(self.folder.root))
        self.class_names = self.folder.identities

    def _read_bytes(self, index: int) -> bytes:
        return self.folder.read_bytes(index)

    def _describe(self, index: int) -> str:
        return str(self.folder.paths[index])


def open_dataset(path: str | os.PathLike) -> FaceDataset:
    """RecordIO for ``DIR`` holding ``train.rec``/``train.idx`` or a ``.rec`` path; else an identity folder."""
    path = Path(path)
    if not path.exists():
        raise CdfaceError(f"dataset {path} does not exist.")
    if path.is_file():
        if path.suffix == ".rec":
            return RecordIODataset(path, path.with_suffix(".idx"))
        raise CdfaceError(f"dataset {path} is a file but not a .rec; give a .rec, a RecordIO directory or an "
                          "image folder.")
    if (path / "train.rec").exists() or (path / "train.idx").exists():
        return RecordIODataset(path / "train.rec", path / "train.idx")
    return FolderDataset(path)


class EpochBatchSampler(Sampler[list[tuple[int, bool]]]):
    """Per-rank batches of ``(index, flip)`` for DDP, identical to what one process would draw.

    Epoch ``e`` is a permutation from ``torch.Generator().manual_seed(seed + e)``, followed (same
    generator) by one flip coin per permutation position. Step ``b`` of the epoch is the global
    batch ``perm[b * B * W : (b + 1) * B * W]`` (B = batch_size, W = world_size); rank ``r`` takes
    its entries ``r::W``. So the ranks' batches of one step together are exactly the batch a single
    process with batch size ``B * W`` would draw, whatever the world size.

    ``set_epoch(e, start_batch=k)`` starts the next iteration at step ``k`` of epoch ``e``, which is
    how a run resumes mid-epoch at the exact sample it stopped at. ``len()`` is the number of
    batches in a full epoch for this rank.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        flip: bool = True,
        drop_last: bool = True,
    ):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid batch_size={batch_size}, world_size={world_size}, rank={rank}")
        if num_samples < 1:
            raise CdfaceError("cannot sample batches from an empty dataset.")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.flip = flip
        self.drop_last = drop_last
        self.global_batch_size = batch_size * world_size
        if drop_last and num_samples < self.global_batch_size:
            raise CdfaceError(
                f"the dataset has {num_samples} samples, fewer than one global batch of {self.global_batch_size} "
                f"({batch_size} x {world_size} ranks)."
            )
        self.epoch = 0
        self.start_batch = 0

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.global_batch_size
        return math.ceil(self.num_samples / self.global_batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch {start_batch} is outside 0..{len(self)}")
        self.epoch = epoch
        self.start_batch = start_batch

    def epoch_plan(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(permutation, flip per position) of one epoch; the same on every rank and every run."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        permutation = torch.randperm(self.num_samples, generator=generator)
        flips = torch.rand(self.num_samples, generator=generator) < 0.5
        if not self.flip:
            flips = torch.zeros_like(flips)
        return permutation, flips

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        permutation, flips = self.epoch_plan(self.epoch)
        if not self.drop_last:
            # Pad the last global batch from the epoch's start so every rank gets a batch
            # (DDP ranks must take the same number of steps).
            padding = len(self) * self.global_batch_size - self.num_samples
            padding_positions = torch.arange(padding) % self.num_samples
            permutation = torch.cat([permutation, permutation[padding_positions]])
            flips = torch.cat([flips, flips[padding_positions]])
        indices, flip_flags = permutation.tolist(), flips.tolist()
        for step in range(self.start_batch, len(self)):
            start = step * self.global_batch_size
            positions = range(start + self.rank, start + self.global_batch_size, self.world_size)
            yield [(indices[p], flip_flags[p]) for p in positions]
