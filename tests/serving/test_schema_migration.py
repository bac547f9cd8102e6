"""A gallery written by an older cdface (schema version 1) opens in this one with every row kept.

Version 1's tables are created here from their DDL as it shipped (the real older format), filled,
and then opened with today's store, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from cdface.core.errors import CdfaceError
from cdface.serving.store import ModelKey, SQLiteStore
from tests.serving.conftest import vec

# Version 1's schema, as cdface 0.x created it ($-placeholders per database).
V1_SCHEMA = """
CREATE TABLE identities (id TEXT PRIMARY KEY, external_id TEXT UNIQUE, name TEXT,
    metadata TEXT NOT NULL DEFAULT '{}', created TEXT NOT NULL, updated TEXT NOT NULL);
CREATE TABLE faces (id $serial, identity_id TEXT NOT NULL REFERENCES identities(id) ON DELETE CASCADE,
    embedding $blob NOT NULL, dim INTEGER NOT NULL, model_name TEXT NOT NULL, model_version INTEGER NOT NULL,
    created TEXT NOT NULL, crop $blob, box TEXT, quality TEXT NOT NULL DEFAULT '{}');
CREATE INDEX faces_identity ON faces(identity_id);
CREATE INDEX faces_model ON faces(model_name, model_version);
CREATE TABLE changes (seq $serial, op TEXT NOT NULL, identity_id TEXT, face_id $int64, at TEXT NOT NULL);
CREATE TABLE api_keys (id TEXT PRIMARY KEY, hash TEXT NOT NULL, name TEXT NOT NULL, scopes TEXT NOT NULL,
    created TEXT NOT NULL, revoked TEXT);
CREATE TABLE audit_log (id $serial, at TEXT NOT NULL, key_id TEXT, action TEXT NOT NULL, identity_id TEXT,
    face_ids TEXT NOT NULL DEFAULT '[]', outcome TEXT NOT NULL DEFAULT '{}', request_id TEXT);
CREATE INDEX audit_log_at ON audit_log(at);
CREATE TABLE schema_version (version INTEGER NOT NULL);
INSERT INTO schema_version VALUES (1)
"""
NOW = "2026-11-01T10:00:00.000+00:00"
MODEL = ModelKey("sface", 1)


def _fill_v1(execute, blob) -> None:
    execute("INSERT INTO identities (id, external_id, name, metadata, created, updated) VALUES (?, ?, ?, ?, ?, ?)",
            ("idt_a", "emp-1", "Ada", json.dumps({"team": "x"}), NOW, NOW))
    for seed in (1, 2):
        execute("INSERT INTO faces (identity_id, embedding, dim, model_name, model_version, created, crop, quality) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", ("idt_a", blob(vec(seed).tobytes()), 8, MODEL.name, MODEL.version,
                                                    NOW, blob(b"\x89PNG-crop"), "{}"))
    execute("INSERT INTO changes (op, identity_id, face_id, at) VALUES (?, ?, ?, ?)", ("face.add", "idt_a", 1, NOW))
    execute("INSERT INTO api_keys (id, hash, name, scopes, created) VALUES (?, ?, ?, ?, ?)",
            ("k1", "h", "ops", json.dumps(["admin"]), NOW))
    execute("INSERT INTO audit_log (at, key_id, action, identity_id) VALUES (?, ?, ?, ?)", (NOW, "k1", "enroll", "idt_a"))


def _v1_sqlite(path) -> None:
    import sqlite3

    db = sqlite3.connect(str(path))
    db.executescript(V1_SCHEMA.replace("$serial", "INTEGER PRIMARY KEY AUTOINCREMENT").replace("$blob", "BLOB")
                     .replace("$int64", "INTEGER"))
    _fill_v1(lambda sql, args: db.execute(sql, args), lambda b: b)
    db.commit()
    db.close()


def _v1_postgres(url) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as db:
        for statement in V1_SCHEMA.replace("$serial", "BIGSERIAL PRIMARY KEY").replace("$blob", "BYTEA") \
                .replace("$int64", "BIGINT").split(";"):
            db.execute(statement)
        _fill_v1(lambda sql, args: db.execute(sql.replace("?", "%s"), args), lambda b: b)


@pytest.fixture(params=["sqlite", "postgres"])
def v1_store(request, tmp_path):
    """Today's store opened on a version-1 gallery (the migration runs as it opens)."""
    if request.param == "sqlite":
        _v1_sqlite(tmp_path / "old.db")
        store = SQLiteStore(tmp_path / "old.db")
    else:
        from cdface.serving.store.postgres import PostgresStore

        url = request.getfixturevalue("postgres_url")
        _v1_postgres(url)
        store = PostgresStore(url)
    yield store
    store.close()


def test_every_row_survives_the_migration(v1_store):
    identity = v1_store.get_identity("idt_a")
    assert (identity.external_id, identity.name, identity.metadata, identity.face_count) == \
        ("emp-1", "Ada", {"team": "x"}, 2)
    ids, owners, tenants, vectors = v1_store.load_embeddings(MODEL, 8)
    assert ids.tolist() == [1, 2] and owners == ["idt_a", "idt_a"] and tenants == ["default", "default"]
    np.testing.assert_array_equal(vectors, np.stack([vec(1), vec(2)]))
    assert v1_store.face_crop("idt_a", 1) == b"\x89PNG-crop"
    assert [c.op for c in v1_store.changes_since(0)] == ["face.add"]
    assert v1_store.find_key("k1")[0].scopes == ("admin",)
    assert [e.action for e in v1_store.audit_entries()] == ["enroll"]
    # New faces continue the old id sequence (ids are never reused).
    assert v1_store.add_faces("idt_a", [])  == []
    assert v1_store.last_seq() == 1


def test_migrated_gallery_keeps_its_constraints(v1_store):
    from cdface.serving.errors import Conflict

    with pytest.raises(Conflict):  # still unique within the tenant every version-1 row now belongs to
        v1_store.create_identity("emp-1", "Other", {})
    v1_store.delete_identity("idt_a")  # ON DELETE CASCADE still reaches the faces
    assert v1_store.count_faces_by_model() == {}


def test_reopening_a_migrated_gallery_changes_nothing(tmp_path):
    _v1_sqlite(tmp_path / "old.db")
    SQLiteStore(tmp_path / "old.db").close()
    again = SQLiteStore(tmp_path / "old.db")
    try:
        assert again.get_identity("idt_a").face_count == 2
    finally:
        again.close()


def test_a_newer_schema_is_refused(tmp_path):
    import sqlite3

    SQLiteStore(tmp_path / "new.db").close()
    db = sqlite3.connect(str(tmp_path / "new.db"))
    db.execute("UPDATE schema_version SET version = 99")
    db.commit()
    db.close()
    with pytest.raises(CdfaceError, match="schema version 99"):
        SQLiteStore(tmp_path / "new.db")
