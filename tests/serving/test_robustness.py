"""Failures the gateway must survive: Triton going away and coming back, kill -9 mid-write, racing clients."""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from .conftest import b64, enroll_until_killed, start_gateway
from .test_bad_input import _png

pytestmark = pytest.mark.slow


def _crop(seed: int) -> str:
    """A random 112x112 image sent as an aligned crop: a distinct embedding per seed, no detector time."""
    return b64(_png(np.random.default_rng(seed).integers(0, 256, (112, 112, 3), dtype=np.uint8)))


def test_triton_stopped_gives_quick_503_and_the_gateway_recovers_without_restart(model_repo, tmp_path):
    from cdface.devtools.triton_local import TritonServer, free_port

    ports = dict(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
    server = TritonServer(model_repo, log_path=tmp_path / "triton.log", **ports).start()
    gw = start_gateway(tmp_path / "gw", server.grpc_url, model_repo)
    body = {"images": [{"data": _crop(1), "mode": "aligned"}]}
    try:
        with gw.client("admin", timeout=30) as c:
            assert c.post("/v1/embeddings", json=body).status_code == 200
            server.stop()
            times = []
            for _ in range(6):
                started = time.monotonic()
                r = c.post("/v1/embeddings", json=body)
                times.append(time.monotonic() - started)
                assert r.status_code == 503, r.text
                assert r.json()["error"]["code"] == "model_unavailable" and int(r.headers["retry-after"]) >= 1
            assert max(times) < 3.0, times  # quick, never a hang
            # Issue 12: readiness no longer follows Triton (it was 503 here); the body still reports it.
            ready = c.get("/readyz")
            assert ready.status_code == 200 and ready.json()["triton"] is False
            assert c.get("/healthz").status_code == 200
            server.start()  # same ports
            deadline, status = time.monotonic() + 60, None
            while time.monotonic() < deadline:
                status = c.post("/v1/embeddings", json=body).status_code
                if status == 200:
                    break
                time.sleep(0.5)
            assert status == 200, "the gateway did not recover after Triton came back"
            ready = c.get("/readyz")
            assert ready.status_code == 200 and ready.json()["triton"] is True
            assert gw.alive()
    finally:
        gw.stop()
        server.stop()


def test_without_triton_the_gateway_stays_ready_for_the_gallery_and_refuses_inference_with_503(model_repo, tmp_path):
    """Issue 12: a Triton outage must not take the gateways out of the Service: listings and deletions
    need no model and keep working; inference answers 503 model_unavailable + Retry-After."""
    from cdface.devtools.triton_local import TritonServer

    server = TritonServer(model_repo, log_path=tmp_path / "triton.log").start()
    gw = start_gateway(tmp_path / "gw", server.grpc_url, model_repo)
    try:
        with gw.client("admin", timeout=30) as c:
            people = [c.post("/v1/identities", json={"external_id": f"outage-{i}"}).json()["id"] for i in range(2)]
            r = c.post(f"/v1/identities/{people[0]}/faces",
                       json={"images": [{"data": _crop(70_000 + j), "mode": "aligned"} for j in range(2)]})
            assert r.status_code == 201, r.text
            face_ids = [f["id"] for f in r.json()["faces"]]
            assert c.get("/readyz").json()["triton"] is True
            server.stop()

            ready = c.get("/readyz")
            assert ready.status_code == 200, ready.text
            assert ready.json()["status"] == "ready" and ready.json()["triton"] is False and ready.json()["gallery"]
            listed = c.get("/v1/identities")
            assert listed.status_code == 200 and set(people) <= {i["id"] for i in listed.json()["items"]}
            assert c.get(f"/v1/identities/{people[0]}/faces").status_code == 200
            assert c.delete(f"/v1/identities/{people[0]}/faces/{face_ids[0]}").status_code == 204
            assert c.delete(f"/v1/identities/{people[1]}").status_code == 204
            assert c.get(f"/v1/identities/{people[1]}").status_code == 404
            assert c.get(f"/v1/identities/{people[0]}").json()["face_count"] == 1
            assert c.get("/v1/gallery").json()["consistent"]

            r = c.post("/v1/identify", json={"image": {"data": _crop(70_000), "mode": "aligned"}, "top_k": 1})
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "model_unavailable" and int(r.headers["retry-after"]) >= 1
            assert c.get("/readyz").status_code == 200  # still ready after inference failed
        assert gw.alive()
    finally:
        gw.stop()
        server.stop()


def test_kill_9_during_concurrent_enrollments_loses_no_acknowledged_face(triton, model_repo, tmp_path):
    gw = start_gateway(tmp_path / "gw", triton.grpc_url, model_repo)
    with gw.client("admin") as c:
        people = [c.post("/v1/identities", json={"external_id": f"k9-{i}"}).json()["id"] for i in range(4)]
    acked = enroll_until_killed(gw, people, _crop)
    assert len(acked) >= 30

    with sqlite3.connect(gw.db) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        orphans = db.execute("SELECT COUNT(*) FROM faces WHERE identity_id NOT IN (SELECT id FROM identities)")
        assert orphans.fetchone()[0] == 0
        # enrolments are one transaction each: faces arrive in whole requests of three
        sizes = db.execute("SELECT COUNT(*) FROM faces GROUP BY created").fetchall()
        total = db.execute("SELECT COUNT(*) FROM faces").fetchone()[0]
        # every face has its one embedding, whole: none without, none cut short
        assert db.execute("SELECT COUNT(*), MIN(dim), MAX(dim) FROM face_embeddings").fetchone() == (total, 128, 128)
        assert total % 3 == 0 and sizes
    again = start_gateway(tmp_path / "gw2", triton.grpc_url, model_repo, db=gw.db, keys=gw.keys)
    try:
        with again.client("admin") as c:
            stored = {(p, f["id"]) for p in people for f in c.get(f"/v1/identities/{p}/faces").json()["items"]}
            assert set(acked) <= stored
            status = c.get("/v1/gallery").json()
            assert status["consistent"] and status["faces_indexed"] == status["store_faces"] == total
            # an acknowledged face is found by search
            r = c.post("/v1/identify", json={"image": {"data": _crop(0), "mode": "aligned"}, "top_k": 1})
            assert r.json()["faces"][0]["candidates"][0]["similarity"] > 0.99
    finally:
        again.stop()


def test_no_search_returns_a_face_after_its_delete_was_acknowledged(gateway):
    with gateway.client("admin") as c:
        people = [c.post("/v1/identities", json={}).json()["id"] for _ in range(6)]
        faces: list[tuple[str, int, int]] = []  # (identity, face id, crop seed)
        for i, person in enumerate(people):
            r = c.post(f"/v1/identities/{person}/faces",
                       json={"images": [{"data": _crop(50_000 + i * 10 + j), "mode": "aligned"} for j in range(4)]})
            faces += [(person, f["id"], 50_000 + i * 10 + j) for j, f in enumerate(r.json()["faces"])]
    deleted_at: dict[int, float] = {}
    lock = threading.Lock()
    violations = []
    stop = threading.Event()

    searched = threading.Condition(lock)  # notified after every finished search
    finished = [0]

    def deleter() -> None:
        order = faces[:]
        random.Random(0).shuffle(order)
        try:
            with gateway.client("delete") as c:
                for person, face_id, _ in order[: len(order) * 3 // 4]:
                    r = c.delete(f"/v1/identities/{person}/faces/{face_id}")
                    assert r.status_code == 204
                    with searched:
                        deleted_at[face_id] = time.monotonic()
                        # Pace the deletes by the searches, not by the clock: at least one search
                        # finishes between two deletes, however loaded the machine is.
                        seen = finished[0]
                        searched.wait_for(lambda: finished[0] > seen, timeout=60)
        finally:
            stop.set()

    def searcher(seed: int) -> int:
        rng = random.Random(seed)
        n = 0
        with gateway.client("identify") as c:
            while not stop.is_set():
                _, _, crop_seed = rng.choice(faces)
                started = time.monotonic()
                r = c.post("/v1/identify", json={"image": {"data": _crop(crop_seed), "mode": "aligned"}, "top_k": 10})
                assert r.status_code == 200, r.text
                with lock:
                    gone = {f for f, t in deleted_at.items() if t < started}
                returned = {cand["face_id"] for cand in r.json()["faces"][0]["candidates"]}
                if returned & gone:
                    violations.append(returned & gone)
                n += 1
                with searched:
                    finished[0] += 1
                    searched.notify_all()
        return n

    def enroller() -> None:
        with gateway.client("enroll") as c:
            person = c.post("/v1/identities", json={}).json()["id"]
            k = 0
            while not stop.is_set():
                r = c.post(f"/v1/identities/{person}/faces",
                           json={"images": [{"data": _crop(90_000 + k), "mode": "aligned"}]})
                assert r.status_code == 201
                k += 1

    with ThreadPoolExecutor(6) as pool:
        searches = [pool.submit(searcher, s) for s in range(3)]
        extra = pool.submit(enroller)
        pool.submit(deleter).result()
        counts = [f.result() for f in searches]
        extra.result()
    assert sum(counts) >= 10
    assert not violations, violations[:5]
    with gateway.client("admin") as c:
        assert c.get("/v1/gallery").json()["consistent"]
