"""Tenant isolation: a key sees, searches, enrolls into and deletes only its own tenant's gallery.

The gateway tests run real gateway processes on real Triton with two tenants' admin keys; every
route that takes an identity id is derived from the OpenAPI document (as ``test_auth`` does), so a
route added later is covered or fails the coverage check. Another tenant's identity must be
answered exactly like an id that does not exist. The store and gallery tests run on SQLite and
PostgreSQL (the ``store`` fixture).
"""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from cdface.serving.errors import Conflict, NotFound
from cdface.serving.gallery import Gallery
from cdface.serving.store import Actor, ModelKey, NewFace

from .conftest import REPO_ROOT, b64, start_gateway, start_pg_gateway, vec
from .test_auth import _routes

MODEL = ModelKey("m", 1)
A, B = Actor("key_a", tenant="alpha"), Actor("key_b", tenant="beta")
NOBODY = "idt_000000000000000000000000"  # well formed, never made (ids are 24 random hex digits)


# -- the store and the gallery, on both databases -------------------------------------------------


def test_store_scopes_every_identity_read_and_write_to_the_tenant(store):
    a = store.create_identity("emp-1", "Ada", {}, A)
    b, (bf,) = store.create_identity_with_faces("emp-1", "Bob", {}, [NewFace(vec(1), MODEL, b"png")], B)
    with pytest.raises(Conflict) as dup:
        store.create_identity("emp-1", "Eve", {}, B)  # unique within the tenant only
    assert dup.value.code == "duplicate_external_id"

    assert store.get_identity(b.id, tenant="beta").name == "Bob"
    probes = [lambda: store.get_identity(b.id, tenant="alpha"),
              lambda: store.list_faces(b.id, tenant="alpha"),
              lambda: store.face_crop(b.id, bf.id, tenant="alpha"),
              lambda: store.update_identity(b.id, {"name": "Mallory"}, A),
              lambda: store.add_faces(b.id, [NewFace(vec(2), MODEL)], A),
              lambda: store.delete_face(b.id, bf.id, A),
              lambda: store.delete_identity(b.id, A)]
    for probe in probes:
        with pytest.raises(NotFound) as other:
            probe()
        assert other.value.code == "unknown_identity"
    assert store.face_embeddings(b.id, MODEL, tenant="alpha").size == 0
    with pytest.raises(NotFound):
        store.get_identity(b.id)  # no tenant named: "default", which is not beta

    assert [i.id for i in store.list_identities(10, tenant="alpha")] == [a.id]
    assert [i.id for i in store.list_identities(10, external_id="emp-1", tenant="alpha")] == [a.id]
    assert store.list_identities(10, contains="bo", tenant="alpha") == []
    assert [i.id for i in store.list_identities(10, contains="bo", tenant="beta")] == [b.id]
    assert set(store.identities_by_id([a.id, b.id], tenant="alpha")) == {a.id}

    # B's identity is untouched by A's attempts, and its own key still reaches it.
    assert store.get_identity(b.id, tenant="beta").name == "Bob"
    assert [f.id for f in store.list_faces(b.id, tenant="beta")] == [bf.id]
    ids, owners, tenants, _ = store.load_embeddings(MODEL, 8)
    assert (ids.tolist(), owners, tenants) == ([bf.id], [b.id], ["beta"])
    assert store.embeddings_of([bf.id], MODEL, 8)[2] == ["beta"]
    assert store.delete_identity(b.id, B) == [bf.id]

    assert [(e.action, e.key_id, e.tenant) for e in store.audit_entries()] == [
        ("create_identity", "key_a", "alpha"), ("create_identity", "key_b", "beta"),
        ("delete_identity", "key_b", "beta")]


def test_keys_belong_to_one_tenant(store):
    from cdface.serving.auth import create_key, verify_key
    from cdface.serving.errors import InvalidRequest

    key, record = create_key(store, "ci", ["admin"], tenant="beta")
    assert record.tenant == "beta" and verify_key(store, key, None).tenant == "beta"
    assert create_key(store, "plain", ["embed"])[1].tenant == "default"
    assert {k.name: k.tenant for k in store.list_keys()} == {"ci": "beta", "plain": "default"}
    for bad in ("", "Beta", "-x", "a" * 64, "a b", "a/b"):
        with pytest.raises(InvalidRequest) as refused:
            create_key(store, "x", ["embed"], tenant=bad)
        assert refused.value.code == "invalid_tenant"


