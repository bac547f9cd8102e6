"""The gateway's face pipeline: a decoded photo -> aligned 112x112 RGB crops (box, landmarks, quality).

The implementation lives in ``cdface.core.detection`` so that training (``cdface data align``) cuts
its crops with the very detector and alignment the gateway serves with; this module keeps the names
the gateway imports.
"""

from __future__ import annotations

from cdface.core.detection import CropGate, Detector, FaceCrop, FaceMode, extract_faces, sharpness

__all__ = ["CropGate", "Detector", "FaceCrop", "FaceMode", "extract_faces", "sharpness"]
