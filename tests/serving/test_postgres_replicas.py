"""Several gateway replicas on one PostgreSQL gallery: real PostgreSQL, real Triton, real gateway processes.

A write through one replica must reach every other replica's FAISS index within a bounded delay
(the change log, LISTEN/NOTIFY to wake up, a poll as the fallback). Visibility is polled with a
deadline, never assumed after a sleep.
"""

from __future__ import annotations

import time
from collections import Counter

import httpx
import pytest

from .conftest import b64, enroll_until_killed, start_pg_gateway
from .test_robustness import _crop

pytestmark = pytest.mark.slow

DEADLINE_S = 10.0  # generous for CI; the follower's poll fallback is 0.5 s and NOTIFY wakes it at once


@pytest.fixture(scope="module")
def pg_module_url(postgres_server):
    import psycopg

    name = "replicas_" + str(int(time.time() * 1000))
    with psycopg.connect(postgres_server + "/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{postgres_server}/{name}"


@pytest.fixture(scope="module")
def keys(pg_module_url):
    from cdface.serving.auth import create_key
    from cdface.serving.store.postgres import PostgresStore

    store = PostgresStore(pg_module_url)
    out = {scope: create_key(store, f"test-{scope}", [scope])[0]
           for scope in ("admin", "embed", "verify", "identify", "enroll", "delete")}
    store.close()
    return out


BOOTSTRAP = "cdf_b00757a9c0de_bootstrap-secret-for-tests-only"


@pytest.fixture(scope="module")
def replicas(triton, model_repo, pg_module_url, keys, tmp_path_factory):
    work = tmp_path_factory.mktemp("replicas")
    a = start_pg_gateway(work / "a", triton.grpc_url, model_repo, pg_module_url, keys,
                         CDFACE_SERVE_BOOTSTRAP_ADMIN_KEY=BOOTSTRAP)
    b = start_pg_gateway(work / "b", triton.grpc_url, model_repo, pg_module_url, keys,
                         CDFACE_SERVE_BOOTSTRAP_ADMIN_KEY=BOOTSTRAP)
    yield a, b
    a.stop()
    b.stop()


def until(what: str, check, deadline_s: float = DEADLINE_S):
    """Poll ``check`` until it returns something truthy; fail after the deadline."""
    end = time.monotonic() + deadline_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > end:
            pytest.fail(f"not within {deadline_s} s: {what}")
        time.sleep(0.05)


def _top(gw, photo) -> str | None:
    with gw.client("identify") as c:
        r = c.post("/v1/identify", json={"image": {"data": photo}, "top_k": 1})
    assert r.status_code == 200, r.text
    match = r.json()["faces"][0]["match"]
    return match["identity_id"] if match else None


def test_readiness_reports_sync_and_the_bootstrap_key_works_everywhere(replicas):
    for gw in replicas:
        ready = httpx.get(gw.url + "/readyz", timeout=10)
        assert ready.status_code == 200, ready.text
        sync = ready.json()["sync"]
        assert sync["behind"] >= 0 and sync["seconds_since_sync"] is not None
        assert sync["applied_seq"] <= sync["store_seq"]
        r = httpx.get(gw.url + "/v1/gallery", headers={"Authorization": f"Bearer {BOOTSTRAP}"}, timeout=10)
        assert r.status_code == 200, r.text  # stored once (hashed) though both replicas were given it
    r = httpx.get(replicas[0].url + "/v1/gallery", headers={"Authorization": f"Bearer {BOOTSTRAP}x"}, timeout=10)
    assert r.status_code == 401


def test_enroll_through_a_identify_through_b_delete_through_b_gone_from_a(replicas, photos):
    a, b = replicas
    with a.client("admin") as c:
        ident = c.post("/v1/identities", json={"external_id": "pg-obama", "name": "Barack Obama"}).json()["id"]
        r = c.post(f"/v1/identities/{ident}/faces", json={"images": [{"data": b64(photos["obama"])}]})
        assert r.status_code == 201, r.text
    probe = b64(photos["obama2"])
    until("B identifies the face enrolled through A", lambda: _top(b, probe) == ident)
    with b.client("admin") as c:
        assert c.get(f"/v1/identities/{ident}").json()["face_count"] == 1  # the store is shared

    def b_in_step():
        sync = httpx.get(b.url + "/readyz", timeout=10).json()["sync"]
        return sync["behind"] == 0 and sync["applied_seq"] == sync["store_seq"]

    until("B reports no lag", b_in_step)
    with b.client("admin") as c:
        assert c.delete(f"/v1/identities/{ident}").status_code == 204
    assert _top(b, probe) is None  # B's own write: gone at once
    until("the identity deleted through B is gone from A", lambda: _top(a, probe) is None)
    with a.client("admin") as c:
        status = until("A's index equals the store", lambda: (s := c.get("/v1/gallery").json())["consistent"] and s)
        assert status["faces_indexed"] == status["store_faces"]


def test_kill_9_of_one_replica_mid_write_loses_nothing_acknowledged(replicas, triton, model_repo, pg_module_url,
                                                                     keys, tmp_path):
    from cdface.serving.store.postgres import PostgresStore

    _, b = replicas
    victim = start_pg_gateway(tmp_path / "victim", triton.grpc_url, model_repo, pg_module_url, keys)
    with victim.client("admin") as c:
        people = [c.post("/v1/identities", json={"external_id": f"pg-k9-{i}"}).json()["id"] for i in range(4)]
    acked = enroll_until_killed(victim, people, _crop, seed_base=50_000)
    assert len(acked) >= 30

    store = PostgresStore(pg_module_url)
    try:
        stored = {f.id: person for person in people for f in store.list_faces(person)}
        assert all(stored.get(face_id) == person for person, face_id in acked)  # every acknowledged face is there
        per_request = Counter(c.face_id and stored.get(c.face_id) for c in store.changes_since(0, 100_000)
                              if c.op == "face.add" and c.face_id in stored)
        assert all(n % 3 == 0 for n in per_request.values())  # whole enrolments only: one transaction each
    finally:
        store.close()
    # The surviving replica followed every write the dead one committed, acknowledged or not.
    with b.client("admin") as c:
        status = until("B's index equals the store after the kill", lambda: (s := c.get("/v1/gallery").json())
                       ["consistent"] and s)
        assert status["faces_indexed"] == status["store_faces"] >= len(acked)
        ready = httpx.get(b.url + "/readyz", timeout=10)
        assert ready.status_code == 200 and ready.json()["sync"]["behind"] == 0
