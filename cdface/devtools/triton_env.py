"""The local ``tritonserver``'s own virtual environment, created once per machine and reused.

The ``nvidia-pytriton`` wheel carries Triton 2.51 with only its Python backend, whose stub runs model
code in an environment that must have numpy < 2 (with numpy 2 outputs come back empty, silently),
while the project's environment uses numpy 2. So, as production gives Triton its own image, the
server gets its own small environment under ``$CDFACE_CACHE`` (default ``~/.cache/cdface``), in a
folder named by a hash of its requirements: changing a pin makes a new one instead of mutating an
old one. ``cdface.devtools.triton_local`` runs the server from it.
"""


from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cdface.core.atomic import atomic_write_text
from cdface.core.digest import sha256_bytes
from cdface.core.errors import CdfaceError
from cdface.core.paths import cache_dir

# What the server's environment holds. onnxruntime is pinned to a release built and tested against
# numpy 1.x; numpy < 2 is what the Python backend stub needs.
SERVER_REQUIREMENTS: tuple[str, ...] = (
    "nvidia-pytriton==0.7.0",
    "onnxruntime==1.22.1",
    "numpy>=1.24,<2",
)

_ENV_INFO = "cdface-triton-env.json"


@dataclass(frozen=True)
class ServerEnv:
    """A ready server environment: where the binary, its backends and its libraries are."""

    root: Path  # the virtual environment
    python_version: str  # "3.11": picks the matching Python-backend stub
    libdir: Path  # the interpreter's own libpython directory
    site_packages: Path

    @property
    def bin_dir(self) -> Path:
        return self.root / "bin"

    @property
    def tritonserver_dir(self) -> Path:
        return self.site_packages / "pytriton" / "tritonserver"

    @property
    def tritonserver(self) -> Path:
        return self.tritonserver_dir / "bin" / "tritonserver"

    @property
    def backend_dir(self) -> Path:
        # Our own backend directory, built once beside the environment (see _build_backend_dir).
        return self.root / "triton-backends"

    @property
    def lib_path(self) -> str:
        # The interpreter's LIBDIR must come first, or the stub loads Debian's libpython; the wheel's
        # bundled libraries (libcudart, libb64, ...) come next.
        return os.pathsep.join([str(self.libdir), str(self.site_packages / "nvidia_pytriton.libs")])


def _requirements_key(python: str) -> str:
    text = "\n".join([python, *SERVER_REQUIREMENTS])
    return sha256_bytes(text.encode())[:12]


def _base_python() -> str:
    # A venv made from inside another venv still links to the base interpreter; be explicit anyway.
    return getattr(sys, "_base_executable", None) or sys.executable


def _run(cmd: list[str], what: str, log: Path) -> None:
    with open(log, "ab") as out:
        out.write(f"\n$ {' '.join(cmd)}\n".encode())
        out.flush()
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise CdfaceError(f"{what} failed (exit {proc.returncode}): {file_tail(log, 15)}")


def _describe_env(root: Path) -> ServerEnv:
    probe = (
        "import json, sys, sysconfig; print(json.dumps({"
        "'version': f'{sys.version_info[0]}.{sys.version_info[1]}',"
        "'libdir': sysconfig.get_config_var('LIBDIR'),"
        "'purelib': sysconfig.get_paths()['purelib']}))"
    )
    out = subprocess.run([str(root / "bin" / "python"), "-c", probe], capture_output=True, text=True, check=True)
    facts = json.loads(out.stdout)
    return ServerEnv(root, facts["version"], Path(facts["libdir"]), Path(facts["purelib"]))


def _build_backend_dir(env: ServerEnv) -> None:
    """Lay out ``<backend_dir>/python/`` as Triton expects: the backend library, its utils, the stub."""
    src = env.tritonserver_dir
    stub = src / "python_backend_stubs" / env.python_version / "triton_python_backend_stub"
    if not stub.exists():
        raise CdfaceError(f"nvidia-pytriton has no Python-backend stub for Python {env.python_version}.")
    dst = env.backend_dir / "python"
    dst.mkdir(parents=True, exist_ok=True)
    for f in (src / "backends" / "python" / "libtriton_python.so",
              src / "backends" / "python" / "triton_python_backend_utils.py", stub):
        shutil.copy2(f, dst / f.name)


def ensure_server_env(*, quiet: bool = True) -> ServerEnv:
    """Create the server's virtual environment if it does not exist yet; return it.

    Safe when several processes race: the first takes a file lock and builds, the others wait for it
    and reuse the result. A half-built environment (a crash mid-install) has no completion marker and
    is rebuilt.
    """
    from filelock import FileLock

    python = _base_python()
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    root = cache_dir() / "triton" / f"server-env-py{version}-{_requirements_key(python)}"
    marker = root / _ENV_INFO
    if marker.exists():
        return _load_env(marker)

    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        if marker.exists():  # another process finished it while we waited
            return _load_env(marker)
        if root.exists():
            shutil.rmtree(root)
        log = root.parent / (root.name + ".install.log")
        log.write_text("")
        if not quiet:
            print(f"creating the Triton server environment in {root} (once per machine; a minute or two)",
                  file=sys.stderr)
        _run([python, "-m", "venv", str(root)], "creating the Triton server virtual environment", log)
        _run([str(root / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
              *SERVER_REQUIREMENTS], "installing the Triton server environment", log)
        env = _describe_env(root)
        if not env.tritonserver.exists():
            raise CdfaceError(f"nvidia-pytriton installed no tritonserver binary at {env.tritonserver}.")
        _build_backend_dir(env)
        info = {"python_version": env.python_version, "libdir": str(env.libdir),
                "site_packages": str(env.site_packages), "requirements": list(SERVER_REQUIREMENTS)}
        atomic_write_text(marker, json.dumps(info, indent=2) + "\n")
        return env


def _load_env(marker: Path) -> ServerEnv:
    info = json.loads(marker.read_text())
    return ServerEnv(marker.parent, info["python_version"], Path(info["libdir"]), Path(info["site_packages"]))


def file_tail(path: Path, lines: int) -> str:
    try:
        text = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"
