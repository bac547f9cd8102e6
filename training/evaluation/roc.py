"""TAR at FAR (the IJB-B/C metric) and ROC curves from genuine and impostor similarity scores.

Convention (shared with serving, which uses the thresholds reported here): a pair is **accepted when
``score > threshold``** (strictly greater).

For a target FAR ``f`` over ``n`` impostor scores, at most ``k = floor(f * n)`` impostors may be accepted.
The threshold is the lowest value ``t`` with ``#{impostor > t} <= k``, which is the (k+1)-th largest
impostor score. Ties are handled exactly: when several impostors share that score they are all rejected, so
the achieved FAR can be below the target, never above it. TAR is ``mean(genuine > t)``.

When ``f * n < 1`` not even one false accept is allowed: the set cannot measure that FAR (any claim would
rest on zero observed events), so the level is reported as unavailable (``None``), not as a number.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from cdface.core.matching import is_match

FAR_LEVELS: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


@dataclass(frozen=True)
class OperatingPoint:
    far_target: float
    threshold: float   # accept when score > threshold
    tar: float         # fraction of genuine scores accepted
    far: float         # achieved fraction of impostor scores accepted (<= far_target)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def far_key(far: float) -> str:
    """``1e-3`` -> ``"1e-3"`` (the key used in reports and manifests)."""
    exponent = round(math.log10(far))
    if math.isclose(far, 10.0**exponent, rel_tol=1e-9):
        return f"1e{exponent}"
    return repr(float(far))


def _split_scores(genuine: np.ndarray, impostor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    genuine = np.asarray(genuine, dtype=np.float64).reshape(-1)
    impostor = np.asarray(impostor, dtype=np.float64).reshape(-1)
    if genuine.size == 0 or impostor.size == 0:
        raise ValueError("TAR@FAR needs both genuine and impostor scores")
    if not (np.all(np.isfinite(genuine)) and np.all(np.isfinite(impostor))):
        raise ValueError("scores contain NaN or infinity")
    return genuine, impostor


def allowed_false_accepts(far: float, num_impostors: int) -> int:
    # The tiny relative slack keeps 1e-3 * 1000 from rounding down to 0.999... -> 0.
    return int(math.floor(far * num_impostors * (1.0 + 1e-9)))


def operating_point(genuine: np.ndarray, impostor: np.ndarray, far: float) -> OperatingPoint | None:
    """The operating point at target ``far``, or ``None`` when ``far < 1 / len(impostor)``."""
    genuine, impostor = _split_scores(genuine, impostor)
    if not 0.0 < far < 1.0:
        raise ValueError(f"target FAR must be in (0, 1), got {far}")
    k = allowed_false_accepts(far, impostor.size)
    if k < 1:
        return None
    impostor_descending = np.sort(impostor)[::-1]
    threshold = float(impostor_descending[k])  # k < n because far < 1
    return OperatingPoint(
        far_target=float(far),
        threshold=threshold,
        tar=float(np.mean(is_match(genuine, threshold))),
        far=float(np.mean(is_match(impostor, threshold))),
    )


def tar_at_far(
    genuine: np.ndarray, impostor: np.ndarray, far_levels: tuple[float, ...] = FAR_LEVELS
) -> dict[float, OperatingPoint | None]:
    """``{far: OperatingPoint or None}`` for each target FAR."""
    return {far: operating_point(genuine, impostor, far) for far in far_levels}


def tar_at_far_summary(points: dict[float, OperatingPoint | None]) -> dict[str, dict | None]:
    """JSON-safe form: ``{"1e-3": {"tar", "threshold", "far", "far_target"} or None}``."""
    return {far_key(far): (p.to_dict() if p is not None else None) for far, p in points.items()}


def roc_curve(genuine: np.ndarray, impostor: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(far, tar, thresholds): one point per distinct score, thresholds descending, FAR and TAR ascending.

    The first point is at the highest score (nothing accepted: FAR = TAR = 0); the last accepts everything.
    """
    genuine, impostor = _split_scores(genuine, impostor)
    distinct = np.unique(np.concatenate([genuine, impostor]))[::-1]
    thresholds = np.concatenate([distinct, [np.nextafter(distinct[-1], -np.inf)]])
    genuine_sorted, impostor_sorted = np.sort(genuine), np.sort(impostor)
    tar = (genuine.size - np.searchsorted(genuine_sorted, thresholds, side="right")) / genuine.size
    far = (impostor.size - np.searchsorted(impostor_sorted, thresholds, side="right")) / impostor.size
    return far, tar, thresholds


def scores_by_label(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(genuine, impostor) from pair scores and same/different labels."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels, dtype=bool).reshape(-1)
    return scores[labels], scores[~labels]
