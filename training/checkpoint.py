"""Training checkpoints: one file for all ranks, written atomically, validated on load.

A checkpoint is a dict saved with ``torch.save``::

    format      "cdface-checkpoint/1"
    backbone    {"name": "ir50", "kwargs": {"width": 1.0, "embedding_size": 512, ...}}
    config      the full training configuration (plain dict)
    model       backbone state_dict
    head        margin head state_dict
    bank        difficulty score bank state (scores, seen)
    optimizer, scheduler, scaler, progress, rng   (resume state; absent in weights-only files)

One file for every rank (not one per rank) so a run can resume on a different number of GPUs.
"""

from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cdface.core.atomic import atomic_write_bytes
from cdface.core.errors import CdfaceError
from cdface.training.backbones import create_backbone

FORMAT = "cdface-checkpoint/1"


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Serialise in memory first, then write atomically: a crash never leaves a half-written file."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CdfaceError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # torch raises many types for a damaged file
        raise CdfaceError(f"checkpoint {path} is corrupt or not a cdface checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CdfaceError(f"{path} is not a cdface checkpoint (expected format {FORMAT})")
    for key in ("backbone", "model"):
        if key not in state:
            raise CdfaceError(f"checkpoint {path} has no {key!r} entry")
    return state


def check_compatible(state: dict[str, Any], path: str | os.PathLike, backbone: dict, num_classes: int,
                     num_samples: int) -> None:
    """Refuse a checkpoint of another backbone, or of a dataset with other identities or samples."""
    if state["backbone"] != backbone:
        raise CdfaceError(f"checkpoint {path} holds backbone {state['backbone']}, the configuration asks for "
                          f"{backbone}")
    classes = state.get("num_classes")
    if classes is not None and classes != num_classes:
        raise CdfaceError(f"checkpoint {path} was trained on {classes} identities, the dataset has {num_classes}")
    bank = state.get("bank")
    if bank is not None and bank["scores"].numel() != num_samples:
        raise CdfaceError(f"checkpoint {path} has a score bank of {bank['scores'].numel()} samples, "
                          f"the dataset has {num_samples}")


def rng_state() -> dict:
    """Every random generator training draws from, for the ``rng`` entry: a resumed run continues their streams."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def build_backbone_from(state: dict[str, Any], path: str | os.PathLike = "<checkpoint>") -> torch.nn.Module:
    """The checkpoint's backbone with its weights, in eval mode."""
    spec = state["backbone"]
    model = create_backbone(spec["name"], **spec.get("kwargs", {}))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CdfaceError(f"checkpoint {path} does not fit backbone {spec['name']}: {first}") from None
    return model.eval()


def load_backbone(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Load a checkpoint's backbone for inference; returns (model in eval mode, checkpoint dict)."""
    state = load_checkpoint(path, map_location)
    return build_backbone_from(state, path), state
