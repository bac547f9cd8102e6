"""The gallery's store of record: identities, their faces (embeddings), API keys and an ordered change log.

``GalleryStore`` is the interface the gateway uses; ``SQLiteStore`` implements it on one SQLite file
in WAL mode with ``synchronous=FULL``, so a write the caller saw acknowledged survives a crash of the
process (kill -9) or of the machine. A PostgreSQL implementation for several gateway replicas goes
behind the same interface; the change log (a strictly increasing ``seq``) is what replicas will
follow to keep their in-memory indexes in step.

Ids: identities get opaque string ids (``idt_`` + 24 hex digits) plus an optional caller-chosen,
unique ``external_id``; faces get integer ids that are never reused (SQLite AUTOINCREMENT), which
is what the FAISS index stores.
"""

from __future__ import annotations

import abc
import datetime as _dt
import json
import os
import sqlite3
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from cdface.core.errors import CdfaceError


class StoreError(CdfaceError):
    """Base class for store errors the API maps to 4xx answers."""

    code = "store_error"


class NotFound(StoreError):
    code = "not_found"


class Conflict(StoreError):
    code = "conflict"


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def new_identity_id() -> str:
    return "idt_" + uuid.uuid4().hex[:24]


@dataclass(frozen=True)
class ModelKey:
    """Which model made an embedding: embeddings of different models never meet in one search."""

    name: str
    version: int

    def __str__(self) -> str:
        return f"{self.name}:{self.version}"


@dataclass(frozen=True)
class Identity:
    id: str
    external_id: str | None
    name: str | None
    metadata: dict[str, Any]
    created: str
    updated: str
    face_count: int = 0


@dataclass(frozen=True)
class NewFace:
    embedding: np.ndarray  # float32 [D], L2-normalised
    model: ModelKey
    crop: bytes | None = None  # the aligned 112x112 crop as PNG, kept only when asked (re-embedding)
    box: list[float] | None = None
    quality: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Face:
    id: int
    identity_id: str
    model: ModelKey
    dim: int
    created: str
    has_crop: bool
    box: list[float] | None
    quality: dict[str, float]


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    scopes: tuple[str, ...]
    created: str
    revoked: str | None


@dataclass(frozen=True)
class Change:
    seq: int
    op: str  # identity.create | identity.update | identity.delete | face.add | face.delete | face.reembed
    identity_id: str | None
    face_id: int | None
    at: str


