"""``cdface data``: make synthetic identities, convert folders to RecordIO, describe a dataset."""

from __future__ import annotations

import time
from enum import Enum
from pathlib import Path

import typer

from cdface.core.errors import CdfaceError, exit_on_error

app = typer.Typer(no_args_is_help=True)


class DataFormat(str, Enum):
    folder = "folder"
    recordio = "recordio"


@app.command("synth")
def synth_command(
    out: Path = typer.Option(..., "--out", help="output directory (training set, val.bin, synthetic.json)"),
    identities: int = typer.Option(1000, "--identities", min=1, help="training identities"),
    per_identity: int = typer.Option(20, "--per-identity", min=1, help="images per training identity"),
    hard_share: float = typer.Option(0.1, "--hard-share", min=0.0, max=1.0, help="share of hard samples"),
    data_format: DataFormat = typer.Option(DataFormat.recordio, "--format", help="folder or recordio"),
    seed: int = typer.Option(0, "--seed", help="generator seed; same seed, same images"),
    val_identities: int = typer.Option(200, "--val-identities", min=2, help="held-out identities for val.bin"),
    val_pairs: int = typer.Option(1000, "--val-pairs", min=1, help="verification pairs in val.bin (half same)"),
    difficulty: float = typer.Option(1.0, "--difficulty", min=0.0,
                                     help="scales the normal nuisance (pose, light, blur)"),
) -> None:
    """Write a synthetic face-identity training set plus a held-out verification set (DIR/val.bin)."""
    from cdface.training.data.synthetic import SyntheticSpec, write_folder, write_recordio, write_verification_bin

    spec = SyntheticSpec(identities, per_identity, hard_share, seed, difficulty)
    started = time.perf_counter()
    if data_format is DataFormat.folder:
        write_folder(out, spec)
    else:
        write_recordio(out, spec)
    write_verification_bin(out / "val.bin", seed, val_identities, val_pairs, hard_share, difficulty)
    elapsed = time.perf_counter() - started
    typer.echo(
        f"wrote {identities * per_identity} images of {identities} identities ({data_format.value}) and "
        f"{val_pairs} verification pairs to {out} in {elapsed:.1f} s"
    )


@app.command("to-recordio")
def to_recordio_command(
    src_folder: Path = typer.Argument(..., help="root/<identity>/<image>.jpg|png"),
    out_dir: Path = typer.Argument(..., help="directory for train.rec and train.idx"),
) -> None:
    """Convert an identity-per-folder tree to InsightFace RecordIO (image bytes copied unchanged)."""
    from cdface.core.imaging import ImageError
    from cdface.core.imaging import image_format as read_format
    from cdface.training.data.folder import scan_image_folder
    from cdface.training.data.recordio import write_face_recordio

    folder = scan_image_folder(src_folder)

    def samples():
        for index, label in enumerate(folder.labels.tolist()):
            data = folder.read_bytes(index)
            # Check the header only: a non-image must fail here, not in the middle of training.
            try:
                image_format = read_format(data, what=f"image {folder.paths[index]}")
            except ImageError as exc:
                raise CdfaceError(f"cannot decode image {folder.paths[index]}: {exc}.") from exc
            if image_format not in ("JPEG", "PNG"):
                raise CdfaceError(f"image {folder.paths[index]} is {image_format}; RecordIO here holds JPEG or PNG.")
            yield label, data

    images, classes = write_face_recordio(out_dir, samples())
    typer.echo(f"wrote {images} images of {classes} identities to {out_dir / 'train.rec'}")


@app.command("info")
def info_command(
    path: Path = typer.Argument(..., help="RecordIO dir or .rec, image folder, or verification .bin"),
) -> None:
    """Describe a dataset: samples, identities, images per identity (or pairs for a .bin)."""
    if path.suffix == ".bin":
        from cdface.training.data.binfile import read_bin

        images, issame = read_bin(path)
        typer.echo(f"{path}: verification set, {len(issame)} pairs ({int(issame.sum())} same, "
                   f"{int((~issame).sum())} different), {len(images)} images")
        return
    import numpy as np

    from cdface.training.data.dataset import RecordIODataset, open_dataset

    dataset = open_dataset(path)
    counts = dataset.class_counts()
    present = counts[counts > 0]
    kind = "RecordIO" if isinstance(dataset, RecordIODataset) else "image folder"
    typer.echo(f"{path}: {kind}")
    typer.echo(f"samples:    {len(dataset)}")
    # Labels without samples happen in RecordIO files built from filtered lists; say so.
    gaps = f" (labels 0..{dataset.num_classes - 1})" if len(present) != dataset.num_classes else ""
    typer.echo(f"identities: {len(present)}{gaps}")
    typer.echo(
        f"per identity: min {int(present.min())}, median {float(np.median(present)):g}, max {int(present.max())}"
    )


if __name__ == "__main__":  # how the demos run this group (cdface.devtools.commands)
    exit_on_error(app, "cdface data")
