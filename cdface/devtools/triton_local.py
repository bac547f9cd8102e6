"""Run the real ``tritonserver`` bundled in the ``nvidia-pytriton`` wheel, on a machine without the NGC image.

The wheel carries Triton 2.51 with only its Python backend. That backend's stub runs model code in a
Python environment that must have numpy < 2 (with numpy 2 outputs come back empty, silently), while
the project's own environment uses numpy 2. So, as production gives Triton its own image, the server
gets its own small virtual environment, created once per machine and reused::

    with TritonServer("runs/triton-repo") as server:
        client = tritonclient.http.InferenceServerClient(server.http_url)

The environment lives under ``$CDFACE_CACHE`` (default ``~/.cache/cdface``), in a folder named by a
hash of its requirements, so changing a pin makes a new one instead of mutating an old one.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

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

# Flags measured to work with the bundled server (docs/ENVIRONMENT.md); 4 MiB of shared memory
# per Python-backend instance holds a batch of 32 face crops (32 x 112 x 112 x 3 bytes = 1.2 MB) twice.
_SHM_BYTES = 4 * 1024 * 1024
_EXIT_TIMEOUT_S = 10
_SHM_PREFIX = "triton_python_backend_shm_region_"
_ENV_INFO = "cdface-triton-env.json"


# --------------------------------------------------------------------------------------------------
# The server's own virtual environment
# --------------------------------------------------------------------------------------------------


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
        raise CdfaceError(f"{what} failed (exit {proc.returncode}): {_tail(log, 15)}")


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


# --------------------------------------------------------------------------------------------------
# Shared memory left behind by dead servers
# --------------------------------------------------------------------------------------------------


def _shm_in_use() -> set[str]:
    """Names of /dev/shm files that some live process has mapped or open."""
    used: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for line in (proc / "maps").read_text().splitlines():
                if "/dev/shm/" in line:
                    used.add(line.rsplit("/", 1)[-1].replace(" (deleted)", ""))
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("/dev/shm/"):
                        used.add(target[len("/dev/shm/"):])
    return used


def clean_stale_shm(min_age_s: float = 30.0) -> list[Path]:
    """Delete Python-backend shared-memory regions that no live process holds; return what was removed.

    A stub that fails to start, or a server killed with SIGKILL, leaves its region in /dev/shm, where
    it uses RAM until reboot. Only our own files, older than ``min_age_s`` (a starting server may not
    have mapped its fresh region yet), and held by no process are removed.
    """
    shm = Path("/dev/shm")
    if not shm.is_dir():
        return []
    candidates = []
    now = time.time()
    for f in shm.glob(_SHM_PREFIX + "*"):
        with contextlib.suppress(OSError):
            st = f.stat()
            if st.st_uid == os.getuid() and now - st.st_mtime > min_age_s:
                candidates.append(f)
    if not candidates:
        return []
    in_use = _shm_in_use()
    removed = []
    for f in candidates:
        if f.name not in in_use:
            with contextlib.suppress(OSError):
                f.unlink()
                removed.append(f)
    return removed


# --------------------------------------------------------------------------------------------------
# The server process
# --------------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int) -> str:
    try:
        text = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"


# Servers this process started and has not stopped. The server runs in its own session (so a Ctrl-C
# meant for us does not cut it off mid-request); this makes sure it does not outlive an interpreter
# that exits without calling stop(), e.g. on an unhandled exception.
_RUNNING: "weakref.WeakSet[TritonServer]" = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_RUNNING):
        with contextlib.suppress(Exception):
            server.stop()


class TritonServer:
    """One ``tritonserver`` process serving a model repository on local ports.

    Ports left as ``None`` are chosen free at ``start()``. With ``explicit=True`` the server starts
    with no models loaded (or only ``load_models``) and models are loaded and unloaded at run time
    through the model-repository API.
    """

    def __init__(
        self,
        repo: str | os.PathLike,
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        explicit: bool = False,
        log_path: str | os.PathLike | None = None,
        *,
        load_models: tuple[str, ...] | list[str] = (),
        ready_timeout_s: float = 120.0,
        stop_timeout_s: float = _EXIT_TIMEOUT_S + 10.0,
        host: str = "127.0.0.1",
    ) -> None:
        self.repo = Path(repo).resolve()
        self._ports_given = (http_port, grpc_port, metrics_port)
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.explicit = explicit
        self.load_models = tuple(load_models)
        self.log_path = Path(log_path) if log_path else None
        self.ready_timeout_s = ready_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.host = host
        self.process: subprocess.Popen | None = None
        self._log_file: BinaryIO | None = None

    # URLs in the forms tritonclient wants (host:port, no scheme) and curl-able metrics.
    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def command(self, env: ServerEnv) -> list[str]:
        cmd = [
            str(env.tritonserver),
            f"--model-repository={self.repo}",
            f"--backend-directory={env.backend_dir}",
            f"--cache-directory={env.tritonserver_dir / 'caches'}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            f"--http-address={self.host}",
            f"--grpc-address={self.host}",
            "--allow-gpu-metrics=false",
            f"--backend-config=python,shm-default-byte-size={_SHM_BYTES}",
            f"--exit-timeout-secs={_EXIT_TIMEOUT_S}",
        ]
        if self.explicit:
            cmd.append("--model-control-mode=explicit")
            cmd += [f"--load-model={name}" for name in self.load_models]
        return cmd

    def _environ(self, env: ServerEnv) -> dict[str, str]:
        environ = dict(os.environ)
        # The stub finds numpy and onnxruntime through the first python3 on PATH: the server venv's.
        environ["PATH"] = os.pathsep.join([str(env.bin_dir), environ.get("PATH", "")])
        environ["VIRTUAL_ENV"] = str(env.root)
        environ["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in [env.lib_path, environ.get("LD_LIBRARY_PATH")] if p)
        # Our own project environment must not leak into the stub's interpreter.
        for var in ("PYTHONPATH", "PYTHONHOME"):
            environ.pop(var, None)
        return environ

    def start(self) -> "TritonServer":
        if self.process is not None and self.process.poll() is None:
            return self
        if not self.repo.is_dir():
            raise CdfaceError(f"model repository {self.repo} does not exist.")
        env = ensure_server_env(quiet=False)
        clean_stale_shm()
        # Ports we pick ourselves can be taken between picking and binding; retry those with fresh ones.
        attempts = 1 if all(self._ports_given) else 3
        for attempt in range(attempts):
            self._pick_ports()
            try:
                self._launch(env)
                return self
            except CdfaceError as exc:
                if attempt + 1 < attempts and "address already in use" in str(exc).lower():
                    continue
                raise
        return self  # unreachable

    def _pick_ports(self) -> None:
        chosen: set[int] = set(p for p in self._ports_given if p)
        picked = []
        for given in self._ports_given:
            port = given
            while port is None or (given is None and port in chosen):
                port = free_port()
            chosen.add(port)
            picked.append(port)
        self.http_port, self.grpc_port, self.metrics_port = picked

    def _launch(self, env: ServerEnv) -> None:
        if self.log_path is None:
            logs = cache_dir() / "triton" / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f"tritonserver-{self.http_port}-", suffix=".log", dir=logs)
            os.close(fd)
            self.log_path = Path(name)
        log_path = self.log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(log_path, "ab")
        # Its own session: a Ctrl-C meant for the parent does not reach the server half-way through
        # a request; stop() (or the exit hook above) decides how it ends.
        self.process = process = subprocess.Popen(self.command(env), stdout=self._log_file,
                                                  stderr=subprocess.STDOUT, env=self._environ(env),
                                                  start_new_session=True)
        _RUNNING.add(self)
        try:
            self._wait_ready(process, log_path)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, process: subprocess.Popen, log_path: Path) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        url = f"http://{self.http_url}/v2/health/ready"
        while True:
            code = process.poll()
            if code is not None:
                raise CdfaceError(f"tritonserver exited with code {code} while starting; log {log_path}: "
                                  f"{_tail(log_path, 12)}")
            with contextlib.suppress(urllib.error.URLError, OSError):
                with urllib.request.urlopen(url, timeout=1) as resp:
                    if resp.status == 200:
                        return
            if time.monotonic() > deadline:
                raise CdfaceError(f"tritonserver was not ready after {self.ready_timeout_s:.0f} s; "
                                  f"log {log_path}: {_tail(log_path, 12)}")
            time.sleep(0.2)

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM (Triton drains in-flight requests), then SIGKILL to the whole group if it hangs."""
        proc = self.process
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=self.stop_timeout_s)
                except subprocess.TimeoutExpired:
                    # The group holds the Python-backend stubs too.
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            self.process = None
        _RUNNING.discard(self)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def log_tail(self, lines: int = 20) -> str:
        return _tail(self.log_path, lines) if self.log_path else ""

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"TritonServer({str(self.repo)!r}, http={self.http_port}, grpc={self.grpc_port}, {state})"
