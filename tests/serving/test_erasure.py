"""Retention and erasure: retained crops sealed at rest, deletes that leave no bytes in the database files,
and the retention policy (faces not matched for N days expire).

Store level on both SQLite and PostgreSQL (real databases; the raw files are read back byte by byte);
the command line as real processes; last-seen times through a real gateway (real Triton, SFace).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cdface.serving.crop_cipher import MAGIC, CropCipher, CropKeyError, new_key, parse_keys
from cdface.serving.errors import InvalidRequest
from cdface.serving.store import ModelKey, NewFace, SQLiteStore, utc_iso

from .conftest import CROP_KEYS, REPO_ROOT, start_gateway

M1 = ModelKey("face", 1)
DIM = 128  # SFace's size: 512 bytes per embedding, stored inline (PostgreSQL TOASTs values over ~2 kB)


def distinctive(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def random_crop(seed: int, size: int = 20_000) -> bytes:
    """Stand-in crop bytes: random, so they neither compress (PostgreSQL stores them out of line, in TOAST)
    nor occur anywhere by chance."""
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def windows(data: bytes, size: int = 32) -> list[bytes]:
    """Non-overlapping pieces of ``data``: a value may be split across pages (SQLite overflow pages,
    PostgreSQL TOAST chunks), so it is looked for piece by piece."""
    return [data[i:i + size] for i in range(0, len(data) - size + 1, size)]


def found(haystack: bytes, data: bytes) -> float:
    """The fraction of ``data``'s pieces present in ``haystack``."""
    pieces = windows(data)
    return sum(p in haystack for p in pieces) / len(pieces)


def raw_column(store, sql: str, args: tuple) -> bytes:
    return bytes(store._read(sql, args)[0][0])


# -- the cipher -------------------------------------------------------------------------------------


def test_cipher_round_trip_binding_rotation_and_errors():
    old, new = CropCipher.from_setting(CROP_KEYS), CropCipher.from_setting(new_key() + "," + CROP_KEYS)
    sealed = old.seal(b"\x89PNG crop", "idt_a")
    assert sealed.startswith(MAGIC) and b"PNG crop" not in sealed
    assert old.open(sealed, "idt_a") == b"\x89PNG crop"
    assert new.open(sealed, "idt_a") == b"\x89PNG crop"  # rotation: every listed key opens
    assert new.seal(b"x", "idt_a") != sealed and new.is_current(new.seal(b"x", "idt_a"))
    assert old.seal(b"same", "idt_a") != old.seal(b"same", "idt_a")  # a fresh nonce each time
    with pytest.raises(CropKeyError) as moved:  # bound to its identity: a crop moved elsewhere does not open
        old.open(sealed, "idt_b")
    assert moved.value.code == "crop_undecryptable"
    with pytest.raises(CropKeyError) as unknown:
        CropCipher.from_setting(new_key()).open(sealed, "idt_a")
    assert unknown.value.code == "crop_key_unknown" and "cktest" in str(unknown.value)
    tampered = bytearray(sealed)
    tampered[-1] ^= 1
    with pytest.raises(CropKeyError):
        old.open(bytes(tampered), "idt_a")
    assert old.open(b"\x89PNG legacy", "idt_a") == b"\x89PNG legacy"  # stored in the clear by an older cdface
    secret = base64.b64encode(os.urandom(16)).decode()
    for bad in (f"k1:{secret}", "k1", f"bad id:{base64.b64encode(os.urandom(32)).decode()}", "k1:***", ""):
        with pytest.raises(ValueError) as error:
            parse_keys(bad)
        assert secret not in str(error.value)


def test_crop_keys_setting_names_the_problem_without_the_key():
    from cdface.serving.cli import _invalid_settings
    from cdface.serving.settings import Settings

    short = base64.b64encode(os.urandom(16)).decode()
    with pytest.raises(Exception) as error:
        Settings(crop_keys=f"k1:{short}")
    message = _invalid_settings(error.value)
    assert "CDFACE_SERVE_CROP_KEYS" in message and "32" in message and short not in message
    assert Settings(crop_keys="  ").crop_keys is None  # an empty Secret: no keys


# -- crops sealed in the store ---------------------------------------------------------------------


