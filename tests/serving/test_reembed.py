"""After a model change: faces of the old model are not searched, the API reports them, reembed fixes them."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import pytest

from .conftest import CROP_KEYS, REPO_ROOT, start_gateway
from .test_robustness import _crop

pytestmark = pytest.mark.slow


def test_faces_of_another_model_are_reported_and_reembedded_from_retained_crops(triton, model_repo, tmp_path):
    gw = start_gateway(tmp_path / "gw", triton.grpc_url, model_repo)
    with gw.client("admin") as c:
        person = c.post("/v1/identities", json={"external_id": "reembed"}).json()["id"]
        kept = c.post(f"/v1/identities/{person}/faces",
                      json={"images": [{"data": _crop(s), "mode": "aligned"} for s in (1, 2)]}).json()["faces"]
        lost = c.post(f"/v1/identities/{person}/faces",
                      json={"images": [{"data": _crop(3), "mode": "aligned"}], "retain_crop": False}).json()["faces"]
        before = c.post("/v1/embeddings", json={"images": [{"data": _crop(1), "mode": "aligned"}]}).json()
    gw.stop()
    # Pretend the faces were made by an older model.
    with sqlite3.connect(gw.db) as db:
        db.execute("UPDATE faces SET model_name = 'old-model', embedding = zeroblob(512)")
    gw = start_gateway(tmp_path / "gw2", triton.grpc_url, model_repo, db=gw.db, keys=gw.keys)
    try:
        with gw.client("admin") as c:
            ident = c.get(f"/v1/identities/{person}").json()
            assert ident["face_count"] == 3 and ident["faces_needing_reenrolment"] == 3
            assert not any(f["current"] for f in c.get(f"/v1/identities/{person}/faces").json()["items"])
            status = c.get("/v1/gallery").json()
            assert status["faces_indexed"] == 0 and status["faces_other_models"] == {"old-model:1": 3}
            r = c.post("/v1/identify", json={"image": {"data": _crop(1), "mode": "aligned"}})
            assert r.json()["faces"][0]["candidates"] == []  # never compared across models
    finally:
        gw.stop()
    done = subprocess.run([sys.executable, "-m", "cdface.serving.cli", "gallery", "reembed", "--db", str(gw.db),
                           "--model-repository", str(model_repo), "--triton-url", triton.grpc_url],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
                          env={**os.environ, "CDFACE_SERVE_CROP_KEYS": CROP_KEYS})  # the crops are sealed
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result == {"model": "sface:1", "reembedded": 2, "need_reenrolment": 1}
    gw = start_gateway(tmp_path / "gw3", triton.grpc_url, model_repo, db=gw.db, keys=gw.keys)
    try:
        with gw.client("admin") as c:
            assert c.get(f"/v1/identities/{person}").json()["faces_needing_reenrolment"] == 1
            r = c.post("/v1/identify", json={"image": {"data": _crop(1), "mode": "aligned"}}).json()
            best = r["faces"][0]["candidates"][0]
            assert best["face_id"] == kept[0]["id"] and best["similarity"] > 0.999  # the PNG crop is lossless
            assert lost[0]["id"] not in {f["id"] for f in c.get(f"/v1/identities/{person}/faces").json()["items"]
                                         if f["current"]}
    finally:
        gw.stop()
    assert len(before["faces"][0]["embedding"]) == 128
