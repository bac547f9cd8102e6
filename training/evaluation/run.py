"""Evaluating several benchmarks in one go, from the CLI or in-process from the trainer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from cdface.training.evaluation.embedders import Embedder


def evaluate_bins(
    embedder: Embedder,
    bin_paths: Sequence[str | os.PathLike],
    flip: bool = True,
    batch_size: int = 64,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """``evaluate_bin`` on each file (raw score arrays included, for plots)."""
    from cdface.training.evaluation.verification import evaluate_bin

    return [evaluate_bin(embedder, p, flip=flip, batch_size=batch_size, progress=progress) for p in bin_paths]


def write_plots(evaluations: Sequence[dict[str, Any]], plot_dir: str | os.PathLike, model_label: str) -> list[Path]:
    """A score histogram per benchmark and one ROC figure with every benchmark's curve."""
    from cdface.training.evaluation.plots import plot_roc_curves, plot_score_histograms
    from cdface.training.evaluation.roc import scores_by_label

    plot_dir = Path(plot_dir)
    written = []
    curves = {}
    for evaluation in evaluations:
        name = evaluation["dataset"]
        written.append(plot_score_histograms(
            evaluation["scores"], evaluation["issame"], plot_dir / f"{name}_histogram.png",
            title=f"{model_label} on {name}", threshold=evaluation.get("best_threshold"),
        ))
        curves[name] = scores_by_label(evaluation["scores"], evaluation["issame"])
    if curves:
        written.append(plot_roc_curves(curves, plot_dir / "roc.png", title=model_label))
    return written


def evaluate_checkpoint_model(
    model,
    bin_paths: Sequence[str | os.PathLike],
    flip: bool = True,
    batch_size: int = 64,
    model_label: str = "in-process model",
) -> dict[str, Any]:
    """Evaluate a live torch backbone (e.g. during training) on ``.bin`` files; returns the JSON-safe report.

    The model stays on its current device, and its train/eval mode is restored afterwards.
    """
    from cdface.training.evaluation.embedders import TorchEmbedder
    from cdface.training.evaluation.report import build_report

    device = next(model.parameters()).device
    embedder = TorchEmbedder(model, device=str(device), batch_size=batch_size)
    evaluations = evaluate_bins(embedder, bin_paths, flip=flip, batch_size=batch_size)
    return build_report(model_label, evaluations)