def test_store_seals_crops_opens_them_and_refuses_to_store_one_unsealed(store):
    store.use_crop_cipher(CropCipher.from_setting(CROP_KEYS))
    person = store.create_identity(None, None, {})
    crop = random_crop(1, 3000)
    face, bare = store.add_faces(person.id, [NewFace(distinctive(1), M1, crop), NewFace(distinctive(2), M1)])
    stored = raw_column(store, "SELECT crop FROM faces WHERE id = ?", (face.id,))
    assert stored.startswith(MAGIC + bytes([6]) + b"cktest") and found(stored, crop) == 0
    assert store.face_crop(person.id, face.id) == crop
    assert list(store.faces_to_reembed(ModelKey("face", 2))) == [(face.id, crop)]
    _, (made,) = store.create_identity_with_faces(None, None, {}, [NewFace(distinctive(3), M1, crop)])
    assert raw_column(store, "SELECT crop FROM faces WHERE id = ?", (made.id,)).startswith(MAGIC)
    store.use_crop_cipher(None)  # what open_store does without CDFACE_SERVE_CROP_KEYS
    with pytest.raises(InvalidRequest) as refused:
        store.add_faces(person.id, [NewFace(distinctive(4), M1, crop)])
    assert refused.value.code == "crop_retention_off"
    with pytest.raises(CropKeyError):
        store.face_crop(person.id, face.id)
    assert [f.id for f in store.list_faces(person.id)] == [face.id, bare.id]  # the refused enrolment left nothing


def test_rotation_reseals_every_crop_resumably_and_names_an_unknown_key(store, tmp_path):
    first = CropCipher.from_setting(CROP_KEYS)
    person = store.create_identity(None, None, {})
    crops = [random_crop(10 + i, 500) for i in range(5)]
    faces = store.add_faces(person.id, [NewFace(distinctive(10 + i), M1, c) for i, c in enumerate(crops[:2])])
    store.use_crop_cipher(first)
    faces += store.add_faces(person.id, [NewFace(distinctive(12 + i), M1, c) for i, c in enumerate(crops[2:])])
    rotated = CropCipher.from_setting(new_key() + "," + CROP_KEYS)
    store.use_crop_cipher(rotated)
    old_sealed = raw_column(store, "SELECT crop FROM faces WHERE id = ?", (faces[2].id,))
    batches = list(store.reseal_crops(batch=2))
    if isinstance(store, SQLiteStore):  # overwritten ciphertexts are erased like deleted rows
        assert found(database_bytes(store), old_sealed) == 0
    assert [b[1:] for b in batches] == [(2, 0), (2, 0), (1, 0)] and batches[-1][0] == faces[-1].id
    for face, crop in zip(faces, crops):
        assert rotated.is_current(raw_column(store, "SELECT crop FROM faces WHERE id = ?", (face.id,)))
        assert store.face_crop(person.id, face.id) == crop
    assert [b[1:] for b in store.reseal_crops(batch=10)] == [(0, 5)]  # a rerun only skips
    audit = [e for e in store.audit_entries(0, 1000) if e.action == "rotate_crop_key"]
    assert sum(e.outcome["crops"] for e in audit) == 5 and all(e.outcome["key"] == rotated.primary for e in audit)
    store.use_crop_cipher(CropCipher.from_setting(new_key()))  # the keys in use were dropped too early
    with pytest.raises(CropKeyError) as error:
        list(store.reseal_crops())
    assert error.value.code == "crop_key_unknown" and f"face {faces[0].id}" in str(error.value)


def test_rotate_command_counts_and_an_unknown_key_is_one_line(tmp_path):
    db = tmp_path / "g.db"
    store = SQLiteStore(db)
    store.use_crop_cipher(CropCipher.from_setting(CROP_KEYS))
    person = store.create_identity(None, None, {})
    store.add_faces(person.id, [NewFace(distinctive(i), M1, random_crop(i, 400)) for i in range(3)])
    store.close()
    newer = new_key()

    def rotate(keys: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cdface.serving.cli", "gallery", "rotate-crop-key", "--db",
                               str(db), "--batch", "2"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60,
                              env={**os.environ, "CDFACE_SERVE_CROP_KEYS": keys})

    done = rotate(f"{newer},{CROP_KEYS}")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"key": newer.split(":")[0], "resealed": 3, "already_current": 0,
                                       "last_face": 3}
    lost = rotate(new_key())
    assert lost.returncode != 0 and "Traceback" not in lost.stderr
    assert len(lost.stderr.strip().splitlines()) == 1 and newer.split(":")[0] in lost.stderr
    made = subprocess.run([sys.executable, "-m", "cdface.serving.cli", "keys", "crop-key"], capture_output=True,
                          text=True, cwd=REPO_ROOT, timeout=60)
    assert made.returncode == 0 and len(parse_keys(made.stdout.strip())) == 1


