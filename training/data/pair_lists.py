"""Verification pairs from aligned identity folders: a balanced pairs list, and a ``.bin`` from one.

``sample_pairs`` draws, with a seed, as many same-identity pairs as different-identity pairs, each
kind uniformly over all distinct unordered pairs of images (no pair twice), and interleaves them
(same, different, same, ...) so every contiguous fold of the 10-fold protocol is balanced, as in
LFW's file. When the folders hold fewer distinct pairs of a kind than asked for, all of them are
taken and the other kind is cut to the same number.

The pairs list is the CSV ``cdface eval pairs`` reads (``training/evaluation/pairs.py``): a
``path1,path2,label`` header, then one row per pair, paths relative to the list's own folder.
``write_pairs_bin`` packs the listed crops (their encoded bytes, unchanged) into an InsightFace
verification ``.bin`` through ``binfile.write_bin``.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cdface.core.atomic import atomic_write_text
from cdface.core.errors import CdfaceError
from cdface.core.imaging import ImageError, decode_image
from cdface.training.data.binfile import write_bin
from cdface.training.data.folder import ImageFolder

# Up to this many pairs of images, the different-identity pairs are listed outright; above it they
# are drawn by rejection (a set of those already taken), fast while few of all pairs are asked for.
_ENUMERATE_LIMIT = 2_000_000
# The 10-fold protocol of ``cdface eval bin`` needs a pair per fold at least.
MIN_BIN_PAIRS = 10


@dataclass(frozen=True)
class PairList:
    first: list[Path]
    second: list[Path]
    issame: np.ndarray  # bool [P]
    requested: int  # pairs asked for; len(issame) is smaller when the folders hold too few

    def __len__(self) -> int:
        return len(self.issame)


def _triangle(local: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index t of the pairs (a < b) ordered by b, then a -> (a, b): t = b (b - 1) / 2 + a."""
    b = np.floor((1 + np.sqrt(1 + 8 * local.astype(np.float64))) / 2).astype(np.int64)
    # Float rounding can put b one off for very large t; correct it exactly in integers.
    b -= (b * (b - 1) // 2 > local).astype(np.int64)
    b += ((b + 1) * b // 2 <= local).astype(np.int64)
    return local - b * (b - 1) // 2, b


def _same_pairs(labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """[min(count, all), 2] sample indices of distinct same-identity pairs, uniform over all of them."""
    order = np.argsort(labels, kind="stable")  # samples grouped by identity
    sizes = np.bincount(labels)
    per_identity = sizes * (sizes - 1) // 2
    total = int(per_identity.sum())
    chosen = rng.choice(total, size=min(count, total), replace=False) if total else np.zeros(0, np.int64)
    ends = np.cumsum(per_identity)
    identity = np.searchsorted(ends, chosen, side="right")
    a, b = _triangle(chosen - (ends[identity] - per_identity[identity]))
    starts = np.cumsum(sizes) - sizes
    return np.stack([order[starts[identity] + a], order[starts[identity] + b]], axis=1).reshape(-1, 2)


def _different_pairs(labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """[min(count, all), 2] sample indices of distinct different-identity pairs, uniform over all of them."""
    n = len(labels)
    sizes = np.bincount(labels)
    total = (n * n - int((sizes * sizes).sum())) // 2
    count = min(count, total)
    if n * (n - 1) // 2 <= _ENUMERATE_LIMIT:
        first, second = np.triu_indices(n, k=1)
        keep = labels[first] != labels[second]
        pairs = np.stack([first[keep], second[keep]], axis=1)
        return pairs[rng.choice(len(pairs), size=count, replace=False)].reshape(-1, 2)
    seen: set[tuple[int, int]] = set()
    out: list[tuple[int, int]] = []
    while len(out) < count:
        for i, j in rng.integers(n, size=(2 * (count - len(out)), 2)).tolist():
            pair = (min(i, j), max(i, j))
            if labels[i] != labels[j] and pair not in seen:
                seen.add(pair)
                out.append(pair)
                if len(out) == count:
                    break
    return np.asarray(out, np.int64)


def sample_pairs(folder: ImageFolder, pairs: int, seed: int = 0) -> PairList:
    """``pairs`` (even) pairs of ``folder``'s images: half same identity, half different, interleaved."""
    if pairs < 2 or pairs % 2:
        raise CdfaceError(f"the number of pairs must be even and at least 2 (half same, half different), got {pairs}.")
    if len(folder.identities) < 2:
        raise CdfaceError(f"{folder.root} has one identity; different-identity pairs need at least two.")
    rng = np.random.default_rng(seed)
    same = _same_pairs(folder.labels, pairs // 2, rng)
    if len(same) == 0:
        raise CdfaceError(f"no identity in {folder.root} has two images; same-identity pairs need them.")
    different = _different_pairs(folder.labels, len(same), rng)
    same = same[: len(different)]
    interleaved = np.empty((2 * len(same), 2), np.int64)
    interleaved[0::2], interleaved[1::2] = same, different
    issame = np.arange(len(interleaved)) % 2 == 0
    return PairList([folder.paths[i] for i in interleaved[:, 0]], [folder.paths[j] for j in interleaved[:, 1]],
                    issame, pairs)


def write_pairs_csv(path: str | os.PathLike, pair_list: PairList) -> Path:
    """The list as ``cdface eval pairs`` reads it, paths relative to ``path``'s folder (atomically)."""
    path = Path(path)
    base = path.parent.resolve()
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path1", "path2", "label"])
    for first, second, same in zip(pair_list.first, pair_list.second, pair_list.issame.tolist()):
        writer.writerow([os.path.relpath(first.resolve(), base), os.path.relpath(second.resolve(), base), int(same)])
    atomic_write_text(path, buffer.getvalue())
    return path


def write_pairs_bin(path: str | os.PathLike, first: list[Path], second: list[Path], issame: np.ndarray) -> Path:
    """A verification ``.bin`` of the listed aligned crops; each must decode to 112x112 (checked first)."""
    from cdface.core.contract import INPUT_SIZE

    if len(issame) < MIN_BIN_PAIRS:
        raise CdfaceError(f"a verification .bin needs at least {MIN_BIN_PAIRS} pairs (one per fold of the 10-fold "
                          f"protocol); got {len(issame)}.")

    encoded: dict[Path, bytes] = {}
    images: list[bytes] = []
    for image_path in (p for pair in zip(first, second) for p in pair):
        if image_path not in encoded:
            try:
                data = image_path.read_bytes()
            except OSError as exc:
                raise CdfaceError(f"cannot read image {image_path}: {exc.strerror or exc}.") from exc
            try:
                crop = decode_image(data, what=f"image {image_path}")
            except ImageError as exc:
                raise CdfaceError(f"{exc}.") from exc
            if crop.shape[:2] != (INPUT_SIZE, INPUT_SIZE):
                raise CdfaceError(f"{image_path} is {crop.shape[1]}x{crop.shape[0]}; a verification .bin holds "
                                  f"aligned {INPUT_SIZE}x{INPUT_SIZE} crops (run cdface data align first).")
            encoded[image_path] = data
        images.append(encoded[image_path])
    write_bin(path, images, [bool(s) for s in issame])
    return Path(path)
