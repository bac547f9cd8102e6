"""``cdface triton``: write Triton model repositories and run a local ``tritonserver``.

    cdface triton setup                                   # create the server's environment ahead of time
    cdface triton add-version REPO EXPORT_DIR --model face --backend python
    cdface triton serve REPO [--explicit] [--http-port 8000]

Heavy imports (onnx, tritonclient's protobufs) stay inside the commands so ``cdface --help`` is fast.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Optional

import typer

from cdface.errors import CdfaceError

app = typer.Typer(no_args_is_help=True, help="Triton model repositories and a local Triton Inference Server.")


def _int_list(text: Optional[str], what: str) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CdfaceError(f"{what} must be comma-separated integers, got {text!r}.") from None


@app.command("add-version")
def add_version_command(
    repo: Path = typer.Argument(..., help="Model repository directory (created if missing)."),
    export_dir: Path = typer.Argument(..., help="Exported model: model.onnx (or model.plan) + manifest.json."),
    model: str = typer.Option(..., "--model", "-m", help="Model name in the repository."),
    backend: str = typer.Option("python", help="python (CPU, ONNX Runtime in Triton's Python backend), "
                                               "onnxruntime_onnx or tensorrt_plan (GPU nodes)."),
    version: Optional[int] = typer.Option(None, help="Version number; default: the next one."),
    max_batch_size: Optional[int] = typer.Option(None, help="Largest batch Triton forms or accepts (default 32)."),
    preferred: Optional[str] = typer.Option(None, help="Preferred batch sizes for the dynamic batcher, e.g. 8,16,32."),
    queue_delay_us: Optional[int] = typer.Option(None, help="How long the batcher may hold a request (default 2000)."),
    instances: Optional[int] = typer.Option(None, help="Model instances (per GPU for GPU backends; default 1)."),
    version_policy: Optional[str] = typer.Option(None, help="latest[:N], all or specific:V1,V2 (default latest:1)."),
    ort_threads: Optional[int] = typer.Option(None, help="python backend: ONNX Runtime threads per instance."),
    gpus: Optional[str] = typer.Option(None, help="GPU backends: device ids for the instances, e.g. 0,1."),
    device: Optional[str] = typer.Option(None, help="onnxruntime_onnx: gpu (default) or cpu instances, e.g. for a "
                                                    "cluster trial without GPUs."),
    dynamic_batching: Optional[bool] = typer.Option(None, "--dynamic-batching/--no-dynamic-batching",
                                                    help="Merge concurrent requests into batches (default on)."),
) -> None:
    """Add an exported model to a Triton model repository as a new version (older versions stay)."""
    from export.triton_repo import BACKENDS, add_model_version

    if backend not in BACKENDS:
        raise CdfaceError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
    added = add_model_version(
        repo, model, export_dir, backend=backend, version=version, max_batch_size=max_batch_size,
        preferred=_int_list(preferred, "--preferred"), queue_delay_us=queue_delay_us, instances=instances,
        version_policy=version_policy, ort_threads=ort_threads, gpus=_int_list(gpus, "--gpus"),
        dynamic_batching=dynamic_batching, device=device,
    )
    typer.echo(f"added {added.model_name} version {added.version} ({added.settings.backend}) at {added.path}; "
               f"serving policy {added.settings.version_policy}")


@app.command("setup")
def setup_command() -> None:
    """Create the Triton server's own virtual environment now (it is otherwise made on first `serve`)."""
    from export.triton_server import ensure_server_env

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
    from export.triton_server import TritonServer

    server = TritonServer(repo, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                          explicit=explicit, log_path=log, load_models=load_model or ())
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
