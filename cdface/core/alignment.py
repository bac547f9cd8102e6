"""Face alignment: five landmarks -> the standard 112x112 ArcFace crop (torch-free).

Every model in this project (and SFace, and the insightface models) expects faces warped so the
eyes, nose tip and mouth corners land on the same five template points. The warp is a similarity
transform (rotation, uniform scale, translation): it keeps the face's proportions, which a full
affine fit to five points would not.
"""

from __future__ import annotations

import numpy as np

from cdface.core.contract import INPUT_SIZE
from cdface.core.errors import CdfaceError

# Landmark order: the eye on the image's left (the subject's right eye), the other eye, the nose
# tip, the mouth corner on the image's left, the other mouth corner - the order RetinaFace, SCRFD
# and OpenCV's YuNet report. Pixel coordinates in a 112x112 crop.
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 similarity transform that maps ``src`` points onto ``dst`` in the least-squares sense.

    Umeyama's closed form (IEEE PAMI 1991): centre both point sets, take the SVD of their
    covariance for the rotation (with a reflection guard), the scale from the singular values
    over the source variance, and the translation from the centroids.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise ValueError(f"need two matching [K, 2] point sets with K >= 2, got {src.shape} and {dst.shape}")
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    covariance = dst_c.T @ src_c / len(src)
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # a reflection would mirror the face
        sign[-1] = -1.0
    rotation = u @ np.diag(sign) @ vt
    src_var = (src_c ** 2).sum() / len(src)
    if src_var <= 1e-12:
        raise CdfaceError("the landmarks all coincide; cannot align the face")
    scale = float((singular * sign).sum() / src_var)
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def template(size: int = INPUT_SIZE) -> np.ndarray:
    """The ArcFace template for a ``size`` x ``size`` crop (scaled from 112)."""
    return ARCFACE_TEMPLATE * (size / INPUT_SIZE)


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """Warp ``image`` (H x W x 3 uint8, any channel order - it is kept) to the aligned crop.

    ``landmarks``: [5, 2] (x, y) pixel coordinates in ``image``, in the template's order.
    """
    try:
        import cv2
    except ImportError:
        raise CdfaceError("face alignment needs OpenCV: pip install opencv-python-headless") from None
    landmarks = np.asarray(landmarks, dtype=np.float64).reshape(-1, 2)
    if landmarks.shape != (5, 2):
        raise CdfaceError(f"alignment needs 5 landmarks, got {landmarks.shape[0]}")
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise CdfaceError(f"alignment needs an H x W x 3 uint8 image, got {image.dtype} {image.shape}")
    matrix = similarity_transform(landmarks, template(size))
    # Bilinear, and black outside the photo, like the insightface reference crops.
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderValue=0.0)