class GalleryStore(abc.ABC):
    """What the gateway needs from a store of record. Every write is one transaction and is durable on return."""

    # Row layouts both SQL stores select and decode the same way.
    _IDENTITY_COLUMNS = ("SELECT i.id, i.external_id, i.name, i.metadata, i.created, i.updated, "
                         "(SELECT COUNT(*) FROM faces f WHERE f.identity_id = i.id) FROM identities i")
    _FACE_COLUMNS = ("SELECT id, identity_id, model_name, model_version, dim, created, crop IS NOT NULL, box, quality "
                     "FROM faces")

    @staticmethod
    def _identity(row: tuple) -> Identity:
        return Identity(row[0], row[1], row[2], json.loads(row[3]), row[4], row[5], int(row[6]))

    @staticmethod
    def _face(row: tuple) -> Face:
        return Face(int(row[0]), row[1], ModelKey(row[2], row[3]), row[4], row[5], bool(row[6]),
                    json.loads(row[7]) if row[7] else None, json.loads(row[8]))

    @staticmethod
    def _key(row: tuple) -> ApiKey:
        return ApiKey(row[0], row[1], tuple(json.loads(row[2])), row[3], row[4])

    # identities
    @abc.abstractmethod
    def create_identity(self, external_id: str | None, name: str | None, metadata: dict[str, Any]) -> Identity: ...

    @abc.abstractmethod
    def get_identity(self, identity_id: str) -> Identity: ...

    @abc.abstractmethod
    def list_identities(self, limit: int, after: str | None = None) -> list[Identity]: ...

    @abc.abstractmethod
    def update_identity(self, identity_id: str, changes: dict[str, Any]) -> Identity: ...

    @abc.abstractmethod
    def delete_identity(self, identity_id: str) -> list[int]:
        """Delete the identity and all its faces; return the deleted face ids."""

    @abc.abstractmethod
    def identities_by_id(self, ids: Sequence[str]) -> dict[str, Identity]: ...

    # faces
    @abc.abstractmethod
    def add_faces(self, identity_id: str, faces: Sequence[NewFace]) -> list[Face]: ...

    @abc.abstractmethod
    def list_faces(self, identity_id: str) -> list[Face]: ...

    @abc.abstractmethod
    def delete_face(self, identity_id: str, face_id: int) -> None: ...

    @abc.abstractmethod
    def face_embeddings(self, identity_id: str, model: ModelKey) -> np.ndarray: ...

    @abc.abstractmethod
    def load_embeddings(self, model: ModelKey, dim: int) -> tuple[np.ndarray, list[str], np.ndarray]:
        """(face ids int64 [N], identity ids, embeddings float32 [N, dim]) of every face made by ``model``."""

    @abc.abstractmethod
    def count_faces_by_model(self) -> dict[ModelKey, int]: ...

    @abc.abstractmethod
    def faces_to_reembed(self, model: ModelKey) -> Iterator[tuple[int, bytes]]:
        """(face id, retained crop PNG) of faces made by another model that kept their crop."""

    @abc.abstractmethod
    def replace_embeddings(self, items: Sequence[tuple[int, np.ndarray]], model: ModelKey) -> int: ...

    # change log
    @abc.abstractmethod
    def changes_since(self, seq: int, limit: int = 1000) -> list[Change]: ...

    @abc.abstractmethod
    def last_seq(self) -> int: ...

    # API keys (hashes only)
    @abc.abstractmethod
    def add_key(self, key_id: str, key_hash: str, name: str, scopes: Sequence[str]) -> ApiKey: ...

    @abc.abstractmethod
    def find_key(self, key_id: str) -> tuple[ApiKey, str] | None:
        """The key and its stored hash, or None."""

    @abc.abstractmethod
    def list_keys(self) -> list[ApiKey]: ...

    @abc.abstractmethod
    def revoke_key(self, key_id: str) -> ApiKey: ...

    @abc.abstractmethod
    def check(self) -> None:
        """Raise unless the store answers (readiness)."""

    @abc.abstractmethod
    def close(self) -> None: ...


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
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    identity_id TEXT NOT NULL REFERENCES identities(id) ON DELETE CASCADE,
    embedding BLOB NOT NULL,
    dim INTEGER NOT NULL,
    model_name TEXT NOT NULL,
    model_version INTEGER NOT NULL,
    created TEXT NOT NULL,
    crop BLOB,
    box TEXT,
    quality TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS faces_identity ON faces(identity_id);
CREATE INDEX IF NOT EXISTS faces_model ON faces(model_name, model_version);
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    op TEXT NOT NULL,
    identity_id TEXT,
    face_id INTEGER,
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


