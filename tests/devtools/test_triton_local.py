"""A real tritonserver (nvidia-pytriton's, Python backend + ONNX Runtime) serving an exported model.

No fakes: every request below crosses HTTP or gRPC into the server and its Python-backend stub.
"""

from __future__ import annotations

import os
import time

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from cdface.core.errors import CdfaceError
from tests.triton_fixtures import MODEL

pytestmark = pytest.mark.slow


@pytest.fixture
def http(triton_server):
    client = thttp.InferenceServerClient(triton_server.http_url, concurrency=16)
    yield client
    client.close()  # an open keep-alive connection makes the server wait out its exit timeout


@pytest.fixture
def grpc(triton_server):
    client = tgrpc.InferenceServerClient(triton_server.grpc_url)
    yield client
    client.close()


def infer_http(client, images: np.ndarray, model: str = MODEL, version: str = "", datatype: str = "UINT8"):
    tensor = thttp.InferInput("images", list(images.shape), datatype)
    tensor.set_data_from_numpy(images)
    return client.infer(model, [tensor], model_version=version).as_numpy("embedding")


def infer_grpc(client, images: np.ndarray, model: str = MODEL):
    tensor = tgrpc.InferInput("images", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images)
    return client.infer(model, [tensor]).as_numpy("embedding")


def onnx_runtime(onnx_path, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return session.run(["embedding"], {"images": images})[0]


# --------------------------------------------------------------------------------------------------


def test_health_and_readiness_over_http_and_grpc(http, grpc):
    assert http.is_server_live() and http.is_server_ready() and http.is_model_ready(MODEL)
    assert grpc.is_server_live() and grpc.is_server_ready() and grpc.is_model_ready(MODEL)


def test_model_metadata_matches_the_manifest(http, grpc, exported_model):
    manifest = exported_model.manifest
    dtype = {"uint8": "UINT8", "float32": "FP32"}
    expected_inputs = [{"name": manifest["input"]["name"], "datatype": dtype[manifest["input"]["dtype"]],
                        "shape": manifest["input"]["shape"]}]
    expected_outputs = [{"name": manifest["output"]["name"], "datatype": dtype[manifest["output"]["dtype"]],
                         "shape": manifest["output"]["shape"]}]

    meta = http.get_model_metadata(MODEL)
    assert meta["inputs"] == expected_inputs and meta["outputs"] == expected_outputs

    meta = grpc.get_model_metadata(MODEL, as_json=True)
    assert [{"name": t["name"], "datatype": t["datatype"], "shape": [int(d) for d in t["shape"]]}
            for t in meta["inputs"]] == expected_inputs
    assert [{"name": t["name"], "datatype": t["datatype"], "shape": [int(d) for d in t["shape"]]}
            for t in meta["outputs"]] == expected_outputs


@pytest.mark.parametrize("batch", [1, 8, 32])
def test_triton_equals_onnx_runtime_and_pytorch(batch, http, grpc, exported_model, random_faces):
    import torch

    images = random_faces(batch, seed=batch)
    direct = onnx_runtime(exported_model.onnx_path, images)
    with torch.no_grad():
        reference = exported_model.module(torch.from_numpy(images)).numpy()

    for served in (infer_http(http, images), infer_grpc(grpc, images)):
        assert served.shape == direct.shape == (batch, exported_model.manifest["embedding_size"])
        assert served.dtype == np.float32
        assert np.abs(served - direct).max() <= 1e-5
        cosine = (served * reference).sum(1) / (np.linalg.norm(served, axis=1) * np.linalg.norm(reference, axis=1))
        assert cosine.min() >= 0.99999


def _batch_counts(client, model: str) -> dict[int, int]:
    stats = client.get_inference_statistics(model)["model_stats"]
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for s in stats for b in s.get("batch_stats", [])}


