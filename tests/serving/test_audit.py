"""The append-only audit log: one row per acknowledged write (in the write's own transaction) and per
search, with the acting key's id and the identity ids involved; never a name, an image or an embedding.

Store level on both SQLite and PostgreSQL; end to end through a real gateway (real Triton, SFace) on
real photos; ``cdface audit export`` / ``prune`` as real processes.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cdface.serving.store import Actor, AuditEntry, Conflict, ModelKey, NewFace, NotFound, SQLiteStore, utc_now

from .conftest import REPO_ROOT, b64, start_gateway, vec

M1 = ModelKey("face", 1)
ALICE = Actor("k_alice")


def rows(store) -> list[AuditEntry]:
    return store.audit_entries(0, 10_000)


def test_every_committed_write_has_exactly_one_row_in_order(store):
    a = store.create_identity("ext-a", "Ada Lovelace", {"team": "x"}, ALICE)
    faces = store.add_faces(a.id, [NewFace(vec(1), M1, b"png"), NewFace(vec(2), M1)], ALICE)
    store.update_identity(a.id, {"name": "Ada L"}, Actor("k_bob"))
    store.add_embeddings([(faces[0].id, vec(3))], ModelKey("face", 2))
    store.delete_face(a.id, faces[1].id, ALICE)
    created, _ = store.create_identity_with_faces(None, "Grace", {}, [NewFace(vec(4), M1)], ALICE)
    deleted = store.delete_identity(created.id, ALICE)

    log = rows(store)
    assert [(r.action, r.key_id, r.identity_id) for r in log] == [
        ("create_identity", "k_alice", a.id), ("enroll", "k_alice", a.id), ("update_identity", "k_bob", a.id),
        ("reembed", None, None), ("delete_face", "k_alice", a.id), ("create_identity", "k_alice", created.id),
        ("delete_identity", "k_alice", created.id)]
    assert log[1].face_ids == [f.id for f in faces] and log[1].outcome == {"faces": 2}
    assert log[2].outcome == {"fields": ["name"]}  # which fields changed, not their values
    assert log[3].outcome == {"faces": 1, "model": "face:2"}
    assert log[4].face_ids == [faces[1].id]
    assert log[6].face_ids == deleted and len(deleted) == 1
    assert [r.id for r in log] == sorted(r.id for r in log) and all(r.at.endswith("+00:00") for r in log)
    assert all(r.request_id is None for r in log)
    text = json.dumps([r.__dict__ for r in log])
    assert "Ada" not in text and "Grace" not in text and "team" not in text  # names and metadata are personal data


def test_refused_writes_leave_no_row(store):
    a = store.create_identity("ext-a", None, {}, ALICE)
    before = rows(store)
    with pytest.raises(Conflict):
        store.create_identity("ext-a", None, {}, ALICE)  # rolled back by the unique constraint
    with pytest.raises(Conflict):
        store.create_identity_with_faces("ext-a", None, {}, [NewFace(vec(1), M1)], ALICE)
    with pytest.raises(NotFound):
        store.add_faces("idt_missing", [NewFace(vec(1), M1)], ALICE)
    with pytest.raises(NotFound):
        store.delete_face(a.id, 999_999, ALICE)
    with pytest.raises(NotFound):
        store.delete_identity("idt_missing", ALICE)
    assert rows(store) == before and len(before) == 1


def test_searches_append_and_export_pages_and_time_windows(store):
    for i in range(5):
        store.append_audit(Actor(f"k{i}"), "identify", None, (), {"faces": 1, "top1": [None], "match": [False]})
    page1 = store.audit_entries(0, 2)
    page2 = store.audit_entries(page1[-1].id, 2)
    page3 = store.audit_entries(page2[-1].id, 2)
    assert [r.key_id for r in page1 + page2 + page3] == ["k0", "k1", "k2", "k3", "k4"]
    assert store.audit_entries(page3[-1].id, 2) == []
    first, last = page1[0].at, page3[-1].at
    assert len(store.audit_entries(0, 100, since=first)) == 5
    assert store.audit_entries(0, 100, until=first) == []
    assert [r.key_id for r in store.audit_entries(0, 100, since=last)][-1] == "k4"


def _tick_past(moment: str) -> str:
    """The store's clock once it reads later than ``moment`` (times have millisecond resolution)."""
    while (now := utc_now()) <= moment:
        pass
    return now


def test_prune_deletes_only_rows_older_than_the_cutoff(store):
    store.append_audit(ALICE, "verify", "idt_x", (), {"match": True})
    old = rows(store)[0]
    cutoff = _tick_past(old.at)
    store.append_audit(ALICE, "verify", "idt_y", (), {"match": False})
    assert store.prune_audit(old.at) == 0  # strictly older only
    assert store.prune_audit(cutoff) == 1
    assert [(r.identity_id, r.outcome) for r in rows(store)] == [("idt_y", {"match": False})]


# -- the command line ---------------------------------------------------------------------------------


