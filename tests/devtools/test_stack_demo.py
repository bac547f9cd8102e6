"""The README's main job (`make demo`) end to end: Triton + gateway on localhost, the real photos."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import pytest

from cdface.devtools import stack_demo as demo

pytestmark = pytest.mark.slow


def test_demo_brings_up_the_stack_and_answers_on_real_photos(tmp_path, capsys):
    results = demo.main(["--workdir", str(tmp_path / "demo"), "--once", "--port", "0"])
    assert results["identify"] == {"obama2": "obama", "obama3": "obama"}
    assert results["verify_obama_biden"] is False and results["verify_obama3_obama"] is True
    assert results["group_faces"] == 6
    out = capsys.readouterr().out
    assert "serving model: SFace" in out
    assert "curl -s -X POST" in out and "/v1/identify" in out
    assert ">>> client.identify(" in out and ">>> client.verify(" in out  # the demo speaks through cdface.client
    assert "stopped gateway" in out and "stopped Triton Inference Server" in out


# --------------------------------------------------------------------------------------------------
# Stopping the demo from outside (issue 14): no Triton or gateway may outlive it holding the ports.


def _descendants(root: int) -> set[int]:
    """Every live process below ``root`` (children, grandchildren...), from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    """Running, or at least not yet a zombie (an orphan's zombie waits for PID 1 to reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_for(condition, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} after {timeout_s:.0f} s"
        time.sleep(0.2)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_demo_stopped_from_outside_leaves_no_server_holding_the_ports(tmp_path, sig):
    """The demo program as `make demo` runs it (serving until stopped): SIGTERM stops the stack in
    order; even SIGKILL, which the demo cannot catch, leaves nothing behind (its children get SIGTERM
    from the kernel when it dies)."""
    proc = subprocess.Popen([sys.executable, "-m", "cdface.devtools.stack_demo", "--workdir", str(tmp_path / "demo"),
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()

    def read(stream: IO[str]) -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)  # end of output: the demo has exited

    threading.Thread(target=read, args=(proc.stdout,), daemon=True).start()
    output: list[str] = []
    servers: set[int] = set()
    try:
        deadline = time.monotonic() + 300
        while not any(line.startswith("Ctrl-C (or SIGTERM) stops it.") for line in output):
            assert time.monotonic() < deadline, "the demo did not come up: " + "".join(output)[-3000:]
            with contextlib.suppress(queue.Empty):
                line = lines.get(timeout=1)
                assert line is not None, "the demo exited: " + "".join(output)[-3000:]
                output.append(line)
        text = "".join(output)
        triton = re.search(r"cdface triton serve \S+ --http-port (\d+) --grpc-port (\d+) --metrics-port (\d+)", text)
        gateway = re.search(r"The stack is up: gateway http://127\.0\.0\.1:(\d+)", text)
        assert triton and gateway, text
        ports = [int(port) for port in (*triton.groups(), gateway.group(1))]
        servers = _descendants(proc.pid)
        # The Triton command, tritonserver itself (with its Python-backend stub) and the gateway.
        assert len(servers) >= 3, servers
        assert not any(demo.port_free(port) for port in ports), ports

        proc.send_signal(sig)
        proc.wait(timeout=120)
        said = []
        while (line := lines.get(timeout=30)) is not None:
            said.append(line)
        if sig == signal.SIGTERM:
            assert proc.returncode == 128 + signal.SIGTERM, "".join(said)
            assert said[-2:] == ["stopped gateway\n", "stopped Triton Inference Server\n"], said
            assert "SIGTERM: stopping the stack\n" in said
        else:
            assert proc.returncode == -signal.SIGKILL and said == []
        _wait_for(lambda: not any(_alive(pid) for pid in servers),
                  f"processes still running: {[pid for pid in servers if _alive(pid)]}", 90)
        _wait_for(lambda: all(demo.port_free(port) for port in ports), f"ports still taken: {ports}", 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in servers:  # only when the test failed: leave no server of ours running
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
