"""Figures for the evidence: score histograms, ROC curves, and the similarity-gradient curves of the method.

All figures are PNG files drawn with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping

import numpy as np

SIMILARITY_TERMS = ("d1", "d2", "d3", "d3_truncated")
_TERM_LABELS = {
    "d1": r"$d_1=-\|x-w\|^2$",
    "d2": r"$d_2=x\cdot w$",
    "d3": r"$d_3=(x\cdot w)^2$",
    "d3_truncated": r"$\max(0,\mathrm{sgn}(x\cdot w))(x\cdot w)^2$",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    from cdface.core.atomic import atomic_open

    path = Path(path)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def plot_score_histograms(
    scores: np.ndarray,
    issame: np.ndarray,
    path: str | os.PathLike,
    title: str = "",
    threshold: float | None = None,
    bins: int = 100,
) -> Path:
    """Cosine-similarity histograms of positive and negative pairs (the paper supplement's Fig. A1)."""
    plt = _pyplot()
    scores = np.asarray(scores, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    fig, ax = plt.subplots(figsize=(6, 4))
    edges = np.linspace(min(-1.0, scores.min()), max(1.0, scores.max()), bins + 1)
    ax.hist(scores[issame], bins=edges, alpha=0.6, density=True, label=f"positive pairs ({issame.sum()})")
    ax.hist(scores[~issame], bins=edges, alpha=0.6, density=True, label=f"negative pairs ({(~issame).sum()})")
    if threshold is not None:
        ax.axvline(threshold, color="k", linestyle="--", linewidth=1, label=f"threshold {threshold:.3f}")
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)


def plot_roc_curves(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    path: str | os.PathLike,
    title: str = "",
) -> Path:
    """ROC curves (TAR against log-scale FAR) of one or several models: ``{label: (genuine, impostor)}``."""
    from cdface.training.evaluation.roc import roc_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    smallest_far = 1.0
    for label, (genuine, impostor) in curves.items():
        far, tar, _ = roc_curve(genuine, impostor)
        # FAR = 0 has no place on a log axis; the curve starts at the first measurable false accept.
        visible = far > 0
        ax.plot(far[visible], tar[visible], label=label, linewidth=1.5)
        smallest_far = min(smallest_far, 1.0 / len(impostor))
    format_roc_axes(ax, smallest_far, title)
    return _save(fig, path)


def format_roc_axes(ax, smallest_far: float, title: str, legend_size: float | None = None) -> None:
    """Log-scale FAR axis starting at the smallest measurable FAR (1 / impostors, not below 1e-6)."""
    ax.set_xscale("log")
    ax.set_xlim(max(smallest_far, 1e-6), 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=legend_size)


def similarity_gradient_magnitudes(thetas: np.ndarray) -> dict[str, np.ndarray]:
    """||dS/dx|| for each similarity term S of ``training.losses.similarity_terms``, by autograd.

    x and w are unit vectors at angle theta (x = (cos theta, sin theta), w = (1, 0)); the gradient is taken
    with respect to x in the ambient space, as in the supplement's analysis.
    """
    import torch

    from cdface.training.losses import similarity_terms

    magnitudes = {}
    theta = torch.as_tensor(np.asarray(thetas), dtype=torch.float64)
    for name in SIMILARITY_TERMS:
        x = torch.stack([torch.cos(theta), torch.sin(theta)], dim=1).requires_grad_(True)
        w = torch.zeros_like(x.detach())
        w[:, 0] = 1.0
        # Each row's term depends only on its own x, so the gradient of the sum is the per-row gradient.
        (grad,) = torch.autograd.grad(similarity_terms(x, w)[name].sum(), x)
        magnitudes[name] = grad.norm(dim=1).numpy()
    return magnitudes


def plot_similarity_gradients(path: str | os.PathLike, num_points: int = 361) -> Path:
    """Gradient magnitude against theta in [0, pi] for d1, d2, d3 and the truncated d3 of the diversity loss."""
    plt = _pyplot()
    thetas = np.linspace(0.0, math.pi, num_points)
    magnitudes = similarity_gradient_magnitudes(thetas)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in SIMILARITY_TERMS:
        # d3 and its truncated form coincide below pi/2: dash d3 so both stay visible.
        style = "--" if name == "d3" else "-"
        ax.plot(thetas, magnitudes[name], style, label=_TERM_LABELS[name], linewidth=1.5)
    ax.set_xticks([0, math.pi / 4, math.pi / 2, 3 * math.pi / 4, math.pi])
    ax.set_xticklabels(["0", r"$\pi/4$", r"$\pi/2$", r"$3\pi/4$", r"$\pi$"])
    ax.set_xlabel(r"angle $\theta$ between $x$ and $w$")
    ax.set_ylabel(r"$\|\partial S/\partial x\|$")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, path)
