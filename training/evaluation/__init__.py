"""Evaluation: verification benchmarks, TAR@FAR, IJB-style templates, plots.

Public entry points (imported lazily, so ``import training.evaluation`` stays light for the CLI):

    evaluate_checkpoint_model(model, bin_paths) -> report    the trainer's in-process evaluation
    evaluate_bin / evaluate_pairs / evaluate_ijb / evaluate_rank (embedder, ...) -> evaluation dict
    open_embedder(path), TorchEmbedder, OnnxEmbedder
    verification_accuracy(scores, issame), tar_at_far(genuine, impostor)
    build_report(model, evaluations), write_report(path, report)
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "evaluate_checkpoint_model": "cdface.training.evaluation.run",
    "evaluate_bins": "cdface.training.evaluation.run",
    "evaluate_bin": "cdface.training.evaluation.verification",
    "verification_accuracy": "cdface.training.evaluation.verification",
    "evaluate_pairs": "cdface.training.evaluation.pairs",
    "evaluate_ijb": "cdface.training.evaluation.ijb",
    "evaluate_rank": "cdface.training.evaluation.rank",
    "open_embedder": "cdface.training.evaluation.embedders",
    "TorchEmbedder": "cdface.training.evaluation.embedders",
    "OnnxEmbedder": "cdface.training.evaluation.embedders",
    "tar_at_far": "cdface.training.evaluation.roc",
    "build_report": "cdface.training.evaluation.report",
    "write_report": "cdface.training.evaluation.report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cdface.training.evaluation' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
