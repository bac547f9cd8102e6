"""The gallery store on PostgreSQL, for several gateway replicas sharing one database.

Same queries and behaviour as the SQLite store (``SqlStore``). What is specific:

- Every write is one transaction; multi-face enrolment commits all its faces or none.
- Every write takes one transaction-scoped advisory lock before it touches the change log. With
  BIGSERIAL alone, two concurrent transactions can commit out of ``seq`` order, and a replica that
  has applied seq 11 would never look back for seq 10; serialising writers makes ``seq`` order
  equal commit order, so "applied up to seq N" is a sound watermark. (Gallery writes are rare
  compared with searches; this costs nothing that matters.)
- ``NOTIFY cdface_changes`` is sent inside each write transaction; PostgreSQL delivers it on commit
  only, so a woken replica always finds the change. The notification is only a wake-up: replicas
  read the change log itself (``changes_since``), so a lost notification costs a poll interval.
- One connection shared under a lock (like SQLite), re-opened once if the server dropped it; the
  listener (``wait_for_change``) has a connection of its own.
- Creating the schema takes another advisory lock: replicas starting together must not race on
  ``CREATE TABLE IF NOT EXISTS``.

psycopg is imported here only, so a SQLite-only gateway never needs it.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import psycopg
from psycopg import errors as pg_errors

from cdface.serving.store.sql import SqlStore

CHANNEL = "cdface_changes"
_LOCKS = {
    "write": 0x63646661,  # advisory lock key ("cdfa"): serialises writers, see the module docstring
    "schema": 0x63646662,
}


class PostgresStore(SqlStore):
    placeholder = "%s"
    serial_key = "BIGSERIAL PRIMARY KEY"
    blob = "BYTEA"
    int64 = "BIGINT"
    byte_order = ' COLLATE "C"'  # byte order, as SQLite compares
    unique_violation = pg_errors.UniqueViolation
    driver_error = psycopg.Error

    def __init__(self, url: str, connect_timeout: float = 10.0) -> None:
        self.url = url
        self._timeout = connect_timeout
        self._listener: psycopg.Connection | None = None
        super().__init__()

    @property
    def where(self) -> str:
        """The URL without its password."""
        try:
            info = psycopg.conninfo.conninfo_to_dict(self.url)
        except psycopg.Error:
            return "(unparsable URL)"
        return f"postgresql://{info.get('user', '')}@{info.get('host', '')}:{info.get('port', 5432)}/" \
               f"{info.get('dbname', '')}"


    def _connect(self) -> psycopg.Connection:
        return psycopg.connect(self.url, autocommit=True, connect_timeout=int(self._timeout))

    def _connection(self) -> psycopg.Connection:
        if self._db.closed or self._db.broken:  # the server restarted or dropped us: reconnect once
            self._db = self._connect()
        return self._db

    @contextlib.contextmanager
    def _begin(self, db: psycopg.Connection, lock: str) -> Iterator[None]:
        with db.transaction():
            db.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCKS[lock],))
            yield

    def _insert(self, db: psycopg.Connection, sql: str, args: tuple, key: str) -> int:
        return int(self._run(db, f"{sql} RETURNING {key}", args).fetchone()[0])

    def _in(self, column: str, values: Sequence[Any]) -> tuple[str, tuple]:
        return f"{column} = ANY(?)", (list(values),)

    def _has_table(self, db: psycopg.Connection, name: str) -> bool:
        row = db.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()
        return bool(row and row[0])

    def _migrate_identities(self, db: psycopg.Connection) -> None:
        db.execute("ALTER TABLE identities ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default'")
        # Version 1's column-level UNIQUE, under PostgreSQL's default name; the per-tenant index replaces it.
        db.execute("ALTER TABLE identities DROP CONSTRAINT IF EXISTS identities_external_id_key")

    def vacuum(self) -> None:
        """VACUUM FULL faces, face_embeddings and identities (their TOAST tables too): new files without the
        deleted rows.

        A DELETE leaves the row in the table's file until VACUUM; plain VACUUM only marks the space free.
        So does the migration to schema 3 with the embeddings it moved out of ``faces`` (DROP COLUMN only
        hides them): run ``cdface gallery vacuum`` once after it.
        VACUUM FULL holds an ACCESS EXCLUSIVE lock on each table while it copies it: every request that reads
        or writes that table waits until it is done (seconds for a table of some 100,000 faces).
        """
        with self._lock:
            db = self._connection()  # autocommit: VACUUM cannot run in a transaction
            for table in ("faces", "face_embeddings", "identities"):
                db.execute(f"VACUUM FULL {table}")

    def _notify(self, db: psycopg.Connection, seq: int) -> None:
        db.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(seq)))  # delivered at commit, never before

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

    def close(self) -> None:
        self._close_listener()
        super().close()
