"""API keys: random secrets shown once, stored only as HMAC-SHA256 hashes, each with scopes.

A key looks like ``cdf_<id>_<secret>``; the id (public) finds the row, the hash of the whole key is
compared in constant time. Scopes: ``embed`` (embeddings, detection), ``verify``, ``identify`` (also
listing the gallery), ``enroll``, ``delete``, ``crops`` (downloading retained face crops: face images
are personal data, so listing the gallery does not include them), ``candidates`` (identify answers
name the candidates that did not match too; without it an answer holds the matching ones only) and
``admin`` (which implies every other). Clients send ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``.

Tenants: every key belongs to exactly one tenant (``create_key(..., tenant=)``, "default" unless
named; see ``cdface.serving.store.base``), and its scopes, ``admin`` included, act only on that
tenant's gallery: a key never reads, searches, enrolls into or deletes another tenant's identities.
With auth off (no keys) every request acts for the tenant "default" (``tenant_of(None)``). The
bootstrap admin key is the tenant "default"'s; keys of other tenants are made with
``cdface keys create --tenant``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from typing import Sequence

from cdface.core.errors import CdfaceError
from cdface.serving.errors import Conflict, Forbidden, Unauthorized
from cdface.serving.settings import Settings
from cdface.serving.store import DEFAULT_TENANT, ApiKey, GalleryStore, check_tenant

log = logging.getLogger("cdface.serving")

SCOPES = ("embed", "verify", "identify", "candidates", "enroll", "delete", "crops", "admin")
PREFIX = "cdf"


def hash_key(key: str, pepper: str | None) -> str:
    return hmac.new((pepper or "").encode(), key.encode(), hashlib.sha256).hexdigest()


def _key_id(key: str) -> str | None:
    """The id part of ``cdf_<id>_<secret>``, or None when ``key`` does not have that shape."""
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != PREFIX or not parts[1] or len(key) > 256:
        return None
    return parts[1]


def create_key(store: GalleryStore, name: str, scopes: Sequence[str], pepper: str | None = None,
               tenant: str = DEFAULT_TENANT) -> tuple[str, ApiKey]:
    """Make a key of ``tenant``; return (the key, shown only now, and its record)."""
    bad = [s for s in scopes if s not in SCOPES]
    if bad or not scopes:
        raise CdfaceError(f"scopes must be a non-empty subset of {', '.join(SCOPES)}; got {list(scopes)}")
    check_tenant(tenant)
    key_id = secrets.token_hex(6)
    key = f"{PREFIX}_{key_id}_{secrets.token_urlsafe(24)}"
    record = store.add_key(key_id, hash_key(key, pepper), name, list(dict.fromkeys(scopes)), tenant)
    return key, record


def tenant_of(record: ApiKey | None) -> str:
    """The tenant a request acts for: its key's, or "default" when the server runs without keys."""
    return record.tenant if record is not None else DEFAULT_TENANT


def verify_key(store: GalleryStore, key: str, pepper: str | None) -> ApiKey | None:
    """The live key record for ``key``, or None (unknown, malformed, wrong secret or revoked)."""
    key_id = _key_id(key)
    found = store.find_key(key_id) if key_id is not None else None
    if found is None:
        return None
    record, stored = found
    if not hmac.compare_digest(stored, hash_key(key, pepper)) or record.revoked:
        return None
    return record


def allows(record: ApiKey, scope: str) -> bool:
    return "admin" in record.scopes or scope in record.scopes


def authorize(store: GalleryStore, key: str | None, scope: str, pepper: str | None) -> ApiKey:
    """The record of ``key`` if it may act in ``scope``; else ``Unauthorized`` or ``Forbidden``."""
    if not key:
        raise Unauthorized("an API key is required (Authorization: Bearer <key> or X-API-Key)")
    record = verify_key(store, key, pepper)
    if record is None:
        raise Unauthorized("the API key is unknown or revoked", code="invalid_api_key")
    if not allows(record, scope):
        raise Forbidden(f"the API key lacks the '{scope}' scope")
    return record


def bootstrap_admin_key(store: GalleryStore, settings: Settings) -> bool:
    """Store ``settings.bootstrap_admin_key`` (hashed, admin scope) unless its id is there; True if stored."""
    if settings.bootstrap_admin_key is None:
        return False
    key = settings.bootstrap_admin_key.get_secret_value().strip()
    key_id = _key_id(key)
    if key_id is None or not key.split("_", 2)[2]:
        raise CdfaceError("CDFACE_SERVE_BOOTSTRAP_ADMIN_KEY must look like cdf_<id>_<secret>")
    if store.find_key(key_id) is not None:  # present (or revoked: an operator's decision stands)
        return False
    try:
        store.add_key(key_id, hash_key(key, settings.pepper), "bootstrap-admin", ["admin"])
    except Conflict:  # another replica stored it first
        return False
    log.info("stored the bootstrap admin key %s", key_id)
    return True
