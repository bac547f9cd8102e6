"""``cdface train``: one stage of training from a preset, with typed overrides.

    cdface train --preset demo --set run.stage=pretrain --set run.output=runs/demo-pretrain
    torchrun --nproc-per-node 8 -m cdface.cli train --preset paper --set data.path=/data/ms1mv2
"""

from __future__ import annotations

import json
import logging
from typing import Optional

import typer


def train_command(
    preset: str = typer.Option("demo", "--preset", "-p", help="preset name (demo, paper) or a YAML file"),
    overrides: Optional[list[str]] = typer.Option(
        None, "--set", "-s", help="override a value: section.key=value (repeatable); env CDFACE_TRAIN__SECTION__KEY too"
    ),
    print_config: bool = typer.Option(False, "--print-config", help="print the resolved configuration and exit"),
) -> None:
    """Train one stage (pretrain: plain ArcFace; joint: + closeness/diversity with soft mining)."""
    from cdface.training.config import load_config

    cfg = load_config(preset, overrides or [])
    if print_config:
        typer.echo(json.dumps(cfg.model_dump(), indent=2))
        return
    import os

    from cdface.training.trainer import train

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = train(cfg, evaluate=make_evaluator(cfg.data.val))
    if rank == 0:
        typer.echo(f"trained {result.steps} steps; checkpoint {result.checkpoint}; model {result.output / 'model.pt'}")
        for line in summary_lines(result.evaluation):
            typer.echo(line)


def make_evaluator(bin_paths: list[str]):
    if not bin_paths:
        return None

    def evaluate(backbone) -> dict:
        from cdface.training.evaluation import evaluate_checkpoint_model

        return evaluate_checkpoint_model(backbone, bin_paths, model_label="training")

    return evaluate


def summary_lines(report: dict) -> list[str]:
    """One line per benchmark: accuracy (10-fold mean +- std) and the TAR@FAR levels it could measure."""
    by_dataset: dict[str, list[str]] = {}
    for r in report.get("results", []):
        value = r.get("value")
        if not isinstance(value, (int, float)):
            continue  # a FAR below 1/impostors cannot be measured on this set
        text = f"{r['metric']} {value:.4f}" + (f" +- {r['std']:.4f}" if isinstance(r.get("std"), float) else "")
        by_dataset.setdefault(r.get("dataset", "?"), []).append(text)
    return [f"eval {name}: " + ", ".join(parts) for name, parts in by_dataset.items()]


if __name__ == "__main__":  # how the demos run this command (cdface.devtools.commands)
    from cdface.core.errors import exit_on_error

    exit_on_error(lambda: typer.run(train_command), "cdface train")
