"""A gallery written by an older cdface (schema version 1 or 2) opens in this one with every row kept.

Version 1's and 2's tables are created here from their DDL as it shipped (the real older formats),
filled, and then opened with today's store, on SQLite and on PostgreSQL: version 1 migrates 1 -> 2 -> 3,
version 2 migrates 2 -> 3 (each face's one embedding moves to face_embeddings, in one transaction).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest

from cdface.core.errors import CdfaceError
from cdface.serving.store import SCHEMA_VERSION, ModelKey, ModelState, NewFace, SQLiteStore, SqlStore

from .test_erasure import distinctive

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
# Version 2's schema, as cdface 1.x created it (tenants, last match times; one embedding per face).
V2_SCHEMA = """
CREATE TABLE identities (id TEXT PRIMARY KEY, tenant TEXT NOT NULL DEFAULT 'default', external_id TEXT, name TEXT,
    metadata TEXT NOT NULL DEFAULT '{}', created TEXT NOT NULL, updated TEXT NOT NULL);
CREATE TABLE faces (id $serial, identity_id TEXT NOT NULL REFERENCES identities(id) ON DELETE CASCADE,
    embedding $blob NOT NULL, dim INTEGER NOT NULL, model_name TEXT NOT NULL, model_version INTEGER NOT NULL,
    created TEXT NOT NULL, crop $blob, box TEXT, quality TEXT NOT NULL DEFAULT '{}', last_seen TEXT);
CREATE TABLE changes (seq $serial, op TEXT NOT NULL, identity_id TEXT, face_id $int64, at TEXT NOT NULL);
CREATE TABLE api_keys (id TEXT PRIMARY KEY, hash TEXT NOT NULL, name TEXT NOT NULL, scopes TEXT NOT NULL,
    created TEXT NOT NULL, revoked TEXT, tenant TEXT NOT NULL DEFAULT 'default');
CREATE TABLE audit_log (id $serial, at TEXT NOT NULL, key_id TEXT, action TEXT NOT NULL, identity_id TEXT,
    face_ids TEXT NOT NULL DEFAULT '[]', outcome TEXT NOT NULL DEFAULT '{}', request_id TEXT, tenant TEXT);
CREATE TABLE schema_version (version INTEGER NOT NULL);
INSERT INTO schema_version VALUES (2);
CREATE UNIQUE INDEX identities_tenant_external_id ON identities(tenant, external_id);
CREATE INDEX faces_identity ON faces(identity_id);
CREATE INDEX faces_model ON faces(model_name, model_version);
CREATE INDEX audit_log_at ON audit_log(at)
"""
NOW = "2026-11-01T10:00:00.000+00:00"
MODEL = ModelKey("sface", 1)
OTHER = ModelKey("face", 2)  # version 2 galleries: a face re-embedded in place by an older `gallery reembed`
DIM, OTHER_DIM = 128, 64  # 512 bytes per SFace embedding: long enough to be looked for in the raw files


def _faces(version: int) -> dict[int, tuple[ModelKey, np.ndarray]]:
    """The old gallery's faces: id -> (the model that made its one embedding, the embedding)."""
    faces = {1: (MODEL, distinctive(1)), 2: (MODEL, distinctive(2))}
    if version == 2:
        faces[3] = (OTHER, distinctive(3)[:OTHER_DIM].copy())
    return faces


def _fill(execute, blob, version: int) -> None:
    execute("INSERT INTO identities (id, external_id, name, metadata, created, updated) VALUES (?, ?, ?, ?, ?, ?)",
            ("idt_a", "emp-1", "Ada", json.dumps({"team": "x"}), NOW, NOW))
    for face_id, (model, embedding) in _faces(version).items():
        execute("INSERT INTO faces (identity_id, embedding, dim, model_name, model_version, created, crop, quality) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", ("idt_a", blob(embedding.tobytes()), embedding.size, model.name,
                                                    model.version, NOW, blob(b"\x89PNG-crop") if face_id < 3 else None,
                                                    "{}"))
    execute("INSERT INTO changes (op, identity_id, face_id, at) VALUES (?, ?, ?, ?)", ("face.add", "idt_a", 1, NOW))
    execute("INSERT INTO api_keys (id, hash, name, scopes, created) VALUES (?, ?, ?, ?, ?)",
            ("k1", "h", "ops", json.dumps(["admin"]), NOW))
    execute("INSERT INTO audit_log (at, key_id, action, identity_id) VALUES (?, ?, ?, ?)",
            (NOW, "k1", "enroll", "idt_a"))


