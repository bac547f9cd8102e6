"""How every cdface command group is made: one place for the settings all of them share.

Help texts are plain text, not Rich markup: with markup on, Rich read ``[default: 127.0.0.1]`` in a
help string as a style tag and dropped it (leaving "Bind address ."), took ``latest[:N]`` apart, and
turned ``ipv4:a:port`` into an emoji. Plain text keeps what the help says, and click's own
``[default: ...]`` is shown for every option that has a default.
"""

from __future__ import annotations

from typing import Any

import typer


def command_group(help: str | None = None, **overrides: Any) -> typer.Typer:
    """A Typer app with cdface's settings: help on no arguments, plain-text help, no shell-completion
    commands, and no pretty tracebacks (``exit_on_error`` turns errors into one line)."""
    settings: dict[str, Any] = {"no_args_is_help": True, "add_completion": False, "pretty_exceptions_enable": False,
                                "rich_markup_mode": None}
    return typer.Typer(help=help, **{**settings, **overrides})
