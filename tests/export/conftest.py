"""Fixtures for the Triton tests: a small exported face model, a model repository, a real tritonserver.

The server is the ``tritonserver`` from the ``nvidia-pytriton`` wheel in its own virtual environment
(``export.triton_server``); the first run on a machine creates that environment (about half a minute
to two minutes), later runs reuse it and the server itself starts in a few seconds.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

MODEL = "face"  # served from server start; tests must not change its versions or config


@dataclass
class ExportedModel:
    dir: Path
    manifest: dict
    module: object  # the torch module that was exported: uint8 NHWC -> L2-normalised embedding

    @property
    def onnx_path(self) -> Path:
        return self.dir / "model.onnx"


def _export_small_model(out_dir: Path, seed: int, version: int = 1) -> ExportedModel:
    """IR-18 at 1/8 width, uint8 NHWC in, L2-normalised embedding out: the ONNX contract, quick on CPU."""
    import torch
    import torch.nn.functional as F

    from training.backbones import create_backbone
    from training.preprocess import to_model_input

    class Embedder(torch.nn.Module):
        def __init__(self, backbone):
            super().__init__()
            self.backbone = backbone

        def forward(self, images):
            return F.normalize(self.backbone(to_model_input(images)), dim=1)

    torch.manual_seed(seed)
    module = Embedder(create_backbone("ir18", width=0.125)).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / "model.onnx"
    example = torch.zeros(2, 112, 112, 3, dtype=torch.uint8)
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated and the input check traces as a constant; both are fine here.
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(onnx_path), input_names=["images"], output_names=["embedding"],
                          dynamic_axes={"images": {0: "batch"}, "embedding": {0: "batch"}}, opset_version=17,
                          dynamo=False)
    with torch.no_grad():
        dim = int(module(example).shape[1])
    manifest = {
        "format": "cdface-model/1",
        "name": "test-face",
        "version": version,
        "backbone": "ir18",
        "embedding_size": dim,
        "input": {"name": "images", "dtype": "uint8", "layout": "NHWC", "shape": [-1, 112, 112, 3],
                  "pixel_format": "RGB"},
        "output": {"name": "embedding", "dtype": "float32", "shape": [-1, dim], "l2_normalised": True},
        "onnx_file": "model.onnx",
        "onnx_sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return ExportedModel(out_dir, manifest, module)


@pytest.fixture(scope="session")
def exported_model(tmp_path_factory) -> ExportedModel:
    return _export_small_model(tmp_path_factory.mktemp("export") / "v1", seed=0)


@pytest.fixture(scope="session")
def exported_model_v2(tmp_path_factory) -> ExportedModel:
    """Different weights, same contract: tells two served versions apart."""
    return _export_small_model(tmp_path_factory.mktemp("export") / "v2", seed=1, version=2)


@pytest.fixture(scope="session")
def triton_repo(tmp_path_factory, exported_model) -> Path:
    from export.triton_repo import add_model_version

    repo = tmp_path_factory.mktemp("triton-repo")
    # A long-ish queue delay makes the dynamic batcher's merging visible even on a loaded 2-core box.
    add_model_version(repo, MODEL, exported_model.dir, backend="python", max_batch_size=32,
                      preferred=[8, 32], queue_delay_us=20_000)
    return repo


@pytest.fixture(scope="session")
def triton_server(triton_repo, tmp_path_factory):
    """One real server for the session, in explicit model-control mode so tests can load models."""
    from export.triton_server import TritonServer

    log = tmp_path_factory.mktemp("triton-log") / "tritonserver.log"
    with TritonServer(triton_repo, explicit=True, load_models=[MODEL], log_path=log) as server:
        yield server


@pytest.fixture
def random_faces():
    def make(n: int, seed: int = 0) -> np.ndarray:
        return np.random.default_rng(seed).integers(0, 256, size=(n, 112, 112, 3), dtype=np.uint8)

    return make
