"""The change feed every GalleryStore offers (what replicas follow), on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from cdface.serving.store import GalleryStore, ModelKey, NewFace, SQLiteStore

M1, M2 = ModelKey("face", 1), ModelKey("face", 2)


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s: GalleryStore = SQLiteStore(tmp_path / "g.db")
    else:
        from cdface.serving.store.postgres import PostgresStore

        s = PostgresStore(request.getfixturevalue("postgres_url"))
    yield s
    s.close()


def vec(seed: int, dim: int = 8) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def test_only_a_store_several_processes_write_is_shared(store):
    assert store.shared is (type(store).__name__ == "PostgresStore")


def test_wait_for_change_wakes_on_a_commit(store):
    a = store.create_identity(None, None, {})
    assert store.wait_for_change(0.05) is False  # nothing new (PostgreSQL: listening from now on)
    writer = threading.Timer(0.2, store.add_faces, (a.id, [NewFace(vec(1), M1)]))
    writer.start()
    try:
        assert store.wait_for_change(10.0) is True
    finally:
        writer.join()
    assert [c.op for c in store.changes_since(0)] == ["identity.create", "face.add"]


def test_embeddings_of_reads_just_the_faces_asked_for(store):
    a = store.create_identity(None, None, {})
    f1, f2, f3 = store.add_faces(a.id, [NewFace(vec(1), M1), NewFace(vec(2), M2), NewFace(vec(3), M1)])
    ids, owners, matrix = store.embeddings_of([f3.id, f2.id, f1.id, 10**9], M1, 8)
    assert ids.tolist() == [f1.id, f3.id] and owners == [a.id, a.id]  # face id order; M2's face and a gone one left out
    np.testing.assert_array_equal(matrix, np.stack([vec(1), vec(3)]))
    ids, owners, matrix = store.embeddings_of([], M1, 8)
    assert ids.size == 0 and owners == [] and matrix.shape == (0, 8)
