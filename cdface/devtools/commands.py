"""How the demos run cdface commands: as child processes, each printed as the ``cdface ...`` line to type.

A command group runs from the stage module that defines it (``python -m cdface.export.cli onnx ...``
is ``cdface export onnx ...``). Those modules are imported here, so the import contracts see which
stages the demos drive; the CLI root above them is not needed (and may not be imported from here).
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time

from cdface.core.errors import CdfaceError
from cdface.devtools import triton_cli
from cdface.export import cli as export_cli
from cdface.serving import cli as serving_cli
from cdface.training import cli as training_cli
from cdface.training.data import cli as data_cli
from cdface.training.evaluation import cli as eval_cli

# `cdface <group> ...` -> (the module that runs it, whether the module takes the group's name too)
_GROUPS = {
    "data": (data_cli, False), "train": (training_cli, False), "eval": (eval_cli, False),
    "export": (export_cli, False), "triton": (triton_cli, False),
    "serve": (serving_cli, True), "keys": (serving_cli, True), "gallery": (serving_cli, True),
}


class Command(list):
    """A child-process command line that remembers the ``cdface ...`` form a user would type."""

    def __init__(self, argv: list[str], shown: str) -> None:
        super().__init__(argv)
        self.shown = shown


def cdface(*args: str) -> Command:
    """``cdface(*args)``: the process that runs ``cdface args...``."""
    try:
        module, keeps_group = _GROUPS[args[0]]
    except (IndexError, KeyError):
        raise CdfaceError(f"no cdface command group {args[:1]}") from None
    argv = [sys.executable, "-m", module.__name__, *(args if keeps_group else args[1:])]
    return Command(argv, " ".join(shlex.quote(a) for a in ("cdface", *args)))


def run(title: str, command: Command, *, capture: bool = False) -> str:
    """Print the step and its command, run it, fail with the command's last error line; return its stdout."""
    print(f"\n== {title}\n$ {command.shown}", flush=True)
    start = time.monotonic()
    done = subprocess.run(command, capture_output=capture, text=True)
    if done.returncode != 0:
        last = (done.stderr or "").strip().splitlines()[-1:] if capture else []
        raise CdfaceError(f"demo step failed: {command.shown}" + (f": {last[0]}" if last else ""))
    if not capture:
        print(f"   ({time.monotonic() - start:.0f} s)", flush=True)
    return done.stdout or ""
