"""The one image decoder: bytes (or a file) in, an RGB uint8 array out, or an ``ImageError`` with a stable code.

Every stage decodes through here: the gateway (uploads, retained crops), training (image folders,
RecordIO, ``.bin`` files), evaluation and TensorRT calibration (aligned crops on disk).

- JPEG, PNG and WebP only; anything else (text, PDFs, GIF, TIFF, ...) is refused by its header.
- Limits before decoding, when given: the byte size, then the pixel count read from the header -
  a PNG that declares 20000 x 20000 is refused without allocating a pixel (decompression bombs).
- EXIF orientation is applied; grey, palette, RGBA, CMYK and 16-bit images become 8-bit RGB.
- A truncated or corrupt file is an error, never a half-grey picture.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Literal

import numpy as np

from cdface.core.contract import INPUT_SIZE
from cdface.core.errors import CdfaceError

FORMATS = ("JPEG", "PNG", "WEBP")
MIN_SIDE = 8


class ImageError(CdfaceError):
    """Bad image input: ``code`` is stable (the API returns it; the gateway picks its HTTP status)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def decode_image(data: bytes, *, max_bytes: int | None = None, max_pixels: int | None = None,
                 what: str = "image", size: int | None = None, aligned: bool = False) -> np.ndarray:
    """Decode ``data`` to an H x W x 3 uint8 RGB array (``size``: resized to size x size, bilinear).

    ``aligned``: the image must be an aligned INPUT_SIZE x INPUT_SIZE crop, checked from the header
    before a pixel is decoded (a small file can declare tens of megapixels).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise ImageError("empty_image", f"the {what} is empty")
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageError("image_too_large", f"the {what} is {len(data)} bytes; the limit is {max_bytes}")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=FORMATS)
        except UnidentifiedImageError:
            raise ImageError("unsupported_image", f"the {what} is not a JPEG, PNG or WebP image") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError("image_too_many_pixels", f"the {what} declares too many pixels") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageError("corrupt_image", f"the {what} cannot be read ({_short(exc)})") from None
        width, height = img.size
        if aligned and (width, height) != (INPUT_SIZE, INPUT_SIZE):
            raise ImageError("not_aligned_crop", f"mode 'aligned' needs a {INPUT_SIZE}x{INPUT_SIZE} crop; the {what} "
                             f"is {width}x{height}")
        if max_pixels is not None and width * height > max_pixels:
            raise ImageError("image_too_many_pixels",
                             f"the {what} is {width}x{height} pixels; the limit is {max_pixels} pixels")
        if min(width, height) < MIN_SIDE:
            raise ImageError("image_too_small", f"the {what} is {width}x{height}; faces need at least "
                             f"{MIN_SIDE} pixels a side")
        try:
            img.load()
            upright: Image.Image = ImageOps.exif_transpose(img) or img
            if size is not None and upright.size != (size, size):
                upright = upright.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            return _to_rgb(upright)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError("image_too_many_pixels", f"the {what} declares too many pixels") from None
        except (OSError, SyntaxError, ValueError, TypeError, MemoryError, EOFError) as exc:
            raise ImageError("corrupt_image", f"the {what} is truncated or corrupt ({_short(exc)})") from None


ImageFormat = Literal["file", "rgb24"]
"""How an image's bytes are given: a JPEG, PNG or WebP file, or an aligned crop's raw pixels (``crop_from_pixels``)."""


def crop_from_pixels(data: bytes, what: str = "image") -> np.ndarray:
    """An aligned crop from its raw pixels: INPUT_SIZE rows of INPUT_SIZE pixels of 3 bytes (R, G, B)."""
    expected = INPUT_SIZE * INPUT_SIZE * 3
    if len(data) != expected:
        raise ImageError("not_aligned_crop", f"the {what} is {len(data)} bytes of pixels; an aligned {INPUT_SIZE}x"
                         f"{INPUT_SIZE} RGB crop is {expected}")
    return np.frombuffer(data, np.uint8).reshape(INPUT_SIZE, INPUT_SIZE, 3).copy()


def read_image(path: str | os.PathLike, *, size: int | None = None) -> np.ndarray:
    """``decode_image`` of a file; a missing or unreadable file is an ``ImageError`` naming it."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ImageError("image_not_found", f"image not found: {path}") from None
    except OSError as exc:
        raise ImageError("unreadable_image", f"cannot read image {path} ({_short(exc)})") from None
    return decode_image(data, what=f"image {path}", size=size)


def read_aligned_crop(path: str | os.PathLike, size: int = INPUT_SIZE) -> np.ndarray:
    """An aligned face crop from a file; any other size is an error, never silently resized."""
    crop = read_image(path)
    if crop.shape[:2] != (size, size):
        raise ImageError("not_aligned_crop", f"{path} is {crop.shape[1]}x{crop.shape[0]}; an aligned "
                         f"{size}x{size} crop is expected")
    return crop


def image_format(data: bytes, what: str = "image") -> str:
    """The format named in the header (JPEG, PNG, WEBP), without decoding pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as img:
            return str(img.format)
    except UnidentifiedImageError:
        raise ImageError("unsupported_image", f"the {what} is not a JPEG, PNG or WebP image") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError("corrupt_image", f"the {what} cannot be read ({_short(exc)})") from None


def _to_rgb(img) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit (or 32-bit integer) grey: keep the top 8 bits of the 16-bit range.
        grey = np.asarray(img, dtype=np.int64)
        grey = (np.clip(grey, 0, 65535) >> 8).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2))
    if mode == "F":
        grey = np.clip(np.asarray(img, dtype=np.float64), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2))
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        # Transparent pixels on white, not on whatever colour they happen to carry.
        from PIL import Image

        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return np.ascontiguousarray(array)


def encode_png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="PNG")
    return out.getvalue()


def _short(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:160]
