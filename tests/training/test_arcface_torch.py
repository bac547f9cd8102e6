"""arcface_torch IResNet weights (insightface's ``backbone.pth`` layout) in the project's backbones.

Two independent sources of the layout: the project's own model through the inverse mapping, and a
key list built here from the published architecture alone (units per stage, channels, a downsample
on every stage's first unit, BN2d -> flatten -> FC(512*7*7) -> BN1d). The reference output is a
functional forward written here over the arcface_torch keys, so the check does not lean on the
mapping it tests.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cdface.core.errors import CdfaceError
from cdface.training.backbones import create_backbone
from cdface.training.backbones.arcface_torch import (
    arcface_torch_spec,
    convert_arcface_torch,
    load_arcface_torch,
    to_arcface_torch,
)

CDFACE = Path(sys.executable).parent / "cdface"
PUBLISHED_UNITS = {"iresnet18": (2, 2, 2, 2), "iresnet50": (3, 4, 14, 3)}


def _bn(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (channels,), f"{prefix}.bias": (channels,), f"{prefix}.running_mean": (channels,),
            f"{prefix}.running_var": (channels,), f"{prefix}.num_batches_tracked": ()}


def published_layout(units: tuple[int, ...], width: float = 1.0, embedding: int = 512) -> dict[str, tuple[int, ...]]:
    """Key -> shape of arcface_torch's IResNet (iresnet.py: IBasicBlock, _make_layer, IResNet.__init__)."""
    planes = [int(round(c * width)) for c in (64, 128, 256, 512)]
    layout: dict[str, tuple[int, ...]] = {"conv1.weight": (planes[0], 3, 3, 3), **_bn("bn1", planes[0]),
                                          "prelu.weight": (planes[0],)}
    inplanes = planes[0]
    for stage, (count, p) in enumerate(zip(units, planes), start=1):
        for unit in range(count):
            cin = inplanes if unit == 0 else p
            u = f"layer{stage}.{unit}"
            layout.update({**_bn(f"{u}.bn1", cin), f"{u}.conv1.weight": (p, cin, 3, 3), **_bn(f"{u}.bn2", p),
                           f"{u}.prelu.weight": (p,), f"{u}.conv2.weight": (p, p, 3, 3), **_bn(f"{u}.bn3", p)})
            if unit == 0:  # every stage starts with stride 2, so its first unit has a downsample
                layout.update({f"{u}.downsample.0.weight": (p, cin, 1, 1), **_bn(f"{u}.downsample.1", p)})
        inplanes = p
    layout.update({**_bn("bn2", planes[3]), "fc.weight": (embedding, planes[3] * 7 * 7), "fc.bias": (embedding,),
                   **_bn("features", embedding)})
    return layout


