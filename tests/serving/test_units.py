"""Small pieces without a server: the circuit breaker, decoding limits, settings masking, the decision rule."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from cdface.core.imaging import ImageError, decode_image
from cdface.serving.http_errors import http_status
from cdface.serving.settings import Settings
from cdface.serving.triton import CircuitBreaker, TritonEmbedder, TritonUnavailable


def test_circuit_breaker_opens_half_opens_and_closes():
    b = CircuitBreaker(failures=2, reset_s=0.2)
    b.before(); b.failure()
    b.before(); b.failure()
    assert b.state == "open"
    with pytest.raises(TritonUnavailable) as info:
        b.before()
    assert info.value.retry_after >= 1
    time.sleep(0.25)
    b.before()  # the probe
    with pytest.raises(TritonUnavailable):
        b.before()  # only one probe at a time
    b.failure()
    assert b.state == "open"
    time.sleep(0.25)
    b.before(); b.success()
    assert b.state == "closed"


def test_embedder_against_nothing_fails_fast_with_503_semantics():
    from cdface.devtools.triton_local import free_port

    async def go():
        e = TritonEmbedder(f"127.0.0.1:{free_port()}", "face", 1, dim=128, timeout_s=2, retries=1,
                           breaker_failures=2, breaker_reset_s=30)
        started = time.monotonic()
        with pytest.raises(TritonUnavailable):
            await e.embed(np.zeros((1, 112, 112, 3), np.uint8))
        first = time.monotonic() - started
        started = time.monotonic()
        with pytest.raises(TritonUnavailable) as info:
            await e.embed(np.zeros((1, 112, 112, 3), np.uint8))  # breaker open: no network at all
        assert time.monotonic() - started < 0.05 and info.value.retry_after > 20
        assert not await e.model_ready(timeout_s=0.5)
        await e.close()
        return first

    assert asyncio.run(go()) < 3.0


def test_decode_refuses_before_decoding():
    with pytest.raises(ImageError) as info:
        decode_image(b"x" * 2048, max_bytes=1024, max_pixels=10)
    assert info.value.code == "image_too_large" and http_status(info.value) == 413
    with pytest.raises(ImageError) as info:
        decode_image(b"", max_bytes=1024, max_pixels=10)
    assert info.value.code == "empty_image"


def test_settings_from_environment_with_secrets_masked(monkeypatch):
    monkeypatch.setenv("CDFACE_SERVE_KEY_PEPPER", "s3cret")
    monkeypatch.setenv("CDFACE_SERVE_PORT", "9001")
    settings = Settings()
    shown = settings.describe()
    assert shown["port"] == 9001 and shown["key_pepper"] == "**********" and "s3cret" not in str(shown)
    assert settings.cors_origins == [] and settings.auth is True
