"""From the images of a request to L2-normalised embeddings: decode, find and align the faces, embed them.

Blocking work (base64, decoding, detection) runs in a worker thread, except for a request of small
aligned crops (``inline_decode_bytes``), decoded on the event loop; the Triton call is async. All
faces of one request go to Triton as one batch.

Each mode has its pixel budget, checked from the image header before a pixel is decoded: exactly
112x112 for ``aligned``, ``max_detect_pixels`` for the detect modes, ``max_image_pixels`` for
``landmarks``. Every crop then passes the face-presence and orientation gate
(``cdface.core.detection.CropGate``), and enrollment adds its quality floor (``enrollable``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
from anyio import to_thread

from cdface.core.contract import INPUT_SIZE
from cdface.core.imaging import ImageError, ImageFormat, crop_from_pixels, decode_image
from cdface.serving.errors import InvalidRequest
from cdface.serving.faces import CropGate, FaceCrop, FaceMode, check_timed, extract_timed
from cdface.serving.metrics import stage
from cdface.serving.settings import Settings
from cdface.serving.triton import TritonEmbedder

if TYPE_CHECKING:
    from cdface.serving.service import FaceService


@dataclass(frozen=True)
class ImageIn:
    """One image of a request and how to find the face in it."""

    data: bytes | str  # the file's bytes, or base64 text (JSON bodies)
    mode: FaceMode = "detect"
    format: ImageFormat = "file"
    landmarks: list[list[float]] | None = None
    min_face_size: float = 0.0
    min_score: float = 0.0


@dataclass(frozen=True)
class FoundFace:
    image: int  # index of the image in the request
    face: FaceCrop
    checked: bool = True  # False: the crop gate is still to run on it (``embed_checked``)
    retry: ImageIn | None = None  # detect mode, unchecked: its photo, to pick another face if this one fails


def _from_base64(text: str, what: str, limit: int) -> bytes:
    if len(text) > (limit * 4) // 3 + 8:
        raise ImageError("image_too_large", f"the {what} is over {limit} bytes")
    try:  # the common case, plain padded base64, without copying the text first
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        pass
    cleaned = "".join(text.split())
    if "," in cleaned[:64] and cleaned.startswith("data:"):
        cleaned = cleaned.split(",", 1)[1]  # a data: URL
    try:
        return base64.b64decode(cleaned + "=" * (-len(cleaned) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("invalid_base64", f"the {what} is not valid base64") from None


def pixel_budget(settings: Settings, mode: FaceMode) -> int:
    """The most pixels an image's header may declare in ``mode`` (``aligned`` is checked as exactly 112x112)."""
    if mode in ("detect", "detect_all"):
        return min(settings.max_image_pixels, settings.max_detect_pixels)
    return settings.max_image_pixels


def crop_gate(settings: Settings) -> CropGate | None:
    """The face-presence and orientation check of every crop; None when turned off (min_crop_face_score 0)."""
    if settings.min_crop_face_score <= 0:
        return None
    return CropGate(settings.min_crop_face_score, settings.upside_down_margin)


def enrollable(settings: Settings, faces: Sequence[FoundFace]) -> None:
    """Refuse (``low_quality_face``) enrolling a face below the configured crop face score or sharpness."""
    for found in faces:
        quality = found.face.quality
        score, sharp = quality.get("crop_score"), quality.get("sharpness", 0.0)
        if score is not None and score < settings.min_enroll_face_score:
            raise ImageError("low_quality_face", f"the face of image {found.image} scores {score:.2f} as a face; "
                             f"enrollment needs at least {settings.min_enroll_face_score}")
        if sharp < settings.min_enroll_sharpness:
            raise ImageError("low_quality_face", f"the face of image {found.image} is blurred (sharpness "
                             f"{sharp:.1f}; enrollment needs at least {settings.min_enroll_sharpness})")


async def find_faces(service: FaceService, images: Sequence[ImageIn], check_later: bool = False) -> list[FoundFace]:
    """The faces of every image, in image order (``ImageError`` names the first image that fails).

    ``check_later``: the crop gate runs in ``embed_checked``, beside the Triton call, instead of here.
    A crop given as such (``aligned``) or by landmarks is simply checked there. In ``detect`` mode the
    gate also picks the face (the largest that passes): the largest is embedded speculatively and, in
    the rare case it fails, ``embed_checked`` picks as the gate would and embeds that face instead.
    ``detect_all`` gates here: every face of the photo is answered.
    """
    settings = service.settings
    if len(images) > settings.max_images:
        raise InvalidRequest(f"{len(images)} images in one request; the limit is {settings.max_images}",
                             code="too_many_images")
    gate = crop_gate(settings)

    def work() -> list[FoundFace]:
        out = []
        for i, image in enumerate(images):
            later = check_later and gate is not None and image.mode != "detect_all"
            crops = _faces_of(service, i, image, None if later else gate)
            out += [FoundFace(i, crop, checked=not later, retry=image if later and image.mode == "detect" else None)
                    for crop in crops]
        return out

    if _small_crops(images, settings.inline_decode_bytes):
        return work()  # a crop or two of a few KB: decoding costs less than the worker-thread hop
    return await to_thread.run_sync(work)


