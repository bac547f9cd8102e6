"""InsightFace RecordIO (``train.rec`` + ``train.idx``) without mxnet.

The format is dmlc RecordIO as written by ``mx.recordio.MXIndexedRecordIO``:

* every record on disk is ``uint32 magic (0xced7230a)``, ``uint32 lrecord`` (upper 3 bits:
  continuation flag, lower 29 bits: length), the bytes, and zero padding to a multiple of 4;
* dmlc splits a payload wherever the magic word sits at a 4-byte aligned position inside it:
  the parts are stored as chunks with continuation flag 1 (first), 2 (middle), 3 (last), and the
  magic word is re-inserted between them on reading. Flag 0 is an unsplit record;
* the payload is an ``IRHeader`` (``<IfQQ``: flag, label, id, id2), then ``flag`` float32
  labels when flag > 0, then the encoded image;
* ``train.idx`` holds text lines ``key\\toffset`` (offset of the record's magic word).

InsightFace datasets (MS1MV2, MS1MV3, Glint360K) add a header record at key 0 with flag 2 and
label ``(identity_start, identity_end)``: images are keys ``1 .. identity_start - 1`` and keys
``identity_start .. identity_end - 1`` are one record per identity whose label is that
identity's image key range ``(first, last + 1)``. A "plain" file has no such header: every
key in the index is an image.
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from cdface.core.atomic import atomic_write_text
from cdface.core.errors import CdfaceError

RECORD_MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", RECORD_MAGIC)
_FRAME = struct.Struct("<II")  # magic, lrecord
IR_HEADER = struct.Struct("<IfQQ")  # flag, label, id, id2
_LENGTH_MASK = (1 << 29) - 1
# Keys and ranges are stored as float32 labels; past 2**24 they stop being exact integers.
MAX_EXACT_FLOAT_KEY = 1 << 24


@dataclass(frozen=True)
class IRHeader:
    """The per-record header. ``label`` is a float, or a float32 array when ``flag`` > 0."""

    flag: int
    label: float | np.ndarray
    id: int = 0
    id2: int = 0


def pack_payload(label: float | Iterable[float], image: bytes, id: int = 0, id2: int = 0) -> bytes:
    """IRHeader + optional label vector + image bytes, exactly as ``mx.recordio.pack`` builds it."""
    if isinstance(label, (int, float, np.integer, np.floating)):
        return IR_HEADER.pack(0, float(label), id, id2) + image
    labels = np.asarray(list(label), dtype="<f4")
    return IR_HEADER.pack(len(labels), 0.0, id, id2) + labels.tobytes() + image


def unpack_payload(payload: bytes, where: str = "record") -> tuple[IRHeader, bytes]:
    """Inverse of :func:`pack_payload`: (header, image bytes)."""
    if len(payload) < IR_HEADER.size:
        raise CdfaceError(f"{where} is {len(payload)} bytes, shorter than the {IR_HEADER.size}-byte IRHeader.")
    flag, label, id_, id2 = IR_HEADER.unpack_from(payload)
    body_start = IR_HEADER.size
    if flag > 0:
        body_start += 4 * flag
        if len(payload) < body_start:
            raise CdfaceError(f"{where} declares {flag} labels but its payload is only {len(payload)} bytes.")
        label = np.frombuffer(payload, dtype="<f4", count=flag, offset=IR_HEADER.size).copy()
    return IRHeader(flag, label, id_, id2), payload[body_start:]


def _frame_chunks(payload: bytes) -> bytes:
    """Split ``payload`` at aligned magic words (dmlc's escaping) and frame each chunk."""
    chunks: list[tuple[int, bytes]] = []
    start = 0
    aligned_end = len(payload) & ~3
    search_from = 0
    while True:
        hit = payload.find(_MAGIC_BYTES, search_from, aligned_end)
        if hit < 0:
            break
        if hit % 4:
            search_from = hit + 1
            continue
        chunks.append((1 if start == 0 else 2, payload[start:hit]))
        start = search_from = hit + 4
    chunks.append((3 if start else 0, payload[start:]))

    out = bytearray()
    for cflag, chunk in chunks:
        if len(chunk) > _LENGTH_MASK:
            raise CdfaceError(f"a RecordIO record cannot hold {len(chunk)} bytes (the limit is {_LENGTH_MASK}).")
        out += _FRAME.pack(RECORD_MAGIC, (cflag << 29) | len(chunk))
        out += chunk
        out += b"\0" * (-len(chunk) % 4)
    return bytes(out)


def _parse_idx(idx_path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        text = idx_path.read_bytes()
    except OSError as exc:
        raise CdfaceError(f"cannot read RecordIO index {idx_path}: {exc.strerror or exc}.") from exc
    try:
        fields = np.array(text.split(), dtype=np.int64)
    except ValueError as exc:
        raise CdfaceError(f"RecordIO index {idx_path} is not 'key<TAB>offset' lines of integers.") from exc
    if fields.size % 2:
        raise CdfaceError(f"RecordIO index {idx_path} has a line without an offset.")
    pairs = fields.reshape(-1, 2)
    return pairs[:, 0].copy(), pairs[:, 1].copy()


class RecordIOReader:
    """Random access to an indexed RecordIO pair.

    Reads with ``os.pread`` (no shared file position, so threads may read concurrently) on a
    file descriptor opened lazily per process: a reader pickled into DataLoader workers, or
    inherited through fork, opens its own descriptor on first use.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None):
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else self.rec_path.with_suffix(".idx")
        for path in (self.rec_path, self.idx_path):
            if not path.is_file():
                raise CdfaceError(f"RecordIO file {path} does not exist.")
        self.file_size = self.rec_path.stat().st_size
        keys, offsets = _parse_idx(self.idx_path)
        if len(keys) == 0:
            raise CdfaceError(f"RecordIO index {self.idx_path} is empty.")
        beyond = np.flatnonzero((offsets < 0) | (offsets + _FRAME.size > self.file_size))
        if len(beyond):
            k = int(beyond[0])
            raise CdfaceError(
                f"RecordIO index {self.idx_path} does not match {self.rec_path}: key {keys[k]} points to offset "
                f"{offsets[k]}, beyond the end of the {self.file_size}-byte file."
            )
        self.keys = keys
        # Sorted numpy arrays rather than a dict: millions of keys stay compact, and forked
        # DataLoader workers share them instead of copying pages touched by refcounting.
        order = np.argsort(keys, kind="stable")
        self._sorted_keys, self._sorted_offsets = keys[order], offsets[order]
        if len(keys) > 1 and (np.diff(self._sorted_keys) == 0).any():
            raise CdfaceError(f"RecordIO index {self.idx_path} lists a key more than once.")
        self._fd: int | None = None
        self._fd_pid = -1

    # -- file handle management ---------------------------------------------------------------
    def _file(self) -> int:
        if self._fd is None or self._fd_pid != os.getpid():
            self._fd = os.open(self.rec_path, os.O_RDONLY)
            self._fd_pid = os.getpid()
        return self._fd

    def close(self) -> None:
        if self._fd is not None and self._fd_pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fd"], state["_fd_pid"] = None, -1
        return state

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def _positions(self, keys: np.ndarray) -> np.ndarray:
        """Positions of ``keys`` in the sorted index; raises for a key the index lacks."""
        positions = np.searchsorted(self._sorted_keys, keys)
        found = positions < len(self._sorted_keys)
        found[found] = self._sorted_keys[positions[found]] == keys[found]
        if not found.all():
            missing = int(keys[np.flatnonzero(~found)[0]])
            raise CdfaceError(f"key {missing} is not in RecordIO index {self.idx_path}.")
        return positions

    def __contains__(self, key: int) -> bool:
        position = int(np.searchsorted(self._sorted_keys, key))
        return position < len(self._sorted_keys) and int(self._sorted_keys[position]) == int(key)

    # -- reading -----------------------------------------------------------------------------
    def offset(self, key: int) -> int:
        return int(self._sorted_offsets[self._positions(np.array([int(key)], dtype=np.int64))[0]])

    def _read_chunk(self, offset: int, key: int) -> tuple[int, bytes, int]:
        """(continuation flag, bytes, offset of the next chunk) for the chunk at ``offset``."""
        fd = self._file()
        frame = os.pread(fd, _FRAME.size, offset)
        if len(frame) < _FRAME.size:
            raise CdfaceError(f"RecordIO file {self.rec_path} is truncated: record {key} ends past the end of "
                              "the file.")
        magic, lrecord = _FRAME.unpack(frame)
        if magic != RECORD_MAGIC:
            raise CdfaceError(
                f"bad magic 0x{magic:08x} at offset {offset} of {self.rec_path} (record {key}): the file is "
                f"corrupt or {self.idx_path.name} does not match it."
            )
        length = lrecord & _LENGTH_MASK
        data = os.pread(fd, length, offset + _FRAME.size)
        if len(data) < length:
            raise CdfaceError(
                f"RecordIO file {self.rec_path} is truncated: record {key} at offset {offset} needs {length} bytes, "
                f"only {len(data)} remain."
            )
        return lrecord >> 29, data, offset + _FRAME.size + length + (-length % 4)

    def read_payload(self, key: int) -> bytes:
        """The record's payload (IRHeader + labels + image), re-joined if dmlc split it."""
        cflag, data, next_offset = self._read_chunk(self.offset(key), key)
        if cflag == 0:
            return data
        if cflag != 1:
            raise CdfaceError(f"record {key} of {self.rec_path} starts with continuation flag {cflag}, not 0 or 1.")
        parts = [data]
        while cflag != 3:
            cflag, data, next_offset = self._read_chunk(next_offset, key)
            if cflag not in (2, 3):
                raise CdfaceError(f"record {key} of {self.rec_path} has a broken chunk sequence (flag {cflag}).")
            parts.append(data)
        return _MAGIC_BYTES.join(parts)

    def read(self, key: int) -> tuple[IRHeader, bytes]:
        """(header, encoded image bytes) of one record."""
        return unpack_payload(self.read_payload(key), where=f"record {key} of {self.rec_path}")

    def read_header(self, key: int) -> IRHeader:
        return self.read(key)[0]

    def read_labels(self, keys: np.ndarray, chunk: int = 1 << 20) -> np.ndarray:
        """float32 first label of each record, read from the headers only (no image bytes).

        Vectorised over a memory map; it also checks every record's magic word and length, so a
        mismatched ``.idx`` or a truncated ``.rec`` is found when a dataset opens.
        """
        keys = np.asarray(keys, dtype=np.int64)
        offsets = self._sorted_offsets[self._positions(keys)]
        labels = np.empty(len(keys), dtype=np.float32)
        if len(keys) == 0:
            return labels
        data = np.memmap(self.rec_path, dtype=np.uint8, mode="r")
        # frame (8) + IRHeader (24) + first extra label (4): the largest prefix we may look at.
        prefix = np.arange(_FRAME.size + IR_HEADER.size + 4, dtype=np.int64)
        try:
            for start in range(0, len(keys), chunk):
                off = offsets[start : start + chunk]
                window = np.minimum(off[:, None] + prefix, self.file_size - 1)
                raw = np.ascontiguousarray(data[window])
                magic = raw[:, 0:4].view("<u4")[:, 0]
                lrecord = raw[:, 4:8].view("<u4")[:, 0]
                flag = raw[:, 8:12].view("<u4")[:, 0]
                header_label = raw[:, 12:16].view("<f4")[:, 0]
                first_extra = raw[:, 32:36].view("<f4")[:, 0]
                length = (lrecord & _LENGTH_MASK).astype(np.int64)
                self._check_frames(keys[start : start + chunk], off, magic, length)
                chunk_labels = np.where(flag > 0, first_extra, header_label)
                # Records dmlc split, or too short to hold a header, take the slow exact path.
                odd = np.flatnonzero(((lrecord >> 29) != 0) | (length < IR_HEADER.size + 4 * (flag > 0)))
                for i in odd.tolist():
                    header = self.read_header(int(keys[start + i]))
                    chunk_labels[i] = np.atleast_1d(header.label)[0]  # a float, or the first of several
                labels[start : start + chunk] = chunk_labels
        finally:
            del data
        return labels

    def _check_frames(self, keys: np.ndarray, offsets: np.ndarray, magic: np.ndarray, length: np.ndarray) -> None:
        bad = np.flatnonzero(magic != RECORD_MAGIC)
        if len(bad):
            i = int(bad[0])
            raise CdfaceError(
                f"bad magic 0x{int(magic[i]):08x} at offset {int(offsets[i])} of {self.rec_path} "
                f"(record {int(keys[i])}): "
                f"the file is corrupt or {self.idx_path.name} does not match it."
            )
        short = np.flatnonzero(offsets + _FRAME.size + length > self.file_size)
        if len(short):
            i = int(short[0])
            raise CdfaceError(
                f"RecordIO file {self.rec_path} is truncated: record {int(keys[i])} at offset {int(offsets[i])} needs "
                f"{int(length[i])} bytes past the end of the file."
            )


@dataclass(frozen=True)
class RecordIOLayout:
    """Which keys hold images, and where the InsightFace identity records are when the file has them."""

    image_keys: np.ndarray  # int64, ascending
    identity_keys: range | None  # keys of the per-identity records (InsightFace layout only)


def read_layout(reader: RecordIOReader) -> RecordIOLayout:
    """Detect the InsightFace header record (key 0, flag 2), else treat every key as an image."""
    if 0 in reader:
        header = reader.read_header(0)
        if header.flag == 2:
            identity_start, identity_end = (int(round(float(v))) for v in np.atleast_1d(header.label)[:2])
            if not 1 <= identity_start <= identity_end:
                raise CdfaceError(
                    f"the header record of {reader.rec_path} holds an invalid key range "
                    f"({identity_start}, {identity_end})."
                )
            image_keys = np.arange(1, identity_start, dtype=np.int64)
            for key in (image_keys[:1].tolist() + image_keys[-1:].tolist()):
                if key not in reader:
                    raise CdfaceError(
                        f"RecordIO index {reader.idx_path} lacks image key {key}, which the header record of "
                        f"{reader.rec_path} announces."
                    )
            return RecordIOLayout(image_keys, range(identity_start, identity_end))
    return RecordIOLayout(np.sort(reader.keys), None)


def read_identity_ranges(reader: RecordIOReader, layout: RecordIOLayout) -> np.ndarray:
    """int64 [C, 2]: (first image key, last + 1) per identity, from the InsightFace identity records."""
    if layout.identity_keys is None:
        raise CdfaceError(f"{reader.rec_path} has no InsightFace header record, so no identity records.")
    ranges = [np.atleast_1d(reader.read_header(key).label)[:2] for key in layout.identity_keys]
    return np.round(np.array(ranges, dtype=np.float64)).astype(np.int64).reshape(-1, 2)


def _current_umask() -> int:
    try:  # Linux reports it without the set-and-restore race of os.umask
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


class RecordIOWriter:
    """Writes an indexed RecordIO pair atomically: both files appear (renamed) only on ``close()``.

    ``write(key, payload)`` writes one record; keys must be unique. Readers see the old pair or
    the new one.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None):
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else self.rec_path.with_suffix(".idx")
        self.rec_path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._rec_tmp = tempfile.mkstemp(prefix=f".{self.rec_path.name}.", suffix=".tmp", dir=self.rec_path.parent)
        # mkstemp makes the file 0600; a dataset is read by other users and by training jobs.
        os.fchmod(fd, 0o666 & ~_current_umask())
        self._rec = os.fdopen(fd, "wb")
        self._offsets: dict[int, int] = {}
        self._reserved: dict[int, int] = {}
        self._closed = False

    def reserve(self, key: int, size: int) -> None:
        """Keep ``size`` bytes at the current position for ``key``, written later by ``write_at``.

        Lets the header record (key 0) sit first in the file although its content is known last.
        """
        self._add_key(key, self._rec.tell())
        self._reserved[key] = size
        self._rec.write(b"\0" * size)

    def write_at(self, key: int, payload: bytes) -> None:
        framed = _frame_chunks(payload)
        offset = self._offsets[key]
        if len(framed) != self._reserved[key]:
            # A sequential reader would stumble over a gap or an overlap.
            raise CdfaceError(f"record {key} takes {len(framed)} bytes but {self._reserved[key]} were reserved for it.")
        position = self._rec.tell()
        self._rec.seek(offset)
        self._rec.write(framed)
        self._rec.seek(position)

    def write(self, key: int, payload: bytes) -> None:
        self._add_key(key, self._rec.tell())
        self._rec.write(_frame_chunks(payload))

    def _add_key(self, key: int, offset: int) -> None:
        if key in self._offsets:
            raise CdfaceError(f"RecordIO key {key} was written twice.")
        self._offsets[key] = offset

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._rec.flush()
            os.fsync(self._rec.fileno())
            self._rec.close()
            index = "".join(f"{key}\t{offset}\n" for key, offset in sorted(self._offsets.items()))
            # .rec first, then .idx: an .idx always describes a complete .rec.
            os.replace(self._rec_tmp, self.rec_path)
            atomic_write_text(self.idx_path, index)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        self._closed = True
        with contextlib.suppress(Exception):
            self._rec.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._rec_tmp)

    def __enter__(self) -> "RecordIOWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


_HEADER_RECORD_SIZE = _FRAME.size + IR_HEADER.size + 8  # flag 2: two float32 labels, no image


def write_face_recordio(out_dir: str | os.PathLike, samples: Iterable[tuple[int, bytes]]) -> tuple[int, int]:
    """Write ``out_dir/train.rec`` + ``train.idx`` in the standard InsightFace layout.

    ``samples`` yields (label, encoded image) with each identity's samples contiguous and labels
    0..C-1 in order of first appearance (as MS1MV2 has them). Images get keys 1..N with the label
    as a float; identity records follow; the header record (key 0) is reserved at the start of the
    file and filled in last. Returns (number of images, number of identities).
    """
    out_dir = Path(out_dir)
    ranges: list[tuple[int, int]] = []
    key = 0
    with RecordIOWriter(out_dir / "train.rec", out_dir / "train.idx") as writer:
        writer.reserve(0, _HEADER_RECORD_SIZE)
        for label, image in samples:
            key += 1
            if label == len(ranges):
                ranges.append((key, key + 1))
            elif label == len(ranges) - 1:
                ranges[-1] = (ranges[-1][0], key + 1)
            else:
                raise CdfaceError(
                    f"samples must come grouped by identity with labels 0, 1, 2, ... in order; got label {label} "
                    f"after label {len(ranges) - 1}."
                )
            writer.write(key, pack_payload(float(label), image, id=key))
        identity_start = key + 1
        identity_end = identity_start + len(ranges)
        if identity_end > MAX_EXACT_FLOAT_KEY:
            raise CdfaceError(
                f"{key} images and {len(ranges)} identities exceed the {MAX_EXACT_FLOAT_KEY} keys a float32 "
                "header label "
                "can address exactly."
            )
        for offset, (first, end) in enumerate(ranges):
            key_of_identity = identity_start + offset
            writer.write(key_of_identity, pack_payload([float(first), float(end)], b"", id=key_of_identity))
        writer.write_at(0, pack_payload([float(identity_start), float(identity_end)], b""))
    return key, len(ranges)


def iter_records(reader: RecordIOReader) -> Iterator[tuple[int, IRHeader, bytes]]:
    """Every (key, header, image bytes) in key order."""
    for key in np.sort(reader.keys).tolist():
        header, image = reader.read(key)
        yield key, header, image
