"""Figures are valid PNGs; the gradient curves computed by autograd have the method's shape."""

import math

import numpy as np
import pytest
from PIL import Image

from cdface.training.evaluation.plots import (
    plot_roc_curves,
    plot_score_histograms,
    plot_similarity_gradients,
    similarity_gradient_magnitudes,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100


def test_histogram_and_roc_figures_are_png(tmp_path):
    rng = np.random.default_rng(0)
    issame = rng.random(2000) < 0.5
    scores = np.where(issame, rng.normal(0.6, 0.1, 2000), rng.normal(0.0, 0.1, 2000))
    _assert_png(plot_score_histograms(scores, issame, tmp_path / "hist.png", title="tiny", threshold=0.3))
    weaker = np.where(issame, rng.normal(0.3, 0.2, 2000), rng.normal(0.0, 0.2, 2000))
    curves = {"model A": (scores[issame], scores[~issame]), "model B": (weaker[issame], weaker[~issame])}
    _assert_png(plot_roc_curves(curves, tmp_path / "sub" / "roc.png"))


def test_gradient_curves_from_autograd():
    thetas = np.linspace(0.0, math.pi, 181)
    magnitudes = similarity_gradient_magnitudes(thetas)
    assert set(magnitudes) == {"d1", "d2", "d3", "d3_truncated"}
    beyond_orthogonal = thetas > math.pi / 2
    # The truncation: no gradient at all once x and w are orthogonal or beyond.
    assert np.all(magnitudes["d3_truncated"][beyond_orthogonal] == 0.0)
    # d2 = x.w: the gradient is w, magnitude 1 at every angle.
    np.testing.assert_allclose(magnitudes["d2"], 1.0, atol=1e-12)
    # The others follow their closed forms: |2 cos| for d3 (and its truncated half), 2||x - w|| for d1.
    np.testing.assert_allclose(magnitudes["d3"], 2 * np.abs(np.cos(thetas)), atol=1e-12)
    np.testing.assert_allclose(magnitudes["d3_truncated"][~beyond_orthogonal],
                               2 * np.cos(thetas[~beyond_orthogonal]), atol=1e-12)
    np.testing.assert_allclose(magnitudes["d1"], 4 * np.sin(thetas / 2), atol=1e-12)
    # The method's point: the truncated d3 pushes hardest when x is closest to w.
    assert magnitudes["d3_truncated"][0] == pytest.approx(2.0)


def test_gradient_figure_is_png(tmp_path):
    _assert_png(plot_similarity_gradients(tmp_path / "gradients.png", num_points=91))