# -- deletion is erasure ----------------------------------------------------------------------------


def database_bytes(store) -> bytes:
    """Every byte the database keeps in its files for this gallery.

    SQLite: the database file and its WAL. PostgreSQL: every relation file of the database
    (``base/<oid>/``), after a CHECKPOINT has written the shared buffers out; the server's WAL
    (``pg_wal``) is not included: see docs/data-protection.md.
    """
    if isinstance(store, SQLiteStore):
        return b"".join(Path(f"{store.path}{suffix}").read_bytes() for suffix in ("", "-wal")
                        if Path(f"{store.path}{suffix}").exists())
    with store._lock:
        db = store._connection()
        db.execute("CHECKPOINT")
        data = Path(db.execute("SHOW data_directory").fetchone()[0])
        oid = db.execute("SELECT oid FROM pg_database WHERE datname = current_database()").fetchone()[0]
        # The files the faces table lives in now (VACUUM FULL gives it new ones), to be sure they are read.
        heap, toast = db.execute("SELECT pg_relation_filepath('faces'), pg_relation_filepath(reltoastrelid) "
                                 "FROM pg_class WHERE oid = 'faces'::regclass").fetchone()
    files = [p for p in (data / "base" / str(oid)).rglob("*") if p.is_file()]
    assert data / heap in files and data / toast in files
    return b"".join(p.read_bytes() for p in files)


@pytest.mark.parametrize("how", ["delete_face", "delete_identity"])
def test_a_deleted_face_leaves_neither_its_embedding_nor_its_crop_in_the_database_files(store, how):
    store.use_crop_cipher(CropCipher.from_setting(CROP_KEYS))
    name = "Erasure Name " + os.urandom(8).hex()
    person = store.create_identity(None, name, {})
    embedding, crop = distinctive(424242), random_crop(424242)
    face, kept = store.add_faces(person.id, [NewFace(embedding, M1, crop), NewFace(distinctive(7), M1)])
    sealed = raw_column(store, "SELECT crop FROM faces WHERE id = ?", (face.id,))
    before = database_bytes(store)
    # The control: the bytes are there to be found (else the test below could not fail).
    assert found(before, embedding.tobytes()) > 0.8 and found(before, sealed) > 0.8
    assert name.encode() in before
    if how == "delete_face":
        store.delete_face(person.id, face.id)
    else:
        store.delete_identity(person.id)
    if not isinstance(store, SQLiteStore):
        store.vacuum()  # `cdface gallery vacuum`: PostgreSQL keeps deleted rows in its files until then
    after = database_bytes(store)
    assert found(after, embedding.tobytes()) == 0
    assert found(after, sealed) == 0 and found(after, crop) == 0
    if how == "delete_identity":
        assert name.encode() not in after
    else:  # what was not deleted is still there
        assert found(after, distinctive(7).tobytes()) > 0.8


def test_sqlite_gallery_erases_on_delete_without_vacuum(tmp_path):
    """SQLite: secure_delete and a truncating WAL checkpoint make the delete itself the erasure; the WAL is
    empty after it."""
    store = SQLiteStore(tmp_path / "g.db")
    person = store.create_identity(None, None, {})
    (face,) = store.add_faces(person.id, [NewFace(distinctive(5), M1)])
    assert store._read("PRAGMA secure_delete")[0][0] == 1
    assert Path(f"{store.path}-wal").stat().st_size > 0
    store.delete_face(person.id, face.id)
    assert Path(f"{store.path}-wal").stat().st_size == 0
    assert found(store.path.read_bytes(), distinctive(5).tobytes()) == 0
    store.close()


def test_vacuum_command_on_sqlite(tmp_path):
    SQLiteStore(tmp_path / "g.db").close()
    done = subprocess.run([sys.executable, "-m", "cdface.serving.cli", "gallery", "vacuum", "--db",
                           str(tmp_path / "g.db")], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["vacuumed"] == str(tmp_path / "g.db")


# -- retention: expire faces not seen for N days ------------------------------------------------------


def days_ago(days: float) -> str:
    return utc_iso(dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=days))


def backdate(store, face_id: int, created: str) -> None:
    with store._transaction() as db:
        store._run(db, "UPDATE faces SET created = ? WHERE id = ?", (created, face_id))


def test_last_seen_only_moves_forward(store):
    person = store.create_identity(None, None, {})
    a, b, c = store.add_faces(person.id, [NewFace(distinctive(i), M1) for i in range(3)])
    other = store.create_identity(None, None, {})
    (d,) = store.add_faces(other.id, [NewFace(distinctive(9), M1)])
    assert store.touch_faces([a.id], [other.id], days_ago(1)) == 2
    assert store.touch_faces([a.id, b.id], [], days_ago(3)) == 1  # a was seen later already
    seen = dict(store._read("SELECT id, last_seen FROM faces ORDER BY id"))
    assert seen[a.id] == seen[d.id] > seen[b.id] and seen[c.id] is None


def test_expire_deletes_faces_not_seen_for_n_days_through_the_logs(store):
    person = store.create_identity(None, None, {})
    stale_seen, fresh_seen, old_never, new_never = store.add_faces(
        person.id, [NewFace(distinctive(i), M1) for i in range(4)])
    store.touch_faces([stale_seen.id], [], days_ago(40))
    store.touch_faces([fresh_seen.id], [], days_ago(2))
    for face in (stale_seen, fresh_seen, old_never):
        backdate(store, face.id, days_ago(100))
    lonely = store.create_identity(None, None, {})
    (lonely_face,) = store.add_faces(lonely.id, [NewFace(distinctive(8), M1)])
    backdate(store, lonely_face.id, days_ago(100))
    with store._transaction() as db:  # not updated since long before the cut-off either
        store._run(db, "UPDATE identities SET updated = ? WHERE id = ?", (days_ago(100), lonely.id))
    empty_new = store.create_identity(None, None, {})  # just created, faces to come: kept
    seq = store.last_seq()

    assert store.expire_faces(days_ago(30), dry_run=True, drop_identities=True) == (3, 1)
    assert store.last_seq() == seq and sum(store.count_faces_by_model().values()) == 5  # dry run: nothing changed
    assert store.expire_faces(days_ago(30), drop_identities=True, batch=2) == (3, 1)

    assert [f.id for f in store.list_faces(person.id)] == [fresh_seen.id, new_never.id]
    assert set(store.identities_by_id([person.id, lonely.id, empty_new.id])) == {person.id, empty_new.id}
    changes = store.changes_since(seq)
    assert sorted(c.face_id for c in changes if c.op == "face.delete") == sorted(
        [stale_seen.id, old_never.id, lonely_face.id])
    assert [c.identity_id for c in changes if c.op == "identity.delete"] == [lonely.id]
    expired = [e for e in store.audit_entries(0, 1000) if e.action == "expire"]
    assert {e.identity_id: sorted(e.face_ids) for e in expired if e.face_ids} == {
        person.id: sorted([stale_seen.id, old_never.id]), lonely.id: [lonely_face.id]}
    assert [e.outcome for e in expired if e.identity_id == lonely.id][-1] == {"faces": 0, "identity_deleted": True}
    assert store.expire_faces(days_ago(30), drop_identities=True) == (0, 0)


