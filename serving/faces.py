"""The gateway's face pipeline: a decoded photo -> aligned 112x112 RGB crops (box, landmarks, quality).

The implementation lives in ``cdface.core.detection`` so that training (``cdface data align``) cuts
its crops with the very detector and alignment the gateway serves with; this module keeps the names
the gateway imports, and ``extract_timed`` splits extraction's time into the gateway's stages.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from cdface.core.detection import CropGate, Detector, FaceCrop, FaceMode, extract_faces, sharpness
from cdface.serving.metrics import add_stage_seconds, stage, stage_seconds

__all__ = ["CropGate", "Detector", "FaceCrop", "FaceMode", "check_timed", "extract_faces", "extract_timed",
           "sharpness"]


class _TimedDetector(Detector):
    """A detector whose calls count as stage ``detect``; it holds no pool, it lends its inner one."""

    def __init__(self, inner: Detector) -> None:  # not Detector.__init__: that would load YuNet again
        self.inner = inner

    def detect(self, rgb: np.ndarray, *, min_score: float | None = None) -> np.ndarray:
        with stage("detect"):
            return self.inner.detect(rgb, min_score=min_score)


class _TimedGate(CropGate):
    """The crop gate, its checks counted as stage ``quality`` (and not as ``detect``, though it runs YuNet)."""

    def check(self, detector: Detector, crop: np.ndarray) -> float:
        with stage("quality"):
            return super().check(detector.inner if isinstance(detector, _TimedDetector) else detector, crop)


def extract_timed(rgb: np.ndarray, mode: FaceMode, *, detector: Detector | None, gate: CropGate | None = None,
                  **options: Any) -> list[FaceCrop]:
    """``extract_faces``, its time counted as stages ``detect`` (YuNet on the photo), ``quality`` (the crop
    gate) and ``align`` (the rest: each face's warp and sharpness, measured as the difference)."""
    before = stage_seconds("detect", "quality")
    started = time.perf_counter()
    try:
        return extract_faces(rgb, mode, detector=_TimedDetector(detector) if detector is not None else None,
                             gate=_TimedGate(gate.min_score, gate.upside_down_margin) if gate is not None else None,
                             **options)
    finally:
        add_stage_seconds("align", time.perf_counter() - started - (stage_seconds("detect", "quality") - before))


def check_timed(gate: CropGate, detector: Detector, crop: FaceCrop) -> None:
    """``gate`` on one crop, its time counted as stage ``quality``; the score joins the crop's quality."""
    crop.quality["crop_score"] = round(_TimedGate(gate.min_score, gate.upside_down_margin).check(detector,
                                                                                             crop.crop), 4)