def test_dynamic_batcher_merges_concurrent_requests(http, random_faces, exported_model):
    before = _batch_counts(http, MODEL)
    images = random_faces(48, seed=7)
    # 48 single-image requests, 16 in flight at a time (the client's connection pool): while the one
    # instance is busy the rest queue, and the batcher hands them over together.
    pending = []
    for i in range(len(images)):
        tensor = thttp.InferInput("images", [1, 112, 112, 3], "UINT8")
        tensor.set_data_from_numpy(images[i:i + 1])
        pending.append(http.async_infer(MODEL, [tensor]))
    results = [p.get_result().as_numpy("embedding") for p in pending]
    after = _batch_counts(http, MODEL)

    new_batches = {size: after.get(size, 0) - before.get(size, 0) for size in after}
    merged = {size: n for size, n in new_batches.items() if size > 1 and n > 0}
    assert merged, f"Triton executed only single-request batches: {new_batches}"
    # Merged or not, every request got its own image's embedding back.
    np.testing.assert_allclose(np.concatenate(results), onnx_runtime(exported_model.onnx_path, images), atol=1e-5)


def test_bad_requests_are_rejected_with_clear_errors(http, grpc, random_faces):
    # Triton checks requests against config.pbtxt before they reach the model; the messages name
    # the input, what was expected and what arrived, with HTTP 400 / gRPC INVALID_ARGUMENT.
    faces = random_faces(2)
    with pytest.raises(InferenceServerException, match="400.*data-type is 'FP32', but model 'face' expects 'UINT8'"):
        infer_http(http, faces.astype(np.float32), datatype="FP32")
    with pytest.raises(InferenceServerException, match=r"400.*unexpected shape .* Expected \[-1,112,112,3\], "
                                                       r"got \[2,112,56,3\]"):
        infer_http(http, faces[:, :, :56])
    with pytest.raises(InferenceServerException, match=r"400.*batch-size must be <= 32"):
        infer_http(http, random_faces(33))
    with pytest.raises(InferenceServerException, match=r"INVALID_ARGUMENT.*unexpected shape .* got \[2,112,112,1\]"):
        infer_grpc(grpc, faces[..., :1])
    with pytest.raises(InferenceServerException, match=r"INVALID_ARGUMENT.*batch-size must be <= 32"):
        infer_grpc(grpc, random_faces(33))
    with pytest.raises(InferenceServerException, match="404.*unknown model"):
        infer_http(http, faces, model="no-such-model")
    # The server is fine afterwards.
    assert infer_http(http, faces).shape[0] == 2


def test_model_errors_reach_the_client_as_errors(triton_repo, http, random_faces):
    # A config looser than the graph (any height and width) lets a wrong-sized image past Triton's
    # own checks; ONNX Runtime then fails inside model.py, which must answer with an error response
    # for that request rather than crash the stub or return empty outputs.
    import shutil

    name = "face-loose"
    (triton_repo / name).mkdir()
    shutil.copytree(triton_repo / MODEL / "1", triton_repo / name / "1")
    config = (triton_repo / MODEL / "config.pbtxt").read_text().replace(f'name: "{MODEL}"', f'name: "{name}"')
    config = config.replace("dims: 112\n  dims: 112\n  dims: 3", "dims: -1\n  dims: -1\n  dims: 3")
    assert "dims: -1" in config
    (triton_repo / name / "config.pbtxt").write_text(config)
    http.load_model(name)
    try:
        with pytest.raises(InferenceServerException, match="ONNX Runtime failed"):
            infer_http(http, random_faces(2)[:, :64, :64], model=name)
        assert infer_http(http, random_faces(2), model=name).shape[0] == 2  # the stub survived
    finally:
        http.unload_model(name)


