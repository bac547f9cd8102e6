"""Retained crops sealed at rest: AES-256-GCM under keys from ``CDFACE_SERVE_CROP_KEYS``.

A retained crop is a face image, the most sensitive thing the gallery holds after its embeddings;
it is kept only so a new model can re-embed the gallery. The store never writes one unsealed.

Keys: ``CDFACE_SERVE_CROP_KEYS`` is a comma-separated list of ``<key id>:<base64 of 32 bytes>``
(``cdface keys crop-key`` makes one). The first key seals; every key opens. Rotation is therefore:
put a new key first, keep the old ones after it, run ``cdface gallery rotate-crop-key`` (which
re-seals every crop with the first key), then drop the old keys.

Sealed format (version 1)::

    b"CDFC" 0x01 | key id length (1 byte) | key id (ASCII) | nonce (12 random bytes) | ciphertext + tag (16)

The associated data is that whole header plus the id of the identity the face belongs to: a crop
copied into another identity's row, or given another key id, does not open. The face id is not
bound: it is assigned by the database on insert, after the crop is sealed, and a face never
changes identity, so the identity is the tightest binding available in the same write.

A crop that does not start with the magic is one stored in the clear by a cdface from before
sealing; it is read as it is, and ``rotate-crop-key`` seals it.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
from dataclasses import dataclass, field
from typing import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cdface.serving.errors import ServingError

MAGIC = b"CDFC\x01"
NONCE_BYTES = 12
KEY_BYTES = 32
_KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")
_AAD_LABEL = b"cdface-crop\x00"


class CropKeyError(ServingError):
    """A sealed crop that this server cannot open: ``crop_key_unknown`` (its key is not configured) or
    ``crop_undecryptable`` (wrong key material, or the stored bytes were altered or moved)."""

    code = "crop_key_unknown"


@dataclass(frozen=True)
class CropKey:
    id: str
    secret: bytes = field(repr=False)


def new_key() -> str:
    """A fresh key as the setting takes it: ``<id>:<base64>``; the id is random, so keys never collide."""
    return f"ck{secrets.token_hex(4)}:{base64.b64encode(os.urandom(KEY_BYTES)).decode()}"


def parse_keys(text: str) -> list[CropKey]:
    """The keys of a ``crop_keys`` setting, first (sealing) key first.

    Errors name the position and the rule, never the key material.
    """
    keys: list[CropKey] = []
    for position, item in enumerate((part.strip() for part in text.split(",")), start=1):
        if not item:
            continue
        key_id, sep, encoded = item.partition(":")
        if not sep or not _KEY_ID.fullmatch(key_id):
            raise ValueError(f"crop key {position} is not <key id>:<base64 key> with an id of 1-32 letters, "
                             "digits, - or _ (cdface keys crop-key makes one)")
        try:
            secret = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"crop key {key_id!r} is not valid base64") from None
        if len(secret) != KEY_BYTES:
            raise ValueError(f"crop key {key_id!r} has {len(secret)} bytes; AES-256 needs {KEY_BYTES}")
        if any(k.id == key_id for k in keys):
            raise ValueError(f"crop key id {key_id!r} appears twice")
        keys.append(CropKey(key_id, secret))
    if not keys:
        raise ValueError("no crop key given")
    return keys


def key_id_of(blob: bytes) -> str | None:
    """The id of the key ``blob`` is sealed with, or None for a crop stored in the clear."""
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 1:
        return None
    length = blob[len(MAGIC)]
    return blob[len(MAGIC) + 1:len(MAGIC) + 1 + length].decode("ascii", "replace")


class CropCipher:
    """Seals with the first key, opens with any (see the module docstring)."""

    def __init__(self, keys: Sequence[CropKey]) -> None:
        if not keys:
            raise ValueError("a crop cipher needs at least one key")
        self.keys = list(keys)
        self._aead = {k.id: AESGCM(k.secret) for k in self.keys}

    @classmethod
    def from_setting(cls, text: str) -> CropCipher:
        return cls(parse_keys(text))

    @property
    def primary(self) -> str:
        """The id of the key new crops are sealed with."""
        return self.keys[0].id

    def seal(self, crop: bytes, identity_id: str) -> bytes:
        key_id = self.primary.encode("ascii")
        header = MAGIC + bytes([len(key_id)]) + key_id
        nonce = os.urandom(NONCE_BYTES)  # random 96-bit nonces: safe for far more crops than a gallery holds
        return header + nonce + self._aead[self.primary].encrypt(nonce, crop, _aad(header, identity_id))

    def open(self, blob: bytes, identity_id: str, what: str = "a crop") -> bytes:
        """The crop ``blob`` holds (``blob`` itself when it was stored in the clear)."""
        key_id = key_id_of(blob)
        if key_id is None:
            return blob
        aead = self._aead.get(key_id)
        if aead is None:
            raise CropKeyError(f"{what} is sealed with crop key {key_id!r}, which CDFACE_SERVE_CROP_KEYS does not "
                               "hold (add it after the first key)")
        start = len(MAGIC) + 1 + len(key_id)
        nonce, sealed = blob[start:start + NONCE_BYTES], blob[start + NONCE_BYTES:]
        try:
            return aead.decrypt(nonce, sealed, _aad(blob[:start], identity_id))
        except InvalidTag:
            raise CropKeyError(f"{what} does not open with crop key {key_id!r}: the key material differs from the "
                               "one it was sealed with, or the stored bytes were altered or moved to another "
                               "identity", code="crop_undecryptable") from None

    def is_current(self, blob: bytes) -> bool:
        """Whether ``blob`` is sealed with the first key already (rotation skips it)."""
        return key_id_of(blob) == self.primary


def _aad(header: bytes, identity_id: str) -> bytes:
    return _AAD_LABEL + header + identity_id.encode("utf-8")
