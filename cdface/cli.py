"""The ``cdface`` command line: the root above the stages. Each stage contributes one Typer app.

Heavy imports (torch, onnx, faiss) stay inside the commands, so ``cdface --help`` is fast.
"""

from __future__ import annotations

import typer

import cdface
from cdface.core.commandline import command_group
from cdface.core.errors import exit_on_error

app = command_group(name="cdface", help="Train, export, serve and deploy face-recognition models.")


def _print_version(requested: bool) -> None:
    if requested:
        typer.echo(f"cdface {cdface.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                 help="Print the installed cdface version and exit."),
) -> None:
    """Train, export, serve and deploy face-recognition models."""


def _register() -> None:
    # Imported here, not at module top, so `cdface --help` stays fast and torch-free.
    from cdface.devtools.triton_cli import app as triton_app
    from cdface.export.cli import app as export_app
    from cdface.pipeline.model_cli import model_app
    from cdface.pipeline.retrain import retrain_command
    from cdface.serving.audit_cli import audit_app
    from cdface.serving.cli import gallery_app, keys_app, serve_command
    from cdface.training.cli import train_command
    from cdface.training.data.cli import app as data_app
    from cdface.training.evaluation.cli import app as eval_app

    app.add_typer(data_app, name="data", help="Make and convert training data (synthetic identities, RecordIO).")
    app.command("train")(train_command)
    app.add_typer(eval_app, name="eval", help="Evaluate a checkpoint or an exported ONNX model.")
    app.add_typer(export_app, name="export", help="Export models: ONNX, TensorRT, Triton model repository.")
    app.command("retrain")(retrain_command)
    app.add_typer(model_app, name="model", help="The served model: candidate, promote, rollback (live upgrades).")
    app.add_typer(triton_app, name="triton", help="A local Triton Inference Server (development, demos).")
    app.command("serve")(serve_command)
    app.add_typer(keys_app, name="keys", help="API keys: create, list, revoke.")
    app.add_typer(gallery_app, name="gallery", help="The identity gallery: status, re-embedding after a model change.")
    app.add_typer(audit_app, name="audit", help="The audit log: export as JSON lines, prune past its retention.")


_register()


def main() -> None:
    exit_on_error(app)


if __name__ == "__main__":
    main()