def _small_crops(images: Sequence[ImageIn], limit: int) -> bool:
    """Whether every image is an aligned crop (its pixels bounded by the header check) and all of them
    together are at most ``limit`` bytes (base64 text counted as its decoded size)."""
    if not all(image.mode == "aligned" for image in images):
        return False
    return sum(len(image.data) * 3 // 4 if isinstance(image.data, str) else len(image.data)
               for image in images) <= limit


def _faces_of(service: FaceService, index: int, image: ImageIn, gate: CropGate | None) -> list[FaceCrop]:
    """Decode image ``index`` of a request and extract its faces (blocking); errors name the image."""
    settings, what = service.settings, f"image {index}"
    with stage("decode"):
        data = _from_base64(image.data, what, settings.max_image_bytes) if isinstance(image.data, str) else image.data
        if image.format == "rgb24":
            rgb = crop_from_pixels(data, what)
        else:
            rgb = decode_image(data, max_bytes=settings.max_image_bytes, max_pixels=pixel_budget(settings, image.mode),
                               what=what, aligned=image.mode == "aligned")
    try:
        return extract_timed(rgb, image.mode, detector=service.detector, landmarks=image.landmarks,
                             max_faces=settings.max_faces_per_image, min_face_size=image.min_face_size,
                             min_score=image.min_score, gate=gate)
    except ImageError as exc:  # say which image of the request has no usable face
        raise ImageError(exc.code, f"{what}: {exc}") from None


async def embed_crops(embedder: TritonEmbedder, crops: np.ndarray) -> np.ndarray:
    """uint8 [N, 112, 112, 3] -> float32 [N, D], each row of length 1."""
    with stage("triton"):
        vectors = await embedder.embed(crops)
    # The contract says L2-normalised; renormalise anyway so cosine == inner product holds exactly.
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


async def embed_checked(service: FaceService, embedder: TritonEmbedder,
                        faces: Sequence[FoundFace]) -> tuple[list[FoundFace], np.ndarray]:
    """``faces`` and their embeddings, the crops ``find_faces`` left unchecked gated in a worker thread while
    Triton embeds them: the check costs no time of its own, and its verdict still decides. A refused crop is
    answered as before (``no_face_in_crop``, ``face_upside_down``), also when Triton failed meanwhile; a
    detect-mode face that fails is replaced by the face the gate picks (another Triton call, that once)."""
    faces = list(faces)
    unchecked = [f for f in faces if not f.checked]
    gate = crop_gate(service.settings)
    if not unchecked or gate is None or service.detector is None:
        return faces, await embed_faces(embedder, faces)
    detector = service.detector
    refused: list[FoundFace] = []

    def check() -> None:
        for found in unchecked:
            try:
                check_timed(gate, detector, found.face)
            except ImageError as exc:
                if found.retry is None:
                    raise ImageError(exc.code, f"image {found.image}: {exc}") from None
                refused.append(found)

    checking = asyncio.ensure_future(to_thread.run_sync(check))
    try:
        vectors = await embed_faces(embedder, faces)
    except Exception:  # not a cancellation: the deadline's answer stands
        await checking  # a refused crop is the answer: the request was not one to embed
        raise
    await checking
    if not refused:
        return faces, vectors
    # The largest face of a detect-mode photo failed the gate: pick as the gate does (the next largest that
    # passes; none: the refusal), and embed that face in its place.
    picked = []
    for f in refused:
        assert f.retry is not None  # only a face with its photo to retry is let through refused
        picked += [FoundFace(f.image, crop) for crop in
                   await to_thread.run_sync(_faces_of, service, f.image, f.retry, gate)]
    again = await embed_faces(embedder, picked)
    for found, replacement, vector in zip(refused, picked, again):
        row = next(i for i, f in enumerate(faces) if f is found)  # by identity: crops are arrays
        faces[row], vectors[row] = replacement, vector
    return faces, vectors


async def embed_faces(embedder: TritonEmbedder, faces: Sequence[FoundFace]) -> np.ndarray:
    crops = np.stack([f.face.crop for f in faces]) if faces else np.zeros((0, INPUT_SIZE, INPUT_SIZE, 3), np.uint8)
    return await embed_crops(embedder, crops)
