"""The gallery's SQL, written once: the schema and every query, for SQLite and PostgreSQL alike.

``SqlStore`` implements ``GalleryStore`` with one connection shared under a lock; a dialect
(``SQLiteStore``, ``PostgresStore``) supplies only what differs between the two databases:

- the parameter placeholder (queries here are written with ``?``), and the column types of an
  auto-incremented key that is never reused, of a blob and of a 64-bit integer (upserts are
  ``INSERT ... ON CONFLICT``, which both databases speak alike);
- how to learn an inserted row's key (``lastrowid`` or ``RETURNING``), and ``column IN (...)``;
- ``byte_order``, the collation that makes text compare byte by byte (cursors page alike on both);
- the exception a unique constraint raises, and the driver's base exception;
- connecting, and ``_begin``: one transaction holding the writers' lock, and ``_notify``, the
  wake-up a committed change sends to the processes that follow the change log.

Every write runs in ``_transaction()``: one transaction, durable when it returns; the change-log
rows of a write commit with it, so the log never shows a change the tables do not hold. So do
its ``audit_log`` row: an acknowledged write always has one, a rolled-back write never does.

Tenants (``cdface.serving.store.base``): every query a request reaches names the tenant, either in
``identities.tenant = ?`` or, for faces, through their identity's row; another tenant's identity
is not found, with the same answer as an id that never existed. Operator queries (embeddings for
an index, re-embedding, counts) span every tenant.

Embeddings live in ``face_embeddings``, one row per (face, model), next to each other: enrolment
writes the enrolling model's (and a candidate's, ``NewFace.also``), re-embedding adds another
model's and never touches the existing rows; deleting a face deletes its rows (ON DELETE CASCADE).
"""

from __future__ import annotations

import abc
import contextlib
import json
import threading
from dataclasses import replace
from string import Template
from typing import Any, ContextManager, Iterator, Sequence

import numpy as np

from cdface.core.errors import CdfaceError
from cdface.serving.crop_cipher import CropCipher, CropKeyError, key_id_of
from cdface.serving.errors import Conflict, InvalidRequest, NotFound
from cdface.serving.store.base import (
    DEFAULT_TENANT,
    MODEL_ACTIONS,
    NO_ACTOR,
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
    new_identity_id,
    utc_now,
)

SCHEMA_VERSION = 3
# The tables as a new gallery gets them. A gallery made by an older cdface is brought here step by
# step (``SqlStore._migrate``), in the same transaction.
SCHEMA = Template("""
CREATE TABLE IF NOT EXISTS identities (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL DEFAULT 'default',
    external_id TEXT,
    name TEXT,
    metadata TEXT NOT NULL DEFAULT '{}',
    created TEXT NOT NULL,
    updated TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS faces (
    id $serial_key,
    identity_id TEXT NOT NULL REFERENCES identities(id) ON DELETE CASCADE,
    model_name TEXT NOT NULL,
    model_version INTEGER NOT NULL,
    created TEXT NOT NULL,
    crop $blob,
    box TEXT,
    quality TEXT NOT NULL DEFAULT '{}',
    last_seen TEXT
);
CREATE TABLE IF NOT EXISTS changes (
    seq $serial_key,
    op TEXT NOT NULL,
    identity_id TEXT,
    face_id $int64,
    at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    hash TEXT NOT NULL,
    name TEXT NOT NULL,
    scopes TEXT NOT NULL,
    created TEXT NOT NULL,
    revoked TEXT,
    tenant TEXT NOT NULL DEFAULT 'default'
);
CREATE TABLE IF NOT EXISTS audit_log (
    id $serial_key,
    at TEXT NOT NULL,
    key_id TEXT,
    action TEXT NOT NULL,
    identity_id TEXT,
    face_ids TEXT NOT NULL DEFAULT '[]',
    outcome TEXT NOT NULL DEFAULT '{}',
    request_id TEXT,
    tenant TEXT
);
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
$version_3
""")
# Added by version 3 (model lifecycle): embeddings per (face, model); the model pointer (one row, id 1);
# shadow-scoring totals per (active, candidate); the served models each gateway last reported.
VERSION_3_TABLES = Template("""
CREATE TABLE IF NOT EXISTS face_embeddings (
    face_id $int64 NOT NULL REFERENCES faces(id) ON DELETE CASCADE,
    model_name TEXT NOT NULL,
    model_version INTEGER NOT NULL,
    dim INTEGER NOT NULL,
    embedding $blob NOT NULL,
    created TEXT NOT NULL,
    PRIMARY KEY (face_id, model_name, model_version)
);
CREATE TABLE IF NOT EXISTS model_state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    active_name TEXT,
    active_version INTEGER,
    candidate_name TEXT,
    candidate_version INTEGER,
    previous_name TEXT,
    previous_version INTEGER,
    changed TEXT,
    promoted TEXT
);
CREATE TABLE IF NOT EXISTS shadow_counts (
    active_name TEXT NOT NULL,
    active_version INTEGER NOT NULL,
    candidate_name TEXT NOT NULL,
    candidate_version INTEGER NOT NULL,
    total $int64 NOT NULL DEFAULT 0,
    same_decision $int64 NOT NULL DEFAULT 0,
    same_top1 $int64 NOT NULL DEFAULT 0,
    PRIMARY KEY (active_name, active_version, candidate_name, candidate_version)
);
CREATE TABLE IF NOT EXISTS gateway_heartbeats (
    gateway_id TEXT PRIMARY KEY,
    models TEXT NOT NULL DEFAULT '[]',
    at TEXT NOT NULL
);
INSERT INTO model_state (id) SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM model_state)
""")
# Indexes, made after the tables (new or migrated) have every column they name.
INDEXES = """
CREATE UNIQUE INDEX IF NOT EXISTS identities_tenant_external_id ON identities(tenant, external_id);
CREATE INDEX IF NOT EXISTS faces_identity ON faces(identity_id);
CREATE INDEX IF NOT EXISTS faces_model ON faces(model_name, model_version);
CREATE INDEX IF NOT EXISTS face_embeddings_model ON face_embeddings(model_name, model_version, face_id);
CREATE INDEX IF NOT EXISTS audit_log_at ON audit_log(at)
"""
# Version 1 -> 2: tenants (identities, keys and audit rows belong to one; external ids are unique
# per tenant) and a face's last match time (the retention policy). Rows from version 1 belong to
# the tenant "default". The identities table changes its unique constraint, which each dialect
# does its own way (``_migrate_identities``).
# Version 2 -> 3: the version-3 tables; every face's one embedding moves (bit for bit) to
# face_embeddings under the model that made it, and faces loses its embedding and dim columns.
MIGRATIONS = {
    1: ("ALTER TABLE api_keys ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default'",
        "ALTER TABLE faces ADD COLUMN last_seen TEXT",
        "ALTER TABLE audit_log ADD COLUMN tenant TEXT"),
    2: ("$version_3",
        "INSERT INTO face_embeddings (face_id, model_name, model_version, dim, embedding, created) "
        "SELECT id, model_name, model_version, dim, embedding, created FROM faces",
        "ALTER TABLE faces DROP COLUMN embedding",
        "ALTER TABLE faces DROP COLUMN dim"),
}