class SQLiteStore(GalleryStore):
    """The default store: one SQLite file, WAL, FULL sync, one connection shared under a lock."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=30.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # acknowledged = on disk, even across power loss
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=30000")
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                self._db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
            elif row[0] != SCHEMA_VERSION:
                raise CdfaceError(f"gallery {self.path} has schema version {row[0]}; this cdface reads {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            raise CdfaceError(f"cannot open the gallery database {self.path}: {exc}") from None

    # -- plumbing -------------------------------------------------------------------------------

    class _Tx:
        def __init__(self, store: "SQLiteStore") -> None:
            self.store = store

        def __enter__(self) -> sqlite3.Connection:
            self.store._lock.acquire()
            try:
                self.store._db.execute("BEGIN IMMEDIATE")
            except BaseException:
                self.store._lock.release()
                raise
            return self.store._db

        def __exit__(self, exc_type, exc, tb) -> None:
            try:
                self.store._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
            finally:
                self.store._lock.release()

    def _tx(self) -> "SQLiteStore._Tx":
        return SQLiteStore._Tx(self)

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    @staticmethod
    def _log(db: sqlite3.Connection, op: str, identity_id: str | None, face_id: int | None = None) -> None:
        db.execute("INSERT INTO changes (op, identity_id, face_id, at) VALUES (?, ?, ?, ?)",
                   (op, identity_id, face_id, utc_now()))

    # -- identities -----------------------------------------------------------------------------

    def create_identity(self, external_id: str | None, name: str | None, metadata: dict[str, Any]) -> Identity:
        identity_id, now = new_identity_id(), utc_now()
        try:
            with self._tx() as db:
                db.execute("INSERT INTO identities (id, external_id, name, metadata, created, updated) "
                           "VALUES (?, ?, ?, ?, ?, ?)",
                           (identity_id, external_id, name, json.dumps(metadata), now, now))
                self._log(db, "identity.create", identity_id)
        except sqlite3.IntegrityError:
            raise Conflict(f"an identity with external_id {external_id!r} already exists") from None
        return Identity(identity_id, external_id, name, dict(metadata), now, now, 0)

    def get_identity(self, identity_id: str) -> Identity:
        rows = self._read(self._IDENTITY_COLUMNS + " WHERE i.id = ?", (identity_id,))
        if not rows:
            raise NotFound(f"no identity with id {identity_id!r}")
        return self._identity(rows[0])

    def list_identities(self, limit: int, after: str | None = None) -> list[Identity]:
        rows = self._read(self._IDENTITY_COLUMNS + " WHERE i.id > ? ORDER BY i.id LIMIT ?", (after or "", limit))
        return [self._identity(r) for r in rows]

    def identities_by_id(self, ids: Sequence[str]) -> dict[str, Identity]:
        ids = list(dict.fromkeys(ids))
        if not ids:
            return {}
        rows = self._read(self._IDENTITY_COLUMNS + f" WHERE i.id IN ({','.join('?' * len(ids))})", tuple(ids))
        return {r[0]: self._identity(r) for r in rows}

    def update_identity(self, identity_id: str, changes: dict[str, Any]) -> Identity:
        allowed = {"external_id", "name", "metadata"}
        unknown = set(changes) - allowed
        if unknown:
            raise StoreError(f"cannot update {sorted(unknown)}")
        try:
            with self._tx() as db:
                if db.execute("SELECT 1 FROM identities WHERE id = ?", (identity_id,)).fetchone() is None:
                    raise NotFound(f"no identity with id {identity_id!r}")
                for column, value in changes.items():
                    if column == "metadata":
                        value = json.dumps(value)
                    db.execute(f"UPDATE identities SET {column} = ? WHERE id = ?", (value, identity_id))
                db.execute("UPDATE identities SET updated = ? WHERE id = ?", (utc_now(), identity_id))
                self._log(db, "identity.update", identity_id)
        except sqlite3.IntegrityError:
            raise Conflict(f"an identity with external_id {changes.get('external_id')!r} already exists") from None
        return self.get_identity(identity_id)

    def delete_identity(self, identity_id: str) -> list[int]:
        with self._tx() as db:
            if db.execute("SELECT 1 FROM identities WHERE id = ?", (identity_id,)).fetchone() is None:
                raise NotFound(f"no identity with id {identity_id!r}")
            face_ids = [r[0] for r in db.execute("SELECT id FROM faces WHERE identity_id = ?", (identity_id,))]
            db.execute("DELETE FROM faces WHERE identity_id = ?", (identity_id,))
            db.execute("DELETE FROM identities WHERE id = ?", (identity_id,))
            for face_id in face_ids:
                self._log(db, "face.delete", identity_id, face_id)
            self._log(db, "identity.delete", identity_id)
        return face_ids

    # -- faces ----------------------------------------------------------------------------------

    def add_faces(self, identity_id: str, faces: Sequence[NewFace]) -> list[Face]:
        out = []
        with self._tx() as db:
            if db.execute("SELECT 1 FROM identities WHERE id = ?", (identity_id,)).fetchone() is None:
                raise NotFound(f"no identity with id {identity_id!r}")
            for face in faces:
                vector = np.ascontiguousarray(face.embedding, dtype=np.float32).reshape(-1)
                now = utc_now()
                cur = db.execute(
                    "INSERT INTO faces (identity_id, embedding, dim, model_name, model_version, created, crop, box, "
                    "quality) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (identity_id, vector.tobytes(), int(vector.size), face.model.name, face.model.version, now,
                     face.crop, json.dumps(face.box) if face.box is not None else None, json.dumps(face.quality)))
                face_id = int(cur.lastrowid)
                self._log(db, "face.add", identity_id, face_id)
                out.append(Face(face_id, identity_id, face.model, int(vector.size), now, face.crop is not None,
                                face.box, dict(face.quality)))
            db.execute("UPDATE identities SET updated = ? WHERE id = ?", (utc_now(), identity_id))
        return out

    def list_faces(self, identity_id: str) -> list[Face]:
        self.get_identity(identity_id)
        return [self._face(r) for r in self._read(self._FACE_COLUMNS + " WHERE identity_id = ? ORDER BY id",
                                                  (identity_id,))]

    def delete_face(self, identity_id: str, face_id: int) -> None:
        with self._tx() as db:
            cur = db.execute("DELETE FROM faces WHERE id = ? AND identity_id = ?", (face_id, identity_id))
            if cur.rowcount == 0:
                raise NotFound(f"identity {identity_id!r} has no face {face_id}")
            self._log(db, "face.delete", identity_id, face_id)

    def face_embeddings(self, identity_id: str, model: ModelKey) -> np.ndarray:
        rows = self._read("SELECT embedding FROM faces WHERE identity_id = ? AND model_name = ? AND model_version = ?",
                          (identity_id, model.name, model.version))
        if not rows:
            return np.zeros((0, 0), np.float32)
        return np.stack([np.frombuffer(r[0], dtype=np.float32) for r in rows])

    def load_embeddings(self, model: ModelKey, dim: int) -> tuple[np.ndarray, list[str], np.ndarray]:
        with self._lock:
            cur = self._db.execute("SELECT id, identity_id, embedding FROM faces WHERE model_name = ? AND "
                                   "model_version = ? AND dim = ? ORDER BY id", (model.name, model.version, dim))
            ids: list[int] = []
            identities: list[str] = []
            chunks: list[bytes] = []
            for face_id, identity_id, blob in cur:
                ids.append(face_id)
                identities.append(identity_id)
                chunks.append(blob)
        matrix = np.frombuffer(b"".join(chunks), dtype=np.float32).reshape(len(ids), dim) if ids else \
            np.zeros((0, dim), np.float32)
        return np.asarray(ids, dtype=np.int64), identities, matrix

    def count_faces_by_model(self) -> dict[ModelKey, int]:
        rows = self._read("SELECT model_name, model_version, COUNT(*) FROM faces GROUP BY model_name, model_version")
        return {ModelKey(r[0], r[1]): r[2] for r in rows}

    def faces_to_reembed(self, model: ModelKey) -> Iterator[tuple[int, bytes]]:
        rows = self._read("SELECT id FROM faces WHERE crop IS NOT NULL AND NOT (model_name = ? AND model_version = ?) "
                          "ORDER BY id", (model.name, model.version))
        for (face_id,) in rows:
            found = self._read("SELECT crop FROM faces WHERE id = ?", (face_id,))
            if found:
                yield face_id, found[0][0]

    def replace_embeddings(self, items: Sequence[tuple[int, np.ndarray]], model: ModelKey) -> int:
        done = 0
        with self._tx() as db:
            for face_id, vector in items:
                vector = np.ascontiguousarray(vector, dtype=np.float32).reshape(-1)
                cur = db.execute("UPDATE faces SET embedding = ?, dim = ?, model_name = ?, model_version = ? "
                                 "WHERE id = ?", (vector.tobytes(), int(vector.size), model.name, model.version,
                                                  face_id))
                if cur.rowcount:
                    identity = db.execute("SELECT identity_id FROM faces WHERE id = ?", (face_id,)).fetchone()[0]
                    self._log(db, "face.reembed", identity, face_id)
                    done += 1
        return done

    # -- change log -----------------------------------------------------------------------------

    def changes_since(self, seq: int, limit: int = 1000) -> list[Change]:
        rows = self._read("SELECT seq, op, identity_id, face_id, at FROM changes WHERE seq > ? ORDER BY seq LIMIT ?",
                          (seq, limit))
        return [Change(*r) for r in rows]

    def last_seq(self) -> int:
        return int(self._read("SELECT COALESCE(MAX(seq), 0) FROM changes")[0][0])

    # -- API keys -------------------------------------------------------------------------------

    def add_key(self, key_id: str, key_hash: str, name: str, scopes: Sequence[str]) -> ApiKey:
        now = utc_now()
        with self._tx() as db:
            db.execute("INSERT INTO api_keys (id, hash, name, scopes, created) VALUES (?, ?, ?, ?, ?)",
                       (key_id, key_hash, name, json.dumps(list(scopes)), now))
        return ApiKey(key_id, name, tuple(scopes), now, None)

    def find_key(self, key_id: str) -> tuple[ApiKey, str] | None:
        rows = self._read("SELECT id, name, scopes, created, revoked, hash FROM api_keys WHERE id = ?", (key_id,))
        return (self._key(rows[0][:5]), rows[0][5]) if rows else None

    def list_keys(self) -> list[ApiKey]:
        return [self._key(r) for r in self._read("SELECT id, name, scopes, created, revoked FROM api_keys ORDER BY created")]

    def revoke_key(self, key_id: str) -> ApiKey:
        with self._tx() as db:
            cur = db.execute("UPDATE api_keys SET revoked = ? WHERE id = ? AND revoked IS NULL", (utc_now(), key_id))
            if cur.rowcount == 0 and db.execute("SELECT 1 FROM api_keys WHERE id = ?", (key_id,)).fetchone() is None:
                raise NotFound(f"no API key {key_id!r}")
        found = self.find_key(key_id)
        assert found is not None
        return found[0]

    def check(self) -> None:
        self._read("SELECT 1")

    def close(self) -> None:
        with self._lock:
            self._db.close()
