"""``cdface data align / pairs / bin`` on real photos and on synthetic identities, through the installed CLI.

The raw tree is built from the real photos (face-recognition 1.3.0, insightface 2.1): obama has three
photos plus a mirrored and a downscaled copy (other images of the same face, so there are enough
same-identity pairs for a 10-fold .bin), biden one photo plus a mirrored copy; a solid-colour PNG has
no face and a truncated JPEG cannot be decoded. The crops are checked against the gateway's own
detection + alignment (``cdface.core.detection``) and against a real recogniser (SFace), and the
.bin is evaluated by ``cdface eval bin``.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cdface.core.errors import CdfaceError
from cdface.core.imaging import read_image
from cdface.training.data.binfile import decode_bin_images, read_bin
from cdface.training.data.folder import scan_image_folder
from cdface.training.data.pair_lists import _triangle, sample_pairs
from cdface.training.evaluation.pairs import read_pairs_csv

cv2 = pytest.importorskip("cv2")

CDFACE = Path(sys.executable).parent / "cdface"
SFACE_THRESHOLD = 0.363  # OpenCV Zoo's cosine threshold for SFace


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(CDFACE), *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def raw_tree(face_photos, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw")
    for identity in ("obama", "biden", "nobody"):
        (root / identity).mkdir()
    for name in ("obama", "obama2", "obama3", "biden"):
        shutil.copy(face_photos[name], root / ("biden" if name == "biden" else "obama") / f"{name}.jpg")
    Image.open(face_photos["obama2"]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(root / "obama" / "mirror.jpg")
    small = Image.open(face_photos["obama3"])
    small.resize((small.width // 2, small.height // 2)).save(root / "obama" / "small.png")
    Image.open(face_photos["biden"]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(root / "biden" / "mirror.jpg")
    Image.new("RGB", (240, 180), (70, 130, 190)).save(root / "nobody" / "wall.png")
    (root / "nobody" / "truncated.jpg").write_bytes(face_photos["biden"].read_bytes()[:3000])
    return root


@pytest.fixture(scope="module")
def aligned_tree(raw_tree, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    dst = tmp_path_factory.mktemp("aligned") / "crops"
    return dst, _run("data", "align", str(raw_tree), str(dst), "--format", "png")


@pytest.fixture(scope="module")
def sface_model(sface_onnx, tmp_path_factory) -> Path:
    from cdface.core import assets
    from cdface.export.wrap import wrap_onnx

    out = tmp_path_factory.mktemp("sface")
    return wrap_onnx(sface_onnx, out, name="sface", version=1, input_layout="NCHW", channel_order="RGB",
                     mean=0.0, std=1.0, licence=assets.SFACE_LICENCE).onnx_path


def test_align_reports_counts_and_the_photos_without_a_usable_face(aligned_tree):
    dst, result = aligned_tree
    assert result.returncode == 0, result.stderr
    assert "9 images: 7 aligned" in result.stdout and "1 without a face, 1 unreadable" in result.stdout
    report = json.loads((dst / "align_report.json").read_text())
    assert report["counts"] == {"images": 9, "aligned": 7, "already_aligned": 0, "crops_written": 7,
                                "no_face": 1, "unreadable": 1}
    assert report["no_face"] == ["nobody/wall.png"]
    assert [(u["path"], u["code"]) for u in report["unreadable"]] == [("nobody/truncated.jpg", "corrupt_image")]
    written = sorted(str(p.relative_to(dst)) for p in dst.rglob("*.png"))
    assert written == ["biden/biden.png", "biden/mirror.png", "obama/mirror.png", "obama/obama.png",
                       "obama/obama2.png", "obama/obama3.png", "obama/small.png"]
    assert not (dst / "nobody").exists() or not any((dst / "nobody").iterdir())


def test_crops_are_the_gateways_crops_and_a_recogniser_knows_the_people(aligned_tree, raw_tree, yunet_onnx,
                                                                       sface_model):
    import onnxruntime as ort

    from cdface.core.detection import Detector, extract_faces

    dst, result = aligned_tree
    assert result.returncode == 0, result.stderr
    detector = Detector(yunet_onnx, instances=1)
    crops = {}
    for crop_path in sorted(dst.rglob("*.png")):
        relative = crop_path.relative_to(dst)
        source = next((raw_tree / relative.parent).glob(relative.stem + ".*"))
        served = extract_faces(read_image(source), "detect", detector=detector)[0].crop
        crops[str(relative.with_suffix(""))] = got = read_image(crop_path)
        assert got.shape == (112, 112, 3)
        np.testing.assert_array_equal(got, served)  # PNG is lossless: the very pixels the gateway embeds
    session = ort.InferenceSession(str(sface_model), providers=["CPUExecutionProvider"])
    names = sorted(crops)
    embeddings = session.run(["embedding"], {"images": np.stack([crops[n] for n in names])})[0]
    similarity = embeddings @ embeddings.T
    for (i, a), (j, b) in itertools.combinations(enumerate(names), 2):
        same = a.split("/")[0] == b.split("/")[0]
        assert (similarity[i, j] > SFACE_THRESHOLD) == same, f"{a} vs {b}: cosine {similarity[i, j]:.3f}"


def test_align_resumes_and_keeps_all_faces_when_asked(aligned_tree, raw_tree, face_photos, tmp_path):
    dst, first = aligned_tree
    assert first.returncode == 0, first.stderr
    work = tmp_path / "crops"
    shutil.copytree(dst, work)
    (work / "obama" / "obama2.png").unlink()
    again = _run("data", "align", str(raw_tree), str(work), "--format", "png", "--no-progress")
    assert again.returncode == 0, again.stderr
    counts = json.loads((work / "align_report.json").read_text())["counts"]
    assert counts == {"images": 9, "aligned": 7, "already_aligned": 6, "crops_written": 1, "no_face": 1,
                      "unreadable": 1}
    np.testing.assert_array_equal(read_image(work / "obama" / "obama2.png"), read_image(dst / "obama" / "obama2.png"))

    group = tmp_path / "group"
    (group / "t1").mkdir(parents=True)
    shutil.copy(face_photos["t1"], group / "t1" / "t1.jpg")
    everyone = _run("data", "align", str(group), str(tmp_path / "group_crops"), "--all-faces", "--no-progress")
    assert everyone.returncode == 0, everyone.stderr
    faces = sorted(p.name for p in (tmp_path / "group_crops" / "t1").iterdir())
    assert faces == [f"t1_{i}.jpg" for i in range(6)]  # the six people of the group photo
    sizes = {Image.open(tmp_path / "group_crops" / "t1" / name).size for name in faces}
    assert sizes == {(112, 112)}


def test_pairs_and_bin_from_real_crops_evaluate(aligned_tree, sface_model, tmp_path):
    dst, result = aligned_tree
    assert result.returncode == 0, result.stderr
    pairs_file = tmp_path / "lists" / "pairs.txt"
    made = _run("data", "pairs", str(dst), "--out", str(pairs_file), "--count", "20", "--seed", "7")
    assert made.returncode == 0, made.stderr
    assert "wrote 20 pairs (10 same, 10 different)" in made.stdout
    first, second, issame = read_pairs_csv(pairs_file)  # the reader of `cdface eval pairs`
    assert issame.tolist() == [True, False] * 10
    assert all(a.is_file() and b.is_file() for a, b in zip(first, second))
    assert [a.parent.name == b.parent.name for a, b in zip(first, second)] == issame.tolist()
    assert len({frozenset((a, b)) for a, b in zip(first, second)}) == 20

    bin_path = tmp_path / "real.bin"
    packed = _run("data", "bin", str(dst), "--out", str(bin_path), "--pairs", str(pairs_file))
    assert packed.returncode == 0, packed.stderr
    images, flags = read_bin(bin_path)
    assert flags.tolist() == issame.tolist()
    assert images[0] == first[0].read_bytes() and images[3] == second[1].read_bytes()  # bytes unchanged

    evaluated = _run("eval", "bin", str(sface_model), str(bin_path), "--no-flip", "--out", str(tmp_path / "r.json"))
    assert evaluated.returncode == 0, evaluated.stderr
    rows = json.loads((tmp_path / "r.json").read_text())["results"]
    accuracy = next(r["value"] for r in rows if r["dataset"] == "real" and r["metric"] == "accuracy")
    # A real recogniser on correctly aligned crops of two people; misaligned crops fall towards chance.
    assert accuracy >= 0.9, evaluated.stdout


def test_pairs_and_bin_on_synthetic_identities(tmp_path):
    from cdface.training.data.synthetic import SyntheticSpec, write_folder

    root = write_folder(tmp_path / "synth", SyntheticSpec(identities=6, per_identity=4, seed=3))
    pairs_file = root / "pairs.txt"  # inside the tree: relative paths stay short
    made = _run("data", "pairs", str(root), "--out", str(pairs_file), "--count", "40", "--seed", "1")
    assert made.returncode == 0, made.stderr
    first, second, issame = read_pairs_csv(pairs_file)
    assert len(issame) == 40 and issame.sum() == 20
    assert [a.parent.name == b.parent.name for a, b in zip(first, second)] == issame.tolist()

    sampled = tmp_path / "sampled.bin"
    packed = _run("data", "bin", str(root), "--out", str(sampled), "--count", "40", "--seed", "1")
    assert packed.returncode == 0, packed.stderr
    decoded, flags = decode_bin_images(sampled)
    assert decoded.shape == (80, 112, 112, 3) and flags.tolist() == issame.tolist()
    # Sampling inside `data bin` is the same draw as `data pairs` with the same seed.
    np.testing.assert_array_equal(decoded[1], read_image(second[0]))
    info = _run("data", "info", str(sampled))
    assert "40 pairs (20 same, 20 different), 80 images" in info.stdout


def test_sampling_is_uniform_distinct_seeded_and_capped(tmp_path):
    from cdface.training.data.synthetic import SyntheticSpec, write_folder

    folder = scan_image_folder(write_folder(tmp_path / "s", SyntheticSpec(identities=3, per_identity=3, seed=0)))
    everything = sample_pairs(folder, 40, seed=0)  # 9 same pairs exist (3 per identity), 27 different
    assert len(everything) == 18 and everything.requested == 40
    same = {frozenset(p) for p, s in zip(zip(everything.first, everything.second), everything.issame) if s}
    expected_same = {frozenset(p) for paths in (folder.paths[i * 3:i * 3 + 3] for i in range(3))
                     for p in itertools.combinations(paths, 2)}
    assert same == expected_same
    a, b = sample_pairs(folder, 8, seed=5), sample_pairs(folder, 8, seed=5)
    assert a.first == b.first and a.second == b.second
    assert sample_pairs(folder, 8, seed=6).first != a.first or sample_pairs(folder, 8, seed=6).second != a.second

    # The pair index -> (a, b) decoding is exact far beyond float precision.
    t = np.array([0, 1, 2, 3, 10**15, 10**15 + 12345, 2**53 + 7], dtype=np.int64)
    low, high = _triangle(t)
    assert ((high * (high - 1) // 2 + low) == t).all() and (low < high).all() and (low >= 0).all()


def test_bad_input_is_one_line_and_exit_code_2(raw_tree, tmp_path):
    missing = _run("data", "align", str(tmp_path / "nope"), str(tmp_path / "out"))
    odd = _run("data", "pairs", str(raw_tree), "--out", str(tmp_path / "p.txt"), "--count", "5")
    raw_bin = _run("data", "bin", str(raw_tree), "--out", str(tmp_path / "raw.bin"), "--count", "10")
    foreign = tmp_path / "foreign.txt"
    foreign.write_text(f"path1,path2,label\n{raw_tree / 'obama/obama.jpg'},{raw_tree / 'biden/biden.jpg'},0\n")
    elsewhere = _run("data", "bin", str(tmp_path), "--out", str(tmp_path / "raw.bin"), "--pairs", str(foreign))
    for result, words in ((missing, "does not exist"), (odd, "must be even"), (raw_bin, "run cdface data align"),
                          (elsewhere, "which is not inside")):
        assert result.returncode == 2, result.stdout
        assert result.stderr.strip().count("\n") == 0 and words in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "raw.bin").exists()
    one = tmp_path / "one" / "only"
    one.mkdir(parents=True)
    Image.new("RGB", (112, 112)).save(one / "a.png")
    with pytest.raises(CdfaceError, match="at least two"):
        sample_pairs(scan_image_folder(tmp_path / "one"), 4)
