"""The match rule: two faces match when their cosine similarity is strictly above the threshold.

Evaluation picks thresholds under this rule (TAR at FAR, 10-fold accuracy) and writes them into the
model manifest; serving decides verify and identify answers with the same function, so a threshold
means the same thing on both sides. Works on scalars and numpy arrays alike.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np

MATCH_RULE = "accept when cosine similarity > threshold"

Score = TypeVar("Score", float, np.ndarray)


def cosine(similarity: float) -> float:
    """A similarity of unit vectors as reported: float rounding can step past +-1; a cosine never may."""
    return min(1.0, max(-1.0, float(similarity)))


def is_match(similarity: Score, threshold: float) -> Score:
    """True where ``similarity > threshold`` (strictly: a score equal to the threshold is rejected)."""
    return similarity > threshold