def _ddl(version: int, serial: str, blob: str, int64: str) -> list[str]:
    schema = V1_SCHEMA if version == 1 else V2_SCHEMA
    return [s for s in schema.replace("$serial", serial).replace("$blob", blob).replace("$int64", int64).split(";")
            if s.strip()]


def _old_sqlite(path, version: int) -> None:
    import sqlite3

    db = sqlite3.connect(str(path))
    for statement in _ddl(version, "INTEGER PRIMARY KEY AUTOINCREMENT", "BLOB", "INTEGER"):
        db.execute(statement)
    _fill(lambda sql, args: db.execute(sql, args), lambda b: b, version)
    db.commit()
    db.close()


def _old_postgres(url, version: int) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as db:
        for statement in _ddl(version, "BIGSERIAL PRIMARY KEY", "BYTEA", "BIGINT"):
            db.execute(statement)
        _fill(lambda sql, args: db.execute(sql.replace("?", "%s"), args), lambda b: b, version)


@dataclass
class Old:
    store: SqlStore  # today's store, opened on the old gallery (the migration ran as it opened)
    version: int  # the gallery's schema version before


@pytest.fixture(params=[(1, "sqlite"), (1, "postgres"), (2, "sqlite"), (2, "postgres")],
                ids=["v1-sqlite", "v1-postgres", "v2-sqlite", "v2-postgres"])
def old(request, tmp_path):
    version, database = request.param
    if database == "sqlite":
        _old_sqlite(tmp_path / "old.db", version)
        store: SqlStore = SQLiteStore(tmp_path / "old.db")
    else:
        from cdface.serving.store.postgres import PostgresStore

        url = request.getfixturevalue("postgres_url")
        _old_postgres(url, version)
        store = PostgresStore(url)
    yield Old(store, version)
    store.close()


def _columns(store: SqlStore, table: str) -> set[str]:
    with store._lock:
        return {c[0] for c in store._run(store._connection(), f"SELECT * FROM {table} LIMIT 0").description}


def _embedding_rows(store: SqlStore) -> list[tuple[int, str, int]]:
    return [(int(r[0]), r[1], int(r[2])) for r in store._read("SELECT face_id, model_name, model_version FROM "
                                                               "face_embeddings ORDER BY face_id")]


def test_every_row_survives_the_migration(old):
    store, faces = old.store, _faces(old.version)
    identity = store.get_identity("idt_a")
    assert (identity.external_id, identity.name, identity.metadata, identity.face_count) == \
        ("emp-1", "Ada", {"team": "x"}, len(faces))
    # Every embedding moved to face_embeddings under the model that made it, bit for bit.
    for model in {m for m, _ in faces.values()}:
        mine = {i: e for i, (m, e) in faces.items() if m == model}
        ids, owners, tenants, vectors = store.load_embeddings(model, next(iter(mine.values())).size)
        assert ids.tolist() == sorted(mine) and owners == ["idt_a"] * len(mine) and tenants == ["default"] * len(mine)
        assert [v.tobytes() for v in vectors] == [mine[i].tobytes() for i in sorted(mine)]
    assert store.count_faces_by_model() == {m: sum(1 for k, _ in faces.values() if k == m) for m, _ in faces.values()}
    assert [(f.id, f.model, f.dim) for f in store.list_faces("idt_a")] == \
        [(i, m, e.size) for i, (m, e) in sorted(faces.items())]
    assert "embedding" not in _columns(store, "faces") and "dim" not in _columns(store, "faces")  # moved, not copied
    assert int(store._read("SELECT version FROM schema_version")[0][0]) == SCHEMA_VERSION == 3
    assert store.model_state() == ModelState()
    assert store.face_crop("idt_a", 1) == b"\x89PNG-crop"
    assert [c.op for c in store.changes_since(0)] == ["face.add"]
    assert store.find_key("k1")[0].scopes == ("admin",)
    assert [e.action for e in store.audit_entries()] == ["enroll"]
    # New faces continue the old id sequence (ids are never reused).
    assert store.add_faces("idt_a", []) == []
    (new,) = store.add_faces("idt_a", [NewFace(distinctive(9), MODEL)])
    assert new.id == max(faces) + 1
    assert store.last_seq() == 2


