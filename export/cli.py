"""Placeholder until this stage's commands land."""

import typer

app = typer.Typer(no_args_is_help=True)
