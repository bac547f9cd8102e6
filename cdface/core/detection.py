"""Face detection and extraction: a decoded photo -> aligned 112x112 RGB crops with box, landmarks and quality.

One implementation for every stage: the gateway detects in uploads with it, and ``cdface data align``
prepares training and evaluation crops with it, so a model is trained on exactly the crops it is
served (same detector, same landmarks, same similarity warp of ``cdface.core.alignment``).

Three ways in (``FaceMode``):

- ``aligned``: the image already is an aligned 112x112 crop;
- ``landmarks``: a photo plus the caller's five landmarks (ArcFace order);
- ``detect`` (the largest face) / ``detect_all`` (every face): YuNet through ``cv2.FaceDetectorYN``.

Quality per face: the detector's score, the face size (shorter side of the box, in pixels) and
sharpness (variance of the Laplacian of the aligned crop; low = blurred); callers filter on them
with ``min_face_size`` / ``min_score``. Torch-free; needs OpenCV (``opencv-python-headless``).
"""

from __future__ import annotations

import queue
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from cdface.core.alignment import align_face
from cdface.core.contract import INPUT_SIZE
from cdface.core.errors import CdfaceError
from cdface.core.imaging import ImageError

FaceMode = Literal["aligned", "landmarks", "detect", "detect_all"]


@dataclass
class FaceCrop:
    crop: np.ndarray  # uint8 [112, 112, 3] RGB
    box: list[float] | None  # x, y, width, height in the photo
    landmarks: list[list[float]] | None
    quality: dict[str, float]


def _cv2():
    try:
        import cv2
    except ImportError:
        raise CdfaceError("face detection needs OpenCV: pip install opencv-python-headless==4.14.0.94") from None
    return cv2


def sharpness(crop: np.ndarray) -> float:
    cv2 = _cv2()
    grey = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


class Detector:
    """A small pool of YuNet detectors (``cv2.FaceDetectorYN`` objects are not thread-safe)."""

    def __init__(self, model: str | Path, *, score: float = 0.7, max_side: int = 640, instances: int = 2) -> None:
        cv2 = _cv2()
        self.model = str(model)
        self.score = score
        self.max_side = max_side
        self._pool: queue.Queue = queue.Queue()
        for _ in range(instances):
            self._pool.put(cv2.FaceDetectorYN.create(self.model, "", (320, 320), score, 0.3, 5000))

    def detect(self, rgb: np.ndarray) -> np.ndarray:
        """[F, 15] rows: x, y, w, h, 5 landmarks (x, y), score - in ``rgb``'s pixel coordinates, largest first."""
        cv2 = _cv2()
        height, width = rgb.shape[:2]
        # Large photos are detected at max_side: YuNet finds faces of a few dozen pixels, and the
        # landmarks are scaled back, so the crop is still warped from the full-resolution photo.
        scale = min(1.0, self.max_side / max(height, width))
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        if scale < 1.0:
            bgr = cv2.resize(bgr, (max(1, round(width * scale)), max(1, round(height * scale))),
                             interpolation=cv2.INTER_AREA)
        detector = self._pool.get()
        try:
            detector.setInputSize((bgr.shape[1], bgr.shape[0]))
            _, faces = detector.detect(bgr)
        finally:
            self._pool.put(detector)
        if faces is None or len(faces) == 0:
            return np.zeros((0, 15), np.float32)
        faces = faces.astype(np.float64)
        faces[:, :14] /= scale
        return faces[np.argsort(-(faces[:, 2] * faces[:, 3]))]


def extract_faces(rgb: np.ndarray, mode: FaceMode, *, detector: Detector | None,
                  landmarks: list[list[float]] | None = None, max_faces: int = 32,
                  min_face_size: float = 0.0, min_score: float = 0.0) -> list[FaceCrop]:
    """The aligned faces of ``rgb`` (largest first); ``ImageError`` with a stable code when there are none."""
    height, width = rgb.shape[:2]
    if mode == "aligned":
        if (height, width) != (INPUT_SIZE, INPUT_SIZE):
            raise ImageError("not_aligned_crop",
                             f"mode 'aligned' needs a {INPUT_SIZE}x{INPUT_SIZE} crop; the image is {width}x{height}")
        return [FaceCrop(rgb, None, None, {"sharpness": round(sharpness(rgb), 2)})]
    if mode == "landmarks":
        if landmarks is None:
            raise ImageError("landmarks_required", "mode 'landmarks' needs five [x, y] landmarks")
        points = np.asarray(landmarks, dtype=np.float64)
        if points.shape != (5, 2) or not np.isfinite(points).all():
            raise ImageError("invalid_landmarks", "landmarks must be five [x, y] pairs of finite numbers")
        if (points < 0).any() or (points[:, 0] >= width).any() or (points[:, 1] >= height).any():
            raise ImageError("landmarks_out_of_image", f"a landmark lies outside the {width}x{height} image")
        spread = points.max(0) - points.min(0)
        if spread.max() < 2.0:
            raise ImageError("invalid_landmarks", "the landmarks (nearly) coincide; cannot align a face")
        crop = align_face(rgb, points)
        size = float(spread.max())
        return [FaceCrop(crop, None, points.tolist(), {"face_size": round(size, 1),
                                                       "sharpness": round(sharpness(crop), 2)})]
    if detector is None:
        raise ImageError("detector_unavailable", "face detection is not available on this server")
    found = detector.detect(rgb)
    out: list[FaceCrop] = []
    for row in found:
        box = [float(v) for v in row[:4]]
        points = row[4:14].reshape(5, 2)
        size = min(box[2], box[3])
        score = float(row[14])
        if size < min_face_size or score < min_score:
            continue
        crop = align_face(rgb, points)
        out.append(FaceCrop(crop, [round(v, 1) for v in box], np.round(points, 1).tolist(),
                            {"score": round(score, 4), "face_size": round(size, 1),
                             "sharpness": round(sharpness(crop), 2)}))
        if mode == "detect" or len(out) >= max_faces:
            break
    if not out:
        raise ImageError("no_face", "no face was found in the image" +
                         (" that passes the quality filters" if len(found) else ""))
    return out