def _cdface(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cdface.cli", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)


def test_cli_export_prune_and_bad_input(tmp_path):
    db = tmp_path / "g.db"
    s = SQLiteStore(db)
    a = s.create_identity(None, "Ada", {}, ALICE)
    _tick_past(rows(s)[0].at)  # the two rows at different times, for --until
    s.append_audit(Actor("k_bob"), "identify", None, (), {"faces": 1, "top1": [a.id], "match": [True]})
    s.close()

    out = tmp_path / "audit" / "export.jsonl"
    done = _cdface("audit", "export", "--db", str(db), "--out", str(out))
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["action"], r["key_id"], r["identity_id"]) for r in lines] == [
        ("create_identity", "k_alice", a.id), ("identify", "k_bob", None)]
    assert lines[1]["outcome"] == {"faces": 1, "top1": [a.id], "match": [True]}
    assert "exported 2 audit rows" in done.stderr

    to_stdout = _cdface("audit", "export", "--db", str(db), "--since", "2000-01-01", "--until", lines[1]["at"])
    assert to_stdout.returncode == 0, to_stdout.stderr
    assert [json.loads(line)["action"] for line in to_stdout.stdout.splitlines()] == ["create_identity"]

    bad = _cdface("audit", "export", "--db", str(db), "--since", "last tuesday")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "ISO 8601" in bad.stderr
    assert "Traceback" not in bad.stderr

    kept = _cdface("audit", "prune", "--db", str(db), "--older-than", "30")
    assert kept.returncode == 0 and json.loads(kept.stdout)["deleted"] == 0, kept.stderr
    pruned = _cdface("audit", "prune", "--db", str(db), "--older-than", "0")
    assert pruned.returncode == 0 and json.loads(pruned.stdout)["deleted"] == 2, pruned.stderr
    s = SQLiteStore(db)
    assert rows(s) == []
    s.close()


# -- through a real gateway ---------------------------------------------------------------------------


@pytest.mark.slow
def test_gateway_writes_and_searches_each_leave_one_row(triton, model_repo, photos, tmp_path):
    gw = start_gateway(tmp_path / "gw", triton.grpc_url, model_repo)  # its own gallery: a clean log
    key_id = {scope: key.split("_")[1] for scope, key in gw.keys.items()}
    store = SQLiteStore(gw.db)  # WAL: read while the gateway writes
    try:
        def new_rows(seen: int) -> list[AuditEntry]:
            return store.audit_entries(seen, 1000)

        # Its first start named the gallery's active model: the one row before any request.
        assert [(e.action, e.key_id, e.outcome["active"]) for e in new_rows(0)] == [("model_activate", None, "face:1")]
        start = new_rows(0)[-1].id
        obama_b64 = b64(photos["obama"])
        with gw.client("enroll") as c:
            r = c.post("/v1/identities", json={"name": "Barack Obama", "images": [{"data": obama_b64}]})
            assert r.status_code == 201, r.text
            identity, first_faces = r.json()["id"], [f["id"] for f in r.json()["faces"]]
            r = c.post(f"/v1/identities/{identity}/faces", json={"images": [{"data": b64(photos["obama2"])}]})
            assert r.status_code == 201, r.text
            second_face = r.json()["faces"][0]["id"]
            log = new_rows(start)
            assert [(e.action, e.key_id, e.identity_id, e.face_ids) for e in log] == [
                ("create_identity", key_id["enroll"], identity, first_faces),
                ("enroll", key_id["enroll"], identity, [second_face])]

            # Refused: no face in a blank photo -> 422, and no write row.
            blank = io.BytesIO()
            Image.new("RGB", (320, 240), (128, 128, 128)).save(blank, "PNG")
            r = c.post(f"/v1/identities/{identity}/faces", json={"images": [{"data": b64(blank.getvalue())}]})
            assert r.status_code == 422 and r.json()["error"]["code"] == "no_face", r.text
            r = c.patch("/v1/identities/idt_000000000000000000000000", json={"name": "x"})
            assert r.status_code == 404, r.text
            assert new_rows(log[-1].id) == []

        with gw.client("identify") as c:
            r = c.post("/v1/identify", json={"image": {"data": b64(photos["obama3"])}})
            assert r.status_code == 200 and r.json()["faces"][0]["match"]["identity_id"] == identity, r.text
        with gw.client("verify") as c:
            r = c.post("/v1/verify", json={"image": {"data": b64(photos["obama3"])}, "identity_id": identity})
            assert r.status_code == 200 and r.json()["match"] is True, r.text
        searches = new_rows(log[-1].id)
        assert [(e.action, e.key_id, e.identity_id, e.outcome) for e in searches] == [
            ("identify", key_id["identify"], None, {"faces": 1, "top1": [identity], "match": [True]}),
            ("verify", key_id["verify"], identity, {"match": True})]
        log += searches

        with gw.client("embed") as c:  # the embedding an export must never contain
            r = c.post("/v1/embeddings", json={"images": [{"data": obama_b64}]})
            assert r.status_code == 200, r.text
            embedding = np.asarray(r.json()["faces"][0]["embedding"], np.float32)
        with gw.client("delete") as c:
            assert c.delete(f"/v1/identities/{identity}/faces/{second_face}").status_code == 204
            assert c.delete(f"/v1/identities/{identity}").status_code == 204
        deletes = new_rows(log[-1].id)
        assert [(e.action, e.key_id, e.identity_id, e.face_ids) for e in deletes] == [
            ("delete_face", key_id["delete"], identity, [second_face]),
            ("delete_identity", key_id["delete"], identity, first_faces)]
        log += deletes
    finally:
        store.close()
        gw.stop()

    out = tmp_path / "audit.jsonl"
    done = _cdface("audit", "export", "--db", str(gw.db), "--out", str(out))
    assert done.returncode == 0, done.stderr
    exported = out.read_text()
    lines = [json.loads(line) for line in exported.splitlines()][1:]  # after the gateway's model_activate row
    assert [e["id"] for e in lines] == [e.id for e in log]  # one row per acknowledged write and search
    assert all(set(e) == {"id", "at", "key_id", "action", "identity_id", "face_ids", "outcome", "request_id",
                          "tenant"} for e in lines)
    assert {e["tenant"] for e in lines} == {"default"}  # the test keys' tenant
    assert "Obama" not in exported  # names are personal data
    assert obama_b64[:64] not in exported and base64.b64encode(embedding.tobytes())[:32].decode() not in exported
    assert not any(f"{v:.4f}" in exported for v in embedding[:8])  # no embedding value, in any rounding
