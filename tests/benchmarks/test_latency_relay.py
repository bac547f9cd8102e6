"""The benchmarks' delaying relay (``benchmarks.latency_relay``): a real process relaying to a real TCP server."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from cdface.devtools.triton_local import free_port

REPO = Path(__file__).resolve().parents[2]


def _echo_server() -> tuple[socket.socket, int]:
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(1 << 16):
                    conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return server, server.getsockname()[1]


def test_the_relay_delays_each_direction_and_keeps_the_bytes_in_order():
    server, port = _echo_server()
    listen = free_port()
    relay = subprocess.Popen([sys.executable, "-m", "benchmarks.latency_relay", "--listen", f"127.0.0.1:{listen}",
                              "--to", f"127.0.0.1:{port}", "--delay-ms", "40"], cwd=REPO)
    try:
        for _ in range(100):
            try:
                client = socket.create_connection(("127.0.0.1", listen), timeout=5)
                break
            except ConnectionRefusedError:
                time.sleep(0.05)
        else:
            raise AssertionError("the relay did not start listening")
        payload = bytes(range(256)) * 1024  # 256 KiB: several chunks each way
        with client:
            started = time.perf_counter()
            client.sendall(payload)
            received = b""
            while len(received) < len(payload):
                received += client.recv(1 << 16)
            took = time.perf_counter() - started
        assert received == payload
        assert took >= 0.08  # 40 ms there and 40 ms back, at the least
    finally:
        relay.terminate()
        relay.wait(timeout=10)
        server.close()
