"""InsightFace RecordIO: round trip, byte-level layout, and the errors a broken pair must give."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from cdface.core.errors import CdfaceError
from cdface.training.data.dataset import RecordIODataset, open_dataset
from cdface.training.data.recordio import (
    RECORD_MAGIC,
    RecordIOReader,
    RecordIOWriter,
    pack_payload,
    read_identity_ranges,
    read_layout,
    write_face_recordio,
)
from cdface.training.data.synthetic import encode_jpeg


def _image(seed: int) -> bytes:
    return encode_jpeg(np.random.default_rng(seed).integers(0, 255, (112, 112, 3), dtype=np.uint8))


def _frame(payload: bytes, cflag: int = 0) -> bytes:
    """One record framed by hand: magic, lrecord, payload, zero padding to 4 bytes."""
    return struct.pack("<II", RECORD_MAGIC, (cflag << 29) | len(payload)) + payload + b"\0" * (-len(payload) % 4)


def _write_pair(directory, records: list[tuple[int, bytes]]) -> None:
    rec, idx, offset = b"", "", 0
    for key, payload in records:
        framed = _frame(payload)
        idx += f"{key}\t{offset}\n"
        rec += framed
        offset += len(framed)
    (directory / "train.rec").write_bytes(rec)
    (directory / "train.idx").write_text(idx)


def test_writer_round_trip_keeps_labels_ids_and_bytes(tmp_path):
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    images = [_image(i) for i in range(len(labels))]
    assert write_face_recordio(tmp_path, zip(labels, images)) == (9, 3)

    reader = RecordIOReader(tmp_path / "train.rec")
    layout = read_layout(reader)
    assert layout.image_keys.tolist() == list(range(1, 10))
    for key, (label, image) in enumerate(zip(labels, images), start=1):
        header, data = reader.read(key)
        assert (header.flag, header.label, header.id) == (0, float(label), key)
        assert data == image
    assert read_identity_ranges(reader, layout).tolist() == [[1, 4], [4, 6], [6, 10]]

    dataset = open_dataset(tmp_path)
    assert dataset.labels.tolist() == labels and dataset.num_classes == 3
    # The header record sits first in the file, so the .idx is sorted by offset too.
    offsets = [int(line.split("\t")[1]) for line in (tmp_path / "train.idx").read_text().splitlines()]
    assert offsets == sorted(offsets) and offsets[0] == 0


def test_hand_built_insightface_layout_is_decoded(tmp_path):
    """Key 0: flag 2 header (identity_start, identity_end); images 1..3; identity records 4..5."""
    img_a, img_b, img_c = _image(1), _image(2), _image(3)
    records = [
        (0, struct.pack("<IfQQ", 2, 0.0, 0, 0) + struct.pack("<2f", 4.0, 6.0)),
        (1, struct.pack("<IfQQ", 0, 0.0, 11, 0) + img_a),
        (2, struct.pack("<IfQQ", 0, 0.0, 12, 0) + img_b),
        # An image record with a label vector (flag 2): the class is the first label.
        (3, struct.pack("<IfQQ", 2, 0.0, 13, 0) + struct.pack("<2f", 1.0, 7.5) + img_c),
        (4, struct.pack("<IfQQ", 2, 0.0, 0, 0) + struct.pack("<2f", 1.0, 3.0)),
        (5, struct.pack("<IfQQ", 2, 0.0, 0, 0) + struct.pack("<2f", 3.0, 4.0)),
    ]
    _write_pair(tmp_path, records)

    reader = RecordIOReader(tmp_path / "train.rec", tmp_path / "train.idx")
    header, image = reader.read(3)
    assert header.flag == 2 and header.label.tolist() == [1.0, 7.5] and header.id == 13 and image == img_c
    layout = read_layout(reader)
    assert layout.image_keys.tolist() == [1, 2, 3]
    assert read_identity_ranges(reader, layout).tolist() == [[1, 3], [3, 4]]

    dataset = RecordIODataset(tmp_path / "train.rec")
    assert dataset.labels.tolist() == [0, 0, 1]
    picture, label, index = dataset[(2, False)]
    assert picture.shape == (112, 112, 3) and label == 1 and index == 2


def test_plain_layout_without_header_record(tmp_path):
    records = [(key, pack_payload(float(key % 2), _image(key))) for key in range(4)]
    _write_pair(tmp_path, records)
    dataset = open_dataset(tmp_path / "train.rec")
    assert dataset.labels.tolist() == [0, 1, 0, 1]  # key 0 is an image here


def test_payload_containing_the_magic_word_is_split_and_rejoined(tmp_path):
    # dmlc splits a payload at every 4-byte-aligned magic word; the reader must put it back.
    magic = struct.pack("<I", RECORD_MAGIC)
    tricky = pack_payload(5.0, b"abcd" + magic + b"efgh" + magic + b"xy")
    with RecordIOWriter(tmp_path / "t.rec") as writer:
        writer.write(7, tricky)
        writer.write(8, pack_payload(6.0, b"plain"))
    raw = (tmp_path / "t.rec").read_bytes()
    assert struct.unpack_from("<I", raw, 4)[0] >> 29 == 1  # first chunk of a split record
    reader = RecordIOReader(tmp_path / "t.rec")
    assert reader.read_payload(7) == tricky
    assert reader.read(8)[1] == b"plain"
    assert reader.read_labels(np.array([7, 8])).tolist() == [5.0, 6.0]


def test_truncated_rec_gives_a_clear_error(tmp_path):
    write_face_recordio(tmp_path, [(0, _image(0)), (0, _image(1)), (1, _image(2))])
    rec = tmp_path / "train.rec"
    # Cut inside the last image record: its frame is there, its bytes are not.
    last_image_offset = int((tmp_path / "train.idx").read_text().splitlines()[3].split("\t")[1])
    rec.write_bytes(rec.read_bytes()[: last_image_offset + 100])
    with pytest.raises(CdfaceError, match="truncated"):
        RecordIOReader(rec).read(3)
    (tmp_path / "train.idx").write_text("".join(f"{k}\t{o}\n" for k, o in [(1, 40), (3, last_image_offset)]))
    with pytest.raises(CdfaceError, match="truncated"):
        open_dataset(tmp_path)


def test_idx_that_does_not_match_the_rec_gives_a_clear_error(tmp_path):
    write_face_recordio(tmp_path, [(0, _image(0)), (1, _image(1))])
    idx = tmp_path / "train.idx"
    lines = idx.read_text().splitlines()

    idx.write_text("\n".join(lines[:1] + ["1\t99999999"] + lines[2:]) + "\n")
    with pytest.raises(CdfaceError, match="does not match .*beyond the end"):
        RecordIOReader(tmp_path / "train.rec")

    # An offset inside the file that does not start a record: bad magic, at that offset.
    idx.write_text("\n".join(lines[:1] + ["1\t44"] + lines[2:]) + "\n")
    with pytest.raises(CdfaceError, match="bad magic 0x[0-9a-f]+ at offset 44"):
        open_dataset(tmp_path)
    with pytest.raises(CdfaceError, match="bad magic .* at offset 44"):
        RecordIOReader(tmp_path / "train.rec").read(1)


def test_missing_files_give_a_clear_error(tmp_path):
    write_face_recordio(tmp_path, [(0, _image(0))])
    (tmp_path / "train.idx").unlink()
    with pytest.raises(CdfaceError, match="train.idx does not exist"):
        open_dataset(tmp_path)


def test_writer_leaves_nothing_behind_on_failure(tmp_path):
    with pytest.raises(CdfaceError, match="grouped by identity"):
        write_face_recordio(tmp_path, [(0, b"a"), (1, b"b"), (0, b"c")])
    assert list(tmp_path.iterdir()) == []


def test_reader_survives_pickling_for_dataloader_workers(tmp_path):
    import pickle

    write_face_recordio(tmp_path, [(0, _image(0)), (1, _image(1))])
    dataset = open_dataset(tmp_path)
    dataset.read_image(0)  # opens the descriptor in this process
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone.reader._fd is None
    assert np.array_equal(clone.read_image(1), dataset.read_image(1))
