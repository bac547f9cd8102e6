"""What a new user meets first on the command line (issue 14): `cdface --version`, and help texts
that say what each option defaults to.

The help test walks the real command tree (every group and command `cdface` registers) and renders
each command's help as `cdface ... --help` does.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from cdface.cli import app
from cdface.serving.settings import Settings, env_name

ROOT_COMMAND = typer.main.get_command(app)


def test_version_prints_the_installed_version():
    done = subprocess.run([sys.executable, "-m", "cdface.cli", "--version"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"cdface {importlib.metadata.version('cdface')}\n"
    import cdface

    assert cdface.__version__ == importlib.metadata.version("cdface")


# Typer brings its own copy of click, so the tree is walked by what its nodes have, not by class.
def every_command() -> list[tuple[tuple[str, ...], Any]]:
    """(path, command) for the root, each group and each command under it, depth first."""
    found = []

    def walk(path: tuple[str, ...], command: Any) -> None:
        found.append((path, command))
        if hasattr(command, "commands"):  # a group
            for name, sub in sorted(command.commands.items()):
                walk((*path, name), sub)

    walk((), ROOT_COMMAND)
    return found


COMMANDS = every_command()


def test_the_walk_reaches_every_stage():
    paths = {" ".join(path) for path, _ in COMMANDS}
    assert {"", "serve", "keys create", "gallery reembed", "triton serve", "export onnx", "data synth", "train",
            "eval bin"} <= paths, sorted(paths)
    assert len(COMMANDS) >= 25


def _help(path: tuple[str, ...]) -> str:
    done = CliRunner().invoke(app, [*path, "--help"], prog_name="cdface", terminal_width=100)
    assert done.exit_code == 0, done.output
    return done.output


def _options(command: Any) -> list[Any]:
    return [p for p in command.params if p.param_type_name == "option" and not p.hidden and p.name != "help"]


def _shows_a_default(option: Any) -> bool:
    """Whether an option has a default worth showing: a value (not None, not an off flag), or a text."""
    if isinstance(option.show_default, str):
        return True
    if option.is_flag and not option.secondary_opts:
        return bool(option.default)
    return option.default is not None and option.default != () and option.default != []


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=[" ".join(p) or "cdface" for p, _ in COMMANDS])
def test_help_shows_every_default_and_loses_no_text(path, command):
    text = _help(path)
    for line in text.splitlines():
        # What was left when Rich took "[default: ...]" for markup: "Bind address ."
        assert not re.search(r"\s\.(\s|$)", line), line
    assert text.isascii(), [c for c in text if not c.isascii()]  # no markup turned into emoji (ipv4:a:port)
    context = command.context_class(command, info_name=path[-1] if path else "cdface")
    for param in _options(command):
        record = param.get_help_record(context)
        assert record is not None
        # Help is wrapped: compare with whitespace squeezed.
        flat = " ".join(text.split())
        if _shows_a_default(param):
            assert "[default: " in record[1], (path, param.opts, record)
            shown = re.search(r"\[default: [^\]]*\]", record[1])
            assert shown and " ".join(shown.group(0).split()) in flat, (path, param.opts)
        assert " ".join(record[1].split()) in flat, (path, param.opts)  # the help text is all there


SERVING_COMMANDS = [(path, command) for path, command in COMMANDS if path[:1] in (("serve",), ("keys",), ("gallery",))]


@pytest.mark.parametrize(("path", "command"), SERVING_COMMANDS, ids=[" ".join(p) for p, _ in SERVING_COMMANDS])
def test_serving_options_show_the_setting_they_override_and_its_default(path, command):
    """An option left out takes CDFACE_SERVE_<NAME> or the setting's default; the help says both."""
    context = command.context_class(command, info_name=path[-1])
    for param in _options(command):
        record = param.get_help_record(context)
        assert record is not None
        variable = re.search(r"Overrides (CDFACE_SERVE_\w+)", record[1])
        if variable is None:
            continue
        field = variable.group(1).removeprefix("CDFACE_SERVE_").lower()
        assert env_name(field) == variable.group(1) and field in Settings.model_fields, record
        default = Settings.model_fields[field].default
        if default is not None and not isinstance(default, bool):
            assert f"[default: ({default})]" in " ".join(record[1].split()), (path, param.opts, record)
    if path == ("serve",):
        shown = " ".join(_help(path).split())
        for expected in ("Bind address. Overrides CDFACE_SERVE_HOST. [default: (127.0.0.1)]",
                         "HTTP port. Overrides CDFACE_SERVE_PORT. [default: (8000)]",
                         "Gallery SQLite file. Overrides CDFACE_SERVE_DB_PATH. [default: (gallery.db)]",
                         "ipv4:a:port,b:port"):
            assert expected in shown, shown
