"""``cdface triton serve`` in the foreground: prints its URLs, serves, and stops cleanly on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tritonclient.http as thttp

pytestmark = pytest.mark.slow


def test_serve_runs_until_sigterm(triton_repo, tmp_path):
    from cdface.devtools.triton_env import ensure_server_env
    from cdface.devtools.triton_local import free_port

    ensure_server_env()  # created by the session already, or now; not part of the timing below
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cdface.cli", "triton", "serve", str(triton_repo), "--http-port", str(port),
         "--log", str(tmp_path / "server.log")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "tritonserver ready" in line:
                break
        assert any(f"HTTP 127.0.0.1:{port}" in ln for ln in lines), "".join(lines)

        client = thttp.InferenceServerClient(f"127.0.0.1:{port}")
        images = np.zeros((2, 112, 112, 3), np.uint8)
        tensor = thttp.InferInput("images", list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images)
        assert client.infer("face", [tensor]).as_numpy("embedding").shape[0] == 2
        client.close()

        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, rest
        assert "stopping tritonserver" in rest
        with pytest.raises(Exception):  # nothing listens any more
            thttp.InferenceServerClient(f"127.0.0.1:{port}").is_server_live()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_reports_a_missing_repository_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cdface.cli", "triton", "serve", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("cdface: error: model repository")


def test_setup_reports_the_environment():
    proc = subprocess.run([sys.executable, "-m", "cdface.cli", "triton", "setup"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Triton server environment ready" in proc.stdout
