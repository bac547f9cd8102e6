"""One JSON file per benchmark in ``benchmarks/results/``; the README's figures are generated from them."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from cdface.core.atomic import atomic_write_text

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = None
    try:
        import torch  # optional: benchmarks of torch-free stages must not need it

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return {"cores": os.cpu_count(), "cpu": cpu, "gpu": gpu, "python": platform.python_version()}


def git_commit() -> str:
    sent = os.environ.get("CDFACE_BENCH_COMMIT")
    if sent:  # a copy of the tree run elsewhere (a lent GPU machine) may carry a stale .git, or none
        return sent
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def invocation() -> str:
    """How this benchmark was started, as a user would type it."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    head = f"python -m {spec.name}" if spec is not None else f"python {sys.argv[0]}"
    return " ".join([head, *sys.argv[1:]])


def write_result(
    name: str,
    metric: str,
    value: float,
    baseline: float | None,
    target: str,
    details: dict | None = None,
    results_dir: Path | None = None,
) -> Path:
    """Write ``<name>.json``. ``ratio`` = value / baseline; ``target`` says what passes (e.g. ``<= 1.25``)."""
    ratio = (value / baseline) if baseline else None
    record = {
        "name": name,
        "metric": metric,
        "value": value,
        "baseline": baseline,
        "ratio": ratio,
        "target": target,
        "command": invocation(),
        "machine": machine(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git": git_commit(),
        "details": details or {},
    }
    out_dir = results_dir or RESULTS_DIR
    path = out_dir / f"{name}.json"
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    return path
