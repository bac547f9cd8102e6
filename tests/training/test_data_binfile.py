"""Verification .bin files: InsightFace's pickle layout, read safely."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
from PIL import Image

from cdface.core.errors import CdfaceError
from cdface.training.data.binfile import decode_bin_images, read_bin, write_bin
from cdface.training.data.synthetic import encode_jpeg


def _png(colour: tuple[int, int, int], size: int = 112) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_written_bin_reads_back_identical(tmp_path):
    images = [_png((i * 40, 0, 0)) for i in range(4)] + [encode_jpeg(np.full((112, 112, 3), 90, np.uint8))] * 2
    issame = [True, False, True]
    write_bin(tmp_path / "val.bin", images, issame)
    read_images, read_issame = read_bin(tmp_path / "val.bin")
    assert read_images == images
    assert read_issame.dtype == bool and read_issame.tolist() == issame
    # The plain-pickle view InsightFace's own loader takes.
    with open(tmp_path / "val.bin", "rb") as f:
        bins, flags = pickle.load(f, encoding="bytes")
    assert bins == images and flags == issame


def test_decode_resizes_and_keeps_rgb(tmp_path):
    write_bin(tmp_path / "v.bin", [_png((250, 10, 10), size=150), _png((10, 250, 10))], [False])
    decoded, issame = decode_bin_images(tmp_path / "v.bin")
    assert decoded.shape == (2, 112, 112, 3) and decoded.dtype == np.uint8
    assert decoded[0, 50, 50].tolist() == [250, 10, 10] and decoded[1, 50, 50].tolist() == [10, 250, 10]
    assert issame.tolist() == [False]


def test_python2_style_and_numpy_bool_flags_are_accepted(tmp_path):
    # Protocol 2 from Python 3 writes bytes through _codecs.encode; flags may be numpy bools.
    payload = pickle.dumps(([_png((1, 2, 3)), _png((4, 5, 6))], [np.bool_(True)]), protocol=2)
    (tmp_path / "old.bin").write_bytes(payload)
    images, issame = read_bin(tmp_path / "old.bin")
    assert len(images) == 2 and issame.tolist() == [True]


def test_corrupt_entry_error_names_the_index(tmp_path):
    images = [_png((0, 0, 0)), _png((1, 1, 1)), _png((2, 2, 2)), b"\xff\xd8 not really a jpeg"]
    write_bin(tmp_path / "bad.bin", images, [True, False])
    with pytest.raises(CdfaceError, match="entry 3 of .*bad.bin"):
        decode_bin_images(tmp_path / "bad.bin")


class _Payload:
    def __reduce__(self):
        return (print, ("pwned",))


class Arbitrary:
    pass


@pytest.mark.parametrize("evil", [_Payload(), Arbitrary()])
def test_unpickler_refuses_arbitrary_globals(tmp_path, evil, capsys):
    (tmp_path / "evil.bin").write_bytes(pickle.dumps(([b"x", b"y"], [evil])))
    with pytest.raises(CdfaceError, match="not a safe verification .bin: global .* is not allowed"):
        read_bin(tmp_path / "evil.bin")
    assert "pwned" not in capsys.readouterr().out


def test_shape_errors(tmp_path):
    (tmp_path / "odd.bin").write_bytes(pickle.dumps(([b"x", b"y", b"z"], [True])))
    with pytest.raises(CdfaceError, match="two per pair"):
        read_bin(tmp_path / "odd.bin")
    (tmp_path / "junk.bin").write_bytes(b"\x80\x04garbage")
    with pytest.raises(CdfaceError, match="not a readable verification .bin"):
        read_bin(tmp_path / "junk.bin")
    with pytest.raises(CdfaceError, match="two images per pair"):
        write_bin(tmp_path / "x.bin", [b"a"], [True])
