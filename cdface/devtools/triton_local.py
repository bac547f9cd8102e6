"""Run the real ``tritonserver`` bundled in the ``nvidia-pytriton`` wheel, on a machine without the NGC image.

For development, tests and demos (production runs Triton's own image). The server runs from its own
virtual environment (``cdface.devtools.triton_env``), as a child process in its own session::

    with TritonServer("runs/triton-repo") as server:
        client = tritonclient.http.InferenceServerClient(server.http_url)
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from pathlib import Path
from typing import BinaryIO

from cdface.core.errors import CdfaceError
from cdface.core.paths import cache_dir
from cdface.devtools.processes import dies_with_this_process
from cdface.devtools.triton_env import ServerEnv, ensure_server_env, file_tail

# Flags measured to work with the bundled server (docs/ENVIRONMENT.md); 4 MiB of shared memory
# per Python-backend instance holds a batch of 32 face crops (32 x 112 x 112 x 3 bytes = 1.2 MB) twice.
_SHM_BYTES = 4 * 1024 * 1024
_EXIT_TIMEOUT_S = 10
_SHM_PREFIX = "triton_python_backend_shm_region_"


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


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on at ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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
    through the model-repository API. ``host`` is the IPv4 address all three endpoints bind to: two
    servers on 127.0.0.1 and 127.0.0.2 can share the same ports, as two pods behind one DNS name do.
    With ``die_with_parent=True`` (Linux) the server gets SIGTERM when the thread that started it
    exits, even if this process is killed outright (``cdface triton serve`` does this); leave it off
    when a short-lived thread starts the server.
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
        die_with_parent: bool = False,
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
        self.die_with_parent = die_with_parent
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
            f"--metrics-address={self.host}",
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
                port = free_port(self.host)
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
                                                  start_new_session=True,
                                                  preexec_fn=dies_with_this_process() if self.die_with_parent
                                                  else None)
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
                                  f"{file_tail(log_path, 12)}")
            with contextlib.suppress(urllib.error.URLError, OSError):
                with urllib.request.urlopen(url, timeout=1) as resp:
                    if resp.status == 200:
                        return
            if time.monotonic() > deadline:
                raise CdfaceError(f"tritonserver was not ready after {self.ready_timeout_s:.0f} s; "
                                  f"log {log_path}: {file_tail(log_path, 12)}")
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
        return file_tail(self.log_path, lines) if self.log_path else ""

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"TritonServer({str(self.repo)!r}, http={self.http_port}, grpc={self.grpc_port}, {state})"
