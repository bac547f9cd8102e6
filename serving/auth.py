"""API keys: random secrets shown once, stored only as HMAC-SHA256 hashes, each with scopes.

A key looks like ``cdf_<id>_<secret>``; the id (public) finds the row, the hash of the whole key is
compared in constant time. Scopes: ``embed``, ``verify``, ``identify``, ``enroll``, ``delete`` and
``admin`` (which implies every other). Clients send ``Authorization: Bearer <key>`` or
``X-API-Key: <key>``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Sequence

from cdface.serving.store import ApiKey, GalleryStore

SCOPES = ("embed", "verify", "identify", "enroll", "delete", "admin")
PREFIX = "cdf"


def hash_key(key: str, pepper: str | None) -> str:
    return hmac.new((pepper or "").encode(), key.encode(), hashlib.sha256).hexdigest()


def create_key(store: GalleryStore, name: str, scopes: Sequence[str], pepper: str | None = None) -> tuple[str, ApiKey]:
    """Make a key; return (the key, shown only now, and its record)."""
    bad = [s for s in scopes if s not in SCOPES]
    if bad or not scopes:
        from cdface.core.errors import CdfaceError

        raise CdfaceError(f"scopes must be a non-empty subset of {', '.join(SCOPES)}; got {list(scopes)}")
    key_id = secrets.token_hex(6)
    key = f"{PREFIX}_{key_id}_{secrets.token_urlsafe(24)}"
    record = store.add_key(key_id, hash_key(key, pepper), name, list(dict.fromkeys(scopes)))
    return key, record


def verify_key(store: GalleryStore, key: str, pepper: str | None) -> ApiKey | None:
    """The live key record for ``key``, or None (unknown, malformed, wrong secret or revoked)."""
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != PREFIX or not parts[1] or len(key) > 256:
        return None
    found = store.find_key(parts[1])
    if found is None:
        return None
    record, stored = found
    if not hmac.compare_digest(stored, hash_key(key, pepper)) or record.revoked:
        return None
    return record


def allows(record: ApiKey, scope: str) -> bool:
    return "admin" in record.scopes or scope in record.scopes
