"""Pretrained IResNet weights from insightface's arcface_torch, in the project's backbones.

arcface_torch publishes its models as ``backbone.pth``: a plain ``state_dict`` of its ``IResNet``
(``torch.save(backbone.state_dict())``). Its key layout, from the published architecture:

    conv1.weight  bn1.*  prelu.weight                         stem: conv3x3 -> BN -> PReLU
    layer{1..4}.{b}.bn1.*  .conv1.weight  .bn2.*  .prelu.weight  .conv2.weight  .bn3.*
    layer{1..4}.{b}.downsample.0.weight  .downsample.1.*      1x1 conv + BN shortcut (first unit)
    bn2.*  fc.weight  fc.bias  features.*                     BN2d -> flatten -> FC -> BN1d

(``*`` of a BatchNorm: weight, bias, running_mean, running_var, num_batches_tracked.) The project's
``IResNet`` is the same network under other names (``stem.0/1/2``, ``stages.{i}.{b}``,
``shortcut.0/1``); the computation is identical, so the mapping below renames keys and never
touches a tensor. Depth (units per stage: 18, 34, 50, 100, 200), width (``conv1``'s channels / 64)
and embedding size (``fc``'s rows) are read from the weights. The project's dropout sits before
the flatten and theirs after it: elementwise, so the same function (and a no-op in evaluation).

Also accepted: a ``module.``-prefixed state dict (saved from DDP), and arcface_torch's resume
checkpoint (``checkpoint_gpu_0.pt``: the backbone under ``state_dict_backbone``). Squeeze-excite
variants are not part of arcface_torch and are refused.

Uses: ``load_arcface_torch(path)`` (a backbone with the weights, strictly loaded), or
``load_arcface_torch(path, into=backbone)`` to start a fine-tuning run from them, and
``convert_arcface_torch(src, dst)``: a weights-only cdface checkpoint that ``cdface export onnx``
and ``cdface eval`` take like any other.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from cdface.core.digest import sha256_file
from cdface.core.errors import CdfaceError
from cdface.training.backbones.iresnet import DEPTHS, STAGE_CHANNELS
from cdface.training.backbones.registry import create_backbone

_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_UNIT_PARTS = {"bn1", "conv1", "bn2", "prelu", "conv2", "bn3"}
_THEIR_UNIT = re.compile(r"^layer([1-4])\.(\d+)\.(.+)$")
_OUR_UNIT = re.compile(r"^stages\.([0-3])\.(\d+)\.(.+)$")
# Stem and output layer: theirs -> ours (the output layer has the same names on both sides).
_THEIR_TOP = {"conv1": "stem.0", "bn1": "stem.1", "prelu": "stem.2",
              "bn2": "bn2", "fc": "fc", "features": "features"}
_OUR_TOP = {ours: theirs for theirs, ours in _THEIR_TOP.items()}


def _rename_unit_part(part: str, downsample: str, shortcut: str) -> str | None:
    module, _, leaf = part.partition(".")
    if module in _UNIT_PARTS:
        return part
    if module == downsample:
        index, _, leaf = leaf.partition(".")
        if index in ("0", "1") and leaf:
            return f"{shortcut}.{index}.{leaf}"
    return None


def _theirs_to_ours(key: str) -> str | None:
    unit = _THEIR_UNIT.match(key)
    if unit:
        stage, block, part = unit.groups()
        renamed = _rename_unit_part(part, "downsample", "shortcut")
        return None if renamed is None else f"stages.{int(stage) - 1}.{block}.{renamed}"
    module, _, leaf = key.partition(".")
    return f"{_THEIR_TOP[module]}.{leaf}" if module in _THEIR_TOP and leaf else None


def _ours_to_theirs(key: str) -> str | None:
    unit = _OUR_UNIT.match(key)
    if unit:
        stage, block, part = unit.groups()
        renamed = _rename_unit_part(part, "shortcut", "downsample")
        return None if renamed is None else f"layer{int(stage) + 1}.{block}.{renamed}"
    for ours, theirs in _OUR_TOP.items():
        if key.startswith(ours + "."):
            return theirs + key[len(ours):]
    return None


def _renamed(state: Mapping[str, torch.Tensor], rename: Callable[[str], str | None],
             refusal: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state.items():
        new = rename(key)
        if new is None:
            unknown.append(key)
        else:
            out[new] = tensor
    if unknown:
        raise CdfaceError(f"{refusal} {_few(unknown)}")
    return out


def from_arcface_torch(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """arcface_torch keys -> the project's IResNet keys (tensors unchanged); unknown keys are an error."""
    return _renamed(state, _theirs_to_ours, "not an arcface_torch IResNet state dict: unexpected keys")


