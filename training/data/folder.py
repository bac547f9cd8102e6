"""Identity-per-folder image trees (``root/<identity>/<image>.jpg|png``) and training's image reader.

Identities are sorted by folder name and numbered 0..C-1; images inside an identity are sorted by
file name, so a tree always opens to the same sample order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from cdface.core.contract import INPUT_SIZE
from cdface.core.errors import CdfaceError
from cdface.core.imaging import ImageError
from cdface.core.imaging import decode_image as decode_image_bytes

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_JPEG_FRAMES = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # the SOFn markers


def _jpeg_components(data: bytes) -> int | None:
    """The colour components of a JPEG's frame (1 grey, 3 YCbCr/RGB, 4 CMYK); None if not a JPEG."""
    if data[:2] != b"\xff\xd8":
        return None
    at = 2
    while at + 4 <= len(data) and data[at] == 0xFF:
        marker, length = data[at + 1], int.from_bytes(data[at + 2:at + 4], "big")
        if marker in _JPEG_FRAMES:
            return data[at + 9] if at + 9 < len(data) else None
        at += 2 + length  # segments before the frame (APPn, DQT, ...) carry their length
    return None


def decode_image(data: bytes, source: str, size: int = INPUT_SIZE) -> np.ndarray:
    """Encoded image bytes -> uint8 [size, size, 3] RGB (other sizes resized by the core decoder).

    A colour or greyscale JPEG already ``size`` a side (every record of a face dataset) is decoded by
    OpenCV: the pixels of the core (Pillow) decoder, bit for bit (both are libjpeg-turbo; a test holds
    them equal; CMYK is converted differently, so it is left to the core decoder), with the GIL
    released throughout. The refined branch decodes its mined images on threads while a training step
    launches its kernels, and Pillow's Python-side parsing held those launches up (on an H200 the
    refined branch's overhead came down to 1.25, ``benchmarks.train_step``). Anything else, and any
    error, goes through the core decoder.

    ``source`` names the image in the error message (a path, a record key, a .bin index).
    """
    # A file cut short lacks its end marker: the core decoder reports it, where OpenCV may hand back grey.
    if _jpeg_components(data) in (1, 3) and data.endswith(b"\xff\xd9"):
        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)  # EXIF orientation applied
        if pixels is not None and pixels.shape == (size, size, 3):
            return cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)
    try:
        return decode_image_bytes(data, what=f"image {source}", size=size)
    except ImageError as exc:
        raise CdfaceError(f"cannot decode image {source}: {exc}.") from exc


@dataclass(frozen=True)
class ImageFolder:
    """The file list of an identity-per-folder tree; images are read on demand."""

    root: Path
    identities: list[str]  # label -> folder name
    paths: list[Path]  # sample -> file
    labels: np.ndarray  # int64, sample -> label

    def read_bytes(self, index: int) -> bytes:
        path = self.paths[index]
        try:
            return path.read_bytes()
        except OSError as exc:
            raise CdfaceError(f"cannot read image {path}: {exc.strerror or exc}.") from exc

    def read_image(self, index: int) -> np.ndarray:
        return decode_image(self.read_bytes(index), str(self.paths[index]))


def _is_image(entry: os.DirEntry) -> bool:
    return not entry.name.startswith(".") and entry.name.lower().endswith(IMAGE_SUFFIXES) and entry.is_file()


def scan_image_folder(root: str | os.PathLike) -> ImageFolder:
    """List ``root/<identity>/<image>``; errors name the empty root or the empty identity folder."""
    root = Path(root)
    if not root.is_dir():
        raise CdfaceError(f"image folder {root} does not exist or is not a directory.")
    identities = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not identities:
        raise CdfaceError(f"image folder {root} has no identity sub-folders (expected root/<identity>/<image>.jpg).")
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(identities):
        with os.scandir(root / name) as entries:
            files = sorted(e.name for e in entries if _is_image(e))
        if not files:
            raise CdfaceError(f"identity folder {root / name} holds no .jpg/.jpeg/.png images.")
        paths.extend(root / name / f for f in files)
        labels.extend([label] * len(files))
    return ImageFolder(root, identities, paths, np.asarray(labels, dtype=np.int64))
