"""The gallery store on PostgreSQL, for several gateway replicas sharing one database.

Same interface and behaviour as ``SQLiteStore``. What is specific:

- Every write is one transaction; multi-face enrolment commits all its faces or none.
- Every write takes one transaction-scoped advisory lock before it touches the change log. With
  BIGSERIAL alone, two concurrent transactions can commit out of ``seq`` order, and a replica that
  has applied seq 11 would never look back for seq 10; serialising writers makes ``seq`` order
  equal commit order, so "applied up to seq N" is a sound watermark. (Gallery writes are rare
  compared with searches; this costs nothing that matters.)
- ``NOTIFY cdface_changes`` is sent inside each write transaction; PostgreSQL delivers it on commit
  only, so a woken replica always finds the change. The notification is only a wake-up: replicas
  read the change log itself (``changes_since``), so a lost notification costs a poll interval.
- One connection shared under a lock (like SQLite), re-opened if the server dropped it.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Callable, Iterator, Sequence, TypeVar

import numpy as np
import psycopg
from psycopg import errors as pg_errors

from cdface.core.errors import CdfaceError
from cdface.serving.store import (ApiKey, Change, Conflict, Face, GalleryStore, Identity, ModelKey, NewFace, NotFound,
                           StoreError, new_identity_id, utc_now)

CHANNEL = "cdface_changes"
_WRITE_LOCK = 0x63646661  # advisory lock key ("cdfa"): serialises writers, see the module docstring
_SCHEMA_LOCK = 0x63646662

_SCHEMA = """
CREATE TABLE IF NOT EXISTS identities (
    id TEXT PRIMARY KEY,
    external_id TEXT UNIQUE,
    name TEXT,
    metadata TEXT NOT NULL DEFAULT '{}',
    created TEXT NOT NULL,
    updated TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS faces (
    id BIGSERIAL PRIMARY KEY,
    identity_id TEXT NOT NULL REFERENCES identities(id) ON DELETE CASCADE,
    embedding BYTEA NOT NULL,
    dim INTEGER NOT NULL,
    model_name TEXT NOT NULL,
    model_version INTEGER NOT NULL,
    created TEXT NOT NULL,
    crop BYTEA,
    box TEXT,
    quality TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS faces_identity ON faces(identity_id);
CREATE INDEX IF NOT EXISTS faces_model ON faces(model_name, model_version);
CREATE TABLE IF NOT EXISTS changes (
    seq BIGSERIAL PRIMARY KEY,
    op TEXT NOT NULL,
    identity_id TEXT,
    face_id BIGINT,
    at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    hash TEXT NOT NULL,
    name TEXT NOT NULL,
    scopes TEXT NOT NULL,
    created TEXT NOT NULL,
    revoked TEXT
);
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
"""
SCHEMA_VERSION = 1

T = TypeVar("T")


class PostgresStore(GalleryStore):
    shared = True  # several processes write: a gateway must follow the change log

    def __init__(self, url: str, connect_timeout: float = 10.0) -> None:
        self.url = url
        self._timeout = connect_timeout
        self._lock = threading.RLock()
        self._listener: psycopg.Connection | None = None
        try:
            self._db = self._connect()
            with self._db.transaction():
                # Two replicas starting together must not race on CREATE TABLE IF NOT EXISTS.
                self._db.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                self._db.execute(_SCHEMA)
                row = self._db.execute("SELECT version FROM schema_version").fetchone()
                if row is None:
                    self._db.execute("INSERT INTO schema_version VALUES (%s)", (SCHEMA_VERSION,))
                elif row[0] != SCHEMA_VERSION:
                    raise CdfaceError(f"gallery database has schema version {row[0]}; this cdface reads "
                                      f"{SCHEMA_VERSION}")
        except psycopg.Error as exc:
            raise CdfaceError(f"cannot open the gallery database {self.safe_url}: {exc}".strip()) from None

    @property
    def safe_url(self) -> str:
        """The URL without its password, for messages."""
        try:
            info = psycopg.conninfo.conninfo_to_dict(self.url)
        except psycopg.Error:
            return "(unparsable URL)"
        return f"postgresql://{info.get('user', '')}@{info.get('host', '')}:{info.get('port', 5432)}/" \
               f"{info.get('dbname', '')}"

    def _connect(self) -> psycopg.Connection:
        return psycopg.connect(self.url, autocommit=True, connect_timeout=int(self._timeout))

    # -- plumbing -------------------------------------------------------------------------------

    def _conn(self) -> psycopg.Connection:
        if self._db.closed or self._db.broken:  # the server restarted or dropped us: reconnect once
            self._db = self._connect()
        return self._db

    def _write(self, work: Callable[[psycopg.Connection], T]) -> T:
        """Run ``work`` in one transaction holding the writers' lock; durable on return."""
        with self._lock:
            db = self._conn()
            with db.transaction():
                db.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK,))
                return work(db)

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._conn().execute(sql, args).fetchall()

    @staticmethod
    def _log(db: psycopg.Connection, op: str, identity_id: str | None, face_id: int | None = None) -> None:
        seq = db.execute("INSERT INTO changes (op, identity_id, face_id, at) VALUES (%s, %s, %s, %s) RETURNING seq",
                         (op, identity_id, face_id, utc_now())).fetchone()[0]
        db.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(seq)))  # delivered at commit, never before

    @staticmethod
    def _exists(db: psycopg.Connection, identity_id: str) -> None:
        if db.execute("SELECT 1 FROM identities WHERE id = %s", (identity_id,)).fetchone() is None:
            raise NotFound(f"no identity with id {identity_id!r}")

    # -- identities -----------------------------------------------------------------------------

    def create_identity(self, external_id: str | None, name: str | None, metadata: dict[str, Any]) -> Identity:
        identity_id, now = new_identity_id(), utc_now()

        def work(db):
            db.execute("INSERT INTO identities (id, external_id, name, metadata, created, updated) "
                       "VALUES (%s, %s, %s, %s, %s, %s)", (identity_id, external_id, name, json.dumps(metadata), now, now))
            self._log(db, "identity.create", identity_id)

        try:
            self._write(work)
        except pg_errors.UniqueViolation:
            raise Conflict(f"an identity with external_id {external_id!r} already exists") from None
        return Identity(identity_id, external_id, name, dict(metadata), now, now, 0)

    def get_identity(self, identity_id: str) -> Identity:
        rows = self._read(self._IDENTITY_COLUMNS + " WHERE i.id = %s", (identity_id,))
        if not rows:
            raise NotFound(f"no identity with id {identity_id!r}")
        return self._identity(rows[0])

    def list_identities(self, limit: int, after: str | None = None) -> list[Identity]:
        # COLLATE "C": byte order, as SQLite compares, so cursors page the same way on both stores.
        rows = self._read(self._IDENTITY_COLUMNS + ' WHERE i.id COLLATE "C" > %s ORDER BY i.id COLLATE "C" LIMIT %s',
                          (after or "", limit))
        return [self._identity(r) for r in rows]

    def identities_by_id(self, ids: Sequence[str]) -> dict[str, Identity]:
        ids = list(dict.fromkeys(ids))
        if not ids:
            return {}
        rows = self._read(self._IDENTITY_COLUMNS + " WHERE i.id = ANY(%s)", (ids,))
        return {r[0]: self._identity(r) for r in rows}

    def update_identity(self, identity_id: str, changes: dict[str, Any]) -> Identity:
        allowed = {"external_id", "name", "metadata"}
        unknown = set(changes) - allowed
        if unknown:
            raise StoreError(f"cannot update {sorted(unknown)}")

        def work(db):
            self._exists(db, identity_id)
            for column, value in changes.items():  # column names come from ``allowed`` only
                if column == "metadata":
                    value = json.dumps(value)
                db.execute(f"UPDATE identities SET {column} = %s WHERE id = %s", (value, identity_id))
            db.execute("UPDATE identities SET updated = %s WHERE id = %s", (utc_now(), identity_id))
            self._log(db, "identity.update", identity_id)

        try:
            self._write(work)
        except pg_errors.UniqueViolation:
            raise Conflict(f"an identity with external_id {changes.get('external_id')!r} already exists") from None
        return self.get_identity(identity_id)

    def delete_identity(self, identity_id: str) -> list[int]:
        def work(db):
            self._exists(db, identity_id)
            face_ids = [int(r[0]) for r in db.execute("DELETE FROM faces WHERE identity_id = %s RETURNING id",
                                                       (identity_id,)).fetchall()]
            face_ids.sort()
            db.execute("DELETE FROM identities WHERE id = %s", (identity_id,))
            for face_id in face_ids:
                self._log(db, "face.delete", identity_id, face_id)
            self._log(db, "identity.delete", identity_id)
            return face_ids

        return self._write(work)

    # -- faces ----------------------------------------------------------------------------------

    def add_faces(self, identity_id: str, faces: Sequence[NewFace]) -> list[Face]:
        def work(db):
            self._exists(db, identity_id)
            out = []
            for face in faces:
                vector = np.ascontiguousarray(face.embedding, dtype=np.float32).reshape(-1)
                now = utc_now()
                face_id = int(db.execute(
                    "INSERT INTO faces (identity_id, embedding, dim, model_name, model_version, created, crop, box, "
                    "quality) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
                    (identity_id, vector.tobytes(), int(vector.size), face.model.name, face.model.version, now,
                     face.crop, json.dumps(face.box) if face.box is not None else None,
                     json.dumps(face.quality))).fetchone()[0])
                self._log(db, "face.add", identity_id, face_id)
                out.append(Face(face_id, identity_id, face.model, int(vector.size), now, face.crop is not None,
                                face.box, dict(face.quality)))
            db.execute("UPDATE identities SET updated = %s WHERE id = %s", (utc_now(), identity_id))
            return out

        return self._write(work)

    def list_faces(self, identity_id: str) -> list[Face]:
        self.get_identity(identity_id)
        return [self._face(r) for r in self._read(self._FACE_COLUMNS + " WHERE identity_id = %s ORDER BY id",
                                                  (identity_id,))]

    def delete_face(self, identity_id: str, face_id: int) -> None:
        def work(db):
            cur = db.execute("DELETE FROM faces WHERE id = %s AND identity_id = %s", (face_id, identity_id))
            if cur.rowcount == 0:
                raise NotFound(f"identity {identity_id!r} has no face {face_id}")
            self._log(db, "face.delete", identity_id, face_id)

        self._write(work)

    def face_embeddings(self, identity_id: str, model: ModelKey) -> np.ndarray:
        rows = self._read("SELECT embedding FROM faces WHERE identity_id = %s AND model_name = %s AND "
                          "model_version = %s ORDER BY id", (identity_id, model.name, model.version))
        if not rows:
            return np.zeros((0, 0), np.float32)
        return np.stack([np.frombuffer(r[0], dtype=np.float32) for r in rows])

    def _embeddings(self, where: str, args: tuple, dim: int) -> tuple[np.ndarray, list[str], np.ndarray]:
        rows = self._read("SELECT id, identity_id, embedding FROM faces WHERE " + where + " AND dim = %s ORDER BY id",
                          args + (dim,))
        ids = np.asarray([r[0] for r in rows], dtype=np.int64)
        matrix = np.frombuffer(b"".join(bytes(r[2]) for r in rows), dtype=np.float32).reshape(len(rows), dim) \
            if rows else np.zeros((0, dim), np.float32)
        return ids, [r[1] for r in rows], matrix

    def load_embeddings(self, model: ModelKey, dim: int) -> tuple[np.ndarray, list[str], np.ndarray]:
        return self._embeddings("model_name = %s AND model_version = %s", (model.name, model.version), dim)

    def embeddings_of(self, face_ids: Sequence[int], model: ModelKey, dim: int) -> tuple[np.ndarray, list[str],
                                                                                          np.ndarray]:
        """Like ``load_embeddings`` for just these faces (those still present and made by ``model``)."""
        return self._embeddings("id = ANY(%s) AND model_name = %s AND model_version = %s",
                                ([int(i) for i in face_ids], model.name, model.version), dim)

    def count_faces_by_model(self) -> dict[ModelKey, int]:
        rows = self._read("SELECT model_name, model_version, COUNT(*) FROM faces GROUP BY model_name, model_version")
        return {ModelKey(r[0], r[1]): int(r[2]) for r in rows}

    def faces_to_reembed(self, model: ModelKey) -> Iterator[tuple[int, bytes]]:
        rows = self._read("SELECT id FROM faces WHERE crop IS NOT NULL AND NOT (model_name = %s AND "
                          "model_version = %s) ORDER BY id", (model.name, model.version))
        for (face_id,) in rows:
            found = self._read("SELECT crop FROM faces WHERE id = %s", (face_id,))
            if found:
                yield int(face_id), bytes(found[0][0])

    def replace_embeddings(self, items: Sequence[tuple[int, np.ndarray]], model: ModelKey) -> int:
        def work(db):
            done = 0
            for face_id, vector in items:
                vector = np.ascontiguousarray(vector, dtype=np.float32).reshape(-1)
                row = db.execute("UPDATE faces SET embedding = %s, dim = %s, model_name = %s, model_version = %s "
                                 "WHERE id = %s RETURNING identity_id",
                                 (vector.tobytes(), int(vector.size), model.name, model.version, int(face_id))
                                 ).fetchone()
                if row is not None:
                    self._log(db, "face.reembed", row[0], int(face_id))
                    done += 1
            return done

        return self._write(work)

    # -- change log -----------------------------------------------------------------------------

    def changes_since(self, seq: int, limit: int = 1000) -> list[Change]:
        rows = self._read("SELECT seq, op, identity_id, face_id, at FROM changes WHERE seq > %s ORDER BY seq LIMIT %s",
                          (seq, limit))
        return [Change(int(r[0]), r[1], r[2], None if r[3] is None else int(r[3]), r[4]) for r in rows]

    def last_seq(self) -> int:
        return int(self._read("SELECT COALESCE(MAX(seq), 0) FROM changes")[0][0])

    def wait_for_change(self, timeout: float) -> bool:
        """Block up to ``timeout`` s for a change notification; True if one came. Own connection (LISTEN)."""
        try:
            if self._listener is None or self._listener.closed or self._listener.broken:
                self._listener = self._connect()
                self._listener.execute(f"LISTEN {CHANNEL}")
            for _ in self._listener.notifies(timeout=timeout, stop_after=1):
                return True
            return False
        except psycopg.Error:
            # The server is away: drop the listener; the caller's poll keeps the replica in step.
            self._close_listener()
            raise

    def _close_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.close()
            except psycopg.Error:
                pass

    # -- API keys -------------------------------------------------------------------------------

    def add_key(self, key_id: str, key_hash: str, name: str, scopes: Sequence[str]) -> ApiKey:
        now = utc_now()
        try:
            with self._lock:
                self._conn().execute("INSERT INTO api_keys (id, hash, name, scopes, created) VALUES (%s, %s, %s, %s, %s)",
                                     (key_id, key_hash, name, json.dumps(list(scopes)), now))
        except pg_errors.UniqueViolation:
            raise Conflict(f"an API key with id {key_id!r} already exists") from None
        return ApiKey(key_id, name, tuple(scopes), now, None)

    def find_key(self, key_id: str) -> tuple[ApiKey, str] | None:
        rows = self._read("SELECT id, name, scopes, created, revoked, hash FROM api_keys WHERE id = %s", (key_id,))
        return (self._key(rows[0][:5]), rows[0][5]) if rows else None

    def list_keys(self) -> list[ApiKey]:
        return [self._key(r) for r in self._read("SELECT id, name, scopes, created, revoked FROM api_keys "
                                                 "ORDER BY created")]

    def revoke_key(self, key_id: str) -> ApiKey:
        with self._lock:
            db = self._conn()
            with db.transaction():
                cur = db.execute("UPDATE api_keys SET revoked = %s WHERE id = %s AND revoked IS NULL",
                                 (utc_now(), key_id))
                if cur.rowcount == 0 and db.execute("SELECT 1 FROM api_keys WHERE id = %s", (key_id,)).fetchone() \
                        is None:
                    raise NotFound(f"no API key {key_id!r}")
        found = self.find_key(key_id)
        assert found is not None
        return found[0]

    def check(self) -> None:
        self._read("SELECT 1")

    def close(self) -> None:
        self._close_listener()
        with self._lock:
            self._db.close()
