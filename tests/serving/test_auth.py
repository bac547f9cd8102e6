"""Every route but health, readiness, metrics and the docs needs a key with the right scope."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from .conftest import REPO_ROOT

pytestmark = pytest.mark.slow

OPEN = {"/healthz", "/readyz", "/metrics"}
SCOPE = {  # (method, path) -> scope needed
    ("post", "/v1/embeddings"): "embed",
    ("post", "/v1/detect"): "embed",
    ("post", "/v1/verify"): "verify",
    ("post", "/v1/identify"): "identify",
    ("post", "/v1/identities"): "enroll",
    ("get", "/v1/identities"): "identify",
    ("get", "/v1/identities/{identity_id}"): "identify",
    ("patch", "/v1/identities/{identity_id}"): "enroll",
    ("delete", "/v1/identities/{identity_id}"): "delete",
    ("post", "/v1/identities/{identity_id}/faces"): "enroll",
    ("get", "/v1/identities/{identity_id}/faces"): "identify",
    ("delete", "/v1/identities/{identity_id}/faces/{face_id}"): "delete",
    ("get", "/v1/identities/{identity_id}/faces/{face_id}/crop"): "crops",  # no fixture key has it: admin only
    ("get", "/v1/gallery"): "admin",
}


def _routes(spec):
    for path, ops in spec["paths"].items():
        for method in ops:
            yield method, path


def test_every_route_needs_a_key_with_the_right_scope(gateway):
    spec = httpx.get(gateway.url + "/openapi.json").json()
    routes = list(_routes(spec))
    assert {r for r in routes if r[1] not in OPEN} == set(SCOPE)  # the table covers every route
    for method, path in routes:
        url = gateway.url + path.format(identity_id="idt_x", face_id=1)
        if path in OPEN:
            assert httpx.request(method, url).status_code in (200, 503)
            continue
        body = {"json": {}} if method in ("post", "patch") else {}
        r = httpx.request(method, url, **body)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", (method, path)
        assert r.headers["www-authenticate"] == "Bearer"
        r = httpx.request(method, url, headers={"Authorization": "Bearer cdf_nope_nope"}, **body)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        needed = SCOPE[(method, path)]
        for scope, key in gateway.keys.items():
            r = httpx.request(method, url, headers={"X-API-Key": key}, **body)
            if scope == needed or scope == "admin":
                assert r.status_code not in (401, 403), (method, path, scope)
            else:
                assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", (method, path, scope)


def test_keys_cli_create_list_revoke(gateway, tmp_path):
    cli = [sys.executable, "-m", "cdface.serving.cli", "keys"]
    db = ["--db", str(gateway.db)]
    made = subprocess.run(cli + ["create", "--name", "ci", "--scope", "embed", *db], capture_output=True, text=True,
                          cwd=REPO_ROOT, check=True)
    key = made.stdout.strip()
    key_id = key.split("_")[1]
    listed = subprocess.run(cli + ["list", *db], capture_output=True, text=True, cwd=REPO_ROOT, check=True).stdout
    assert key_id in listed and key not in listed  # the secret is never shown again
    assert gateway.db.read_bytes().find(key.encode()) == -1  # stored hashed
    with httpx.Client(base_url=gateway.url, headers={"X-API-Key": key}) as c:
        assert c.post("/v1/embeddings", json={}).status_code == 422  # authorised, then validated
        subprocess.run(cli + ["revoke", key_id, *db], capture_output=True, cwd=REPO_ROOT, check=True)
        r = c.post("/v1/embeddings", json={})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    bad = subprocess.run(cli + ["create", "--name", "x", "--scope", "root", *db], capture_output=True, text=True,
                         cwd=REPO_ROOT)
    assert bad.returncode == 2 and "scopes must be" in bad.stderr


def test_cors_is_off_by_default(gateway):
    r = httpx.options(gateway.url + "/v1/embeddings", headers={"Origin": "https://evil.example",
                                                               "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers
