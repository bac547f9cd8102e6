"""``cdface train``: placeholder until the trainer lands."""

import typer


def train_command(preset: str = typer.Option("demo", help="preset name or YAML path")) -> None:
    """Train a face model."""
    raise typer.Exit(1)
