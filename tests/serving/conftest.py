"""Fixtures for the serving tests: the wrapped SFace model in a real tritonserver, real gateways over HTTP.

Nothing is faked: the gateway runs as its own process (``python -m cdface.serving.cli serve``) on a free
port with a real SQLite file, and talks gRPC to the ``tritonserver`` of the export stage
(``cdface.devtools.triton_local``), which runs SFace through its Python backend and ONNX Runtime.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest

MODEL = "face"
REPO_ROOT = Path(__file__).resolve().parents[2]
# The gateways seal retained crops with this key (without one no crop is kept, and re-embedding has nothing to use).
CROP_KEYS = "cktest:" + base64.b64encode(os.urandom(32)).decode()


@pytest.fixture(scope="session")
def sface_export(sface_onnx, tmp_path_factory) -> Path:
    from cdface.core import assets
    from cdface.export.wrap import wrap_onnx

    out = tmp_path_factory.mktemp("sface-export")
    wrap_onnx(sface_onnx, out, name="sface", version=1, input_layout="NCHW", channel_order="RGB", mean=0.0, std=1.0,
              licence=assets.SFACE_LICENCE, backbone="sface", url=assets.SFACE_URL)
    return out


@pytest.fixture(scope="session")
def model_repo(sface_export, tmp_path_factory) -> Path:
    from cdface.export.triton_repo import add_model_version

    repo = tmp_path_factory.mktemp("serving-repo")
    add_model_version(repo, MODEL, sface_export, backend="python", max_batch_size=32, preferred=[8, 32],
                      queue_delay_us=2_000)
    return repo


@pytest.fixture(scope="session")
def triton(model_repo, tmp_path_factory):
    from cdface.devtools.triton_local import TritonServer

    log = tmp_path_factory.mktemp("triton-log") / "tritonserver.log"
    with TritonServer(model_repo, log_path=log) as server:
        yield server


def b64(path_or_bytes) -> str:
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    return base64.b64encode(data).decode()


@dataclass
class Gateway:
    url: str
    proc: subprocess.Popen
    db: Path
    env: dict
    log: Path
    keys: dict[str, str] = field(default_factory=dict)

    def client(self, scope: str = "admin", timeout: float = 60.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.keys[scope]}"} if scope else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _free_port() -> int:
    from cdface.devtools.triton_local import free_port

    return free_port()


def start_gateway(workdir: Path, triton_url: str, model_repo: Path, *, db: Path | None = None,
                  keys: dict[str, str] | None = None, extra_env: dict | None = None,
                  args: tuple[str, ...] = ()) -> Gateway:
    from cdface.serving.auth import create_key
    from cdface.serving.store import SQLiteStore

    workdir.mkdir(parents=True, exist_ok=True)
    db = db or workdir / "gallery.db"
    if keys is None:
        store = SQLiteStore(db)
        keys = {scope: create_key(store, f"test-{scope}", [scope])[0]
                for scope in ("admin", "embed", "verify", "identify", "enroll", "delete")}
        store.close()
    port = _free_port()
    env = {**os.environ, "CDFACE_SERVE_PORT": str(port), "CDFACE_SERVE_DB_PATH": str(db),
           "CDFACE_SERVE_TRITON_URL": triton_url, "CDFACE_SERVE_MODEL_REPOSITORY": str(model_repo),
           "CDFACE_SERVE_MODEL": MODEL, "CDFACE_SERVE_LOG_LEVEL": "warning",
           "CDFACE_SERVE_BREAKER_RESET_S": "2", "CDFACE_SERVE_TRITON_TIMEOUT_S": "5",
           "CDFACE_SERVE_MAX_REQUEST_BYTES": str(12 * 1024 * 1024),
           "CDFACE_SERVE_MAX_IMAGE_BYTES": str(8 * 1024 * 1024),
           # Many tests send random 112x112 crops as stand-ins for faces (a distinct embedding per seed), which
           # the face gate refuses; tests/serving/test_faults.py runs the gate at its production default.
           "CDFACE_SERVE_MIN_CROP_FACE_SCORE": "0",
           # The session's gateways serve thousands of requests per key (schemathesis, load and kill tests), over
           # the production default of 600/minute; tests/serving/test_rate_limits.py sets its own limits.
           "CDFACE_SERVE_RATE_LIMIT": "none", "CDFACE_SERVE_CROP_KEYS": CROP_KEYS, **(extra_env or {})}
    log = workdir / f"gateway-{port}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cdface.serving.cli", "serve", *args], cwd=REPO_ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    gw = Gateway(f"http://127.0.0.1:{port}", proc, db, env, log, keys)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            if httpx.get(gw.url + "/healthz", timeout=1).status_code == 200:
                return gw
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    gw.stop(signal.SIGKILL)
    raise RuntimeError(f"gateway did not answer within 60 s: {log.read_text()[-2000:]}")


def enroll_until_killed(gw: "Gateway", people: list[str], crop, seed_base: int = 0,
                        workers: int = 4, at_least: int = 30) -> list[tuple[str, int]]:
    """Enroll 3-face batches from several clients, SIGKILL the gateway mid-stream once ``at_least``
    faces are acknowledged; returns the acknowledged (identity, face id) pairs."""
    import threading

    acked: list[tuple[str, int]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def enroller(worker: int) -> None:
        n = 0
        with gw.client("enroll", timeout=10) as c:
            while not stop.is_set():
                person = people[(worker + n) % len(people)]
                images = [{"data": crop(seed_base + worker * 10_000 + n * 3 + j), "mode": "aligned"}
                          for j in range(3)]
                n += 1
                try:
                    r = c.post(f"/v1/identities/{person}/faces", json={"images": images})
                except httpx.HTTPError:
                    return  # the server died mid-request: not acknowledged
                if r.status_code == 201:
                    with lock:
                        acked.extend((person, f["id"]) for f in r.json()["faces"])

    threads = [threading.Thread(target=enroller, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(acked) < at_least and time.monotonic() < deadline:
        time.sleep(0.05)
    gw.stop(signal.SIGKILL)
    stop.set()
    for t in threads:
        t.join()
    return acked


@pytest.fixture(scope="session")
def gateway(triton, model_repo, tmp_path_factory):
    gw = start_gateway(tmp_path_factory.mktemp("gateway"), triton.grpc_url, model_repo)
    yield gw
    gw.stop()


@pytest.fixture(scope="session")
def photos(face_photos) -> dict[str, Path]:
    return face_photos


# --------------------------------------------------------------------------------------------------
# PostgreSQL: a throwaway server per test session (Debian's ``postgresql`` package; .ci/run installs it)
# --------------------------------------------------------------------------------------------------


def _pg_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else None


@pytest.fixture(scope="session")
def postgres_server():
    """A fresh PostgreSQL cluster on a free port in a temp dir; yields its base URL (no database name).

    initdb refuses to run as root (CI runs as root): then the cluster runs as the ``postgres`` user,
    in a directory that user owns. Trust authentication on 127.0.0.1 only: it is a throwaway.
    """
    import shutil
    import tempfile

    pytest.importorskip("psycopg", reason="psycopg[binary] (the serve extra) is not installed")
    bin_dir = _pg_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run does it)")
    as_root = os.geteuid() == 0
    base = Path(tempfile.mkdtemp(prefix="cdface-pg-"))
    if as_root:
        shutil.chown(base, "postgres", "postgres")
    run_as = ["runuser", "-u", "postgres", "--"] if as_root else []
    data, port = base / "data", _free_port()
    subprocess.run(run_as + [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                             "-E", "UTF8", "--no-sync"], check=True, capture_output=True)
    # fsync stays on: the kill -9 test is about what an acknowledged write survives.
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {base} -c max_connections=200"
    subprocess.run(run_as + [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(base / "postgres.log"),
                             "-o", options, "-w", "-t", "60", "start"], check=True, capture_output=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run(run_as + [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server, request) -> str:
    """A fresh, empty database on the session's server for one test."""
    import re

    import psycopg

    name = "t_" + re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:40] + "_" + os.urandom(3).hex()
    with psycopg.connect(postgres_server + "/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{postgres_server}/{name}"


def start_pg_gateway(workdir: Path, triton_url: str, model_repo: Path, database_url: str, keys: dict[str, str],
                     **env: str) -> Gateway:
    """A gateway on the shared PostgreSQL gallery, following its change log every 0.5 s at worst."""
    return start_gateway(workdir, triton_url, model_repo, keys=keys,
                         extra_env={"CDFACE_SERVE_DATABASE_URL": database_url, "CDFACE_SERVE_SYNC_POLL_S": "0.5",
                                    **env})


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    """A gallery store on each database (a test module may define its own ``store`` instead)."""
    from cdface.serving.store import SQLiteStore

    if request.param == "sqlite":
        s = SQLiteStore(tmp_path / "g.db")
    else:
        from cdface.serving.store.postgres import PostgresStore

        s = PostgresStore(request.getfixturevalue("postgres_url"))
    yield s
    s.close()


def vec(seed: int, dim: int = 8) -> np.ndarray:
    """A seeded unit vector (a stand-in embedding)."""
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)
