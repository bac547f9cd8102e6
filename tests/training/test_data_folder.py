"""Identity-per-folder trees."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cdface.core.errors import CdfaceError
from cdface.core.imaging import decode_image as decode_image_bytes
from cdface.training.data.dataset import FolderDataset, open_dataset
from cdface.training.data.folder import _jpeg_components, decode_image
from cdface.training.data.synthetic import encode_jpeg


def _tree(root, counts: dict[str, int]) -> None:
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for j in range(count):
            pixels = np.full((112, 112, 3), 20 * j, np.uint8)
            (root / name / f"{j:02d}.jpg").write_bytes(encode_jpeg(pixels))


def test_labels_follow_sorted_identity_names(tmp_path):
    _tree(tmp_path, {"zoe": 2, "adam": 3, "mia": 1})
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / "adam" / "readme.md").write_text("ignored")
    dataset = open_dataset(tmp_path)
    assert isinstance(dataset, FolderDataset)
    assert dataset.class_names == ["adam", "mia", "zoe"]
    assert dataset.labels.tolist() == [0, 0, 0, 1, 2, 2]
    assert [len(ix) for ix in dataset.identity_index()] == [3, 1, 2]
    image, label, index = dataset[(4, True)]
    assert image.shape == (112, 112, 3) and label == 2 and index == 4


def test_empty_root_and_empty_identity_folder(tmp_path):
    with pytest.raises(CdfaceError, match="no identity sub-folders"):
        open_dataset(tmp_path)
    _tree(tmp_path, {"anna": 1})
    (tmp_path / "bert").mkdir()
    with pytest.raises(CdfaceError, match=r"identity folder .*bert holds no"):
        open_dataset(tmp_path)


def test_corrupt_image_is_reported_when_read(tmp_path):
    _tree(tmp_path, {"anna": 2})
    broken = tmp_path / "anna" / "01.jpg"
    broken.write_bytes(broken.read_bytes()[:200])  # a truncated JPEG
    dataset = open_dataset(tmp_path)  # opening lists files; it does not decode them
    dataset[(0, False)]
    with pytest.raises(CdfaceError, match=f"cannot decode image {broken}"):
        dataset[(1, False)]
    with pytest.raises(CdfaceError, match=f"cannot decode image {broken}"):
        dataset.load_images([0, 1], workers=2)


def _encoded(image: Image.Image, format: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **({"quality": 90} if format == "JPEG" else {}), **options)
    return buffer.getvalue()


def test_the_training_decoder_gives_the_core_decoders_pixels(face_photos):
    """Training decodes 112-pixel JPEGs with OpenCV (the GIL stays free for the training step) and
    everything else with the core decoder serving uses: the two must agree bit for bit, or a model
    would train on other pixels than it is served."""
    photo = Image.open(face_photos["obama"]).convert("RGB")
    crop = photo.crop((0, 0, min(photo.size), min(photo.size))).resize((112, 112))
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8))
    turned = Image.fromarray(np.arange(112 * 112 * 3, dtype=np.uint8).reshape(112, 112, 3))
    exif = turned.getexif()
    exif[0x0112] = 6  # orientation: rotated 90 degrees; both decoders must turn it upright
    cases = {
        "photo 4:2:0": _encoded(crop),
        "photo 4:4:4": _encoded(crop, subsampling=0),
        "noise": _encoded(noise),
        "greyscale": _encoded(crop.convert("L")),
        "cmyk": _encoded(crop.convert("CMYK")),
        "exif orientation": _encoded(turned, exif=exif),
        "larger, resized": _encoded(photo),
        "png": _encoded(crop, "PNG"),
    }
    # The fast path is taken where it should be (else the equality below would hold trivially).
    assert {name for name, data in cases.items() if _jpeg_components(data) in (1, 3) and data.endswith(b"\xff\xd9")} == {
        "photo 4:2:0", "photo 4:4:4", "noise", "greyscale", "exif orientation", "larger, resized"}
    for name, data in cases.items():
        expected = decode_image_bytes(data, size=112)
        got = decode_image(data, name)
        assert got.shape == (112, 112, 3) and got.dtype == np.uint8, name
        assert np.array_equal(got, expected), f"{name}: differs by up to {np.abs(got.astype(int) - expected).max()}"


def test_a_jpeg_cut_short_is_an_error_or_the_core_decoders_pixels_never_made_up_ones():
    rng = np.random.default_rng(1)
    whole = _encoded(Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)))
    with pytest.raises(CdfaceError, match="cannot decode image record 7"):
        decode_image(whole[: len(whole) // 2], "record 7")
    cut = whole[:-2]  # every scan present, the end marker gone
    try:
        expected = decode_image_bytes(cut, size=112)
    except Exception:
        with pytest.raises(CdfaceError):
            decode_image(cut, "record 7")
    else:
        assert np.array_equal(decode_image(cut, "record 7"), expected)
