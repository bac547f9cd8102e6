"""Raw photos -> aligned 112x112 crops, with the detector and alignment the gateway serves with.

``align_folder(SRC, DST)`` reads ``SRC/<identity>/<photo>`` (the layout of ``folder.py``), finds faces
with YuNet (``cdface.core.detection``, the gateway's own code) and writes
``DST/<identity>/<photo stem>.jpg``: the largest face of each photo, or with ``all_faces`` every face
as ``<stem>_0.jpg``, ``<stem>_1.jpg``, ... (largest first). Crops are JPEG quality 95 by default (JPEG,
as in the aligned sets InsightFace publishes; about a third of PNG's size on the test photos) or PNG
(lossless).

Resumable: a photo whose output exists is not detected again. Every crop is written atomically,
so an interrupted run leaves whole files only. Photos that cannot be decoded or hold no face are
reported, never fatal: ``DST/align_report.json`` holds the counts and lists both kinds.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from cdface.core.atomic import atomic_write_bytes, atomic_write_text
from cdface.core.detection import Detector, extract_faces
from cdface.core.errors import CdfaceError
from cdface.core.imaging import ImageError, read_image
from cdface.training.data.folder import scan_image_folder

CropFormat = Literal["jpeg", "png"]
JPEG_QUALITY = 95
REPORT_NAME = "align_report.json"
_SUFFIX = {"jpeg": ".jpg", "png": ".png"}


@dataclass
class AlignReport:
    """What one ``align_folder`` run did; ``images = aligned + no_face + unreadable``."""

    source: str
    destination: str
    crop_format: str
    faces: str  # "largest" or "all"
    images: int = 0
    aligned: int = 0  # photos with at least one crop in DST (this run or an earlier one)
    already_aligned: int = 0  # of those, photos skipped because their crop existed
    crops_written: int = 0
    no_face: list[str] = field(default_factory=list)  # photo paths relative to SRC
    unreadable: list[dict[str, str]] = field(default_factory=list)  # path, code, error

    def as_json(self) -> dict:
        return {
            "source": self.source,
            "destination": self.destination,
            "format": self.crop_format,
            "faces": self.faces,
            "counts": {
                "images": self.images,
                "aligned": self.aligned,
                "already_aligned": self.already_aligned,
                "crops_written": self.crops_written,
                "no_face": len(self.no_face),
                "unreadable": len(self.unreadable),
            },
            "no_face": self.no_face,
            "unreadable": self.unreadable,
        }

    def summary(self) -> str:
        return (f"{self.images} images: {self.aligned} aligned ({self.already_aligned} already done, "
                f"{self.crops_written} crops written), {len(self.no_face)} without a face, "
                f"{len(self.unreadable)} unreadable")


def encode_crop(crop: np.ndarray, crop_format: CropFormat) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    if crop_format == "jpeg":
        Image.fromarray(crop).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    else:
        Image.fromarray(crop).save(buffer, format="PNG")
    return buffer.getvalue()


def _planned_outputs(src: Path, dst: Path, photos: list[Path], crop_format: CropFormat,
                     all_faces: bool) -> list[Path]:
    """The output that marks each photo as done (its only crop, or its largest face's)."""
    suffix = _SUFFIX[crop_format]
    outputs = []
    for photo in photos:
        relative = photo.relative_to(src)
        stem = relative.stem + ("_0" if all_faces else "")
        outputs.append(dst / relative.parent / (stem + suffix))
    seen: dict[Path, Path] = {}
    for photo, output in zip(photos, outputs):
        if output in seen:
            raise CdfaceError(f"{seen[output]} and {photo} would both be aligned to {output}; rename one of them.")
        seen[output] = photo
    return outputs


def align_folder(src: str | os.PathLike, dst: str | os.PathLike, detector: Detector, *,
                 crop_format: CropFormat = "jpeg", all_faces: bool = False, min_face_size: float = 0.0,
                 progress: bool = True) -> AlignReport:
    """Align every photo of ``src/<identity>/`` into ``dst/<identity>/``; writes and returns the report."""
    from tqdm import tqdm

    src, dst = Path(src), Path(dst)
    if crop_format not in _SUFFIX:
        raise CdfaceError(f"crop format must be jpeg or png, got {crop_format!r}.")
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise CdfaceError(f"the destination {dst} must lie outside the source folder {src}.")
    folder = scan_image_folder(src)
    outputs = _planned_outputs(src, dst, folder.paths, crop_format, all_faces)
    report = AlignReport(str(src), str(dst), crop_format, "all" if all_faces else "largest")
    suffix = _SUFFIX[crop_format]
    for photo, marker in tqdm(list(zip(folder.paths, outputs)), desc="align", unit="img", dynamic_ncols=True,
                              disable=not progress):
        relative = str(photo.relative_to(src))
        report.images += 1
        if marker.is_file():
            report.aligned += 1
            report.already_aligned += 1
            continue
        try:
            rgb = read_image(photo)
            faces = extract_faces(rgb, "detect_all" if all_faces else "detect", detector=detector,
                                  min_face_size=min_face_size)
        except ImageError as exc:
            if exc.code == "no_face":
                report.no_face.append(relative)
            else:
                report.unreadable.append({"path": relative, "code": exc.code, "error": str(exc)})
            continue
        # The marker (the largest face's crop) is written last, so a run stopped part-way through a
        # photo's faces redoes that photo instead of skipping it with crops missing.
        for index in reversed(range(len(faces))):
            name = marker.name if index == 0 else f"{Path(relative).stem}_{index}{suffix}"
            atomic_write_bytes(marker.parent / name, encode_crop(faces[index].crop, crop_format))
            report.crops_written += 1
        report.aligned += 1
    dst.mkdir(parents=True, exist_ok=True)
    atomic_write_text(dst / REPORT_NAME, json.dumps(report.as_json(), indent=1) + "\n")
    return report
