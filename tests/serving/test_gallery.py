"""The gallery without a server: SQLite store of record, FAISS index derived from it, kept in step."""

from __future__ import annotations

import numpy as np
import pytest

from cdface.serving.gallery import Gallery
from cdface.serving.index import FaceIndex, IndexSpec
from cdface.serving.store import Conflict, ModelKey, NotFound, SQLiteStore

MODEL = ModelKey("sface", 1)
DIM = 16


def unit(rng, n, dim=DIM):
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture
def store(tmp_path):
    s = SQLiteStore(tmp_path / "gallery.db")
    yield s
    s.close()


def test_store_identities_crud_pagination_and_change_log(store):
    a = store.create_identity("ext-a", "A", {"team": 1})
    b = store.create_identity(None, None, {})
    with pytest.raises(Conflict):
        store.create_identity("ext-a", "again", {})
    assert store.get_identity(a.id).metadata == {"team": 1}
    first = store.list_identities(limit=1)
    rest = store.list_identities(limit=10, after=first[0].id)
    assert {i.id for i in first + rest} == {a.id, b.id}
    updated = store.update_identity(a.id, {"name": "A2", "metadata": {"x": [1, 2]}})
    assert updated.name == "A2" and updated.metadata == {"x": [1, 2]}
    with pytest.raises(Conflict):
        store.update_identity(b.id, {"external_id": "ext-a"})
    with pytest.raises(NotFound):
        store.get_identity("idt_nope")
    ops = [c.op for c in store.changes_since(0)]
    assert ops == ["identity.create", "identity.create", "identity.update"]
    seqs = [c.seq for c in store.changes_since(0)]
    assert seqs == sorted(seqs) and store.last_seq() == seqs[-1]


def test_face_ids_are_never_reused_and_deletes_cascade(store):
    rng = np.random.default_rng(0)
    a = store.create_identity(None, None, {})
    from cdface.serving.store import NewFace
    faces = store.add_faces(a.id, [NewFace(v, MODEL) for v in unit(rng, 3)])
    store.delete_face(a.id, faces[-1].id)
    again = store.add_faces(a.id, [NewFace(unit(rng, 1)[0], MODEL)])
    assert again[0].id > faces[-1].id
    deleted = store.delete_identity(a.id)
    assert sorted(deleted) == sorted([faces[0].id, faces[1].id, again[0].id])
    ids, _, _, vectors = store.load_embeddings(MODEL, DIM)
    assert len(ids) == 0 and vectors.shape == (0, DIM)


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_gallery_search_enroll_delete_and_rebuild(tmp_path, kind):
    rng = np.random.default_rng(1)
    store = SQLiteStore(tmp_path / "g.db")
    spec = IndexSpec(kind=kind, nlist=4, nprobe=4)
    gallery = Gallery(store, MODEL, DIM, spec)
    gallery.load()
    centres = unit(rng, 20)
    people = []
    for c in centres:
        ident = store.create_identity(None, None, {})
        samples = c + 0.05 * rng.standard_normal((10, DIM)).astype(np.float32)
        samples /= np.linalg.norm(samples, axis=1, keepdims=True)
        gallery.enroll(ident.id, samples, [None] * 10, [None] * 10, [{}] * 10)
        people.append(ident.id)
    gallery.load()  # enough vectors now to train IVF
    assert gallery.index_kind == kind
    hits = gallery.search(centres, top_k=3)
    assert [h[0].identity_id for h in hits] == people
    assert all(len(h) == 3 and h[0].similarity >= h[1].similarity for h in hits)
    # delete: gone from the very next search
    gone = people[5]
    gallery.delete_identity(gone)
    assert all(c.identity_id != gone for c in gallery.search(centres[5:6], top_k=20)[0])
    faces = store.list_faces(people[6])
    gallery.delete_face(people[6], faces[0].id)
    assert gallery.check()["consistent"]
    # another model's faces are never indexed
    other = Gallery(store, ModelKey("other", 1), DIM, spec)
    other.load()
    assert other.faces_indexed == 0 and other.status().faces_other_models == {str(MODEL): 189}
    assert other.status().faces_not_searchable == 189
    # rebuilt from the store equals the live index
    fresh = Gallery(SQLiteStore(tmp_path / "g.db"), MODEL, DIM, spec)
    fresh.load()
    np.testing.assert_array_equal(fresh.index_of().ids(), gallery.index_of().ids())
    assert fresh.check()["consistent"]


def test_index_on_an_empty_gallery_and_missing_gpu():
    index = FaceIndex(DIM, IndexSpec(gpu=True))  # no faiss-gpu here: falls back to the CPU
    scores, ids = index.search(np.zeros((2, DIM), np.float32), 5)
    assert ids.shape == (2, 5) and (ids == -1).all() and not index.on_gpu
