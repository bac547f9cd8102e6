"""The default gallery store: one SQLite file, for one gateway process.

WAL mode with ``synchronous=FULL``: a write the caller saw acknowledged is on disk, and survives a
crash of the process (kill -9) or of the machine. Faces get ``INTEGER PRIMARY KEY AUTOINCREMENT``
ids, which SQLite never reuses. Each write is one ``BEGIN IMMEDIATE`` transaction: it takes SQLite's
write lock at once, so writers (other processes included, e.g. ``cdface gallery reembed``) queue
instead of failing half-way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from cdface.serving.store.sql import SqlStore

POLL_S = 0.1  # how often wait_for_change reads the change log

log = logging.getLogger("cdface.serving.store")


def _lower(text: str | None) -> str | None:
    return text.lower() if text is not None else None


class SQLiteStore(SqlStore):
    """One SQLite file, WAL, FULL sync, one connection shared under a lock."""

    serial_key = "INTEGER PRIMARY KEY AUTOINCREMENT"
    blob = "BLOB"
    int64 = "INTEGER"
    unique_violation = sqlite3.IntegrityError
    driver_error = sqlite3.DatabaseError
    lower = "cdface_lower"  # SQLite's own LOWER folds ASCII only; this one is Python's str.lower

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        super().__init__()

    @property
    def where(self) -> str:
        return str(self.path)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=30.0)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # acknowledged = on disk, even across power loss
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("PRAGMA busy_timeout=30000")
        # Deleted rows are overwritten with zeros, in the file and in freed pages: a delete erases.
        db.execute("PRAGMA secure_delete=ON")
        db.create_function("cdface_lower", 1, _lower, deterministic=True)
        return db

    @contextlib.contextmanager
    def _begin(self, db: sqlite3.Connection, lock: str) -> Iterator[None]:
        db.execute("BEGIN IMMEDIATE")  # SQLite's one write lock serves every ``lock``
        try:
            yield
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _insert(self, db: sqlite3.Connection, sql: str, args: tuple, key: str) -> int:
        return int(self._run(db, sql, args).lastrowid)  # ``key`` is the rowid: INTEGER PRIMARY KEY

    def _in(self, column: str, values: Sequence[Any]) -> tuple[str, tuple]:
        return f"{column} IN ({', '.join('?' * len(values))})", tuple(values)

    def _has_table(self, db: sqlite3.Connection, name: str) -> bool:
        return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() \
            is not None

    def _create_schema(self) -> None:
        # A migration rebuilds ``identities``; with foreign keys on, dropping the old table would delete
        # every face through ON DELETE CASCADE. The pragma is a no-op inside a transaction, hence here.
        self._db.execute("PRAGMA foreign_keys=OFF")
        try:
            super()._create_schema()
        finally:
            self._db.execute("PRAGMA foreign_keys=ON")

    def _migrate_identities(self, db: sqlite3.Connection) -> None:
        # SQLite cannot drop a column's UNIQUE constraint: rebuild the table (SQLite's documented
        # twelve-step procedure), keeping every row; faces refer to the table by name, so they follow.
        db.execute("""CREATE TABLE identities_v2 (id TEXT PRIMARY KEY, tenant TEXT NOT NULL DEFAULT 'default',
                      external_id TEXT, name TEXT, metadata TEXT NOT NULL DEFAULT '{}', created TEXT NOT NULL,
                      updated TEXT NOT NULL)""")
        db.execute("INSERT INTO identities_v2 (id, external_id, name, metadata, created, updated) "
                   "SELECT id, external_id, name, metadata, created, updated FROM identities")
        db.execute("DROP TABLE identities")
        db.execute("ALTER TABLE identities_v2 RENAME TO identities")
        broken = db.execute("PRAGMA foreign_key_check").fetchall()
        if broken:  # would mean faces without their identity: refuse rather than commit that
            raise sqlite3.IntegrityError(f"foreign key check failed after the migration: {broken[:3]}")

    # -- erasure --------------------------------------------------------------------------------
    # secure_delete zeroes a deleted row in the page it leaves, but the WAL still holds the page images
    # of earlier writes (the enrolment itself) until a checkpoint: after a delete, copy the WAL into
    # the file and truncate it to zero bytes, after the commit (a checkpoint cannot run inside one).

    def delete_face(self, *args: Any, **kwargs: Any) -> None:
        super().delete_face(*args, **kwargs)
        self._after_erase()

    def delete_identity(self, *args: Any, **kwargs: Any) -> list[int]:
        deleted = super().delete_identity(*args, **kwargs)
        self._after_erase()
        return deleted

    def _after_erase(self) -> None:
        with self._lock:
            busy = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        if busy:  # another process held a read transaction past busy_timeout: the next erase retries
            log.warning("gallery %s: WAL checkpoint after a delete was blocked by a reader; deleted rows may "
                        "stay in the WAL file until the next checkpoint", self.path)

    def vacuum(self) -> None:
        with self._lock:
            self._db.execute("VACUUM")
        self._after_erase()

    def wait_for_change(self, timeout: float) -> bool:
        """Poll the change log (SQLite has no notifications); True as soon as it grew."""
        seen, deadline = self.last_seq(), time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(POLL_S, left))
            if self.last_seq() != seen:
                return True
        return False
