"""The gateway's Triton client: faces of concurrent requests merged into shared calls, and crops through shared memory."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from cdface.serving.merging import CallMerger
from cdface.serving.triton import TritonEmbedder, TritonUnavailable

from .conftest import MODEL


def _crops(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 112, 112, 3), dtype=np.uint8)


def test_concurrent_requests_share_calls_and_get_their_own_embeddings(triton):
    """Against the real Triton: 24 requests of 1-3 faces each at once, through one call slot. Every
    request's rows equal what it gets alone, and the calls were merged."""
    requests = [_crops(seed, 1 + seed % 3) for seed in range(24)]

    async def go():
        alone = TritonEmbedder(triton.grpc_url, MODEL, None, dim=128, timeout_s=30)
        merged = TritonEmbedder(triton.grpc_url, MODEL, None, dim=128, timeout_s=30, merge_slots=1)
        try:
            expected = [await alone.embed(crops) for crops in requests]
            got = await asyncio.gather(*(merged.embed(crops) for crops in requests))
        finally:
            await alone.close()
            await merged.close()
        return expected, got, merged.merger

    expected, got, merger = asyncio.run(go())
    for want, have in zip(expected, got):
        assert have.shape == want.shape
        np.testing.assert_allclose(have, want, atol=1e-5)
    assert merger.requests == len(requests) and merger.calls < len(requests) // 2


def _run(coro):
    return asyncio.run(coro)


async def _echo_rows(crops: np.ndarray, ends_at: float, log: list[int], delay: float = 0.05) -> np.ndarray:
    """Stands in for Triton where the test needs a call whose timing it controls: one row per crop, the
    crop's first pixel, and the batch size logged."""
    log.append(len(crops))
    await asyncio.sleep(delay)
    return crops[:, 0, 0, :1].astype(np.float32)


def test_a_lone_request_goes_at_once_and_the_queue_respects_the_batch_limit():
    async def go():
        sizes: list[int] = []
        merger = CallMerger(lambda c, e: _echo_rows(c, e, sizes), slots=1, max_batch=4,
                            timeout_error=lambda: TritonUnavailable("late", 1.0))
        ends = time.monotonic() + 10
        first = await merger.run(_crops(0, 2), ends)
        assert sizes == [2] and first.shape == (2, 1)
        # one call in flight, then 5 requests of 2 faces queue: 2 + 2 fit a batch of 4, then 2 + 2, then 2
        batches = [_crops(seed, 2) for seed in range(6)]
        results = await asyncio.gather(*(merger.run(b, ends) for b in batches))
        for b, rows in zip(batches, results):
            np.testing.assert_array_equal(rows[:, 0], b[:, 0, 0, 0])
        return sizes, merger

    sizes, merger = _run(go())
    assert sizes == [2, 2, 4, 4, 2] and merger.calls == 5 and merger.requests == 7


def test_a_failed_merged_call_fails_each_request_it_carried_and_a_late_one_times_out():
    async def go():
        async def broken(crops, ends_at):
            await asyncio.sleep(0.05)
            raise TritonUnavailable("down", 1.0)

        merger = CallMerger(broken, slots=1, max_batch=8, timeout_error=lambda: TritonUnavailable("late", 1.0))
        ends = time.monotonic() + 10
        outcomes = await asyncio.gather(*(merger.run(_crops(s, 1), ends) for s in range(4)), return_exceptions=True)
        assert all(isinstance(o, TritonUnavailable) and str(o) == "down" for o in outcomes)

        sizes: list[int] = []
        slow = CallMerger(lambda c, e: _echo_rows(c, e, sizes, delay=0.5), slots=1, max_batch=8,
                          timeout_error=lambda: TritonUnavailable("late", 1.0))
        first = asyncio.ensure_future(slow.run(_crops(0, 1), time.monotonic() + 10))
        await asyncio.sleep(0)
        with pytest.raises(TritonUnavailable, match="late"):  # queued behind a 0.5 s call with a 0.1 s budget
            await slow.run(_crops(1, 1), time.monotonic() + 0.1)
        await first
        await asyncio.sleep(0)
        return sizes

    # the timed-out request's face never went out: the queue dropped it
    assert _run(go()) == [1]


def test_merging_is_off_unless_configured():
    assert TritonEmbedder("127.0.0.1:1", MODEL, 1, dim=128).merger is None
    with pytest.raises(ValueError):
        CallMerger(_echo_rows, slots=0, max_batch=4, timeout_error=lambda: TritonUnavailable("x", 1.0))


def test_shared_memory_gives_the_same_embeddings_and_survives_triton_forgetting_the_regions(triton):
    """Crops through /dev/shm regions registered with the real Triton: the same rows as over gRPC. When
    Triton drops every registration (as a restart does), the next call registers them again."""
    import tritonclient.grpc.aio as grpcaio

    crops = _crops(7, 5)

    async def go():
        plain = TritonEmbedder(triton.grpc_url, MODEL, None, dim=128, timeout_s=30)
        shared = TritonEmbedder(triton.grpc_url, MODEL, None, dim=128, timeout_s=30, shared_memory_slots=2)
        admin = grpcaio.InferenceServerClient(triton.grpc_url)
        try:
            expected = await plain.embed(crops)
            first = await shared.embed(crops)
            status = await admin.get_system_shared_memory_status(as_json=True)
            names = {region["name"] for region in status.get("regions", {}).values()}
            assert shared.shared_memory is not None and shared.shared_memory.registered
            await admin.unregister_system_shared_memory()  # every region, as a restarted Triton has none
            again = await asyncio.gather(*(shared.embed(crops) for _ in range(3)))  # 3 at once: one over gRPC
            status = await admin.get_system_shared_memory_status(as_json=True)
            assert len(status.get("regions", {})) == 4  # registered again
            return expected, first, again, names
        finally:
            await admin.close()
            await plain.close()
            await shared.close()

    expected, first, again, names = asyncio.run(go())
    assert len(names) == 4 and all(name.startswith("cdface-") for name in names)
    np.testing.assert_allclose(first, expected, atol=1e-5)
    for rows in again:
        np.testing.assert_allclose(rows, expected, atol=1e-5)
