"""Small pieces without a server: the circuit breaker, decoding limits, settings masking, the decision rule."""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from types import SimpleNamespace

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


def test_base64_images_decode_in_every_common_form():
    from cdface.serving.usecases.images import _from_base64

    data = bytes(range(256)) * 3
    plain = base64.b64encode(data).decode()
    wrapped = "\r\n".join(plain[i:i + 76] for i in range(0, len(plain), 76))  # MIME line wrapping
    for text in (plain, plain.rstrip("="), wrapped, f"  {plain}\n", "data:image/png;base64," + plain):
        assert _from_base64(text, "image 0", 10_000) == data
    with pytest.raises(ImageError) as info:
        _from_base64("!!!not*base64***", "image 0", 10_000)
    assert info.value.code == "invalid_base64"
    with pytest.raises(ImageError) as info:
        _from_base64(plain, "image 0", 100)
    assert info.value.code == "image_too_large"


def test_small_aligned_requests_decode_on_the_event_loop_and_the_rest_in_a_worker_thread(monkeypatch):
    """One or two aligned crops are decoded where the request runs (a thread hop costs more than the
    decoding); a photo, or crops over ``inline_decode_bytes`` in all, in a worker thread."""
    from cdface.core.imaging import encode_png
    from cdface.serving.usecases import images

    decoded_on: list[int] = []
    real = images.decode_image

    def spying(*args, **kwargs):
        decoded_on.append(threading.get_ident())
        return real(*args, **kwargs)

    monkeypatch.setattr(images, "decode_image", spying)
    crop = base64.b64encode(encode_png(np.full((112, 112, 3), 128, np.uint8))).decode()
    photo = base64.b64encode(encode_png(np.full((160, 200, 3), 128, np.uint8))).decode()

    def threads(limit: int, *specs: tuple[str, str]) -> set[bool]:
        service = SimpleNamespace(settings=Settings(min_crop_face_score=0, inline_decode_bytes=limit), detector=None)
        decoded_on.clear()

        async def run() -> int:
            landmarks = [[60.0, 70.0], [120.0, 70.0], [90.0, 95.0], [70.0, 120.0], [110.0, 120.0]]
            await images.find_faces(service, [images.ImageIn(data, mode, landmarks=landmarks if mode == "landmarks" else None)
                                              for data, mode in specs])
            return threading.get_ident()

        loop_thread = asyncio.run(run())
        return {thread == loop_thread for thread in decoded_on}

    assert threads(64 * 1024, (crop, "aligned")) == {True}
    assert threads(64 * 1024, (crop, "aligned"), (crop, "aligned")) == {True}
    assert threads(len(crop) // 2, (crop, "aligned")) == {False}  # over the limit
    assert threads(0, (crop, "aligned")) == {False}  # turned off
    assert threads(64 * 1024, (crop, "aligned"), (photo, "landmarks")) == {False}  # not only crops


def test_settings_from_environment_with_secrets_masked(monkeypatch):
    monkeypatch.setenv("CDFACE_SERVE_KEY_PEPPER", "s3cret")
    monkeypatch.setenv("CDFACE_SERVE_PORT", "9001")
    settings = Settings()
    shown = settings.describe()
    assert shown["port"] == 9001 and shown["key_pepper"] == "**********" and "s3cret" not in str(shown)
    assert settings.cors_origins == [] and settings.auth is True


@pytest.mark.parametrize("target", ["127.0.0.1:8001", "triton.ns.svc.cluster.local:8001", "[::1]:8001",
                                    "dns:///triton-headless.ns.svc.cluster.local:8001", "dns:triton:8001",
                                    "dns://10.0.0.10/triton:8001", "ipv4:127.0.0.1:8001,127.0.0.2:8001",
                                    "ipv6:[::1]:8001,[fe80::1]:9001", "unix:/run/triton.sock"])
def test_grpc_targets_are_accepted(target):
    assert Settings(triton_url=f" {target} ").triton_url == target


@pytest.mark.parametrize("target", ["", "triton", "http://triton:8001", "dns:///triton", "ipv4:127.0.0.1",
                                    "ipv4:127.0.0.1:8001,triton:8001", "ipv4:300.0.0.1:8001", "ipv6:::1:8001",
                                    "triton:0", "triton:70000", "a b:8001"])
def test_grpc_targets_without_a_port_or_malformed_are_refused(target):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="triton_url"):
        Settings(triton_url=target)


def test_targets_naming_several_servers_are_balanced_round_robin():
    import json

    from cdface.serving.triton import balanced_target, channel_args

    def lb(target: str):
        args = dict(channel_args(target))
        config = args.get("grpc.service_config")
        return json.loads(config)["loadBalancingConfig"] if config else None

    assert lb("dns:///triton-headless:8001") == [{"round_robin": {}}]
    assert lb("ipv4:127.0.0.1:8001,127.0.0.2:8001") == [{"round_robin": {}}]
    assert lb("ipv6:[::1]:8001") == [{"round_robin": {}}]
    assert lb("triton:8001") is None and not balanced_target("dns-cache:8001")  # one server: gRPC's default
    assert dict(channel_args("dns:///t:8001"))["grpc.max_reconnect_backoff_ms"] == 1000  # quick reconnects kept


def test_serve_passes_the_graceful_timeout_to_uvicorn(monkeypatch, tmp_path, model_repo):
    import uvicorn

    from cdface.serving.cli import serve_command

    seen: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: seen.update(kwargs))
    monkeypatch.setenv("CDFACE_SERVE_GRACEFUL_TIMEOUT_S", "45")
    serve_command(host=None, port=None, db=tmp_path / "g.db", create=True, model_repository=model_repo, model="face",
                  triton_url=None)
    assert seen["timeout_graceful_shutdown"] == 45
    monkeypatch.delenv("CDFACE_SERVE_GRACEFUL_TIMEOUT_S")
    assert Settings().graceful_timeout_s == 20


def test_readiness_follows_the_gallery_and_its_database_not_triton(tmp_path):
    """Issue 12: with no Triton at all the gateway is ready once its gallery is loaded and the store
    answers; a store that stops answering makes it unready."""
    from types import SimpleNamespace

    from cdface.devtools.triton_local import free_port
    from cdface.serving.gallery import Gallery
    from cdface.serving.service import ServedModel
    from cdface.serving.store import ModelKey, SQLiteStore
    from cdface.serving.usecases.operations import readiness

    store = SQLiteStore(tmp_path / "gallery.db")
    gallery = Gallery(store, ModelKey("sface", 1), 16)
    embedder = TritonEmbedder(f"127.0.0.1:{free_port()}", "face", 1, dim=16)  # nothing listens there
    active = ServedModel(ModelKey("face", 1), SimpleNamespace(), embedder, gallery)
    service = SimpleNamespace(settings=Settings(), store=store, active=active, follower=None)

    async def go():
        loading = await readiness(service)
        gallery.load()
        loaded = await readiness(service)
        store.close()
        gone = await readiness(service)
        await embedder.close()
        return loading, loaded, gone

    loading, loaded, gone = asyncio.run(go())
    assert not loading.ready and not loading.gallery
    assert loaded.ready and loaded.gallery and not loaded.triton
    assert not gone.ready and gone.gallery
