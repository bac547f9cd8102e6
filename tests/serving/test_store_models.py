"""Schema 3 on both databases: embeddings per (face, model) side by side, re-embedding pages, the model
pointer (compare-and-set), shadow-scoring totals and gateway heartbeats.

Every test runs on a real SQLite file and a real PostgreSQL database (the ``store`` fixture).
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from cdface.serving.store import Actor, Conflict, ModelKey, ModelState, NewFace, ShadowCounts, SQLiteStore, utc_iso

from .conftest import vec

A, B, C = ModelKey("face", 1), ModelKey("face", 2), ModelKey("other", 7)


def embedding_rows(store) -> dict[tuple[int, ModelKey], int]:
    """How many rows face_embeddings holds per (face, model), read straight from the table."""
    rows = store._read("SELECT face_id, model_name, model_version, COUNT(*) FROM face_embeddings "
                       "GROUP BY face_id, model_name, model_version")
    return {(int(r[0]), ModelKey(r[1], int(r[2]))): int(r[3]) for r in rows}


def test_a_face_holds_one_embedding_per_model_side_by_side(store):
    person = store.create_identity(None, None, {})
    # Enrolled while B is the candidate: both embeddings in the enrolment's transaction.
    both, only_a = store.add_faces(person.id, [NewFace(vec(1), A, b"crop-1", also=((B, vec(2, 16)),)),
                                               NewFace(vec(3), A, b"crop-3")])
    assert (both.model, both.dim) == (A, 8)  # the enrolling model, and its embedding's size
    np.testing.assert_array_equal(store.face_embeddings(person.id, A), np.stack([vec(1), vec(3)]))
    np.testing.assert_array_equal(store.face_embeddings(person.id, B), vec(2, 16)[None])
    ids, owners, _, matrix = store.load_embeddings(B, 16)
    assert ids.tolist() == [both.id] and owners == [person.id]
    np.testing.assert_array_equal(matrix, vec(2, 16)[None])
    assert store.embeddings_of([both.id, only_a.id], B, 16)[0].tolist() == [both.id]
    assert store.count_faces() == 2 and store.count_faces_by_model() == {A: 2, B: 1}
    assert [(c.op, c.face_id) for c in store.changes_since(0)][-2:] == [("face.add", both.id), ("face.add", only_a.id)]
    with pytest.raises(ValueError, match="one embedding per model"):
        NewFace(vec(4), A, also=((A, vec(5)),))


def test_add_embeddings_inserts_the_absent_ones_only_and_logs_each(store):
    person = store.create_identity(None, None, {})
    f1, f2, f3 = store.add_faces(person.id, [NewFace(vec(i), A, b"crop") for i in (1, 2, 3)])
    seq = store.last_seq()
    assert store.add_embeddings([(f1.id, vec(11)), (f2.id, vec(12)), (10**9, vec(13))], B) == 2  # 10**9: no face
    assert store.add_embeddings([(f1.id, vec(99)), (f2.id, vec(99)), (f3.id, vec(13))], B) == 1  # only f3 was absent
    np.testing.assert_array_equal(store.load_embeddings(B, 8)[3], np.stack([vec(11), vec(12), vec(13)]))  # kept
    np.testing.assert_array_equal(store.load_embeddings(A, 8)[3], np.stack([vec(1), vec(2), vec(3)]))  # untouched
    assert [(c.op, c.identity_id, c.face_id) for c in store.changes_since(seq)] == [
        ("face.embed", person.id, f1.id), ("face.embed", person.id, f2.id), ("face.embed", person.id, f3.id)]
    reembeds = [e for e in store.audit_entries() if e.action == "reembed"]
    assert [(e.outcome, e.tenant, e.identity_id) for e in reembeds] == [
        ({"model": "face:2", "faces": 2}, None, None), ({"model": "face:2", "faces": 1}, None, None)]
    assert set(embedding_rows(store).values()) == {1} and len(embedding_rows(store)) == 6


def test_deleting_a_face_or_identity_deletes_every_embedding_of_it(store):
    person = store.create_identity(None, None, {})
    other = store.create_identity(None, None, {})
    f1, f2 = store.add_faces(person.id, [NewFace(vec(1), A, also=((B, vec(2)),)), NewFace(vec(3), A)])
    (g,) = store.add_faces(other.id, [NewFace(vec(4), A, also=((B, vec(5)), (C, vec(6, 4))))])
    store.add_embeddings([(f2.id, vec(7))], C)
    store.delete_face(person.id, f1.id)
    assert {face for face, _ in embedding_rows(store)} == {f2.id, g.id}
    store.delete_identity(other.id)
    assert embedding_rows(store) == {(f2.id, A): 1, (f2.id, C): 1}
    assert store.count_faces_by_model() == {A: 1, C: 1}


def test_coverage_counts_and_reembed_pages(store):
    alpha = Actor(tenant="alpha")
    person = store.create_identity(None, None, {})
    in_alpha = store.create_identity(None, None, {}, alpha)
    faces = store.add_faces(person.id, [NewFace(vec(i), A, f"crop-{i}".encode()) for i in range(5)])
    bare = store.add_faces(person.id, [NewFace(vec(10), A)])[0]  # enrolled without its crop
    (alpha_face,) = store.add_faces(in_alpha.id, [NewFace(vec(11), A, b"crop-alpha")], alpha)
    store.add_embeddings([(faces[1].id, vec(21))], B)
    assert store.count_faces() == 7 and store.count_faces("alpha") == 1 and store.count_faces("nobody") == 0
    assert store.count_faces_by_model() == {A: 7, B: 1}
    assert store.count_faces_by_model("alpha") == {A: 1} and store.count_faces_by_model("default") == {A: 6, B: 1}
    assert store.faces_missing(B) == (5, 1) and store.faces_missing(A) == (0, 0)
    # Keyset pages by id: faces with a crop and without B's embedding (faces[1] has it, ``bare`` has no crop).
    wanted = [faces[0], faces[2], faces[3], faces[4], alpha_face]
    first = store.faces_to_reembed(B, limit=2)
    assert first == [(faces[0].id, b"crop-0"), (faces[2].id, b"crop-2")]
    second = store.faces_to_reembed(B, after=first[-1][0], limit=2)
    third = store.faces_to_reembed(B, after=second[-1][0], limit=2)
    assert [f for f, _ in first + second + third] == [f.id for f in wanted]
    assert store.faces_to_reembed(B, after=third[-1][0], limit=2) == []
    assert bare.id not in [f for f, _ in store.faces_to_reembed(B, limit=100)]
    store.add_embeddings([(f, vec(f + 100)) for f, _ in first + second + third], B)
    assert store.faces_missing(B) == (0, 1) and store.faces_to_reembed(B) == []
    assert store.count_faces_by_model()[B] == 6


def test_model_pointer_compare_and_set(store):
    assert store.model_state() == ModelState()
    seq = store.last_seq()
    started = store.set_model_state(A, None, None, action="model_activate")
    assert (started.active, started.candidate, started.previous) == (A, None, None)
    assert started.promoted == started.changed and started.changed is not None
    assert store.model_state() == started
    with_candidate = store.set_model_state(A, B, None, action="model_candidate", expect=started,
                                           actor=Actor("k_ops", "req-1"))
    assert with_candidate.promoted == started.promoted  # active did not change
    # A writer that read the pointer before the candidate was set loses: nothing changes.
    with pytest.raises(Conflict) as lost:
        store.set_model_state(C, None, A, action="model_promote", expect=started)
    assert lost.value.code == "model_state_changed"
    assert store.model_state() == with_candidate
    promoted = store.set_model_state(B, None, A, action="model_promote", expect=store.model_state())
    assert promoted.promoted is not None and promoted.promoted >= with_candidate.changed
    assert store.model_state() == promoted
    rolled = store.set_model_state(A, None, None, action="model_rollback", expect=promoted)
    assert store.model_state() == rolled and rolled.active == A
    with pytest.raises(ValueError, match="unknown model pointer action"):
        store.set_model_state(A, None, None, action="model_whatever")
    changes = store.changes_since(seq)
    assert [(c.op, c.identity_id, c.face_id) for c in changes] == [("model.switch", None, None)] * 4
    audit = [e for e in store.audit_entries() if e.action.startswith("model_")]
    assert [(e.action, e.outcome, e.tenant) for e in audit] == [
        ("model_activate", {"active": "face:1", "candidate": None, "previous": None}, None),
        ("model_candidate", {"active": "face:1", "candidate": "face:2", "previous": None}, None),
        ("model_promote", {"active": "face:2", "candidate": None, "previous": "face:1"}, None),
        ("model_rollback", {"active": "face:1", "candidate": None, "previous": None}, None)]
    assert (audit[1].key_id, audit[1].request_id) == ("k_ops", "req-1")


def test_the_model_pointer_is_shared_by_every_connection_to_the_gallery(store):
    """Two gateways (two connections) that read the same pointer and both try to move it: one wins."""
    seen = store.set_model_state(A, B, None, action="model_candidate")
    if isinstance(store, SQLiteStore):
        other = SQLiteStore(store.path)
    else:
        from cdface.serving.store.postgres import PostgresStore

        other = PostgresStore(store.url)
    try:
        assert other.model_state() == seen
        promoted = other.set_model_state(B, None, A, action="model_promote", expect=seen)
        with pytest.raises(Conflict) as lost:
            store.set_model_state(A, C, None, action="model_candidate", expect=seen)
        assert lost.value.code == "model_state_changed"
        assert store.model_state() == promoted
    finally:
        other.close()


def test_shadow_counts_accumulate_per_pair(store):
    assert store.shadow_counts(A, B) == ShadowCounts(0, 0, 0)
    store.add_shadow_counts(A, B, 10, 9, 8)  # one gateway's flush
    store.add_shadow_counts(A, B, 5, 5, 4)  # another's
    store.add_shadow_counts(A, C, 1, 0, 0)
    assert store.shadow_counts(A, B) == ShadowCounts(15, 14, 12)
    assert store.shadow_counts(A, C) == ShadowCounts(1, 0, 0) and store.shadow_counts(B, A) == ShadowCounts()


def test_heartbeats_report_the_models_in_use_since_a_time(store):
    def ago(seconds: float) -> str:
        return utc_iso(dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=seconds))

    store.report_models_in_use("gw-1", [A, B])
    store.report_models_in_use("gw-2", [A])
    assert store.models_in_use(ago(60)) == {A, B}
    store.report_models_in_use("gw-1", [B])  # gw-1 moved on from A: its newer report replaces the old one
    assert store.models_in_use(ago(60)) == {A, B}
    with store._transaction() as db:  # gw-2 went silent an hour ago
        store._run(db, "UPDATE gateway_heartbeats SET at = ? WHERE gateway_id = ?", (ago(3600), "gw-2"))
    assert store.models_in_use(ago(60)) == {B}
    assert store.models_in_use(ago(7200)) == {A, B}
    store.report_models_in_use("gw-3", [ModelKey("name:with:colons", 3)])
    assert ModelKey("name:with:colons", 3) in store.models_in_use(ago(60))


def test_model_refs_parse_as_name_and_version():
    from cdface.serving.errors import InvalidRequest

    assert ModelKey.parse("face:2") == B and ModelKey.parse("org:face:12") == ModelKey("org:face", 12)
    assert str(ModelKey.parse(str(C))) == "other:7"
    for bad in ("face", "face:", ":2", "face:0", "face:-1", "face:x"):
        with pytest.raises(InvalidRequest) as refused:
            ModelKey.parse(bad)
        assert refused.value.code == "invalid_model_ref" and "NAME:VERSION" in str(refused.value)
