"""Issue 11, faults 5-7: aborted uploads, one deadline per request, bounded reads and concurrency.

Real gateway processes spoken to over raw sockets (a well-behaved HTTP client cannot trickle a body,
stall mid-head or hang up mid-upload), in front of a real tritonserver; for the deadline, a Triton
of the test's own, frozen with SIGSTOP, so the session's shared server is never stopped.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import selectors
import signal
import socket
import time
from urllib.parse import urlsplit

import httpx
import pytest

from .conftest import Gateway, b64, start_gateway

pytestmark = pytest.mark.slow

DEADLINE_S = 3.0  # CDFACE_SERVE_REQUEST_DEADLINE_S of these gateways
HEADER_TIMEOUT_S = 2.0  # CDFACE_SERVE_HEADER_TIMEOUT_S
MAX_CONCURRENT = 4  # CDFACE_SERVE_MAX_CONCURRENT_REQUESTS
MARGIN_S = 2.0  # what a loaded 2-core machine may add to a bound the server keeps
LIMITS_ENV = {"CDFACE_SERVE_REQUEST_DEADLINE_S": str(DEADLINE_S),
              "CDFACE_SERVE_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S), "CDFACE_SERVE_KEEP_ALIVE_S": "2",
              "CDFACE_SERVE_MAX_CONCURRENT_REQUESTS": str(MAX_CONCURRENT),
              "CDFACE_SERVE_MAX_HEADER_BYTES": str(16 * 1024)}


@pytest.fixture(scope="module")
def limited(triton, model_repo, tmp_path_factory):
    gw = start_gateway(tmp_path_factory.mktemp("limits"), triton.grpc_url, model_repo, extra_env=LIMITS_ENV)
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def face_body(photos) -> bytes:
    """An /v1/embeddings JSON body: one real aligned face crop."""
    return json.dumps({"images": [{"data": b64(photos["tom_hanks_aligned"]), "mode": "aligned"}]}).encode()


def _connect(gw: Gateway) -> socket.socket:
    url = urlsplit(gw.url)
    return socket.create_connection((url.hostname, url.port), timeout=10)


def _head(gw: Gateway, path: str, length: int, content_type: str = "application/json") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {gw.keys['admin']}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {length}\r\n\r\n").encode()


def _read_to_close(sock: socket.socket, within_s: float) -> bytes:
    """Everything the server sends until it closes the connection; fails if it is still open after ``within_s``."""
    ends = time.monotonic() + within_s
    data = b""
    while True:
        left = ends - time.monotonic()
        if left <= 0:
            pytest.fail(f"the connection was still open after {within_s} s (got {data[:200]!r})")
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def _status_and_json(raw: bytes) -> tuple[int, dict[str, str], dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body) if body else {}


def _request_counts(gw: Gateway) -> dict[tuple[str, str], float]:
    """cdface_http_requests_total from /metrics: (route, status) -> count."""
    counts: dict[tuple[str, str], float] = {}
    for line in httpx.get(gw.url + "/metrics", timeout=10).text.splitlines():
        match = re.match(r'cdface_http_requests_total\{method="\w+",route="([^"]+)",status="(\d+)"\} (\S+)', line)
        if match:
            counts[(match.group(1), match.group(2))] = counts.get((match.group(1), match.group(2)), 0) \
                + float(match.group(3))
    return counts


def _gauge(gw: Gateway, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", httpx.get(gw.url + "/metrics", timeout=10).text, re.M)
    assert match, f"{name} is not in /metrics"
    return float(match.group(1))


def _wait_for(condition, within_s: float, what: str) -> None:
    ends = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > ends:
            pytest.fail(f"{what}: not seen within {within_s} s")
        time.sleep(0.05)


# -- fault 5: aborted uploads --------------------------------------------------------------------------


def test_an_upload_abandoned_mid_body_is_counted_as_499_not_500_and_logs_no_traceback(limited, face_body):
    body = face_body
    boundary = "cdfaceboundary"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"a.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + b"\x89PNG" + os.urandom(60_000)
    uploads = [("/v1/embeddings", "application/json", body),  # FastAPI's JSON reading
               ("/v1/embeddings", f"multipart/form-data; boundary={boundary}", form)]  # the gateway's own form reading
    before = _request_counts(limited)
    for path, content_type, payload in uploads:
        with _connect(limited) as sock:
            sock.sendall(_head(limited, path, len(payload), content_type) + payload[:len(payload) // 2])
    # The gateway sees each hang-up when it next reads the body; it counts the request then.
    _wait_for(lambda: _request_counts(limited).get(("/v1/embeddings", "499"), 0)
              - before.get(("/v1/embeddings", "499"), 0) == len(uploads), 20, "two requests counted as 499")
    counts = _request_counts(limited)
    assert not [key for key in counts if key[1] == "500"], counts
    log = limited.log.read_text()
    assert "Traceback" not in log and "Exception in ASGI" not in log and '"level": "ERROR"' not in log, log[-3000:]
    with limited.client() as c:  # and the gateway serves on
        assert c.post("/v1/embeddings", content=body, headers={"Content-Type": "application/json"}).status_code == 200


# -- fault 7: read timeouts and the concurrency bound --------------------------------------------------


def test_a_trickled_body_is_cut_off_with_408_at_the_deadline(limited, face_body):
    body = face_body
    with _connect(limited) as sock:
        started = time.monotonic()
        sock.sendall(_head(limited, "/v1/embeddings", len(body)))
        sel = selectors.DefaultSelector()
        sel.register(sock, selectors.EVENT_READ)
        sent = 0
        # One byte every 50 ms (the whole body would take minutes) until the server answers or hangs up.
        while not sel.select(timeout=0.05) and sent < len(body):
            if time.monotonic() - started > DEADLINE_S + MARGIN_S:
                pytest.fail("the trickled request was still open past its deadline")
            try:
                sock.send(body[sent:sent + 1])
            except OSError:
                break
            sent += 1
        raw = _read_to_close(sock, DEADLINE_S + MARGIN_S)
        elapsed = time.monotonic() - started
    assert elapsed < DEADLINE_S + MARGIN_S, elapsed
    status, headers, payload = _status_and_json(raw)
    assert status == 408 and payload["error"]["code"] == "request_timeout", raw[:300]
    assert headers.get("connection") == "close"


def test_request_heads_trickled_stalled_or_never_sent_are_closed_within_the_header_timeout(limited):
    """300 connections that open and send nothing, or half a head and stop: all closed at the header
    timeout (408 to those that had started a request); one trickling its head a byte at a time too."""
    started = time.monotonic()
    idle = [_connect(limited) for _ in range(150)]
    stalled = [_connect(limited) for _ in range(150)]
    for sock in stalled:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: gateway\r\nContent-Type: app")
    trickled = _connect(limited)
    head = _head(limited, "/v1/embeddings", 100)
    try:
        sel = selectors.DefaultSelector()
        sel.register(trickled, selectors.EVENT_READ)
        sent = 0
        while not sel.select(timeout=0.05) and sent < len(head) - 2:  # never completes the head
            assert time.monotonic() - started < HEADER_TIMEOUT_S + MARGIN_S, "the trickled head was not cut off"
            trickled.send(head[sent:sent + 1])
            sent += 1
        within = HEADER_TIMEOUT_S + MARGIN_S + 3  # + the time to open 300 connections on a loaded machine
        answers = [_read_to_close(sock, within - (time.monotonic() - started)) for sock in [*idle, *stalled, trickled]]
        elapsed = time.monotonic() - started
    finally:
        for sock in [*idle, *stalled, trickled]:
            sock.close()
    assert elapsed < within, elapsed
    assert all(answer == b"" for answer in answers[:150]), "an idle connection got an answer"
    for raw in answers[150:]:
        status, headers, payload = _status_and_json(raw)
        assert status == 408 and payload["error"]["code"] == "request_timeout", raw[:300]
    assert httpx.get(limited.url + "/healthz", timeout=10).status_code == 200


def test_an_oversized_request_head_gets_431_and_the_connection_closed(limited):
    with _connect(limited) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nX-Filler: " + b"a" * 40_000)
        raw = _read_to_close(sock, 10)
    status, _, payload = _status_and_json(raw)
    assert status == 431 and payload["error"]["code"] == "request_header_too_large", raw[:300]


def test_over_the_concurrency_bound_requests_get_503_with_retry_after_at_once(limited, face_body):
    body = face_body
    slow = [_connect(limited) for _ in range(MAX_CONCURRENT)]
    try:
        for sock in slow:  # headers and a little of the body: each holds a place until its deadline
            sock.sendall(_head(limited, "/v1/embeddings", len(body)) + body[:10])
        _wait_for(lambda: _gauge(limited, "cdface_http_requests_in_flight") == MAX_CONCURRENT, DEADLINE_S,
                  f"{MAX_CONCURRENT} requests in flight")
        with limited.client() as c:
            for _ in range(3):
                started = time.monotonic()
                r = c.post("/v1/embeddings", content=body, headers={"Content-Type": "application/json"})
                assert time.monotonic() - started < 1.5, "refused, but not at once"
                assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded", r.text
                assert int(r.headers["retry-after"]) >= 1
            assert c.get("/healthz").status_code == 200  # probes are not counted: still answered
            assert c.get("/readyz").status_code == 200
        for sock in slow:  # the held requests end at their deadline, as a trickled body does
            status, _, payload = _status_and_json(_read_to_close(sock, DEADLINE_S + MARGIN_S))
            assert status == 408 and payload["error"]["code"] == "request_timeout"
    finally:
        for sock in slow:
            sock.close()
    _wait_for(lambda: _gauge(limited, "cdface_http_requests_in_flight") == 0, 5, "no requests in flight")
    with limited.client() as c:
        assert c.post("/v1/embeddings", content=body, headers={"Content-Type": "application/json"}).status_code == 200


# -- fault 6: one deadline bounds a request end to end ------------------------------------------------


def test_with_triton_frozen_a_request_answers_503_within_its_deadline_retries_included(model_repo, face_body,
                                                                                         tmp_path):
    from cdface.devtools.triton_local import TritonServer
    from cdface.serving.triton import TritonEmbedder

    server = TritonServer(model_repo, log_path=tmp_path / "triton.log").start()
    # Triton's own budget (10 s) and retries (2) are larger than the request's deadline: the deadline binds.
    # breaker_failures is high so every request waits on Triton rather than on an open breaker.
    gw = start_gateway(tmp_path / "gw", server.grpc_url, model_repo,
                       extra_env={**LIMITS_ENV, "CDFACE_SERVE_TRITON_TIMEOUT_S": "10",
                                  "CDFACE_SERVE_TRITON_RETRIES": "2", "CDFACE_SERVE_BREAKER_FAILURES": "10"})
    assert server.process is not None
    frozen = False
    try:
        with gw.client("admin", timeout=30) as c:
            body = json.loads(face_body)
            assert c.post("/v1/embeddings", json=body).status_code == 200
            os.kill(server.process.pid, signal.SIGSTOP)
            frozen = True
            for _ in range(2):
                started = time.monotonic()
                r = c.post("/v1/embeddings", json=body)
                elapsed = time.monotonic() - started
                assert r.status_code in (503, 504), r.text
                assert r.json()["error"]["code"] in ("model_unavailable", "deadline_exceeded"), r.text
                if r.status_code == 503:
                    assert int(r.headers["retry-after"]) >= 1
                # Bounded by the deadline (before: up to 3 x triton_timeout_s), and it did wait for Triton.
                assert DEADLINE_S - 0.5 <= elapsed < DEADLINE_S + MARGIN_S, elapsed
            os.kill(server.process.pid, signal.SIGCONT)
            frozen = False
            _wait_for(lambda: c.post("/v1/embeddings", json=body).status_code == 200, 30,
                      "a 200 after Triton was thawed")
        assert "Traceback" not in gw.log.read_text()
        # The Triton client on its own (no request deadline): triton_timeout_s bounds all attempts together.
        elapsed = asyncio.run(_embed_while_frozen(server.process.pid, TritonEmbedder(
            server.grpc_url, "face", None, dim=128, timeout_s=2.0, retries=2, breaker_failures=10)))
        assert 1.5 <= elapsed < 2.0 + MARGIN_S, elapsed  # before: up to 3 attempts x 2 s + back-off
    finally:
        if frozen:
            os.kill(server.process.pid, signal.SIGCONT)
        gw.stop()
        server.stop()



async def _embed_while_frozen(pid: int, embedder) -> float:
    """Seconds one embed takes with Triton frozen, on a channel that was connected before the freeze."""
    import numpy as np

    from cdface.serving.triton import TritonUnavailable

    crop = np.zeros((1, 112, 112, 3), np.uint8)
    try:
        await embedder.embed(crop)  # connects: a frozen server is then a call that never answers
        os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(TritonUnavailable):
            await embedder.embed(crop)
        return time.monotonic() - started
    finally:
        os.kill(pid, signal.SIGCONT)
        await embedder.close()