def test_expire_command_reports_counts_and_dry_run_changes_nothing(tmp_path):
    db = tmp_path / "g.db"
    store = SQLiteStore(db)
    person = store.create_identity(None, None, {})
    old, new = store.add_faces(person.id, [NewFace(distinctive(1), M1), NewFace(distinctive(2), M1)])
    backdate(store, old.id, days_ago(10))
    store.close()

    def expire(*args: str) -> dict:
        done = subprocess.run([sys.executable, "-m", "cdface.serving.cli", "gallery", "expire", "--db", str(db),
                               "--not-seen-days", "7", *args], capture_output=True, text=True, cwd=REPO_ROOT,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    assert {k: v for k, v in expire("--dry-run").items() if k != "not_seen_since"} == \
        {"dry_run": True, "faces": 1, "identities": 0}
    assert expire()["faces"] == 1
    assert expire()["faces"] == 0
    with sqlite3.connect(db) as raw:
        assert [r[0] for r in raw.execute("SELECT id FROM faces")] == [new.id]
        assert raw.execute("SELECT COUNT(*) FROM audit_log WHERE action = 'expire'").fetchone()[0] == 1


# -- through a real gateway ---------------------------------------------------------------------------


@pytest.mark.slow
def test_gateway_seals_crops_and_records_matches_as_last_seen(triton, model_repo, tmp_path):
    from .test_robustness import _crop

    gw = start_gateway(tmp_path / "gw", triton.grpc_url, model_repo,
                       extra_env={"CDFACE_SERVE_LAST_SEEN_FLUSH_S": "0.2"})
    try:
        with gw.client("admin") as c:
            person = c.post("/v1/identities", json={"external_id": "seen"}).json()["id"]
            first, second = c.post(f"/v1/identities/{person}/faces", json={
                "images": [{"data": _crop(s), "mode": "aligned"} for s in (1, 2)], "retain_crop": True}).json()["faces"]
            other = c.post("/v1/identities", json={"external_id": "other"}).json()["id"]
            third = c.post(f"/v1/identities/{other}/faces", json={
                "images": [{"data": _crop(3), "mode": "aligned"}]}).json()["faces"][0]
            png = c.get(f"/v1/identities/{person}/faces/{first['id']}/crop")
            assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
            with sqlite3.connect(gw.db) as raw:
                stored = bytes(raw.execute("SELECT crop FROM faces WHERE id = ?", (first["id"],)).fetchone()[0])
            assert stored.startswith(MAGIC) and png.content[:64] not in stored

            def last_seen() -> dict[int, str | None]:
                with sqlite3.connect(gw.db) as raw:
                    return dict(raw.execute("SELECT id, last_seen FROM faces"))

            assert set(last_seen().values()) == {None}
            r = c.post("/v1/identify", json={"image": {"data": _crop(1), "mode": "aligned"}}).json()
            assert r["faces"][0]["match"]["face_id"] == first["id"]
            deadline = time.monotonic() + 60
            while last_seen()[first["id"]] is None and time.monotonic() < deadline:
                time.sleep(0.1)
            seen = last_seen()
            assert seen[first["id"]] is not None and seen[second["id"]] is None and seen[third["id"]] is None
            v = c.post("/v1/verify", json={"image": {"data": _crop(3), "mode": "aligned"}, "identity_id": other})
            assert v.json()["match"] is True
            while last_seen()[third["id"]] is None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert last_seen()[third["id"]] is not None
    finally:
        gw.stop()


@pytest.mark.slow
def test_gateway_without_crop_keys_keeps_no_crop_and_refuses_to_promise_one(triton, model_repo, tmp_path):
    from .test_robustness import _crop

    gw = start_gateway(tmp_path / "gw", triton.grpc_url, model_repo, extra_env={"CDFACE_SERVE_CROP_KEYS": ""})
    try:
        with gw.client("admin") as c:
            person = c.post("/v1/identities", json={"external_id": "nokey"}).json()["id"]
            image = {"data": _crop(1), "mode": "aligned"}
            refused = c.post(f"/v1/identities/{person}/faces", json={"images": [image], "retain_crop": True})
            assert refused.status_code == 422 and refused.json()["error"]["code"] == "crop_retention_off"
            face = c.post(f"/v1/identities/{person}/faces", json={"images": [image]}).json()["faces"][0]
            assert face["has_crop"] is False
            created = c.post("/v1/identities", json={"images": [image], "retain_crop": True})
            assert created.json()["error"]["code"] == "crop_retention_off"
        with sqlite3.connect(gw.db) as raw:
            assert raw.execute("SELECT COUNT(*) FROM faces WHERE crop IS NOT NULL").fetchone()[0] == 0
            assert raw.execute("SELECT COUNT(*) FROM identities").fetchone()[0] == 1
    finally:
        gw.stop()


@pytest.mark.slow
def test_a_face_expired_from_the_command_line_leaves_the_running_gateways_index(triton, model_repo, tmp_path):
    """The command line writes to the gateway's own SQLite gallery; the gateway follows the change log."""
    from .test_robustness import _crop

    gw = start_gateway(tmp_path / "gw", triton.grpc_url, model_repo, extra_env={"CDFACE_SERVE_SYNC_POLL_S": "0.5",
                                                                      "CDFACE_SERVE_LAST_SEEN_FLUSH_S": "3600"})
    try:
        with gw.client("admin") as c:
            person = c.post("/v1/identities", json={"external_id": "stale"}).json()["id"]
            face = c.post(f"/v1/identities/{person}/faces", json={
                "images": [{"data": _crop(7), "mode": "aligned"}]}).json()["faces"][0]
            probe = {"image": {"data": _crop(7), "mode": "aligned"}}
            assert c.post("/v1/identify", json=probe).json()["faces"][0]["match"]["face_id"] == face["id"]
            with sqlite3.connect(gw.db) as raw:  # as if enrolled 30 days ago and never matched since
                raw.execute("UPDATE faces SET created = ?, last_seen = NULL WHERE id = ?", (days_ago(30), face["id"]))
            done = subprocess.run([sys.executable, "-m", "cdface.serving.cli", "gallery", "expire", "--db", str(gw.db),
                                   "--not-seen-days", "7"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
            assert done.returncode == 0 and json.loads(done.stdout)["faces"] == 1, done.stderr
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                candidates = c.post("/v1/identify", json=probe).json()["faces"][0]["candidates"]
                if not candidates:
                    break
                time.sleep(0.2)
            assert candidates == []
            assert c.get("/v1/gallery").json()["faces_indexed"] == 0
    finally:
        gw.stop()


def test_the_retention_policy_expires_stale_faces_and_prunes_old_audit_rows(store):
    from cdface.serving.retention import RetentionPolicy

    person = store.create_identity(None, None, {})
    stale, fresh = store.add_faces(person.id, [NewFace(distinctive(1), M1), NewFace(distinctive(2), M1)])
    backdate(store, stale.id, days_ago(10))
    with store._transaction() as db:  # every row so far (create, enroll) as if written 40 days ago
        store._run(db, "UPDATE audit_log SET at = ?", (days_ago(40),))
    assert RetentionPolicy(store, None, None, 3600).enabled is False
    assert RetentionPolicy(store, 7, 30, 3600).apply() == (1, 2)
    assert [f.id for f in store.list_faces(person.id)] == [fresh.id]
    assert [e.action for e in store.audit_entries()] == ["expire"]  # the expiry's own row is recent
    assert RetentionPolicy(store, 7, 30, 3600).apply() == (0, 0)


@pytest.mark.slow
def test_a_gateway_applies_its_retention_policy_by_itself(triton, model_repo, tmp_path):
    from .test_robustness import _crop

    gw = start_gateway(tmp_path / "gw", triton.grpc_url, model_repo, extra_env={
        "CDFACE_SERVE_FACE_RETENTION_DAYS": "7", "CDFACE_SERVE_RETENTION_INTERVAL_S": "0.5",
        "CDFACE_SERVE_LAST_SEEN_FLUSH_S": "3600"})
    try:
        with gw.client("admin") as c:
            person = c.post("/v1/identities", json={"external_id": "kept-then-stale"}).json()["id"]
            old, new = c.post(f"/v1/identities/{person}/faces", json={
                "images": [{"data": _crop(s), "mode": "aligned"} for s in (11, 12)]}).json()["faces"]
            with sqlite3.connect(gw.db) as raw:  # enrolled 30 days ago, never matched since
                raw.execute("UPDATE faces SET created = ? WHERE id = ?", (days_ago(30), old["id"]))
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                faces = [f["id"] for f in c.get(f"/v1/identities/{person}/faces").json()["items"]]
                if faces == [new["id"]]:
                    break
                time.sleep(0.2)
            assert faces == [new["id"]]
            probe = {"image": {"data": _crop(11), "mode": "aligned"}, "top_k": 5}
            while time.monotonic() < deadline:  # the index follows the store's change log
                hits = [x["face_id"] for x in c.post("/v1/identify", json=probe).json()["faces"][0]["candidates"]]
                if old["id"] not in hits:
                    break
                time.sleep(0.2)
            assert old["id"] not in hits
    finally:
        gw.stop()
