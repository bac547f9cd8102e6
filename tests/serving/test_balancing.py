"""One gateway, several Triton servers: per-request round-robin over a gRPC target that names them all.

Two real tritonservers serve the same model repository on the same ports, one bound to 127.0.0.1 and
one to 127.0.0.2 (as two Triton pods behind a headless Service). The gateway is pointed at both with
``ipv4:127.0.0.1:P,127.0.0.2:P``; each server's own Prometheus endpoint says how many requests it served.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request

import numpy as np
import pytest

from .conftest import MODEL, start_gateway
from .test_robustness import _crop

pytestmark = pytest.mark.slow

HOSTS = ("127.0.0.1", "127.0.0.2")
REQUESTS = 40


@pytest.fixture(scope="module")
def two_tritons(model_repo, tmp_path_factory):
    from cdface.devtools.triton_local import TritonServer

    logs = tmp_path_factory.mktemp("two-tritons")
    first = TritonServer(model_repo, log_path=logs / "triton-1.log", host=HOSTS[0]).start()
    second = TritonServer(model_repo, first.http_port, first.grpc_port, first.metrics_port,
                          log_path=logs / "triton-2.log", host=HOSTS[1])
    try:
        second.start()
        yield first, second
    finally:
        second.stop()
        first.stop()


def served(server) -> int:
    """Successful inference requests of the served model, from the server's own metrics endpoint."""
    with urllib.request.urlopen(server.metrics_url, timeout=5) as resp:
        text = resp.read().decode()
    pattern = rf'^nv_inference_request_success{{[^}}]*model="{MODEL}"[^}}]*}} (\S+)$'
    return int(sum(float(v) for v in re.findall(pattern, text, flags=re.M)))


def settled(servers) -> list[int]:
    """The servers' counts once the last answered requests are counted (Triton counts a request as it
    releases it, just after the answer has gone out): two reads in a row agree (bounded wait)."""
    last, deadline = [served(s) for s in servers], time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = [served(s) for s in servers]
        if now == last:
            break
        last = now
    return last


def counts_after(servers, before: list[int], expected: int) -> list[int]:
    """Each server's requests since ``before``, once they add up to ``expected`` (bounded wait)."""
    deadline = time.monotonic() + 10
    while True:
        delta = [served(s) - b for s, b in zip(servers, before)]
        if sum(delta) >= expected or time.monotonic() > deadline:
            return delta
        time.sleep(0.1)


def test_one_gateway_spreads_requests_over_two_tritons_and_skips_one_that_stops(two_tritons, model_repo, tmp_path):
    first, second = two_tritons
    assert first.grpc_port == second.grpc_port
    target = f"ipv4:{HOSTS[0]}:{first.grpc_port},{HOSTS[1]}:{second.grpc_port}"
    gw = start_gateway(tmp_path / "gw", target, model_repo)
    body = {"images": [{"data": _crop(123), "mode": "aligned"}]}
    try:
        with gw.client("embed", timeout=30) as c:
            for _ in range(4):  # both sub-channels connected before counting
                assert c.post("/v1/embeddings", json=body).status_code == 200
            before = settled((first, second))
            for i in range(REQUESTS):
                r = c.post("/v1/embeddings", json={"images": [{"data": _crop(i), "mode": "aligned"}]})
                assert r.status_code == 200, r.text
            split = counts_after((first, second), before, REQUESTS)
            print(f"requests per server ({HOSTS[0]}, {HOSTS[1]}): {split}")
            assert sum(split) == REQUESTS, split
            assert min(split) >= REQUESTS // 4, f"one server served too little of {REQUESTS}: {split}"

            ready = c.get("/readyz")
            assert ready.status_code == 200 and ready.json()["triton"] is True

            # One server goes away: round-robin skips it, every request is still answered.
            second.stop()
            before = settled((first,))
            for i in range(10):
                r = c.post("/v1/embeddings", json={"images": [{"data": _crop(1000 + i), "mode": "aligned"}]})
                assert r.status_code == 200, r.text
            assert counts_after((first,), before, 10) == [10]
            assert c.get("/readyz").json()["triton"] is True
        assert gw.alive()
    finally:
        gw.stop()


def test_a_dns_target_resolves_and_serves_through_round_robin(two_tritons):
    """``dns:///name:port``: gRPC's resolver, round_robin over what ``localhost`` resolves to (127.0.0.1,
    where the first server listens, and possibly ::1, where nothing does and which is skipped)."""
    from cdface.serving.triton import TritonEmbedder

    first, _ = two_tritons

    async def go():
        embedder = TritonEmbedder(f"dns:///localhost:{first.grpc_port}", MODEL, None, dim=128, timeout_s=10)
        try:
            assert await embedder.model_ready(timeout_s=5)
            crops = np.random.default_rng(0).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
            vectors = await embedder.embed(crops)
            assert vectors.shape == (3, 128) and np.isfinite(vectors).all()
        finally:
            await embedder.close()

    asyncio.run(go())