_IDENTITY = ("SELECT i.id, i.external_id, i.name, i.metadata, i.created, i.updated, "
             "(SELECT COUNT(*) FROM faces f WHERE f.identity_id = i.id) FROM identities i")
# A face with the size of its enrolling model's embedding (0 if that one is gone: not written by cdface).
_FACE = ("SELECT f.id, f.identity_id, f.model_name, f.model_version, COALESCE(e.dim, 0), f.created, "
         "f.crop IS NOT NULL, f.box, f.quality FROM faces f LEFT JOIN face_embeddings e ON e.face_id = f.id "
         "AND e.model_name = f.model_name AND e.model_version = f.model_version")
_KEY = "SELECT id, name, scopes, created, revoked, tenant FROM api_keys"
_UPDATABLE = ("external_id", "name", "metadata")
_AUDIT = "SELECT id, at, key_id, action, identity_id, face_ids, outcome, request_id, tenant FROM audit_log"
# A face's identity is in the tenant (faces have no tenant column: they follow their identity).
_IN_TENANT = "identity_id IN (SELECT id FROM identities WHERE tenant = ?)"


def _identity(row: tuple) -> Identity:
    return Identity(row[0], row[1], row[2], json.loads(row[3]), row[4], row[5], int(row[6]))


def _face(row: tuple) -> Face:
    return Face(int(row[0]), row[1], ModelKey(row[2], int(row[3])), int(row[4]), row[5], bool(row[6]),
                json.loads(row[7]) if row[7] else None, json.loads(row[8]))


def _key(row: tuple) -> ApiKey:
    return ApiKey(row[0], row[1], tuple(json.loads(row[2])), row[3], row[4], row[5])


def _model(name: str | None, version: int | None) -> ModelKey | None:
    return None if name is None else ModelKey(name, int(version))  # type: ignore[arg-type]


def _model_columns(model: ModelKey | None) -> tuple[str | None, int | None]:
    return (None, None) if model is None else (model.name, model.version)


def _model_text(model: ModelKey | None) -> str | None:
    return None if model is None else str(model)


def _audit_entry(row: tuple) -> AuditEntry:
    return AuditEntry(int(row[0]), row[1], row[2], row[3], row[4], json.loads(row[5]), json.loads(row[6]), row[7],
                      row[8])


def _vector(embedding: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(embedding, dtype=np.float32).reshape(-1)


class SqlStore(GalleryStore):
    """Every query of the gallery; a subclass is a dialect (see the module docstring)."""

    placeholder = "?"
    serial_key: str  # column type: an auto-incremented integer key that is never reused
    blob: str
    int64: str
    byte_order = ""  # appended to text columns in comparisons and ORDER BY
    lower = "LOWER"  # the SQL function that lower-cases text for case-insensitive search
    unique_violation: type[Exception]
    driver_error: type[Exception]

    def __init__(self) -> None:
        self._lock = threading.RLock()  # one connection, shared by the threads of the gateway
        try:
            self._db = self._connect()
            self._create_schema()
        except self.driver_error as exc:
            raise CdfaceError(f"cannot open the gallery database {self.where}: {exc}".strip()) from None

    # -- what a dialect supplies ----------------------------------------------------------------

    @property
    @abc.abstractmethod
    def where(self) -> str:
        """The database, for messages (never a password)."""

    @abc.abstractmethod
    def _connect(self) -> Any: ...

    def _connection(self) -> Any:
        """The shared connection, ready for a statement (called under the lock)."""
        return self._db

    @abc.abstractmethod
    def _begin(self, db: Any, lock: str) -> ContextManager[None]:
        """One transaction holding the writers' lock ``lock`` ("write" or "schema"): commit on exit, else roll back."""

    @abc.abstractmethod
    def _insert(self, db: Any, sql: str, args: tuple, key: str) -> int:
        """Run an INSERT; return the new row's ``key`` column."""

    @abc.abstractmethod
    def _in(self, column: str, values: Sequence[Any]) -> tuple[str, tuple]:
        """(condition, arguments): ``column`` is one of ``values``."""

    @abc.abstractmethod
    def _has_table(self, db: Any, name: str) -> bool: ...

    @abc.abstractmethod
    def _migrate_identities(self, db: Any) -> None:
        """Version 1 -> 2 of ``identities``: add ``tenant`` and make ``external_id`` unique per tenant."""

    def _notify(self, db: Any, seq: int) -> None:
        """Tell the processes that follow the change log that ``seq`` commits with this transaction."""

    # -- plumbing -------------------------------------------------------------------------------

    def _run(self, db: Any, sql: str, args: tuple = ()) -> Any:
        if self.placeholder != "?":
            sql = sql.replace("?", self.placeholder)
        return db.execute(sql, args)

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._run(self._connection(), sql, args).fetchall()

    @contextlib.contextmanager
    def _transaction(self, lock: str = "write") -> Iterator[Any]:
        with self._lock:
            db = self._connection()
            with self._begin(db, lock):
                yield db

    def _create_schema(self) -> None:
        # One transaction under its own lock: gateways starting together must not race on it, and a
        # migration that fails leaves the gallery as it was.
        with self._transaction("schema") as db:
            version = self._schema_version(db)
            if version is None:
                self._script(db, self._ddl(SCHEMA))
                self._run(db, "INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
            elif version < SCHEMA_VERSION and version in MIGRATIONS:
                while version < SCHEMA_VERSION:  # 1 -> 2 -> 3: each step from the tables the previous one left
                    self._migrate(db, version)
                    version += 1
                self._run(db, "UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
            elif version != SCHEMA_VERSION:
                raise CdfaceError(f"gallery {self.where} has schema version {version}; this cdface reads "
                                  f"{SCHEMA_VERSION} (and migrates {', '.join(map(str, MIGRATIONS))})")
            self._script(db, INDEXES)

    def _ddl(self, template: Template) -> str:
        """``template`` with the dialect's column types (and the version-3 tables where it says ``$version_3``)."""
        types = {"serial_key": self.serial_key, "blob": self.blob, "int64": self.int64}
        return template.substitute(types, version_3=VERSION_3_TABLES.substitute(types))

    def _migrate(self, db: Any, version: int) -> None:
        """One step: the gallery's tables from schema ``version`` to ``version + 1``."""
        if version == 1:
            self._migrate_identities(db)
        self._script(db, ";".join(self._ddl(Template(statement)) for statement in MIGRATIONS[version]))

    def _script(self, db: Any, statements: str) -> None:
        for statement in statements.split(";"):
            if statement.strip():
                self._run(db, statement)

    def _schema_version(self, db: Any) -> int | None:
        """The gallery's schema version, or None for a database without the gallery's tables."""
        if not self._has_table(db, "schema_version"):
            return None
        row = self._run(db, "SELECT version FROM schema_version").fetchone()
        return None if row is None else int(row[0])

    def _log(self, db: Any, op: str, identity_id: str | None, face_id: int | None = None) -> None:
        seq = self._insert(db, "INSERT INTO changes (op, identity_id, face_id, at) VALUES (?, ?, ?, ?)",
                           (op, identity_id, face_id, utc_now()), "seq")
        self._notify(db, seq)

    def _audit(self, db: Any, actor: Actor, action: str, identity_id: str | None, face_ids: Sequence[int] = (),
               outcome: dict[str, Any] | None = None, gallery_wide: bool = False) -> None:
        """Append an audit row in ``db``'s transaction: ids, counts and decisions only (no names, images, vectors).

        ``gallery_wide``: an operator's write over every tenant (re-embedding), recorded without a tenant.
        """
        self._run(db, "INSERT INTO audit_log (at, key_id, action, identity_id, face_ids, outcome, request_id, tenant) "
                      "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                  (utc_now(), actor.key_id, action, identity_id, json.dumps([int(f) for f in face_ids]),
                   json.dumps(outcome or {}), actor.request_id, None if gallery_wide else actor.tenant))

    def _require_identity(self, db: Any, identity_id: str, tenant: str) -> None:
        if self._run(db, "SELECT 1 FROM identities WHERE id = ? AND tenant = ?",
                     (identity_id, tenant)).fetchone() is None:
            raise self._unknown_identity(identity_id)

    @staticmethod
    def _unknown_identity(identity_id: str) -> NotFound:
        # One answer for an id that does not exist and one of another tenant: ids cannot be probed.
        return NotFound(f"no identity with id {identity_id!r}", code="unknown_identity")

    @staticmethod
    def _duplicate_external_id(external_id: Any) -> Conflict:
        return Conflict(f"an identity with external_id {external_id!r} already exists", code="duplicate_external_id")

    # -- identities -----------------------------------------------------------------------------

    def create_identity(self, external_id: str | None, name: str | None, metadata: dict[str, Any],
                        actor: Actor = NO_ACTOR) -> Identity:
        return self.create_identity_with_faces(external_id, name, metadata, (), actor)[0]

    def create_identity_with_faces(self, external_id: str | None, name: str | None, metadata: dict[str, Any],
                                   faces: Sequence[NewFace], actor: Actor = NO_ACTOR) -> tuple[Identity, list[Face]]:
        identity_id, now = new_identity_id(), utc_now()
        try:
            with self._transaction() as db:
                self._run(db, "INSERT INTO identities (id, tenant, external_id, name, metadata, created, updated) "
                              "VALUES (?, ?, ?, ?, ?, ?, ?)",
                          (identity_id, actor.tenant, external_id, name, json.dumps(metadata), now, now))
                self._log(db, "identity.create", identity_id)
                stored = self._insert_faces(db, identity_id, faces)
                self._audit(db, actor, "create_identity", identity_id, [f.id for f in stored], {"faces": len(stored)})
        except self.unique_violation:
            raise self._duplicate_external_id(external_id) from None
        return Identity(identity_id, external_id, name, dict(metadata), now, now, len(stored)), stored

    def get_identity(self, identity_id: str, *, tenant: str = DEFAULT_TENANT) -> Identity:
        rows = self._read(_IDENTITY + " WHERE i.id = ? AND i.tenant = ?", (identity_id, tenant))
        if not rows:
            raise self._unknown_identity(identity_id)
        return _identity(rows[0])

    def list_identities(self, limit: int, after: str | None = None, external_id: str | None = None,
                        contains: str | None = None, *, tenant: str = DEFAULT_TENANT) -> list[Identity]:
        # Byte order on both databases, so a cursor pages the same way whichever store made it.
        by_id = f"i.id{self.byte_order}"
        conditions, args = ["i.tenant = ?", f"{by_id} > ?"], [tenant, after or ""]
        if external_id is not None:
            conditions.append("i.external_id = ?")
            args.append(external_id)
        if contains is not None:
            # Both sides lower-cased; LIKE's wildcards in the text are escaped, so it matches literally.
            pattern = "%" + contains.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            conditions.append(f"({self.lower}(i.name) LIKE ? ESCAPE '\\' OR {self.lower}(i.external_id) LIKE ? "
                              f"ESCAPE '\\')")
            args += [pattern, pattern]
        rows = self._read(f"{_IDENTITY} WHERE {' AND '.join(conditions)} ORDER BY {by_id} LIMIT ?",
                          (*args, limit))
        return [_identity(r) for r in rows]

    def identities_by_id(self, ids: Sequence[str], *, tenant: str = DEFAULT_TENANT) -> dict[str, Identity]:
        ids = list(dict.fromkeys(ids))
        if not ids:
            return {}
        condition, args = self._in("i.id", ids)
        return {r[0]: _identity(r) for r in self._read(f"{_IDENTITY} WHERE {condition} AND i.tenant = ?",
                                                       (*args, tenant))}

    def update_identity(self, identity_id: str, changes: dict[str, Any], actor: Actor = NO_ACTOR) -> Identity:
        unknown = set(changes) - set(_UPDATABLE)
        if unknown:
            raise InvalidRequest(f"cannot update {sorted(unknown)}", code="store_error")
        try:
            with self._transaction() as db:
                self._require_identity(db, identity_id, actor.tenant)
                for column, value in changes.items():  # column names come from _UPDATABLE only
                    if column == "metadata":
                        value = json.dumps(value)
                    self._run(db, f"UPDATE identities SET {column} = ? WHERE id = ?", (value, identity_id))
                self._run(db, "UPDATE identities SET updated = ? WHERE id = ?", (utc_now(), identity_id))
                self._log(db, "identity.update", identity_id)
                # Which fields changed, never their values (names are personal data).
                self._audit(db, actor, "update_identity", identity_id, outcome={"fields": sorted(changes)})
        except self.unique_violation:
            raise self._duplicate_external_id(changes.get("external_id")) from None
        return self.get_identity(identity_id, tenant=actor.tenant)

    def delete_identity(self, identity_id: str, actor: Actor = NO_ACTOR) -> list[int]:
        with self._transaction() as db:
            self._require_identity(db, identity_id, actor.tenant)
            face_ids = [int(r[0]) for r in self._run(db, "SELECT id FROM faces WHERE identity_id = ? ORDER BY id",
                                                     (identity_id,)).fetchall()]
            self._run(db, "DELETE FROM faces WHERE identity_id = ?", (identity_id,))
            self._run(db, "DELETE FROM identities WHERE id = ?", (identity_id,))
            for face_id in face_ids:
                self._log(db, "face.delete", identity_id, face_id)
            self._log(db, "identity.delete", identity_id)
            self._audit(db, actor, "delete_identity", identity_id, face_ids, {"faces": len(face_ids)})
        return face_ids

    # -- faces ----------------------------------------------------------------------------------

    def add_faces(self, identity_id: str, faces: Sequence[NewFace], actor: Actor = NO_ACTOR) -> list[Face]:
        with self._transaction() as db:
            self._require_identity(db, identity_id, actor.tenant)
            out = self._insert_faces(db, identity_id, faces)
            self._audit(db, actor, "enroll", identity_id, [f.id for f in out], {"faces": len(out)})
            self._run(db, "UPDATE identities SET updated = ? WHERE id = ?", (utc_now(), identity_id))
        return out

    def _insert_faces(self, db: Any, identity_id: str, faces: Sequence[NewFace]) -> list[Face]:
        out = []
        for face in faces:
            vector, now = _vector(face.embedding), utc_now()
            face_id = self._insert(
                db, "INSERT INTO faces (identity_id, model_name, model_version, created, crop, box, quality) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (identity_id, face.model.name, face.model.version, now, self._seal_crop(identity_id, face.crop),
                 json.dumps(face.box) if face.box is not None else None, json.dumps(face.quality)),
                "id")
            for model, embedding in ((face.model, vector), *face.also):
                self._insert_embedding(db, face_id, model, _vector(embedding), now)
            self._log(db, "face.add", identity_id, face_id)
            out.append(Face(face_id, identity_id, face.model, int(vector.size), now, face.crop is not None,
                            face.box, dict(face.quality), tuple(sorted([face.model, *(m for m, _ in face.also)],
                                                                       key=str))))
        return out

    def _insert_embedding(self, db: Any, face_id: int, model: ModelKey, vector: np.ndarray, now: str) -> bool:
        """Insert ``model``'s embedding of the face unless it has one already (kept: never overwritten);
        True when it was inserted."""
        inserted = self._run(db, "INSERT INTO face_embeddings (face_id, model_name, model_version, dim, embedding, "
                                 "created) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (face_id, model_name, model_version) "
                                 "DO NOTHING",
                             (face_id, model.name, model.version, int(vector.size), vector.tobytes(), now)).rowcount
        return inserted > 0

    def list_faces(self, identity_id: str, limit: int | None = None, after: int | None = None, *,
                   tenant: str = DEFAULT_TENANT) -> list[Face]:
        self.get_identity(identity_id, tenant=tenant)
        sql, args = _FACE + " WHERE f.identity_id = ? AND f.id > ? ORDER BY f.id", [identity_id, after or 0]
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        faces = [_face(r) for r in self._read(sql, tuple(args))]
        if not faces:
            return faces
        where, ids = self._in("face_id", [f.id for f in faces])
        models: dict[int, list[ModelKey]] = {}
        for face_id, name, version in self._read(f"SELECT face_id, model_name, model_version FROM face_embeddings "
                                                 f"WHERE {where}", ids):
            models.setdefault(int(face_id), []).append(ModelKey(name, int(version)))
        return [replace(f, models=tuple(sorted(models.get(f.id, []), key=str))) for f in faces]

    def face_crop(self, identity_id: str, face_id: int, *, tenant: str = DEFAULT_TENANT) -> bytes:
        rows = self._read(f"SELECT crop FROM faces WHERE id = ? AND identity_id = ? AND {_IN_TENANT}",
                          (face_id, identity_id, tenant))
        if not rows:
            self.get_identity(identity_id, tenant=tenant)  # unknown_identity before unknown_face
            raise NotFound(f"identity {identity_id!r} has no face {face_id}", code="unknown_face")
        if rows[0][0] is None:
            raise NotFound(f"face {face_id} has no retained crop (enrolled with retain_crop off)",
                           code="no_retained_crop")
        return self._open_crop(identity_id, face_id, bytes(rows[0][0]))

    def delete_face(self, identity_id: str, face_id: int, actor: Actor = NO_ACTOR) -> None:
        with self._transaction() as db:
            self._require_identity(db, identity_id, actor.tenant)  # unknown_identity before unknown_face
            deleted = self._run(db, "DELETE FROM faces WHERE id = ? AND identity_id = ?", (face_id, identity_id))
            if deleted.rowcount == 0:
                raise NotFound(f"identity {identity_id!r} has no face {face_id}", code="unknown_face")
            self._log(db, "face.delete", identity_id, face_id)
            self._audit(db, actor, "delete_face", identity_id, [face_id])

    def face_embeddings(self, identity_id: str, model: ModelKey, *, tenant: str = DEFAULT_TENANT) -> np.ndarray:
        rows = self._read(f"SELECT e.embedding FROM face_embeddings e JOIN faces f ON f.id = e.face_id "
                          f"WHERE f.identity_id = ? AND e.model_name = ? AND e.model_version = ? AND f.{_IN_TENANT} "
                          f"ORDER BY e.face_id", (identity_id, model.name, model.version, tenant))
        if not rows:
            return np.zeros((0, 0), np.float32)
        return np.stack([np.frombuffer(bytes(r[0]), dtype=np.float32) for r in rows])

    def _embeddings(self, model: ModelKey, dim: int, face_ids: Sequence[int] | None = None) -> Embeddings:
        condition = "e.model_name = ? AND e.model_version = ? AND e.dim = ?"
        args: tuple = (model.name, model.version, dim)
        if face_ids is not None:
            among, ids = self._in("e.face_id", [int(i) for i in face_ids])
            condition, args = f"{among} AND {condition}", ids + args
        rows = self._read(f"SELECT e.face_id, f.identity_id, i.tenant, e.embedding FROM face_embeddings e "
                          f"JOIN faces f ON f.id = e.face_id JOIN identities i ON i.id = f.identity_id "
                          f"WHERE {condition} ORDER BY e.face_id", args)
        ids_out = np.asarray([r[0] for r in rows], dtype=np.int64)
        matrix = np.frombuffer(b"".join(bytes(r[3]) for r in rows), dtype=np.float32).reshape(len(rows), dim) \
            if rows else np.zeros((0, dim), np.float32)
        return ids_out, [r[1] for r in rows], [r[2] for r in rows], matrix

    def load_embeddings(self, model: ModelKey, dim: int) -> Embeddings:
        return self._embeddings(model, dim)

    def embeddings_of(self, face_ids: Sequence[int], model: ModelKey, dim: int) -> Embeddings:
        if not len(face_ids):
            return np.zeros(0, np.int64), [], [], np.zeros((0, dim), np.float32)
        return self._embeddings(model, dim, face_ids)

    def count_faces(self, tenant: str | None = None) -> int:
        if tenant is None:
            return int(self._read("SELECT COUNT(*) FROM faces")[0][0])
        return int(self._read(f"SELECT COUNT(*) FROM faces WHERE {_IN_TENANT}", (tenant,))[0][0])

    def count_faces_by_model(self, tenant: str | None = None) -> dict[ModelKey, int]:
        if tenant is None:
            rows = self._read("SELECT model_name, model_version, COUNT(*) FROM face_embeddings "
                              "GROUP BY model_name, model_version")
        else:
            rows = self._read(f"SELECT e.model_name, e.model_version, COUNT(*) FROM face_embeddings e "
                              f"JOIN faces f ON f.id = e.face_id WHERE f.{_IN_TENANT} "
                              f"GROUP BY e.model_name, e.model_version", (tenant,))
        return {ModelKey(r[0], int(r[1])): int(r[2]) for r in rows}

    # A face ``model`` has not embedded (the primary key of face_embeddings answers it).
    _NOT_EMBEDDED = ("NOT EXISTS (SELECT 1 FROM face_embeddings e WHERE e.face_id = f.id AND e.model_name = ? "
                     "AND e.model_version = ?)")

    def faces_to_reembed(self, model: ModelKey, after: int = 0, limit: int = 256) -> list[tuple[int, bytes]]:
        rows = self._read(f"SELECT f.id, f.identity_id, f.crop FROM faces f WHERE f.id > ? AND f.crop IS NOT NULL "
                          f"AND {self._NOT_EMBEDDED} ORDER BY f.id LIMIT ?",
                          (int(after), model.name, model.version, int(limit)))
        return [(int(face_id), self._open_crop(identity_id, int(face_id), bytes(crop)))
                for face_id, identity_id, crop in rows]

    def faces_missing(self, model: ModelKey) -> tuple[int, int]:
        row = self._read(f"SELECT COUNT(f.crop), COUNT(*) FROM faces f WHERE {self._NOT_EMBEDDED}",
                         (model.name, model.version))[0]
        with_crop, total = int(row[0]), int(row[1])  # COUNT(column) counts the non-null crops
        return with_crop, total - with_crop

    def add_embeddings(self, items: Sequence[tuple[int, np.ndarray]], model: ModelKey,
                       actor: Actor = NO_ACTOR) -> int:
        inserted, now = 0, utc_now()
        with self._transaction() as db:
            owners: dict[int, str] = {}
            ids = [int(face_id) for face_id, _ in items]
            for start in range(0, len(ids), 500):  # SQLite bounds the parameters of one statement
                among, args = self._in("id", ids[start:start + 500])
                owners.update((int(r[0]), r[1]) for r in self._run(db, f"SELECT id, identity_id FROM faces WHERE "
                                                                       f"{among}", args).fetchall())
            for face_id, embedding in items:
                owner = owners.get(int(face_id))
                if owner is not None and self._insert_embedding(db, int(face_id), model, _vector(embedding), now):
                    self._log(db, "face.embed", owner, int(face_id))
                    inserted += 1
            self._audit(db, actor, "reembed", None, outcome={"model": str(model), "faces": inserted},
                        gallery_wide=True)
        return inserted

    # -- the model pointer, shadow counts, heartbeats -------------------------------------------

    def model_state(self) -> ModelState:
        rows = self._read("SELECT active_name, active_version, candidate_name, candidate_version, previous_name, "
                          "previous_version, changed, promoted FROM model_state WHERE id = 1")
        if not rows:
            return ModelState()
        r = rows[0]
        return ModelState(_model(r[0], r[1]), _model(r[2], r[3]), _model(r[4], r[5]), r[6], r[7])

    def set_model_state(self, active: ModelKey | None, candidate: ModelKey | None, previous: ModelKey | None, *,
                        action: str, actor: Actor = NO_ACTOR, expect: ModelState | None = None) -> ModelState:
        if action not in MODEL_ACTIONS:
            raise ValueError(f"unknown model pointer action {action!r}; one of {', '.join(MODEL_ACTIONS)}")
        with self._transaction() as db:
            # Read under the writers' lock: no other write can move the pointer between the check and the update.
            current = self.model_state()
            if expect is not None and (current.active, current.candidate, current.previous) != \
                    (expect.active, expect.candidate, expect.previous):
                raise Conflict(f"the model pointer changed meanwhile (active {_model_text(current.active)}, "
                               f"candidate {_model_text(current.candidate)}); read it again and retry",
                               code="model_state_changed")
            now = utc_now()
            promoted = now if active != current.active else current.promoted
            self._run(db, "UPDATE model_state SET active_name = ?, active_version = ?, candidate_name = ?, "
                          "candidate_version = ?, previous_name = ?, previous_version = ?, changed = ?, promoted = ? "
                          "WHERE id = 1",
                      (*_model_columns(active), *_model_columns(candidate), *_model_columns(previous), now, promoted))
            self._log(db, "model.switch", None)
            self._audit(db, actor, action, None, outcome={"active": _model_text(active),
                                                          "candidate": _model_text(candidate),
                                                          "previous": _model_text(previous)}, gallery_wide=True)
        return ModelState(active, candidate, previous, now, promoted)

    def add_shadow_counts(self, active: ModelKey, candidate: ModelKey, total: int, same_decision: int,
                          same_top1: int) -> None:
        with self._transaction() as db:
            self._run(db, "INSERT INTO shadow_counts (active_name, active_version, candidate_name, candidate_version, "
                          "total, same_decision, same_top1) VALUES (?, ?, ?, ?, ?, ?, ?) "
                          "ON CONFLICT (active_name, active_version, candidate_name, candidate_version) DO UPDATE SET "
                          "total = shadow_counts.total + excluded.total, "
                          "same_decision = shadow_counts.same_decision + excluded.same_decision, "
                          "same_top1 = shadow_counts.same_top1 + excluded.same_top1",
                      (active.name, active.version, candidate.name, candidate.version, int(total), int(same_decision),
                       int(same_top1)))

    def shadow_counts(self, active: ModelKey, candidate: ModelKey) -> ShadowCounts:
        rows = self._read("SELECT total, same_decision, same_top1 FROM shadow_counts WHERE active_name = ? AND "
                          "active_version = ? AND candidate_name = ? AND candidate_version = ?",
                          (active.name, active.version, candidate.name, candidate.version))
        return ShadowCounts(*(int(n) for n in rows[0])) if rows else ShadowCounts()

    def report_models_in_use(self, gateway_id: str, models: Sequence[ModelKey]) -> None:
        listed = json.dumps(sorted({str(m) for m in models}))
        with self._transaction() as db:
            self._run(db, "INSERT INTO gateway_heartbeats (gateway_id, models, at) VALUES (?, ?, ?) "
                          "ON CONFLICT (gateway_id) DO UPDATE SET models = excluded.models, at = excluded.at",
                      (gateway_id, listed, utc_now()))

    def models_in_use(self, since: str) -> set[ModelKey]:
        rows = self._read(f"SELECT models FROM gateway_heartbeats WHERE at{self.byte_order} >= ?", (since,))
        return {ModelKey.parse(text) for (listed,) in rows for text in json.loads(listed)}

    # -- the change feed ------------------------------------------------------------------------

    def changes_since(self, seq: int, limit: int = 1000) -> list[Change]:
        rows = self._read("SELECT seq, op, identity_id, face_id, at FROM changes WHERE seq > ? ORDER BY seq LIMIT ?",
                          (seq, limit))
        return [Change(int(r[0]), r[1], r[2], None if r[3] is None else int(r[3]), r[4]) for r in rows]

    def last_seq(self) -> int:
        return int(self._read("SELECT COALESCE(MAX(seq), 0) FROM changes")[0][0])

    # -- the audit log --------------------------------------------------------------------------

    def append_audit(self, actor: Actor, action: str, identity_id: str | None = None,
                     face_ids: Sequence[int] = (), outcome: dict[str, Any] | None = None) -> None:
        with self._transaction() as db:
            self._audit(db, actor, action, identity_id, face_ids, outcome)

    def audit_entries(self, after: int = 0, limit: int = 1000, since: str | None = None,
                      until: str | None = None) -> list[AuditEntry]:
        conditions: list[str] = ["id > ?"]
        args: list[Any] = [after]
        if since is not None:  # times are stored in one UTC format (utc_iso), so text order is time order
            conditions.append(f"at{self.byte_order} >= ?")
            args.append(since)
        if until is not None:
            conditions.append(f"at{self.byte_order} < ?")
            args.append(until)
        rows = self._read(f"{_AUDIT} WHERE {' AND '.join(conditions)} ORDER BY id LIMIT ?", (*args, limit))
        return [_audit_entry(r) for r in rows]

    def prune_audit(self, before: str) -> int:
        with self._transaction() as db:
            return int(self._run(db, f"DELETE FROM audit_log WHERE at{self.byte_order} < ?", (before,)).rowcount)

    # -- retention and erasure ------------------------------------------------------------------
    # Sealed crops (cdface.serving.crop_cipher), last-match times, expiry, and what erasure needs
    # beyond DELETE (``_after_erase``, ``vacuum``). See docs/data-protection.md.

    crop_cipher: CropCipher | None = None
    sealed_crops_only = False  # set by use_crop_cipher: no crop is ever stored in the clear

    def use_crop_cipher(self, cipher: CropCipher | None) -> None:
        """Seal retained crops with ``cipher`` from now on; with None, refuse to store any crop.

        A store built without this call (tests, tools) keeps crops as given; the gateway and the
        command line always make it (``open_store``), so they never write a crop unsealed.
        """
        self.crop_cipher, self.sealed_crops_only = cipher, True

    def _seal_crop(self, identity_id: str, crop: bytes | None) -> bytes | None:
        if crop is None:
            return None
        if self.crop_cipher is not None:
            return self.crop_cipher.seal(crop, identity_id)
        if self.sealed_crops_only:
            raise InvalidRequest("crops are not retained: no crop key is configured (CDFACE_SERVE_CROP_KEYS)",
                                 code="crop_retention_off")
        return crop

    def _open_crop(self, identity_id: str, face_id: int, blob: bytes) -> bytes:
        what = f"the crop of face {face_id}"
        if self.crop_cipher is None:
            if key_id_of(blob) is None:
                return blob  # kept in the clear by a cdface from before sealing (rotate-crop-key seals it)
            raise CropKeyError(f"{what} is sealed and no crop key is configured (CDFACE_SERVE_CROP_KEYS)")
        return self.crop_cipher.open(blob, identity_id, what)

    def reseal_crops(self, after: int = 0, batch: int = 100) -> Iterator[tuple[int, int, int]]:
        """Seal every retained crop with the first crop key, ``batch`` faces per transaction, from face id ``after`` on.

        Yields (last face id done, crops re-sealed, crops already current) per committed batch: a run
        that stops (an unknown key, a crash) keeps what it committed, and a rerun skips crops sealed
        with the first key already. Crops stored in the clear by an older cdface are sealed too.
        """
        cipher = self.crop_cipher
        if cipher is None:
            raise CdfaceError("no crop key is configured: set CDFACE_SERVE_CROP_KEYS (new key first)")
        cursor, resealed_any = after, False
        try:
            while True:
                with self._transaction() as db:
                    rows = self._run(db, "SELECT id, identity_id, crop FROM faces WHERE crop IS NOT NULL AND id > ? "
                                         "ORDER BY id LIMIT ?", (cursor, batch)).fetchall()
                    resealed = 0
                    for face_id, identity_id, blob in rows:
                        blob = bytes(blob)
                        if cipher.is_current(blob):
                            continue
                        crop = self._open_crop(identity_id, int(face_id), blob)
                        self._run(db, "UPDATE faces SET crop = ? WHERE id = ?",
                                  (cipher.seal(crop, identity_id), int(face_id)))
                        resealed += 1
                    if resealed:
                        self._audit(db, NO_ACTOR, "rotate_crop_key", None,
                                    outcome={"crops": resealed, "key": cipher.primary}, gallery_wide=True)
                if not rows:
                    return
                cursor, resealed_any = int(rows[-1][0]), resealed_any or resealed > 0
                yield cursor, resealed, len(rows) - resealed
        finally:
            if resealed_any:
                self._after_erase()  # the old ciphertexts: out of the WAL as well

    def touch_faces(self, face_ids: Sequence[int], identity_ids: Sequence[str], at: str) -> int:
        """Record a match at ``at`` (UTC ISO) on these faces and on every face of these identities, in one
        transaction: ``last_seen``, which never moves back. No change-log or audit row: nothing to index."""
        newer = f"(last_seen IS NULL OR last_seen{self.byte_order} < ?)"
        updated = 0
        with self._transaction() as db:
            for column, values in (("id", [int(f) for f in face_ids]), ("identity_id", list(identity_ids))):
                for start in range(0, len(values), 500):  # SQLite bounds the parameters of one statement
                    among, args = self._in(column, values[start:start + 500])
                    updated += int(self._run(db, f"UPDATE faces SET last_seen = ? WHERE {among} AND {newer}",
                                             (at, *args, at)).rowcount)
        return updated

    def expire_faces(self, before: str, *, dry_run: bool = False, drop_identities: bool = False,
                     batch: int = 500) -> tuple[int, int]:
        """Delete the faces not matched since ``before`` (UTC ISO; a face never matched counts from its
        enrolment), ``batch`` per transaction, each with its change-log rows (gateways following the log
        drop them) and one audit row ``expire`` per identity. ``drop_identities``: then also delete the
        identities left without a face and not updated since ``before``. Returns (faces, identities)
        deleted, or that would be with ``dry_run``."""
        by = self.byte_order
        stale = f"COALESCE(f.last_seen, f.created){by} < ?"
        empty = (f"i.updated{by} < ? AND NOT EXISTS (SELECT 1 FROM faces f WHERE f.identity_id = i.id "
                 f"AND NOT {stale})")
        if dry_run:
            faces = int(self._read(f"SELECT COUNT(*) FROM faces f WHERE {stale}", (before,))[0][0])
            gone = int(self._read(f"SELECT COUNT(*) FROM identities i WHERE {empty}", (before, before))[0][0]) \
                if drop_identities else 0
            return faces, gone
        faces = gone = 0
        try:
            while True:
                with self._transaction() as db:
                    rows = self._run(db, f"SELECT f.id, f.identity_id, i.tenant FROM faces f JOIN identities i "
                                         f"ON i.id = f.identity_id WHERE {stale} ORDER BY f.id LIMIT ?",
                                     (before, batch)).fetchall()
                    if rows:
                        among, args = self._in("id", [int(r[0]) for r in rows])
                        self._run(db, f"DELETE FROM faces WHERE {among}", args)
                    owners: dict[tuple[str, str], list[int]] = {}
                    for face_id, identity_id, tenant in rows:
                        self._log(db, "face.delete", identity_id, int(face_id))
                        owners.setdefault((identity_id, tenant), []).append(int(face_id))
                    for (identity_id, tenant), ids in owners.items():
                        self._audit(db, Actor(tenant=tenant), "expire", identity_id, ids, {"faces": len(ids)})
                faces += len(rows)
                if len(rows) < batch:
                    break
            while drop_identities:
                with self._transaction() as db:
                    empties = self._run(db, f"SELECT i.id, i.tenant FROM identities i WHERE {empty} ORDER BY i.id "
                                            f"LIMIT ?", (before, before, batch)).fetchall()
                    for identity_id, tenant in empties:
                        self._run(db, "DELETE FROM identities WHERE id = ?", (identity_id,))
                        self._log(db, "identity.delete", identity_id)
                        self._audit(db, Actor(tenant=tenant), "expire", identity_id, (),
                                    {"faces": 0, "identity_deleted": True})
                gone += len(empties)
                if len(empties) < batch:
                    break
        finally:
            if faces or gone:
                self._after_erase()
        return faces, gone

    def _after_erase(self) -> None:
        """After rows were deleted or overwritten: push their old bytes out of where the database still
        keeps them without anyone asking (SQLite: the WAL). PostgreSQL needs ``vacuum``, not run here."""

    @abc.abstractmethod
    def vacuum(self) -> None:
        """Rewrite the tables of faces, their embeddings and identities so deleted rows leave the database files."""

    # -- API keys -------------------------------------------------------------------------------

    def add_key(self, key_id: str, key_hash: str, name: str, scopes: Sequence[str],
                tenant: str = DEFAULT_TENANT) -> ApiKey:
        now = utc_now()
        try:
            with self._transaction() as db:
                self._run(db, "INSERT INTO api_keys (id, hash, name, scopes, created, tenant) "
                              "VALUES (?, ?, ?, ?, ?, ?)",
                          (key_id, key_hash, name, json.dumps(list(scopes)), now, tenant))
        except self.unique_violation:
            raise Conflict(f"an API key with id {key_id!r} already exists", code="duplicate_api_key") from None
        return ApiKey(key_id, name, tuple(scopes), now, None, tenant)

    def find_key(self, key_id: str) -> tuple[ApiKey, str] | None:
        rows = self._read("SELECT id, name, scopes, created, revoked, tenant, hash FROM api_keys WHERE id = ?",
                          (key_id,))
        return (_key(rows[0][:6]), rows[0][6]) if rows else None

    def list_keys(self) -> list[ApiKey]:
        return [_key(r) for r in self._read(_KEY + " ORDER BY created")]

    def revoke_key(self, key_id: str) -> ApiKey:
        with self._transaction() as db:
            revoked = self._run(db, "UPDATE api_keys SET revoked = ? WHERE id = ? AND revoked IS NULL",
                                (utc_now(), key_id)).rowcount
            if not revoked and self._run(db, "SELECT 1 FROM api_keys WHERE id = ?", (key_id,)).fetchone() is None:
                raise NotFound(f"no API key {key_id!r}", code="unknown_api_key")
        found = self.find_key(key_id)
        assert found is not None
        return found[0]

    # -- lifecycle ------------------------------------------------------------------------------

    def check(self) -> None:
        self._read("SELECT 1")

    def close(self) -> None:
        with self._lock:
            self._db.close()
