"""``cdface eval``: evaluate a ``.pt`` checkpoint or an exported ``.onnx`` model.

    cdface eval bin MODEL lfw.bin cfp_fp.bin agedb_30.bin [--no-flip] [--out report.json] [--plots DIR]
    cdface eval pairs MODEL pairs.csv
    cdface eval ijb MODEL --images DIR --meta ijbc_face_tid_mid.txt --pairs ijbc_template_pair_label.txt
    cdface eval rank MODEL ROOT
    cdface eval gradients OUT.png      (the method's similarity-gradient figure)

Heavy imports (torch, onnxruntime, matplotlib) happen inside the commands so ``cdface --help`` stays fast.
Errors are raised as ``CdfaceError``; the root CLI prints them as one line and exits 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from cdface.core.commandline import command_group
from cdface.core.errors import CdfaceError, exit_on_error

app = command_group(help="Evaluate a checkpoint (.pt) or an exported ONNX model (.onnx).")

_MODEL_HELP = "a .pt training checkpoint or an exported .onnx model"
_FLIP = typer.Option(True, "--flip/--no-flip", help="add the mirrored image's embedding (standard protocol)")
_OUT = typer.Option(None, "--out", help="write the JSON report here (atomically)")
_PLOTS = typer.Option(None, "--plots", help="write PNG figures (histograms, ROC) into this folder")
_DEVICE = typer.Option("cpu", "--device", help="cpu or cuda")
_BATCH = typer.Option(64, "--batch-size", min=1, help="images per forward pass")


def _open(model: Path, device: str, batch_size: int):
    from cdface.training.evaluation.embedders import open_embedder

    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise CdfaceError(f"--device must be cpu or cuda, got {device!r}")
    return open_embedder(model, device=device, batch_size=batch_size)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _print_evaluation(evaluation: dict[str, Any]) -> None:
    parts = []
    if "accuracy" in evaluation:
        parts.append(f"accuracy {_percent(evaluation['accuracy'])} +- {_percent(evaluation['accuracy_std'])}")
    for key in sorted(k for k in evaluation if k.startswith("rank")):
        parts.append(f"{key} {_percent(evaluation[key])}")
    for far, point in evaluation.get("tar_at_far", {}).items():
        parts.append(f"TAR@FAR={far} {_percent(point['tar'] if point else None)}")
    typer.echo(f"{evaluation['dataset']}: " + "  ".join(parts))


def _finish(model: Path, evaluations: list[dict[str, Any]], out: Optional[Path], plots: Optional[Path]) -> None:
    from cdface.training.evaluation.report import build_report, write_report

    for evaluation in evaluations:
        _print_evaluation(evaluation)
    if plots is not None:
        from cdface.training.evaluation.run import write_plots

        for path in write_plots([e for e in evaluations if "scores" in e], plots, model.name):
            typer.echo(f"plot: {path}")
    if out is not None:
        write_report(out, build_report(str(model), evaluations))
        typer.echo(f"report: {out}")


@app.command("bin")
def bin_command(
    model: Path = typer.Argument(..., metavar="MODEL", help=_MODEL_HELP),
    bins: list[Path] = typer.Argument(..., metavar="BIN", help="verification .bin files (LFW, CFP-FP, AgeDB-30, ...)"),
    flip: bool = _FLIP,
    out: Optional[Path] = _OUT,
    plots: Optional[Path] = _PLOTS,
    device: str = _DEVICE,
    batch_size: int = _BATCH,
) -> None:
    """10-fold verification accuracy and TAR@FAR on .bin benchmarks."""
    from cdface.training.evaluation.run import evaluate_bins

    for path in bins:  # fail before loading the model, not after evaluating the first file
        if not path.is_file():
            raise CdfaceError(f"verification file not found: {path}")
    embedder = _open(model, device, batch_size)
    _finish(model, evaluate_bins(embedder, bins, flip=flip, batch_size=batch_size, progress=True), out, plots)


@app.command("pairs")
def pairs_command(
    model: Path = typer.Argument(..., metavar="MODEL", help=_MODEL_HELP),
    csv_path: Path = typer.Argument(..., metavar="CSV", help="path1,path2,label rows over aligned 112x112 crops"),
    flip: bool = _FLIP,
    out: Optional[Path] = _OUT,
    plots: Optional[Path] = _PLOTS,
    device: str = _DEVICE,
    batch_size: int = _BATCH,
) -> None:
    """Accuracy and TAR@FAR on your own labelled pairs."""
    from cdface.training.evaluation.pairs import evaluate_pairs, read_pairs_csv

    read_pairs_csv(csv_path)  # validate the file before loading the model
    embedder = _open(model, device, batch_size)
    evaluation = evaluate_pairs(embedder, csv_path, flip=flip, batch_size=batch_size, progress=True)
    _finish(model, [evaluation], out, plots)


@app.command("ijb")
def ijb_command(
    model: Path = typer.Argument(..., metavar="MODEL", help=_MODEL_HELP),
    images: Path = typer.Option(..., "--images", help="folder of aligned 112x112 crops named as in --meta"),
    meta: Path = typer.Option(..., "--meta", help="*_face_tid_mid.txt: image_name template_id media_id"),
    pairs: Path = typer.Option(..., "--pairs", help="*_template_pair_label.txt: t1 t2 label"),
    flip: bool = _FLIP,
    out: Optional[Path] = _OUT,
    plots: Optional[Path] = _PLOTS,
    device: str = _DEVICE,
    batch_size: int = _BATCH,
) -> None:
    """IJB-B/C style 1:1 template verification: TAR@FAR 1e-6..1e-1."""
    from cdface.training.evaluation.ijb import evaluate_ijb

    for path, what in ((meta, "meta"), (pairs, "pairs")):
        if not path.is_file():
            raise CdfaceError(f"--{what} file not found: {path}")
    if not images.is_dir():
        raise CdfaceError(f"--images folder not found: {images}")
    embedder = _open(model, device, batch_size)
    evaluation = evaluate_ijb(embedder, images, meta, pairs, flip=flip, batch_size=batch_size, progress=True)
    _finish(model, [evaluation], out, plots)


@app.command("rank")
def rank_command(
    model: Path = typer.Argument(..., metavar="MODEL", help=_MODEL_HELP),
    root: Path = typer.Argument(..., metavar="ROOT", help="root/<identity>/*.jpg, aligned 112x112 crops"),
    flip: bool = _FLIP,
    out: Optional[Path] = _OUT,
    device: str = _DEVICE,
    batch_size: int = _BATCH,
) -> None:
    """1:N rank-1 / rank-5 identification (first image of each identity enrolled, the rest probed)."""
    from cdface.training.evaluation.rank import evaluate_rank, read_identity_folders

    read_identity_folders(root)
    embedder = _open(model, device, batch_size)
    evaluation = evaluate_rank(embedder, root, flip=flip, batch_size=batch_size, progress=True)
    _finish(model, [evaluation], out, None)


@app.command("gradients")
def gradients_command(
    out: Path = typer.Argument(Path("similarity_gradients.png"), metavar="OUT.png", help="where to write the PNG"),
) -> None:
    """Plot ||dS/dx|| against the angle for d1, d2, d3 and the truncated d3 of the diversity loss."""
    from cdface.training.evaluation.plots import plot_similarity_gradients

    typer.echo(f"plot: {plot_similarity_gradients(out)}")


if __name__ == "__main__":  # how the demos run this group (cdface.devtools.commands)
    exit_on_error(app, "cdface eval")