def to_arcface_torch(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The project's IResNet keys -> arcface_torch's (the inverse of ``from_arcface_torch``)."""
    return _renamed(state, _ours_to_theirs,
                    "these IResNet weights have no arcface_torch counterpart (squeeze-excite?):")


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def arcface_torch_spec(state: Mapping[str, torch.Tensor], dropout: float = 0.0) -> dict[str, Any]:
    """The project backbone spec (``{"name": "ir50", "kwargs": {...}}``) the weights fit, read from their shapes."""
    units = [1 + max((int(m.group(2)) for k in state if (m := _THEIR_UNIT.match(k)) and m.group(1) == str(s)),
                     default=-1) for s in range(1, 5)]
    depth = next((d for d, layout in DEPTHS.items() if tuple(units) == layout), None)
    if depth is None:
        known = ", ".join(f"{d}: {layout}" for d, layout in DEPTHS.items())
        raise CdfaceError(f"arcface_torch weights with {tuple(units)} units per stage match no IResNet depth ({known})")
    try:
        stem_channels = int(state["conv1.weight"].shape[0])
        embedding_size = int(state["fc.weight"].shape[0])
    except KeyError as exc:
        raise CdfaceError(f"not an arcface_torch IResNet state dict: no {exc.args[0]}") from None
    return {"name": f"ir{depth}",
            "kwargs": {"width": stem_channels / STAGE_CHANNELS[0], "embedding_size": embedding_size,
                       "dropout": dropout}}


def read_arcface_torch(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The backbone state dict of an arcface_torch ``backbone.pth`` (or resume checkpoint), on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CdfaceError(f"arcface_torch weights not found: {path}")
    try:
        # weights_only: a .pth from elsewhere must not run code on load.
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged or foreign file
        raise CdfaceError(f"{path} is not a readable PyTorch weights file ({type(exc).__name__})") from None
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict_backbone"), Mapping):
        loaded = loaded["state_dict_backbone"]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CdfaceError(f"{path} does not hold a state dict (a mapping of tensors)")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in loaded.items()}


def _with_bn_counters(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    # Some published files were saved without BatchNorm's num_batches_tracked counters. They only
    # count training steps (the momentum is fixed), so a missing one starts at zero; no other key
    # may be missing.
    completed = dict(state)
    for key, value in model.state_dict().items():
        if key.endswith(".num_batches_tracked") and key not in completed:
            completed[key] = torch.zeros_like(value)
    return completed


def load_arcface_torch(source: str | os.PathLike | Mapping[str, torch.Tensor], *, into: nn.Module | None = None,
                       dropout: float = 0.0) -> tuple[nn.Module, dict[str, Any]]:
    """(backbone holding the arcface_torch weights, its spec); strict: no missing or unexpected key.

    ``into``: load into this existing project IResNet (e.g. the one a training run built from its
    configuration) instead of building one; it must have the same depth, width and embedding size.
    """
    state = dict(source) if isinstance(source, Mapping) else read_arcface_torch(source)
    spec = arcface_torch_spec(state, dropout)
    ours = from_arcface_torch(state)
    model = into if into is not None else create_backbone(spec["name"], **spec["kwargs"])
    try:
        model.load_state_dict(_with_bn_counters(ours, model), strict=True)
    except RuntimeError as exc:  # missing/unexpected keys or other shapes; torch's message names them
        detail = " ".join(str(exc).split())[:400]
        raise CdfaceError(f"the arcface_torch weights ({spec['name']}, width {spec['kwargs']['width']:g}, "
                          f"{spec['kwargs']['embedding_size']}-d) do not fit the backbone: {detail}") from None
    return model, spec


def convert_arcface_torch(src: str | os.PathLike, dst: str | os.PathLike, dropout: float = 0.0) -> dict[str, Any]:
    """Write a weights-only cdface checkpoint (backbone spec + state dict) of arcface_torch weights; returns the spec.

    ``cdface export onnx DST`` and ``cdface eval ... DST`` then take it like a trained model. The
    file records where the weights came from (path and sha256).
    """
    from cdface.training.checkpoint import save_checkpoint

    model, spec = load_arcface_torch(src, dropout=dropout)
    save_checkpoint(dst, {"backbone": spec, "model": model.state_dict(),
                          "source": {"kind": "arcface_torch", "path": str(Path(src).resolve()),
                                     "sha256": sha256_file(src)}})
    return spec
