"""Issue 11, duties: rate limits per API key and per route group (``cdface.serving.rate_limits``).

Real gateway processes with their own limits, in front of the session's real tritonserver. The
routes used are cheap ones (listing the gallery, the gallery status), so a limit is reached in a few
milliseconds; nothing waits for a window to pass. A window of a minute is far longer than the test, so
every count below falls in one window.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest

from .conftest import MODEL, REPO_ROOT, Gateway, start_gateway

pytestmark = pytest.mark.slow

PER_KEY = 5  # CDFACE_SERVE_RATE_LIMIT of the gateway below, per key and route group
ADMIN_GROUP = 12  # its per-route override for the admin group (GET /v1/gallery)
WINDOW_S = 60


@pytest.fixture(scope="module")
def limited(triton, model_repo, tmp_path_factory):
    gw = start_gateway(tmp_path_factory.mktemp("rate-limits"), triton.grpc_url, model_repo,
                       extra_env={"CDFACE_SERVE_RATE_LIMIT": f"{PER_KEY}/minute",
                                  "CDFACE_SERVE_RATE_LIMITS": json.dumps({"admin": f"{ADMIN_GROUP}/minute"})})
    yield gw
    gw.stop()


def _statuses(client: httpx.Client, path: str, n: int) -> list[int]:
    return [client.get(path).status_code for _ in range(n)]


def _assert_rate_limited(r: httpx.Response) -> None:
    assert r.status_code == 429, r.text
    assert r.json()["error"]["code"] == "rate_limited"
    assert r.headers["content-type"].startswith("application/json")
    # Whole seconds until the oldest counted request leaves the moving window of a minute.
    assert 1 <= int(r.headers["Retry-After"]) <= WINDOW_S


def test_over_the_limit_is_429_with_retry_after_and_other_keys_and_groups_are_unaffected(limited: Gateway):
    with limited.client("admin") as key_a, limited.client("identify") as key_b, \
            httpx.Client(base_url=limited.url, timeout=30) as anonymous:
        # key A, group identify: exactly PER_KEY requests pass, then every further one is refused
        assert _statuses(key_a, "/v1/identities", PER_KEY) == [200] * PER_KEY
        _assert_rate_limited(key_a.get("/v1/identities"))
        _assert_rate_limited(key_a.get("/v1/identities/someone"))  # the same group: one count for its routes

        # key B, the same group in the same window: its own count
        assert _statuses(key_b, "/v1/identities", PER_KEY) == [200] * PER_KEY
        _assert_rate_limited(key_b.get("/v1/identities"))

        # key A, another group (admin) with its own, larger limit: unaffected by the identify count
        assert _statuses(key_a, "/v1/gallery", ADMIN_GROUP) == [200] * ADMIN_GROUP
        _assert_rate_limited(key_a.get("/v1/gallery"))

        # probes and metrics need no key and are never limited, however often asked
        for path in ("/healthz", "/readyz", "/metrics"):
            assert set(_statuses(anonymous, path, 3 * PER_KEY)) == {200}, path
        assert 'status="429"' in anonymous.get("/metrics").text


def test_refused_keys_are_401_and_do_not_use_up_a_quota(limited: Gateway):
    """The limit is counted after authentication: an unknown key is answered 401 every time (never 429),
    and a key's quota is not spent by strangers' requests."""
    with httpx.Client(base_url=limited.url, timeout=30, headers={"Authorization": "Bearer cdf_nokey_x"}) as stranger:
        assert _statuses(stranger, "/v1/identities", 3 * PER_KEY) == [401] * (3 * PER_KEY)
    with limited.client("delete") as fresh:  # a key that has made no request yet
        # the delete group of this key: PER_KEY deletes of unknown identities pass the limit (404), then 429
        assert [fresh.delete(f"/v1/identities/nobody-{i}").status_code for i in range(PER_KEY)] == [404] * PER_KEY
        _assert_rate_limited(fresh.delete("/v1/identities/nobody"))


def test_without_api_keys_each_client_address_is_limited(triton, model_repo, tmp_path):
    gw = start_gateway(tmp_path / "gw", triton.grpc_url, model_repo,
                       extra_env={"CDFACE_SERVE_AUTH": "0", "CDFACE_SERVE_RATE_LIMIT": "3/minute",
                                  "CDFACE_SERVE_RATE_LIMITS": json.dumps({"admin": "none"})})
    try:
        with httpx.Client(base_url=gw.url, timeout=30) as client:
            assert _statuses(client, "/v1/identities", 3) == [200] * 3
            _assert_rate_limited(client.get("/v1/identities"))
            # a group whose limit is "none" is not limited
            assert _statuses(client, "/v1/gallery", 10) == [200] * 10
    finally:
        gw.stop()


@pytest.mark.parametrize("env, named", [
    ({"CDFACE_SERVE_RATE_LIMIT": "lots"}, "CDFACE_SERVE_RATE_LIMIT"),
    ({"CDFACE_SERVE_RATE_LIMITS": '{"search": "5/minute"}'}, "CDFACE_SERVE_RATE_LIMITS"),
    ({"CDFACE_SERVE_RATE_LIMIT_STORAGE": "memcache://secret@cache:11211"}, "CDFACE_SERVE_RATE_LIMIT_STORAGE"),
])
def test_a_bad_rate_limit_setting_is_one_line_and_exit_2(tmp_path, env, named):
    proc = subprocess.run([sys.executable, "-m", "cdface.serving.cli", "serve", "--db", str(tmp_path / "g.db")],
                          cwd=REPO_ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and "secret" not in proc.stderr  # the storage URI may hold a password


def test_a_storage_whose_client_is_not_installed_is_refused_at_start(model_repo, tmp_path):
    """redis:// needs the redis package, which the serve extra does not install: one line and a non-zero exit
    before the server starts, not a traceback (nor a failure at the first request)."""
    try:
        import redis  # noqa: F401
        pytest.skip("the redis package is installed here")
    except ImportError:
        pass
    env = {**os.environ, "CDFACE_SERVE_RATE_LIMIT_STORAGE": "redis://:secret@127.0.0.1:6379",
           "CDFACE_SERVE_MODEL_REPOSITORY": str(model_repo), "CDFACE_SERVE_MODEL": MODEL}
    proc = subprocess.run([sys.executable, "-m", "cdface.serving.cli", "serve", "--create", "--port", "0",
                           "--db", str(tmp_path / "g.db")],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("cdface: error:")]
    assert len(errors) == 1 and "CDFACE_SERVE_RATE_LIMIT_STORAGE" in errors[0] and "redis" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and "secret" not in proc.stderr