def test_keys_cli_creates_a_key_of_a_tenant_and_lists_it(tmp_path):
    from cdface.serving.store import SQLiteStore

    db = tmp_path / "g.db"
    SQLiteStore(db).close()
    cli = [sys.executable, "-m", "cdface.serving.cli", "keys"]
    made = subprocess.run(cli + ["create", "--name", "acme-app", "--scope", "identify", "--tenant", "acme",
                                 "--db", str(db)], capture_output=True, text=True, cwd=REPO_ROOT)
    assert made.returncode == 0, made.stderr
    assert "of tenant acme" in made.stderr
    plain = subprocess.run(cli + ["create", "--name", "app", "--scope", "identify", "--db", str(db)],
                           capture_output=True, text=True, cwd=REPO_ROOT)
    assert plain.returncode == 0, plain.stderr
    listed = subprocess.run(cli + ["list", "--db", str(db)], capture_output=True, text=True, cwd=REPO_ROOT,
                            check=True).stdout
    assert {line.split("\t")[1]: line.split("\t")[-1] for line in listed.splitlines()} == \
        {"acme-app": "acme", "app": "default"}
    bad = subprocess.run(cli + ["create", "--name", "x", "--scope", "embed", "--tenant", "Acme Corp", "--db", str(db)],
                         capture_output=True, text=True, cwd=REPO_ROOT)
    assert bad.returncode != 0 and "tenant name" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_gallery_searches_and_follows_only_the_callers_tenant(store):
    """One index per tenant: a search never ranks another tenant's face, whatever its score; a second
    gallery on the same store (a replica) routes each face of the change log to its tenant's index."""
    gallery, replica = Gallery(store, MODEL, 8), Gallery(store, MODEL, 8)
    gallery.load()
    replica.load()
    same = vec(7)
    a = store.create_identity(None, None, {}, A)
    b = store.create_identity(None, None, {}, B)
    gallery.enroll(a.id, np.stack([vec(1)]), [None], [None], [{}], A)
    gallery.enroll(b.id, np.stack([same]), [None], [None], [{}], B)
    with pytest.raises(NotFound):
        gallery.enroll(b.id, np.stack([vec(2)]), [None], [None], [{}], A)  # A cannot enroll into B's identity
    assert gallery.faces_by_tenant() == {"alpha": 1, "beta": 1}

    for g in (gallery, replica):
        if g is replica:
            replica.sync()
        assert [c.identity_id for c in g.search(same[None], 5, "beta")[0]] == [b.id]
        assert [c.identity_id for c in g.search(same[None], 5, "alpha")[0]] == [a.id]  # never B's, though exact
        assert g.search(same[None], 5, "default") == [[]]  # a tenant without faces
        assert g.check()["consistent"]
    gallery.delete_identity(b.id, B)
    replica.sync()
    assert replica.search(same[None], 5, "beta") == [[]] and replica.check()["consistent"]
    fresh = Gallery(store, MODEL, 8)
    fresh.load()
    assert fresh.faces_by_tenant() == {"alpha": 1} and fresh.check()["consistent"]


# -- the gateway: two tenants' admin keys ---------------------------------------------------------


@pytest.fixture(scope="module")
def tenants_gateway(triton, model_repo, tmp_path_factory):
    from cdface.serving.auth import create_key
    from cdface.serving.store import SQLiteStore

    work = tmp_path_factory.mktemp("tenants")
    db = work / "gallery.db"
    store = SQLiteStore(db)
    keys = {"a": create_key(store, "tenant-a-admin", ["admin"], tenant="alpha")[0],
            "b": create_key(store, "tenant-b-admin", ["admin"], tenant="beta")[0]}
    store.close()
    gw = start_gateway(work, triton.grpc_url, model_repo, db=db, keys=keys)
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def b_obama(tenants_gateway, photos):
    """Tenant B's identity with one real photo: (identity id, face id)."""
    with tenants_gateway.client("b") as c:
        r = c.post("/v1/identities", json={"external_id": "emp-42", "name": "Barack Obama",
                                           "images": [{"data": b64(photos["obama"])}]})
        assert r.status_code == 201, r.text
        body = r.json()
    return body["id"], body["faces"][0]["id"]


def _bodies(photos) -> dict[tuple[str, str], dict]:
    """A valid body per route that takes an identity id, so only the identity can make it fail."""
    return {("patch", "/v1/identities/{identity_id}"): {"json": {"name": "Mallory", "external_id": "stolen"}},
            ("post", "/v1/identities/{identity_id}/faces"): {"json": {"images": [{"data": b64(photos["obama2"])}]}}}


def _answer(r: httpx.Response, identity_id: str) -> tuple:
    """What a client can tell from a response (the id it asked about blanked out of the message)."""
    body = r.json() if r.headers.get("content-type", "").startswith("application/json") else r.content
    if isinstance(body, dict) and "error" in body:
        body = {**body["error"], "message": body["error"]["message"].replace(identity_id, "<id>")}
        body.pop("request_id", None)
    return r.status_code, body


def _snapshot(gw, identity_id: str) -> tuple:
    with gw.client("b") as c:
        identity = c.get(f"/v1/identities/{identity_id}").json()
        faces = c.get(f"/v1/identities/{identity_id}/faces").json()
    return identity, faces


def test_another_tenants_identity_answers_like_a_nonexistent_one_on_every_route(tenants_gateway, b_obama, photos):
    gw, (b_id, b_face) = tenants_gateway, b_obama
    before = _snapshot(gw, b_id)
    bodies = _bodies(photos)
    spec = httpx.get(gw.url + "/openapi.json").json()
    routes = [(m, p) for m, p in _routes(spec) if "{identity_id}" in p]
    assert len(routes) >= 7 and set(bodies) <= set(routes)  # derived from the API, not a hand-kept list
    with gw.client("a") as c:
        for method, path in routes:
            extra = bodies.get((method, path), {})
            theirs = c.request(method, path.format(identity_id=b_id, face_id=b_face), **extra)
            nobodys = c.request(method, path.format(identity_id=NOBODY, face_id=b_face), **extra)
            assert theirs.status_code == 404 and theirs.json()["error"]["code"] == "unknown_identity", \
                (method, path, theirs.text)
            assert _answer(theirs, b_id) == _answer(nobodys, NOBODY), (method, path)
        # 1:1 against an enrolled identity: the identity is B's, so A's key cannot compare with it
        probe = {"image": {"data": b64(photos["obama2"])}}
        theirs = c.post("/v1/verify", json={**probe, "identity_id": b_id})
        nobodys = c.post("/v1/verify", json={**probe, "identity_id": NOBODY})
        assert theirs.status_code == 404 and _answer(theirs, b_id) == _answer(nobodys, NOBODY)
    assert _snapshot(gw, b_id) == before  # nothing A tried changed B's identity or its faces
    with gw.client("b") as c:
        r = c.post("/v1/verify", json={"image": {"data": b64(photos["obama2"])}, "identity_id": b_id})
        assert r.status_code == 200 and r.json()["match"] is True


def test_identify_searches_only_the_callers_tenant(tenants_gateway, b_obama, photos):
    gw, (b_id, _) = tenants_gateway, b_obama
    with gw.client("a") as c:
        r = c.post("/v1/identities", json={"name": "Joe Biden", "images": [{"data": b64(photos["biden"])}]})
        assert r.status_code == 201, r.text
        a_ids = {r.json()["id"]}
        for photo in ("obama2", "obama3"):
            r = c.post("/v1/identify", json={"image": {"data": b64(photos[photo])}, "top_k": 10})
            assert r.status_code == 200, r.text
            found = [cand["identity_id"] for face in r.json()["faces"] for cand in face.get("candidates", [])]
            assert b_id not in found and set(found) <= a_ids
            assert all(face.get("match") is None for face in r.json()["faces"])
    with gw.client("b") as c:
        r = c.post("/v1/identify", json={"image": {"data": b64(photos["obama2"])}, "top_k": 10})
        assert r.status_code == 200, r.text
        match = r.json()["faces"][0]["match"]
        assert match is not None and match["identity_id"] == b_id
        found = {cand["identity_id"] for face in r.json()["faces"] for cand in face.get("candidates", [])}
        assert not found & a_ids


def test_listing_shows_only_the_callers_tenant(tenants_gateway, b_obama):
    gw, (b_id, _) = tenants_gateway, b_obama
    with gw.client("a") as c:
        for params in ({}, {"q": "obama"}, {"q": "emp-4"}, {"external_id": "emp-42"}, {"limit": 1000}):
            r = c.get("/v1/identities", params=params)
            assert r.status_code == 200, r.text
            assert b_id not in {i["id"] for i in r.json()["items"]}, params
    with gw.client("b") as c:
        assert [i["id"] for i in c.get("/v1/identities", params={"external_id": "emp-42"}).json()["items"]] == [b_id]


