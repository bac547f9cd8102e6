"""``cdface data``: make synthetic identities, align real photos, build verification pairs, convert, describe."""

from __future__ import annotations

import time
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from cdface.core.commandline import command_group
from cdface.core.errors import CdfaceError, exit_on_error

app = command_group()


class DataFormat(str, Enum):
    folder = "folder"
    recordio = "recordio"


class CropFormat(str, Enum):
    jpeg = "jpeg"
    png = "png"


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


@app.command("align")
def align_command(
    src: Path = typer.Argument(..., help="raw photos: SRC/<identity>/<photo>.jpg|jpeg|png"),
    dst: Path = typer.Argument(..., help="aligned 112x112 crops go to DST/<identity>/<photo>.jpg|png"),
    all_faces: bool = typer.Option(False, "--all-faces/--largest-face",
                                   help="every face of a photo (<photo>_0, _1, ... largest first) or the largest"),
    crop_format: CropFormat = typer.Option(CropFormat.jpeg, "--format", help="jpeg (quality 95) or png (lossless)"),
    detect_score: float = typer.Option(0.7, "--detect-score", min=0.01, max=0.99,
                                       help="YuNet confidence a face needs (the gateway's default)"),
    min_face_size: float = typer.Option(0.0, "--min-face-size", min=0.0,
                                        help="skip faces whose shorter box side is below this many pixels"),
    detector_model: Optional[Path] = typer.Option(None, "--detector",
                                                  help="YuNet .onnx file (default: fetched like the gateway's)"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="show a progress bar"),
) -> None:
    """Detect and align raw photos with the gateway's detector (YuNet) and alignment; resumable.

    Photos whose crop already exists are skipped. DST/align_report.json counts images, aligned,
    no face and unreadable, and lists the photos without a face and those that could not be read.
    """
    from cdface.core import assets
    from cdface.core.detection import Detector
    from cdface.training.data.align import REPORT_NAME, align_folder

    if not src.is_dir():
        raise CdfaceError(f"source folder {src} does not exist or is not a directory.")
    if detector_model is not None and not detector_model.is_file():
        raise CdfaceError(f"detector model not found: {detector_model}")
    model = detector_model if detector_model is not None else assets.yunet_onnx()
    detector = Detector(model, score=detect_score, instances=1)
    report = align_folder(src, dst, detector, crop_format=crop_format.value, all_faces=all_faces,
                          min_face_size=min_face_size, progress=progress)
    typer.echo(f"{report.summary()}; report: {dst / REPORT_NAME}")


@app.command("pairs")
def pairs_command(
    aligned: Path = typer.Argument(..., help="aligned crops: ALIGNED/<identity>/<crop>.jpg|png"),
    out: Path = typer.Option(..., "--out", help="pairs list to write (path1,path2,label; cdface eval pairs reads it)"),
    pairs: int = typer.Option(6000, "--count", min=2, help="pairs in all, half same identity, half different"),
    seed: int = typer.Option(0, "--seed", help="sampling seed; same seed and folders, same list"),
) -> None:
    """Write a balanced, seeded list of same / different identity pairs of aligned crops."""
    from cdface.training.data.folder import scan_image_folder
    from cdface.training.data.pair_lists import sample_pairs, write_pairs_csv

    pair_list = sample_pairs(scan_image_folder(aligned), pairs, seed)
    write_pairs_csv(out, pair_list)
    typer.echo(f"wrote {len(pair_list)} pairs ({len(pair_list) // 2} same, {len(pair_list) // 2} different) "
               f"to {out}{_fewer(pair_list.requested, len(pair_list))}")


@app.command("bin")
def bin_command(
    aligned: Path = typer.Argument(..., help="aligned crops: ALIGNED/<identity>/<crop>.jpg|png"),
    out: Path = typer.Option(..., "--out", help="verification .bin to write (cdface eval bin reads it)"),
    pairs_file: Optional[Path] = typer.Option(None, "--pairs",
                                              help="use this pairs list (from cdface data pairs) instead of sampling"),
    pairs: int = typer.Option(6000, "--count", min=2, help="pairs to sample when no --pairs list is given"),
    seed: int = typer.Option(0, "--seed", help="sampling seed when no --pairs list is given"),
) -> None:
    """Write an InsightFace verification .bin (LFW-style) of aligned crops: a given pairs list, or sampled."""
    from cdface.training.data.folder import scan_image_folder
    from cdface.training.data.pair_lists import sample_pairs, write_pairs_bin

    if pairs_file is not None:
        from cdface.training.evaluation.pairs import read_pairs_csv

        first, second, issame = read_pairs_csv(pairs_file)
        root = aligned.resolve()
        # The list and the folder must agree: a list made from another folder is a mistake to report.
        outside = next((p for p in first + second if root not in p.resolve().parents), None)
        if outside is not None:
            raise CdfaceError(f"{pairs_file} lists {outside}, which is not inside {aligned}.")
        note = ""
    else:
        pair_list = sample_pairs(scan_image_folder(aligned), pairs, seed)
        first, second, issame = pair_list.first, pair_list.second, pair_list.issame
        note = _fewer(pairs, len(issame))
    write_pairs_bin(out, first, second, issame)
    typer.echo(f"wrote {len(issame)} pairs ({int(issame.sum())} same, {int((~issame).sum())} different) "
               f"to {out}{note}")


def _fewer(requested: int, written: int) -> str:
    if written == requested:
        return ""
    return f" (asked for {requested}; the folders hold only {written // 2} distinct pairs of one kind)"


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
