"""``cdface triton``: a local ``tritonserver`` for development and demos (production runs Triton's own image).

    cdface triton setup                                   # create the server's environment ahead of time
    cdface triton serve REPO [--explicit] [--http-port 8000]

Model repositories are written by ``cdface export triton``.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Optional

import typer

from cdface.core.commandline import command_group
from cdface.core.errors import CdfaceError, exit_on_error

app = command_group(help="A local Triton Inference Server for development and demos.")


@app.command("setup")
def setup_command() -> None:
    """Create the Triton server's own virtual environment now (it is otherwise made on first `serve`)."""
    from cdface.devtools.triton_env import ensure_server_env

    env = ensure_server_env(quiet=False)
    typer.echo(f"Triton server environment ready: {env.root}")
    typer.echo(f"tritonserver: {env.tritonserver}")


@app.command("serve")
def serve_command(
    repo: Path = typer.Argument(..., help="Model repository directory."),
    http_port: Optional[int] = typer.Option(None, help="HTTP port (default: a free one)."),
    grpc_port: Optional[int] = typer.Option(None, help="gRPC port (default: a free one)."),
    metrics_port: Optional[int] = typer.Option(None, help="Prometheus metrics port (default: a free one)."),
    explicit: bool = typer.Option(False, "--explicit", help="Explicit model control: load/unload models at run time."),
    load_model: Optional[list[str]] = typer.Option(None, "--load-model", help="With --explicit: load at start."),
    log: Optional[Path] = typer.Option(None, help="Server log file (default: under the cdface cache)."),
) -> None:
    """Run tritonserver in the foreground until Ctrl-C or SIGTERM."""
    from cdface.devtools.triton_local import TritonServer

    # die_with_parent: if this command is killed outright (SIGKILL), the server does not stay behind.
    server = TritonServer(repo, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                          explicit=explicit, log_path=log, load_models=load_model or (), die_with_parent=True)
    stopping = False

    def request_stop(signum, frame):  # noqa: ARG001 - signal handler signature
        nonlocal stopping
        stopping = True

    previous = signal.signal(signal.SIGTERM, request_stop)
    try:
        server.start()
        typer.echo(f"tritonserver ready; HTTP {server.http_url}, gRPC {server.grpc_url}, metrics {server.metrics_url}")
        typer.echo(f"log: {server.log_path}; Ctrl-C or SIGTERM stops it")
        while not stopping:
            if not server.is_running():
                raise CdfaceError(f"tritonserver exited unexpectedly; log {server.log_path}: {server.log_tail(8)}")
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        typer.echo("stopping tritonserver")
        server.stop()
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # how the demos run this group (cdface.devtools.commands)
    exit_on_error(app, "cdface triton")
