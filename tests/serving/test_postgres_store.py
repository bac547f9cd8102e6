"""PostgresStore: the same behaviours as SQLiteStore, on a real PostgreSQL server.

Each behaviour runs against both stores, so the two cannot drift apart.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from cdface.serving.store import Conflict, ModelKey, NewFace, NotFound

from .conftest import vec

M1, M2 = ModelKey("face", 1), ModelKey("face", 2)


def test_identities_crud(store):
    a = store.create_identity("ext-a", "Ada", {"team": "x"})
    b = store.create_identity(None, None, {})
    assert store.get_identity(a.id) == a
    with pytest.raises(Conflict):
        store.create_identity("ext-a", "again", {})
    updated = store.update_identity(a.id, {"name": "Ada L", "metadata": {"k": 1}})
    assert (updated.name, updated.metadata, updated.external_id) == ("Ada L", {"k": 1}, "ext-a")
    with pytest.raises(Conflict):
        store.update_identity(b.id, {"external_id": "ext-a"})
    assert [i.id for i in store.list_identities(10)] == sorted([a.id, b.id])
    first = store.list_identities(1)
    assert [i.id for i in store.list_identities(10, after=first[0].id)] == sorted([a.id, b.id])[1:]
    assert set(store.identities_by_id([a.id, b.id, "idt_missing"])) == {a.id, b.id}
    assert store.delete_identity(b.id) == []
    with pytest.raises(NotFound):
        store.get_identity(b.id)
    with pytest.raises(NotFound):
        store.delete_identity(b.id)


def test_faces_and_models(store):
    a = store.create_identity(None, "A", {})
    faces = store.add_faces(a.id, [NewFace(vec(1), M1, b"png", [1.0, 2.0, 3.0, 4.0], {"score": 0.9}),
                                   NewFace(vec(2), M1), NewFace(vec(3), M2, b"png2")])
    assert [f.id for f in faces] == sorted(f.id for f in faces)
    assert store.list_faces(a.id) == faces
    assert store.get_identity(a.id).face_count == 3
    ids, owners, tenants, matrix = store.load_embeddings(M1, 8)
    assert ids.tolist() == [faces[0].id, faces[1].id] and owners == [a.id, a.id] and tenants == ["default"] * 2
    np.testing.assert_array_equal(matrix, np.stack([vec(1), vec(2)]))
    np.testing.assert_array_equal(store.face_embeddings(a.id, M2), vec(3)[None])
    assert store.count_faces_by_model() == {M1: 2, M2: 1}
    assert list(store.faces_to_reembed(M2)) == [(faces[0].id, b"png")]
    assert store.add_embeddings([(faces[0].id, vec(9))], M2) == 1
    assert store.count_faces_by_model() == {M1: 2, M2: 2}  # side by side: face 0 keeps its M1 embedding
    store.delete_face(a.id, faces[1].id)
    with pytest.raises(NotFound):
        store.delete_face(a.id, faces[1].id)
    with pytest.raises(NotFound):
        store.add_faces("idt_missing", [NewFace(vec(4), M1)])
    assert sorted(store.delete_identity(a.id)) == [faces[0].id, faces[2].id]
    assert store.count_faces_by_model() == {}


def test_change_log_order(store):
    assert store.last_seq() == 0
    a = store.create_identity(None, None, {})
    f1, f2 = store.add_faces(a.id, [NewFace(vec(1), M1), NewFace(vec(2), M1)])
    store.delete_face(a.id, f1.id)
    store.update_identity(a.id, {"name": "n"})
    store.delete_identity(a.id)
    log = store.changes_since(0)
    assert [(c.op, c.face_id) for c in log] == [
        ("identity.create", None), ("face.add", f1.id), ("face.add", f2.id), ("face.delete", f1.id),
        ("identity.update", None), ("face.delete", f2.id), ("identity.delete", None)]
    seqs = [c.seq for c in log]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs) and store.last_seq() == seqs[-1]
    assert store.changes_since(seqs[2], limit=2) == log[3:5]


def test_api_keys(store):
    store.add_key("k1", "hash1", "one", ["admin"])
    with pytest.raises(Conflict if type(store).__name__ == "PostgresStore" else Exception):
        store.add_key("k1", "hash2", "dup", ["embed"])
    record, stored = store.find_key("k1")
    assert (record.name, record.scopes, stored, record.revoked) == ("one", ("admin",), "hash1", None)
    assert store.revoke_key("k1").revoked is not None
    with pytest.raises(NotFound):
        store.revoke_key("nope")
    assert store.find_key("nope") is None and [k.id for k in store.list_keys()] == ["k1"]


def test_postgres_enrolment_is_one_transaction(postgres_url):
    from cdface.serving.store.postgres import PostgresStore

    store = PostgresStore(postgres_url)
    a = store.create_identity(None, None, {})
    before = store.last_seq()
    with pytest.raises(Exception):  # the second face is not a vector of numbers: the whole enrolment fails
        store.add_faces(a.id, [NewFace(vec(1), M1), NewFace(np.array(["x"]), M1)])
    assert store.list_faces(a.id) == [] and store.last_seq() == before
    store.close()


def test_postgres_concurrent_writers_commit_in_seq_order(postgres_url):
    """Readers following by seq must never skip a change: seq order is commit order across connections."""
    from cdface.serving.store.postgres import PostgresStore

    stores = [PostgresStore(postgres_url) for _ in range(4)]
    follower = PostgresStore(postgres_url)
    seen: list[int] = []
    done = threading.Event()

    def follow():
        last = 0
        while not done.is_set() or follower.last_seq() > last:
            for change in follower.changes_since(last):
                seen.append(change.seq)
                last = change.seq

    def write(s):
        for i in range(25):
            ident = s.create_identity(None, None, {})
            s.add_faces(ident.id, [NewFace(vec(i), M1)])

    reader = threading.Thread(target=follow)
    reader.start()
    writers = [threading.Thread(target=write, args=(s,)) for s in stores]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    done.set()
    reader.join()
    everything = [c.seq for c in follower.changes_since(0, limit=10_000)]
    assert len(everything) == 4 * 25 * 2 and seen == everything  # nothing skipped, nothing twice
    for s in stores + [follower]:
        s.close()


def test_postgres_notifies_on_commit(postgres_url):
    from cdface.serving.store.postgres import PostgresStore

    store, other = PostgresStore(postgres_url), PostgresStore(postgres_url)
    assert other.wait_for_change(0.2) is False  # listening now; nothing written yet
    store.create_identity(None, None, {})
    assert other.wait_for_change(5.0) is True
    store.close()
    other.close()


def test_cli_keys_and_gallery_take_a_database_url(postgres_url):
    import json
    import subprocess
    import sys

    from cdface.serving.auth import verify_key
    from cdface.serving.store.postgres import PostgresStore

    def cli(*args):
        out = subprocess.run([sys.executable, "-m", "cdface.serving.cli", *args, "--database-url", postgres_url],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout

    key = cli("keys", "create", "--name", "ops", "--scope", "admin").strip()
    store = PostgresStore(postgres_url)
    record = verify_key(store, key, None)
    assert record is not None and record.scopes == ("admin",)
    assert record.id in cli("keys", "list")
    assert json.loads(cli("gallery", "status")) == {"faces_total": 0, "faces_by_model": {}, "active": None,
                                                    "candidate": None, "previous": None, "promoted": None,
                                                    "last_change": 0}
    cli("keys", "revoke", record.id)
    assert verify_key(store, key, None) is None
    store.close()


# The change feed every store offers (what replicas follow).


def test_every_store_is_followed_since_other_processes_write_to_it(store):
    assert store.shared  # PostgreSQL: replicas; SQLite: the command line (expire, reembed) beside the gateway


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
    ids, owners, tenants, matrix = store.embeddings_of([f3.id, f2.id, f1.id, 10**9], M1, 8)
    assert ids.tolist() == [f1.id, f3.id] and owners == [a.id, a.id]  # face id order; M2's face and a gone one left out
    np.testing.assert_array_equal(matrix, np.stack([vec(1), vec(3)]))
    assert tenants == ["default", "default"]
    ids, owners, tenants, matrix = store.embeddings_of([], M1, 8)
    assert ids.size == 0 and owners == [] and tenants == [] and matrix.shape == (0, 8)
