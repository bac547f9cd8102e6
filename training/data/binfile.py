"""InsightFace verification ``.bin`` files (LFW, CFP-FP, AgeDB-30).

A ``.bin`` is ``pickle.dump((bins, issame_list))``: ``bins`` holds two encoded images per pair
(consecutive), ``issame_list`` one bool per pair. The published files were pickled by Python 2,
so they are read with ``encoding="bytes"``.

A pickle can run arbitrary code on load, so reading goes through an unpickler that resolves only
the handful of harmless globals these files are made of; anything else is refused.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np

from cdface.core.atomic import atomic_write_bytes
from cdface.core.contract import INPUT_SIZE
from cdface.core.errors import CdfaceError
from cdface.training.data.folder import decode_image

# (module, name) pairs a verification .bin may reference. Python 3 pickles of bytes at protocol
# <= 2 go through _codecs.encode; numpy arrays/scalars appear in files re-saved with numpy.
_ALLOWED_GLOBALS = {
    ("builtins", "list"),
    ("builtins", "tuple"),
    ("builtins", "bytes"),
    ("builtins", "bytearray"),
    ("builtins", "bool"),
    ("builtins", "int"),
    ("__builtin__", "list"),
    ("__builtin__", "tuple"),
    ("__builtin__", "bool"),
    ("__builtin__", "int"),
    ("_codecs", "encode"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("numpy", "bool_"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
}


class _ForbiddenGlobal(pickle.UnpicklingError):
    pass


class _VerificationUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise _ForbiddenGlobal(f"global '{module}.{name}' is not allowed in a verification .bin")
        return super().find_class(module, name)


def _as_bytes(entry: object, index: int, path: Path) -> bytes:
    if isinstance(entry, bytes):
        return entry
    if isinstance(entry, bytearray):
        return bytes(entry)
    if isinstance(entry, np.ndarray) and entry.dtype == np.uint8 and entry.ndim == 1:
        return entry.tobytes()
    raise CdfaceError(f"entry {index} of {path} is a {type(entry).__name__}, not encoded image bytes.")


def read_bin(path: str | os.PathLike) -> tuple[list[bytes], np.ndarray]:
    """(encoded images, bool [P] is-same flags) of a verification ``.bin``; images are 2 per pair."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CdfaceError(f"cannot read verification file {path}: {exc.strerror or exc}.") from exc
    try:
        loaded = _VerificationUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except _ForbiddenGlobal as exc:
        raise CdfaceError(f"{path} is not a safe verification .bin: {exc}.") from exc
    except Exception as exc:  # truncated or garbled pickles raise a zoo of types
        raise CdfaceError(f"{path} is not a readable verification .bin ({type(exc).__name__}: {exc}).") from exc
    if not isinstance(loaded, (tuple, list)) or len(loaded) != 2:
        raise CdfaceError(f"{path} does not hold the (images, issame) pair of a verification .bin.")
    bins, issame = loaded
    if not isinstance(bins, (list, tuple)):
        raise CdfaceError(f"{path}: the images of a verification .bin must be a list, got {type(bins).__name__}.")
    images = [_as_bytes(entry, i, path) for i, entry in enumerate(bins)]
    try:
        flags = np.asarray(issame, dtype=bool).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise CdfaceError(f"{path}: the is-same flags are not a list of booleans.") from exc
    if len(images) != 2 * len(flags):
        raise CdfaceError(f"{path} has {len(images)} images for {len(flags)} pairs; it must have two per pair.")
    return images, flags


def write_bin(path: str | os.PathLike, images: list[bytes], issame: list[bool]) -> None:
    """Write a verification ``.bin`` that InsightFace's loaders read unchanged (atomically)."""
    if len(images) != 2 * len(issame):
        raise CdfaceError(f"a verification .bin needs two images per pair: got {len(images)} images, "
                          f"{len(issame)} pairs.")
    for i, image in enumerate(images):
        if not isinstance(image, (bytes, bytearray)):
            raise CdfaceError(f"image {i} for the verification .bin is a {type(image).__name__}, not encoded bytes.")
    payload = pickle.dumps(([bytes(b) for b in images], [bool(s) for s in issame]), protocol=4)
    atomic_write_bytes(path, payload)


def decode_bin_images(path: str | os.PathLike, size: int = INPUT_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [2P, size, size, 3] RGB images, bool [P] is-same) of a verification ``.bin``."""
    path = Path(path)
    images, issame = read_bin(path)
    decoded = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, data in enumerate(images):
        decoded[i] = decode_image(data, f"entry {i} of {path}", size=size)
    return decoded, issame
