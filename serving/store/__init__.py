"""The gallery's store of record (see ``base``): SQLite by default, PostgreSQL for several replicas.

``PostgresStore`` lives in ``cdface.serving.store.postgres`` and is not imported here: psycopg is
needed only when PostgreSQL is used.
"""

from cdface.serving.errors import Conflict, NotFound
from cdface.serving.store.base import (
    DEFAULT_TENANT,
    MODEL_ACTIONS,
    NO_ACTOR,
    TENANT_PATTERN,
    Actor,
    ApiKey,
    AuditEntry,
    Change,
    Embeddings,
    Face,
    GalleryStore,
    Identity,
    ModelKey,
    ModelState,
    NewFace,
    ShadowCounts,
    check_tenant,
    new_identity_id,
    utc_iso,
    utc_now,
)
from cdface.serving.store.sql import SCHEMA_VERSION, SqlStore
from cdface.serving.store.sqlite import SQLiteStore

__all__ = ["DEFAULT_TENANT", "MODEL_ACTIONS", "NO_ACTOR", "TENANT_PATTERN", "Actor", "ApiKey", "AuditEntry", "Change",
           "Conflict", "Embeddings", "Face", "GalleryStore", "Identity", "ModelKey", "ModelState", "NewFace",
           "NotFound", "SCHEMA_VERSION", "SQLiteStore", "ShadowCounts", "SqlStore", "check_tenant", "new_identity_id",
           "utc_iso", "utc_now"]
