"""Every index kind (flat, ivf, hnsw, ivfpq) stays equal to the store under deletes and re-adds, never
returns a deleted face, and keeps recall@1 against exact search on clustered, face-like vectors."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from cdface.serving.gallery import Gallery
from cdface.serving.index import FaceIndex, IndexSpec
from cdface.serving.store import ModelKey, SQLiteStore

KINDS = ["flat", "ivf", "hnsw", "ivfpq"]
DIM = 64
MODEL = ModelKey("synthetic", 1)


def faces(rng: np.random.Generator, people: int, per_person: int, dim: int = DIM) -> np.ndarray:
    """Unit vectors in clusters of ``per_person``; same-person cosine about 0.5, as with a face model."""
    centres = rng.standard_normal((people, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    noise = rng.standard_normal((people * per_person, dim)).astype(np.float32) / np.sqrt(dim)
    out = np.repeat(centres, per_person, axis=0) + noise
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def spec(kind: str) -> IndexSpec:
    # Small lists so the IVF kinds train on a few thousand vectors; rebuild-triggering deletes for hnsw.
    return IndexSpec(kind, nlist=16, nprobe=16, pq_m=16, hnsw_m=16, hnsw_ef_search=64)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", KINDS)
def test_index_equals_the_expected_set_under_deletes_and_adds(kind):
    rng = np.random.default_rng(0)
    vectors = faces(rng, 300, 10)
    ids = np.arange(1, len(vectors) + 1, dtype=np.int64) * 7  # sparse ids, as the store's are after deletes
    index = FaceIndex(DIM, spec(kind))
    index.build(ids, vectors)
    assert index.kind == kind and index.fallback is None
    expected = set(ids.tolist())
    deleted: dict[int, np.ndarray] = {}
    # Two rounds of deletes: the second takes hnsw past its rebuild threshold.
    for share in (0.1, 0.2):
        gone = rng.choice(sorted(expected), int(share * len(ids)), replace=False)
        assert index.remove(gone) == len(gone)
        assert index.remove(gone) == 0  # removing again is a no-op
        expected -= set(gone.tolist())
        deleted.update({int(i): vectors[np.searchsorted(ids, i)] for i in gone})
        np.testing.assert_array_equal(index.ids(), sorted(expected))
        assert len(index) == len(expected)
    # new faces, and a deleted face back with a new vector (a re-embedding keeps the face id)
    fresh = faces(rng, 20, 5)
    fresh_ids = np.arange(100_000, 100_000 + len(fresh), dtype=np.int64)
    back = int(next(iter(deleted)))
    back_vector = fresh[:1] * -1.0
    index.add(fresh_ids, fresh)
    index.add(np.array([back], np.int64), back_vector)
    del deleted[back]
    expected |= set(fresh_ids.tolist()) | {back}
    np.testing.assert_array_equal(index.ids(), sorted(expected))
    assert len(index) == len(expected)
    # no search returns a deleted face, not even searched for by its own vector
    queries = np.stack(list(deleted.values()))
    _, found = index.search(queries, 50)
    assert not set(found.ravel().tolist()) & set(deleted)
    assert set(found.ravel().tolist()) - {-1} <= expected
    # the new faces and the re-embedded one are found by their vectors
    _, top = index.search(np.concatenate([fresh, back_vector]), 1)
    assert (top[:, 0] == np.concatenate([fresh_ids, [back]])).mean() >= 0.95
    # emptied: nothing is found
    index.remove(np.asarray(sorted(expected), np.int64))
    assert len(index) == 0 and len(index.ids()) == 0
    _, found = index.search(queries[:2], 5)
    assert (found == -1).all()


@pytest.mark.parametrize("kind", KINDS)
def test_gallery_index_equals_the_store_under_deletes(tmp_path, kind):
    """Through the store-backed gallery: built at load, then enrolments and deletes, check() stays consistent."""
    rng = np.random.default_rng(1)
    store = SQLiteStore(tmp_path / "g.db")
    gallery = Gallery(store, MODEL, DIM, spec(kind))
    centres = faces(rng, 80, 1)
    people = []
    for centre in centres:
        ident = store.create_identity(None, None, {})
        samples = centre + rng.standard_normal((10, DIM)).astype(np.float32) / np.sqrt(DIM)
        samples /= np.linalg.norm(samples, axis=1, keepdims=True)
        gallery.enroll(ident.id, samples, [None] * 10, [None] * 10, [{}] * 10)
        people.append(ident.id)
    gallery.load()  # 800 faces: enough to train 16 lists
    assert gallery.index_kind == kind
    for person in people[:30]:
        gallery.delete_identity(person)
    for person in people[30:50]:
        gallery.delete_face(person, store.list_faces(person)[0].id)
    assert gallery.check()["consistent"]
    more = store.create_identity(None, None, {})
    gallery.enroll(more.id, centres[:3], [None] * 3, [None] * 3, [{}] * 3)
    report = gallery.check()
    assert report["consistent"] and report["index_faces"] == 50 * 10 - 20 + 3
    hits = gallery.search(centres[:30], top_k=5)
    assert not {c.identity_id for row in hits for c in row} & set(people[:30])
    hits = gallery.search(centres[50:], top_k=1)
    assert [row[0].identity_id for row in hits] == people[50:]


def recall_at_1(kind: str, vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray, **params) -> float:
    index = FaceIndex(vectors.shape[1], IndexSpec(kind, **params))  # type: ignore[arg-type]
    index.build(np.arange(len(vectors), dtype=np.int64), vectors)
    assert index.kind == kind
    _, found = index.search(queries, 1)
    return float((found[:, 0] == truth).mean())


def test_recall_at_1_of_the_approximate_kinds_with_their_default_sizing():
    """Face-level recall@1 (the very face exact search ranks first) >= 0.99 with nlist/nprobe chosen from N."""
    rng = np.random.default_rng(2)
    dim = 128
    vectors = faces(rng, 2500, 10, dim)  # 25k: just enough for the IVF kinds' default 632 lists
    picked = rng.integers(0, 2500, 300)
    queries = vectors[picked * 10] + rng.standard_normal((300, dim)).astype(np.float32) / np.sqrt(dim)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exact = FaceIndex(dim)
    exact.build(np.arange(len(vectors), dtype=np.int64), vectors)
    truth = exact.search(queries, 1)[1][:, 0]
    assert recall_at_1("ivf", vectors, queries, truth) >= 0.99
    assert recall_at_1("hnsw", vectors, queries, truth) >= 0.99
    assert recall_at_1("ivfpq", vectors, queries, truth, pq_m=32) >= 0.99


def test_a_gallery_too_small_for_ivf_falls_back_to_exact_and_says_so(caplog):
    rng = np.random.default_rng(3)
    vectors = faces(rng, 100, 10)
    for kind in ("ivf", "ivfpq"):
        index = FaceIndex(DIM, IndexSpec(kind))  # type: ignore[arg-type]
        assert index.kind == "flat" and index.fallback  # empty: nothing to train on yet
        with caplog.at_level(logging.WARNING, logger="cdface.serving.index"):
            index.build(np.arange(len(vectors), dtype=np.int64), vectors)
        assert index.kind == "flat" and index.requested == kind
        assert "exact search" in index.fallback and "exact search" in caplog.text
        assert index.search(vectors[:1], 1)[1][0, 0] == 0
    # hnsw needs no training: it is used at any size
    index = FaceIndex(DIM, IndexSpec("hnsw"))
    index.build(np.arange(len(vectors), dtype=np.int64), vectors)
    assert index.kind == "hnsw" and index.fallback is None


def test_memory_per_face_of_the_compact_kinds():
    rng = np.random.default_rng(4)
    vectors = faces(rng, 300, 10)
    ids = np.arange(len(vectors), dtype=np.int64)
    sizes = {}
    for name, s in {"flat": IndexSpec(), "ivfpq": spec("ivfpq"),
                    "codes": IndexSpec("ivfpq", nlist=16, pq_m=16, pq_rerank=0)}.items():
        index = FaceIndex(DIM, s)
        index.build(ids, vectors)
        sizes[name] = index.memory_bytes() / len(ids)
    assert sizes["flat"] >= DIM * 4
    assert sizes["codes"] < sizes["ivfpq"] < sizes["flat"]  # float16 copies for re-ranking, half of flat
    assert sizes["codes"] < DIM * 4 / 4


def test_ivfpq_without_reranking_still_never_returns_a_deleted_face():
    rng = np.random.default_rng(5)
    vectors = faces(rng, 200, 10)
    ids = np.arange(len(vectors), dtype=np.int64)
    index = FaceIndex(DIM, IndexSpec("ivfpq", nlist=16, nprobe=16, pq_m=16, pq_rerank=0))
    index.build(ids, vectors)
    index.remove(ids[::3])
    _, found = index.search(vectors[::3], 20)
    assert not set(found.ravel().tolist()) & set(ids[::3].tolist())
    np.testing.assert_array_equal(index.ids(), np.setdiff1d(ids, ids[::3]))
    with pytest.raises(RuntimeError):
        index.reconstruct(1)
