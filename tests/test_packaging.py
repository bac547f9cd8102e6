"""How cdface installs: one namespace, and a gateway that runs from the serve extra alone (no torch).

The wheel maps the top-level stage folders into ``cdface.training``, ``cdface.export`` and
``cdface.serving``; nothing named ``training``, ``export`` or ``serving`` may reach site-packages,
where it would collide with users' own modules. The gateway image installs ``.[serve]`` only, so a
fresh virtual environment with just that extra must start the gateway and answer through a real
Triton server. `make demo` installs the `demo` extra only (no torch): that must run the whole demo.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import venv
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
import tomllib

from tests.triton_fixtures import MODEL

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, mapping = set(setuptools["packages"]), setuptools["package-dir"]
    data_only = set(setuptools["package-data"])  # folders of data files, shipped as packages too
    found = set()
    for package, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((package, *relative)))
    assert found | data_only == listed, \
        f"unlisted: {sorted(found - listed)}; listed but missing: {sorted(listed - found - data_only)}"


def _copy_source(source: Path) -> Path:
    """What the gateway image copies (docker/gateway.Dockerfile), and nothing else: no stale build/."""
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    for folder in ("cdface", "training", "export", "serving"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return source


def test_the_wheel_ships_py_typed_and_the_licence(tmp_path):
    """PEP 561's marker makes the package's type hints count in code that imports cdface; the licence
    file travels with the declared licence expression. A wheel only, no dependencies: a few seconds."""
    source = _copy_source(tmp_path / "src")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "--disable-pip-version-check", "-w", str(tmp_path / "dist"), str(source)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("cdface-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (metadata,) = (n for n in names if n.endswith(".dist-info/METADATA"))
        headers = archive.read(metadata).decode()
    assert "cdface/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), sorted(names)[-10:]
    assert "License-Expression: Apache-2.0" in headers.splitlines()
    assert (ROOT / "LICENSE").read_text().split()[:3] == ["Apache", "License", "Version"]


@pytest.fixture(scope="module")
def serve_only_venv(tmp_path_factory) -> Path:
    """A fresh virtual environment holding ``pip install -c docker/gateway-constraints.txt .[serve]`` (a wheel)."""
    work = tmp_path_factory.mktemp("serve-venv")
    source = _copy_source(work / "src")
    root = work / "venv"
    venv.EnvBuilder(with_pip=True).create(root)
    python = root / "bin" / "python"
    # With the gateway image's constraints, so the versions the image pins are the ones tested here.
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                           "-c", str(ROOT / "docker" / "gateway-constraints.txt"), f"{source}[serve]"],
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return python


def _run(python: Path, code: str, cwd: Path) -> subprocess.CompletedProcess:
    # Not from the repository root: its folders would shadow what the wheel installed.
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.mark.slow
def test_wheel_installs_one_namespace_and_no_torch(serve_only_venv, tmp_path):
    probe = """
import importlib.resources, importlib.util, json, pathlib, sysconfig
site = pathlib.Path(sysconfig.get_paths()["purelib"])
print(json.dumps({
    "top_level": {m: importlib.util.find_spec(m) is not None for m in ("training", "export", "serving")},
    "in_site_packages": sorted(p.name for p in site.iterdir() if p.name in ("training", "export", "serving")),
    "namespace": {m: importlib.util.find_spec(m) is not None
                  for m in ("cdface.core", "cdface.serving.app", "cdface.training", "cdface.export")},
    "origin": importlib.util.find_spec("cdface").origin,
    "presets": sorted(p.name for p in importlib.resources.files("cdface.training.presets").iterdir()
                      if p.name.endswith(".yaml")),
    "torch": importlib.util.find_spec("torch") is not None,
}))
"""
    done = _run(serve_only_venv, probe, tmp_path)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["top_level"] == {"training": False, "export": False, "serving": False}
    assert found["in_site_packages"] == []
    assert all(found["namespace"].values()), found["namespace"]
    assert "site-packages" in found["origin"]
    assert {"demo.yaml", "paper.yaml"} <= set(found["presets"])  # package data travels with the wheel
    assert found["torch"] is False  # the serve extra pulls no torch


@pytest.mark.slow
def test_gateway_starts_and_embeds_from_the_serve_extra_alone(serve_only_venv, tmp_path, triton_server,
                                                              triton_repo, yunet_onnx):
    from cdface.core.imaging import encode_png
    from cdface.devtools.triton_local import free_port

    port = free_port()
    env = {**os.environ, "CDFACE_SERVE_PORT": str(port), "CDFACE_SERVE_DB_PATH": str(tmp_path / "gallery.db"),
           "CDFACE_SERVE_CREATE_DB": "1",
           "CDFACE_SERVE_TRITON_URL": triton_server.grpc_url, "CDFACE_SERVE_MODEL_REPOSITORY": str(triton_repo),
           "CDFACE_SERVE_MODEL": MODEL, "CDFACE_SERVE_AUTH": "false", "CDFACE_SERVE_LOG_LEVEL": "warning",
           "CDFACE_SERVE_MIN_CROP_FACE_SCORE": "0"}  # a random crop stands in for a face: no face gate
    cdface = serve_only_venv.parent / "cdface"
    log = tmp_path / "gateway.log"
    with open(log, "wb") as out:
        # The gateway image's command: `cdface serve`.
        proc = subprocess.Popen([str(cdface), "serve"], cwd=tmp_path, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "gateway not ready within 120 s: " + log.read_text()[-3000:]
            time.sleep(0.2)
        crop = np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8)
        answer = httpx.post(url + "/v1/embeddings", timeout=60,
                            files={"images": ("crop.png", encode_png(crop), "image/png")}, data={"mode": "aligned"})
        assert answer.status_code == 200, answer.text
        vector = np.asarray(answer.json()["faces"][0]["embedding"])
        assert vector.shape == (answer.json()["model"]["embedding_size"],)
        assert abs(np.linalg.norm(vector) - 1.0) < 1e-4
        torch_loaded = _run(serve_only_venv, "import torch", tmp_path)
        assert torch_loaded.returncode != 0 and "No module named 'torch'" in torch_loaded.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_the_demo_runs_from_the_demo_extra_alone(tmp_path):
    """`make demo`'s environment (.venv-serve: `pip install -e .[demo]`, no torch) runs the whole demo:
    the stack comes up and the real photos are identified."""
    source = _copy_source(tmp_path / "src")
    root = tmp_path / "venv-serve"
    venv.EnvBuilder(with_pip=True).create(root)
    python = root / "bin" / "python"
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-e",
                           f"{source}[demo]"], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _run(python, "import torch", tmp_path).returncode != 0  # the point: no torch
    # From an empty folder, as `make demo` would from a fresh clone (no exports/: SFace is served).
    demo = subprocess.run([str(python), "-m", "cdface.devtools.stack_demo", "--workdir", str(tmp_path / "demo"),
                           "--once", "--port", "0"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert demo.returncode == 0, (demo.stdout + demo.stderr)[-3000:]
    for line in ("obama2.jpg: match: Barack Obama", "obama3.jpg: match: Barack Obama",
                 "obama.jpg vs biden.jpg: match=False", "6 faces found in t1.jpg"):
        assert line in demo.stdout, demo.stdout[-3000:]
    assert "stopped gateway" in demo.stdout and "stopped Triton Inference Server" in demo.stdout