def test_new_version_is_served_without_restart(triton_server, triton_repo, http, exported_model,
                                              exported_model_v2, random_faces):
    from cdface.export.triton_repo import add_model_version, set_version_policy

    name, pid = "face-versions", triton_server.process.pid
    images = random_faces(4, seed=3)
    want_v1 = onnx_runtime(exported_model.onnx_path, images)
    want_v2 = onnx_runtime(exported_model_v2.onnx_path, images)
    assert np.abs(want_v1 - want_v2).max() > 1e-2  # the two versions are distinguishable

    add_model_version(triton_repo, name, exported_model.dir, backend="python", max_batch_size=8)
    http.load_model(name)
    np.testing.assert_allclose(infer_http(http, images, name), want_v1, atol=1e-5)

    # Version 2 lands on disk; in explicit mode nothing changes until we ask, and v1 keeps serving.
    add_model_version(triton_repo, name, exported_model_v2.dir, backend="python", version_policy="latest:2")
    np.testing.assert_allclose(infer_http(http, images, name), want_v1, atol=1e-5)
    assert not http.is_model_ready(name, "2")

    # Load: both versions serve side by side; the default is the newest.
    http.load_model(name)
    assert http.is_model_ready(name, "1") and http.is_model_ready(name, "2")
    np.testing.assert_allclose(infer_http(http, images, name, version="1"), want_v1, atol=1e-5)
    np.testing.assert_allclose(infer_http(http, images, name, version="2"), want_v2, atol=1e-5)
    np.testing.assert_allclose(infer_http(http, images, name), want_v2, atol=1e-5)

    # Retire v1: the policy now serves only the newest; reloading unloads v1.
    set_version_policy(triton_repo, name, "latest:1")
    http.load_model(name)
    assert not http.is_model_ready(name, "1") and http.is_model_ready(name, "2")
    with pytest.raises(InferenceServerException):
        infer_http(http, images, name, version="1")
    np.testing.assert_allclose(infer_http(http, images, name), want_v2, atol=1e-5)

    http.unload_model(name)
    assert triton_server.process.pid == pid and triton_server.is_running()
    assert http.is_model_ready(MODEL)  # the other model never noticed


def test_metrics_endpoint_serves_prometheus_text(triton_server, http, random_faces):
    import urllib.request

    infer_http(http, random_faces(1))
    with urllib.request.urlopen(triton_server.metrics_url, timeout=5) as resp:
        text = resp.read().decode()
    assert "nv_inference_request_success" in text


# --------------------------------------------------------------------------------------------------
# The launcher itself


def test_a_server_that_cannot_load_its_model_fails_with_the_log_tail(tmp_path):
    from cdface.devtools.triton_local import TritonServer

    broken = tmp_path / "repo" / "broken"
    (broken / "1").mkdir(parents=True)
    (broken / "config.pbtxt").write_text('name: "broken"\nbackend: "python"\nmax_batch_size: 4\n')
    (broken / "1" / "model.py").write_text("raise RuntimeError('this model cannot load')\n")
    server = TritonServer(tmp_path / "repo", log_path=tmp_path / "server.log", ready_timeout_s=60)
    with pytest.raises(CdfaceError, match="this model cannot load|failed to load"):
        server.start()
    assert not server.is_running()


def test_stale_shared_memory_is_cleaned_but_live_regions_stay(tmp_path):
    from cdface.devtools.triton_local import clean_stale_shm

    stale = f"/dev/shm/triton_python_backend_shm_region_cdface-test-stale-{os.getpid()}"
    live = f"/dev/shm/triton_python_backend_shm_region_cdface-test-live-{os.getpid()}"
    old = time.time() - 3600
    for path in (stale, live):
        with open(path, "wb") as f:
            f.write(b"\0" * 16)
        os.utime(path, (old, old))
    held = open(live, "rb")  # a live process holding it, as a running server's stub would
    try:
        removed = {str(p) for p in clean_stale_shm()}
        assert stale in removed and not os.path.exists(stale)
        assert live not in removed and os.path.exists(live)
    finally:
        held.close()
        for path in (stale, live):
            if os.path.exists(path):
                os.unlink(path)


def test_missing_repository_is_a_clear_error(tmp_path):
    from cdface.devtools.triton_local import TritonServer

    with pytest.raises(CdfaceError, match="does not exist"):
        TritonServer(tmp_path / "nope").start()
