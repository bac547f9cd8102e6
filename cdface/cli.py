"""The ``cdface`` command line. Each stage contributes one Typer app; heavy imports stay inside commands."""

from __future__ import annotations

import sys

import typer

from cdface.errors import CdfaceError

app = typer.Typer(
    name="cdface",
    help="Train, export, serve and deploy face-recognition models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _register() -> None:
    # Imported here, not at module top, so `cdface --help` stays fast and torch-free.
    from training.cli import data_app, train_command

    app.add_typer(data_app, name="data")
    app.command("train")(train_command)


_register()


def main() -> None:
    try:
        app()
    except CdfaceError as exc:
        print(f"cdface: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("cdface: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