def test_migrated_gallery_keeps_its_constraints(old):
    from cdface.serving.errors import Conflict

    store = old.store
    with pytest.raises(Conflict):  # still unique within the tenant every version-1 row now belongs to
        store.create_identity("emp-1", "Other", {})
    store.delete_face("idt_a", 1)  # ON DELETE CASCADE reaches the moved embeddings
    assert [face for face, _, _ in _embedding_rows(store)] == sorted(set(_faces(old.version)) - {1})
    store.delete_identity("idt_a")  # and from identities through faces to their embeddings
    assert store.count_faces_by_model() == {} and _embedding_rows(store) == []


def test_a_face_deleted_after_the_migration_leaves_no_embedding_in_the_database_files(old):
    from .test_erasure import database_bytes, found

    store = old.store
    gone, kept = distinctive(1), distinctive(2)
    assert found(database_bytes(store), gone.tobytes()) > 0.8  # the control: the moved bytes are there to find
    store.delete_face("idt_a", 1)
    if not isinstance(store, SQLiteStore):
        store.vacuum()  # `cdface gallery vacuum`: PostgreSQL keeps dropped columns and deleted rows until then
    after = database_bytes(store)
    assert found(after, gone.tobytes()) == 0
    assert found(after, kept.tobytes()) > 0.8


def test_reopening_a_migrated_gallery_changes_nothing(tmp_path):
    _old_sqlite(tmp_path / "old.db", 1)
    SQLiteStore(tmp_path / "old.db").close()
    again = SQLiteStore(tmp_path / "old.db")
    try:
        assert again.get_identity("idt_a").face_count == 2
        assert [v.tobytes() for v in again.load_embeddings(MODEL, DIM)[3]] == \
            [distinctive(1).tobytes(), distinctive(2).tobytes()]
        assert len(_embedding_rows(again)) == 2
    finally:
        again.close()


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_a_failed_migration_leaves_the_gallery_as_it_was(database, request, tmp_path):
    """The migration is one transaction: when a step fails (here a stray table where face_embeddings goes), the
    gallery stays at version 2 with every embedding where it was."""
    stray = "CREATE TABLE face_embeddings (unrelated TEXT)"
    if database == "sqlite":
        import sqlite3

        _old_sqlite(tmp_path / "old.db", 2)
        with sqlite3.connect(tmp_path / "old.db") as db:
            db.execute(stray)
        with pytest.raises(CdfaceError, match="cannot open the gallery database"):
            SQLiteStore(tmp_path / "old.db")
        with sqlite3.connect(tmp_path / "old.db") as db:
            version = db.execute("SELECT version FROM schema_version").fetchone()[0]
            stored = [bytes(r[0]) for r in db.execute("SELECT embedding FROM faces ORDER BY id")]
    else:
        import psycopg

        from cdface.serving.store.postgres import PostgresStore

        url = request.getfixturevalue("postgres_url")
        _old_postgres(url, 2)
        with psycopg.connect(url, autocommit=True) as db:
            db.execute(stray)
        with pytest.raises(CdfaceError, match="cannot open the gallery database"):
            PostgresStore(url)
        with psycopg.connect(url, autocommit=True) as db:
            version = db.execute("SELECT version FROM schema_version").fetchone()[0]
            stored = [bytes(r[0]) for r in db.execute("SELECT embedding FROM faces ORDER BY id")]
    assert version == 2
    assert stored == [e.tobytes() for _, e in _faces(2).values()]