def test_external_ids_are_unique_per_tenant(tenants_gateway, b_obama):
    gw = tenants_gateway
    with gw.client("a") as c:
        first = c.post("/v1/identities", json={"external_id": "emp-42", "name": "Someone else"})
        assert first.status_code == 201, first.text  # B's external id is free in A
        again = c.post("/v1/identities", json={"external_id": "emp-42"})
        assert again.status_code == 409 and again.json()["error"]["code"] == "duplicate_external_id"
    with gw.client("b") as c:
        again = c.post("/v1/identities", json={"external_id": "emp-42"})
        assert again.status_code == 409 and again.json()["error"]["code"] == "duplicate_external_id"
        assert c.get("/v1/identities", params={"external_id": "emp-42"}).json()["items"][0]["name"] == "Barack Obama"


# -- several replicas on PostgreSQL ---------------------------------------------------------------


@pytest.mark.slow
def test_a_face_enrolled_through_one_replica_is_found_by_its_tenant_only_through_another(
        triton, model_repo, postgres_url, photos, tmp_path):
    from cdface.serving.auth import create_key
    from cdface.serving.store.postgres import PostgresStore

    store = PostgresStore(postgres_url)
    keys = {"a": create_key(store, "a", ["admin"], tenant="alpha")[0],
            "b": create_key(store, "b", ["admin"], tenant="beta")[0]}
    store.close()
    one = start_pg_gateway(tmp_path / "1", triton.grpc_url, model_repo, postgres_url, keys)
    two = start_pg_gateway(tmp_path / "2", triton.grpc_url, model_repo, postgres_url, keys)
    try:
        with one.client("b") as c:
            r = c.post("/v1/identities", json={"name": "Obama", "images": [{"data": b64(photos["obama"])}]})
            assert r.status_code == 201, r.text
            b_id = r.json()["id"]
        probe = {"image": {"data": b64(photos["obama2"])}, "top_k": 5}
        deadline, found = time.monotonic() + 10.0, None
        with two.client("b") as c:
            while time.monotonic() < deadline:  # the follower applies the change log within its poll
                match = c.post("/v1/identify", json=probe).json()["faces"][0]["match"]
                if match is not None:
                    found = match["identity_id"]
                    break
                time.sleep(0.1)
        assert found == b_id
        for gw in (one, two):
            with gw.client("a") as c:
                faces = c.post("/v1/identify", json=probe).json()["faces"]
                assert all(not face.get("candidates") for face in faces)
            with gw.client("b") as c:
                assert c.get("/v1/gallery").json()["consistent"] is True
    finally:
        one.stop()
        two.stop()


def test_without_keys_everything_is_the_default_tenant(triton, model_repo, tmp_path):
    from cdface.serving.store import SQLiteStore

    gw = start_gateway(tmp_path, triton.grpc_url, model_repo, keys={},
                       extra_env={"CDFACE_SERVE_AUTH": "false", "CDFACE_SERVE_CREATE_DB": "1"})
    try:
        with httpx.Client(base_url=gw.url, timeout=60) as c:
            r = c.post("/v1/identities", json={"external_id": "emp-1"})
            assert r.status_code == 201, r.text
            made = r.json()["id"]
            assert [i["id"] for i in c.get("/v1/identities").json()["items"]] == [made]
    finally:
        gw.stop()
    store = SQLiteStore(gw.db)
    try:
        assert store.get_identity(made, tenant="default").external_id == "emp-1"
        with pytest.raises(NotFound):
            store.get_identity(made, tenant="alpha")
        # The gateway's first start named the gallery's active model: an operator's row, of no tenant.
        assert [(e.action, e.tenant) for e in store.audit_entries()] == [("model_activate", None),
                                                                         ("create_identity", "default")]
    finally:
        store.close()


def test_gallery_status_counts_the_callers_tenant_only(tenants_gateway, b_obama, photos):
    gw = tenants_gateway

    def status(key: str) -> dict:
        with gw.client(key) as c:
            return c.get("/v1/gallery").json()

    a_before, b_before = status("a"), status("b")
    with gw.client("b") as c:
        r = c.post("/v1/identities", json={"name": "status probe", "images": [{"data": b64(photos["obama3"])}]})
        assert r.status_code == 201, r.text
    a_after, b_after = status("a"), status("b")
    assert b_after["faces_indexed"] == b_before["faces_indexed"] + 1 and b_after["store_faces"] == b_after[
        "faces_indexed"] and b_after["consistent"]
    assert (a_after["faces_indexed"], a_after["store_faces"]) == (a_before["faces_indexed"], a_before["store_faces"])
