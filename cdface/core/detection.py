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
with ``min_face_size`` / ``min_score``. A ``CropGate`` (the gateway's) also requires every crop to
hold an upright face (``crop_score``). Torch-free; needs OpenCV (``opencv-python-headless``).
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


# YuNet pads its input to a multiple of 32; at a padded side of 32 (an input side <= 32) OpenCV's DNN
# reads uninitialised memory and returns non-finite boxes scored 1.0, depending on what the process
# ran before (a 640x8 grey image: "faces" with x = 6e32). Inputs are padded to at least this side.
_MIN_DETECT_SIDE = 64


class Detector:
    """A small pool of YuNet detectors (``cv2.FaceDetectorYN`` objects are not thread-safe).

    ``detect`` is a pure function of its input: every per-call setting (input size, score floor) is
    set on the pooled detector at each call, and the input is padded past YuNet's unsafe sizes.
    """

    def __init__(self, model: str | Path, *, score: float = 0.7, max_side: int = 640, instances: int = 2) -> None:
        cv2 = _cv2()
        self.model = str(model)
        self.score = score
        self.max_side = max_side
        self._pool: queue.Queue = queue.Queue()
        for _ in range(instances):
            self._pool.put(cv2.FaceDetectorYN.create(self.model, "", (320, 320), score, 0.3, 5000))

    def detect(self, rgb: np.ndarray, *, min_score: float | None = None) -> np.ndarray:
        """[F, 15] rows: x, y, w, h, 5 landmarks (x, y), score - in ``rgb``'s pixel coordinates, largest first.

        Every row is finite, its box clipped to the image and its landmarks inside it; ``min_score``
        (default: the detector's) is the score floor of this call.
        """
        cv2 = _cv2()
        height, width = rgb.shape[:2]
        # Large photos are detected at max_side: YuNet finds faces of a few dozen pixels, and the
        # landmarks are scaled back, so the crop is still warped from the full-resolution photo.
        scale = min(1.0, self.max_side / max(height, width))
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        if scale < 1.0:
            bgr = cv2.resize(bgr, (max(1, round(width * scale)), max(1, round(height * scale))),
                             interpolation=cv2.INTER_AREA)
        faces = _inside(self._rows(bgr, self.score if min_score is None else min_score), bgr.shape[1], bgr.shape[0])
        faces[:, :14] /= scale
        return faces[np.argsort(-(faces[:, 2] * faces[:, 3]), kind="stable")]

    def _rows(self, bgr: np.ndarray, min_score: float) -> np.ndarray:
        """YuNet's rows for ``bgr`` as it returns them (float64 [F, 15]), before any check."""
        cv2 = _cv2()
        # Padding right and bottom keeps coordinates unchanged; rows found in it are dropped by _inside.
        pad_h, pad_w = max(0, _MIN_DETECT_SIDE - bgr.shape[0]), max(0, _MIN_DETECT_SIDE - bgr.shape[1])
        if pad_h or pad_w:
            bgr = cv2.copyMakeBorder(bgr, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=(0, 0, 0))
        detector = self._pool.get()
        try:
            detector.setInputSize((bgr.shape[1], bgr.shape[0]))
            detector.setScoreThreshold(float(min_score))
            _, faces = detector.detect(bgr)
        finally:
            self._pool.put(detector)
        return np.zeros((0, 15), np.float64) if faces is None else faces.astype(np.float64).reshape(-1, 15)


def _inside(faces: np.ndarray, width: int, height: int) -> np.ndarray:
    """The rows that describe a face in a ``width`` x ``height`` image: finite, score in [0, 1], the box
    clipped to the image and at least a pixel a side, every landmark inside the image."""
    faces = faces[np.isfinite(faces).all(axis=1)]
    faces = faces[(faces[:, 14] >= 0) & (faces[:, 14] <= 1)]
    x0, y0 = np.clip(faces[:, 0], 0, width), np.clip(faces[:, 1], 0, height)
    x1, y1 = np.clip(faces[:, 0] + faces[:, 2], 0, width), np.clip(faces[:, 1] + faces[:, 3], 0, height)
    faces[:, 0], faces[:, 1], faces[:, 2], faces[:, 3] = x0, y0, x1 - x0, y1 - y0
    points_x, points_y = faces[:, 4:14:2], faces[:, 5:14:2]
    keep = (faces[:, 2] >= 1) & (faces[:, 3] >= 1)
    keep &= ((points_x >= 0) & (points_x <= width) & (points_y >= 0) & (points_y <= height)).all(axis=1)
    return faces[keep]


# The gate looks at the crop at this side: an aligned face still scores about 0.9 at 64 px (0.89-0.93 on the
# stock photos, blank and noise crops under 0.06), and YuNet's cost is per pixel and per call.
GATE_SIDE = 64


@dataclass(frozen=True)
class CropGate:
    """The face-presence and orientation check run on every aligned crop before it is embedded.

    YuNet scores the crop (an aligned face fills it and scores about 0.9; a blank or noise crop scores
    near 0) and the crop turned 180 degrees, both in one call: the two side by side, at ``GATE_SIDE``.
    YuNet finds upside-down faces in photos with a high score and places their landmarks as if
    upright, so an upside-down photo yields an upside-down crop: one that scores clearly higher when
    turned over (by 0.07 or more on the stock photos; upright faces score higher as they are).
    """

    min_score: float = 0.5  # a crop scoring below this holds no face
    upside_down_margin: float = 0.04  # turned over, a crop scoring this much higher is upside down

    def check(self, detector: Detector, crop: np.ndarray) -> float:
        """The crop's face score; ``ImageError`` (``no_face_in_crop``, ``face_upside_down``) when refused."""
        score, turned = _upright_and_turned_scores(detector, crop)
        if turned > score + self.upside_down_margin and turned >= self.min_score:
            raise ImageError("face_upside_down", "the face is upside down (turned 180 degrees); send the photo "
                             "upright")
        if score < self.min_score:
            raise ImageError("no_face_in_crop", f"no face in the aligned crop (face score {score:.2f}; at least "
                             f"{self.min_score} is needed)")
        return score


def _upright_and_turned_scores(detector: Detector, crop: np.ndarray) -> tuple[float, float]:
    """YuNet's best face score for ``crop`` and for ``crop`` turned 180 degrees, from one detection call."""
    small = _cv2().resize(crop, (GATE_SIDE, GATE_SIDE), interpolation=_cv2().INTER_AREA)
    pair = np.concatenate([small, small[::-1, ::-1]], axis=1)
    faces = detector.detect(pair, min_score=0.01)
    left = faces[:, 0] + faces[:, 2] / 2 < GATE_SIDE  # a face belongs to the half its box's centre is in
    return (float(faces[left, 14].max()) if left.any() else 0.0,
            float(faces[~left, 14].max()) if (~left).any() else 0.0)


def extract_faces(rgb: np.ndarray, mode: FaceMode, *, detector: Detector | None,
                  landmarks: list[list[float]] | None = None, max_faces: int = 32,
                  min_face_size: float = 0.0, min_score: float = 0.0,
                  gate: CropGate | None = None) -> list[FaceCrop]:
    """The aligned faces of ``rgb`` (largest first); ``ImageError`` with a stable code when there are none.

    ``gate``: every crop must pass it (quality gains ``crop_score``); in the detect modes a face that
    fails is skipped like one below the filters, and the first refusal is raised when none is left.
    """
    if gate is not None and detector is None:
        raise ImageError("detector_unavailable", "face detection is not available on this server")
    # Gated, the detect modes align up to max_faces candidates: the largest may fail the gate.
    limit = max_faces if mode == "detect_all" or gate is not None else 1
    faces = _faces(rgb, mode, detector=detector, landmarks=landmarks, limit=limit, min_face_size=min_face_size,
                   min_score=min_score)
    if gate is None:
        return faces
    assert detector is not None
    passed: list[FaceCrop] = []
    refusal: ImageError | None = None
    for face in faces:
        try:
            face.quality["crop_score"] = round(gate.check(detector, face.crop), 4)
        except ImageError as exc:
            refusal = refusal or exc
            continue
        passed.append(face)
        if mode != "detect_all" or len(passed) >= max_faces:
            break
    if not passed:
        assert refusal is not None
        raise refusal
    return passed


def _faces(rgb: np.ndarray, mode: FaceMode, *, detector: Detector | None,
           landmarks: list[list[float]] | None, limit: int, min_face_size: float,
           min_score: float) -> list[FaceCrop]:
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
        if len(out) >= limit:
            break
    if not out:
        raise ImageError("no_face", "no face was found in the image" +
                         (" that passes the quality filters" if len(found) else ""))
    return out
