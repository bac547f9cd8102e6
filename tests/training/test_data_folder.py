"""Identity-per-folder trees."""

from __future__ import annotations

import numpy as np
import pytest

from cdface.core.errors import CdfaceError
from cdface.training.data.dataset import FolderDataset, open_dataset
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