def random_weights(layout: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights a trained model could have: He-scaled convs, BN statistics away from their defaults."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in layout.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1000, dtype=torch.long)
        elif key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(shape, generator=g)
        elif key.endswith(("running_mean", "bias")):
            state[key] = 0.1 * torch.randn(shape, generator=g)
        elif key.endswith("prelu.weight"):
            state[key] = 0.25 + 0.05 * torch.randn(shape, generator=g)
        elif len(shape) == 1:  # a BN gain
            state[key] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = int(np.prod(shape[1:]))
            state[key] = torch.randn(shape, generator=g) * (0.5 / fan_in) ** 0.5
    return state


def reference_forward(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """arcface_torch's IResNet.forward in evaluation, written over its own keys."""
    def bn(h, p):
        return F.batch_norm(h, state[f"{p}.running_mean"], state[f"{p}.running_var"], state[f"{p}.weight"],
                            state[f"{p}.bias"], training=False, eps=1e-5)

    h = F.prelu(bn(F.conv2d(x, state["conv1.weight"], padding=1), "bn1"), state["prelu.weight"])
    stage = 1
    while f"layer{stage}.0.bn1.weight" in state:
        unit = 0
        while f"layer{stage}.{unit}.bn1.weight" in state:
            u = f"layer{stage}.{unit}"
            stride = 2 if unit == 0 else 1
            out = bn(F.conv2d(bn(h, f"{u}.bn1"), state[f"{u}.conv1.weight"], padding=1), f"{u}.bn2")
            out = bn(F.conv2d(F.prelu(out, state[f"{u}.prelu.weight"]), state[f"{u}.conv2.weight"], stride=stride,
                              padding=1), f"{u}.bn3")
            if f"{u}.downsample.0.weight" in state:
                h = bn(F.conv2d(h, state[f"{u}.downsample.0.weight"], stride=stride), f"{u}.downsample.1")
            h = out + h
            unit += 1
        stage += 1
    h = torch.flatten(bn(h, "bn2"), 1)
    return bn(F.linear(h, state["fc.weight"], state["fc.bias"]), "features")


def _faces(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand((n, 3, 112, 112), generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("name", ["iresnet18", "iresnet50"])
def test_published_layout_loads_strictly_and_matches_the_reference(name):
    layout = published_layout(PUBLISHED_UNITS[name])
    project_depth = {"iresnet18": "ir18", "iresnet50": "ir50"}[name]
    # The project's model, renamed, has exactly the published keys and shapes.
    ours = to_arcface_torch(create_backbone(project_depth).state_dict())
    assert {k: tuple(v.shape) for k, v in ours.items()} == layout

    state = random_weights(layout)
    model, spec = load_arcface_torch(state)  # strict: raises on any missing or unexpected key
    assert spec == {"name": project_depth, "kwargs": {"width": 1.0, "embedding_size": 512, "dropout": 0.0}}
    x = _faces()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference_forward(state, x), atol=1e-6, rtol=1e-5)


def test_round_trip_from_the_projects_own_model():
    project = create_backbone("ir34", width=0.25, embedding_size=128)
    project.load_state_dict({k: v for k, v in random_weights(
        {k: tuple(v.shape) for k, v in project.state_dict().items()}, seed=3).items()})
    theirs = to_arcface_torch(project.state_dict())
    assert "layer3.5.conv2.weight" in theirs and "layer1.0.downsample.1.running_var" in theirs
    loaded, spec = load_arcface_torch(theirs)
    assert spec == {"name": "ir34", "kwargs": {"width": 0.25, "embedding_size": 128, "dropout": 0.0}}
    for key, value in project.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = _faces(seed=1)
    with torch.no_grad():
        expected = project.eval()(x)
        torch.testing.assert_close(loaded.eval()(x), expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(reference_forward(theirs, x), expected, atol=1e-6, rtol=1e-5)


def test_files_as_published_and_as_saved_elsewhere(tmp_path):
    state = random_weights(published_layout(PUBLISHED_UNITS["iresnet18"], width=0.25, embedding=64), seed=5)
    x = _faces(2)
    with torch.no_grad():
        expected = reference_forward(state, x)
    files = {
        "backbone.pth": state,
        "ddp.pth": {f"module.{k}": v for k, v in state.items()},  # saved from the DDP wrapper
        "checkpoint_gpu_0.pt": {"epoch": 3, "state_dict_backbone": state},  # arcface_torch's resume file
        "no_counters.pth": {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")},
    }
    for name, payload in files.items():
        torch.save(payload, tmp_path / name)
        model, spec = load_arcface_torch(tmp_path / name)
        assert spec["name"] == "ir18" and spec["kwargs"]["embedding_size"] == 64, name
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x), expected, atol=1e-6, rtol=1e-5)


def test_fine_tuning_loads_into_the_configured_backbone():
    state = random_weights(published_layout(PUBLISHED_UNITS["iresnet18"], width=0.25), seed=7)
    configured = create_backbone("ir18", width=0.25, embedding_size=512, dropout=0.1)
    model, _ = load_arcface_torch(state, into=configured)
    assert model is configured and torch.equal(configured.fc.weight, state["fc.weight"])
    with pytest.raises(CdfaceError, match="do not fit the backbone"):
        load_arcface_torch(state, into=create_backbone("ir18", width=0.5))


def test_cdface_train_starts_from_arcface_torch_weights(tmp_path):
    from cdface.training.checkpoint import load_checkpoint
    from tests.training.test_trainer import write_preset
    from tests.training.trainer_support import write_tiny_folder_dataset

    state = random_weights(published_layout(PUBLISHED_UNITS["iresnet18"], width=0.125, embedding=16), seed=9)
    torch.save(state, tmp_path / "backbone.pth")
    data = write_tiny_folder_dataset(tmp_path / "train", identities=4, per_identity=4)
    # A vanishing lr: the one step moves nothing visible, so the saved backbone is the loaded one.
    preset = write_preset(tmp_path / "p.yaml", data, tmp_path / "run", optim={"batch_size": 8, "lr": 1e-9},
                          model={"init_weights": str(tmp_path / "backbone.pth")})
    proc = subprocess.run([str(CDFACE), "train", "--preset", str(preset), "--set", "run.stage=pretrain",
                           "--set", "run.max_steps=1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    trained = load_checkpoint(tmp_path / "run" / "model.pt")["model"]
    expected, _ = load_arcface_torch(state)
    fresh = create_backbone("ir18", width=0.125, embedding_size=16).state_dict()
    for key, value in expected.state_dict().items():
        if "running_" not in key and "num_batches" not in key:
            torch.testing.assert_close(trained[key], value, atol=1e-6, rtol=0, msg=key)
    assert not torch.allclose(trained["fc.weight"], fresh["fc.weight"], atol=1e-3)


def test_wrong_weights_are_refused_with_a_readable_error(tmp_path):
    state = random_weights(published_layout(PUBLISHED_UNITS["iresnet18"], width=0.125), seed=1)
    with pytest.raises(CdfaceError, match="fc.bias"):
        load_arcface_torch({k: v for k, v in state.items() if k != "fc.bias"})
    with pytest.raises(CdfaceError, match="unexpected keys head.weight"):
        load_arcface_torch({**state, "head.weight": torch.zeros(1)})
    with pytest.raises(CdfaceError, match=r"\(2, 2, 1, 2\) units per stage"):
        load_arcface_torch({k: v for k, v in state.items() if not k.startswith("layer3.1.")})
    with pytest.raises(CdfaceError, match="squeeze-excite"):
        to_arcface_torch(create_backbone("ir_se18", width=0.125).state_dict())
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    with pytest.raises(CdfaceError, match="not a readable PyTorch weights file"):
        load_arcface_torch(tmp_path / "junk.pth")
    with pytest.raises(CdfaceError, match="not found"):
        load_arcface_torch(tmp_path / "missing.pth")
    assert arcface_torch_spec(state)["kwargs"]["width"] == 0.125


def test_converted_weights_export_to_onnx_with_the_same_embeddings(tmp_path):
    import onnxruntime as ort

    state = random_weights(published_layout(PUBLISHED_UNITS["iresnet18"], width=0.125, embedding=128), seed=2)
    torch.save(state, tmp_path / "backbone.pth")
    converted = tmp_path / "r18.pt"
    result = subprocess.run([str(CDFACE), "export", "convert-arcface-torch", str(tmp_path / "backbone.pth"),
                             "--out", str(converted)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "ir18" in result.stdout
    spec = convert_arcface_torch(tmp_path / "backbone.pth", tmp_path / "again.pt")
    assert spec["name"] == "ir18"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from cdface.export.onnx_export import export_checkpoint

        exported = export_checkpoint(converted, tmp_path / "export", name="r18-arcface-torch", version=1)
    images = np.random.default_rng(0).integers(0, 256, size=(3, 112, 112, 3), dtype=np.uint8)
    session = ort.InferenceSession(str(exported.onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(["embedding"], {"images": images})[0]
    # arcface_torch's preprocessing: RGB, (x - 127.5) / 127.5, NCHW; the embedding L2-normalised.
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() - 127.5) / 127.5
    with torch.no_grad():
        expected = F.normalize(reference_forward(state, x), dim=1).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert exported.manifest.backbone == "ir18" and exported.manifest.embedding_size == 128

    bad = subprocess.run([str(CDFACE), "export", "convert-arcface-torch", str(tmp_path / "missing.pth"),
                          "--out", str(tmp_path / "x.pt")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "not found" in bad.stderr
    assert not (tmp_path / "x.pt").exists()
