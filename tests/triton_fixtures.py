"""Fixtures for the Triton tests (a pytest plugin of tests/conftest.py): a small exported face model, a model repository, a real tritonserver.

The server is the ``tritonserver`` from the ``nvidia-pytriton`` wheel in its own virtual environment
(``cdface.devtools.triton_local``); the first run on a machine creates that environment (about half a minute
to two minutes), later runs reuse it and the server itself starts in a few seconds.
"""

from __future__ import annotations

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
    """IR-18 at 1/8 width through the real exporter: a checkpoint -> model.onnx + manifest.json, quick on CPU."""
    import torch

    from cdface.export.onnx_export import EmbeddingModel, export_checkpoint
    from cdface.training.backbones import create_backbone
    from cdface.training.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    spec = {"name": "ir18", "kwargs": {"width": 0.125}}
    backbone = create_backbone(spec["name"], **spec["kwargs"]).eval()
    checkpoint = out_dir.parent / f"{out_dir.name}.pt"
    save_checkpoint(checkpoint, {"backbone": spec, "model": backbone.state_dict()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter deprecation chatter
        result = export_checkpoint(checkpoint, out_dir, name="test-face", version=version)
    manifest = json.loads(result.manifest_path.read_text())
    return ExportedModel(out_dir, manifest, EmbeddingModel(backbone).eval())


@pytest.fixture(scope="session")
def exported_model(tmp_path_factory) -> ExportedModel:
    return _export_small_model(tmp_path_factory.mktemp("export") / "v1", seed=0)


@pytest.fixture(scope="session")
def exported_model_v2(tmp_path_factory) -> ExportedModel:
    """Different weights, same contract: tells two served versions apart."""
    return _export_small_model(tmp_path_factory.mktemp("export") / "v2", seed=1, version=2)


@pytest.fixture(scope="session")
def triton_repo(tmp_path_factory, exported_model) -> Path:
    from cdface.export.triton_repo import add_model_version

    repo = tmp_path_factory.mktemp("triton-repo")
    # A long-ish queue delay makes the dynamic batcher's merging visible even on a loaded 2-core box.
    add_model_version(repo, MODEL, exported_model.dir, backend="python", max_batch_size=32,
                      preferred=[8, 32], queue_delay_us=20_000)
    return repo


@pytest.fixture(scope="session")
def triton_server(triton_repo, tmp_path_factory):
    """One real server for the session, in explicit model-control mode so tests can load models."""
    from cdface.devtools.triton_local import TritonServer

    log = tmp_path_factory.mktemp("triton-log") / "tritonserver.log"
    with TritonServer(triton_repo, explicit=True, load_models=[MODEL], log_path=log) as server:
        yield server


@pytest.fixture
def random_faces():
    def make(n: int, seed: int = 0) -> np.ndarray:
        return np.random.default_rng(seed).integers(0, 256, size=(n, 112, 112, 3), dtype=np.uint8)

    return make
