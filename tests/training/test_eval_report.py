"""The JSON report: rows per metric, unavailable FARs as null, thresholds from the largest impostor set,
readable by the export stage's manifest reader; plus pairs-CSV and rank evaluation on tiny folders."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cdface.core.errors import CdfaceError
from cdface.training.backbones import create_backbone
from cdface.training.evaluation.embedders import TorchEmbedder
from cdface.training.evaluation.pairs import evaluate_pairs, read_pairs_csv
from cdface.training.evaluation.rank import evaluate_rank, true_match_ranks
from cdface.training.evaluation.report import build_report, read_report, write_report
from cdface.training.evaluation.roc import scores_by_label, tar_at_far, tar_at_far_summary
from cdface.training.evaluation.verification import verification_accuracy


def _evaluation(name: str, pairs: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    issame = np.arange(pairs) % 2 == 0
    scores = np.where(issame, rng.normal(0.6, 0.15, pairs), rng.normal(0.0, 0.15, pairs))
    result = verification_accuracy(scores, issame)
    genuine, impostor = scores_by_label(scores, issame)
    return {"dataset": name, "pairs": pairs, "flip": True, **result.summary(),
            "tar_at_far": tar_at_far_summary(tar_at_far(genuine, impostor)), "scores": scores, "issame": issame}


def test_report_rows_thresholds_and_atomic_json(tmp_path):
    small, large = _evaluation("small", 200, 0), _evaluation("large", 6000, 1)
    report = build_report("model.pt", [small, large])
    path = tmp_path / "report.json"
    write_report(path, report)
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temporary file left behind
    loaded = read_report(path)
    assert loaded == json.loads(json.dumps(report))

    rows = {(r["dataset"], r["metric"]): r for r in loaded["results"]}
    assert rows[("small", "accuracy")]["value"] == pytest.approx(small["accuracy"])
    assert "scores" not in rows[("small", "accuracy")]
    # 100 impostors in "small": FAR 1e-3 cannot be measured there -> null, with a reason.
    assert rows[("small", "tar@far=1e-3")]["value"] is None and "unavailable" in rows[("small", "tar@far=1e-3")]
    assert rows[("large", "tar@far=1e-3")]["value"] == large["tar_at_far"]["1e-3"]["tar"]
    # Thresholds come from the set with the most impostors, only at the FARs it can measure.
    assert loaded["thresholds_source"] == "large"
    assert set(loaded["thresholds"]) == {"1e-3", "1e-2", "1e-1"}
    assert loaded["thresholds"]["1e-3"] == large["tar_at_far"]["1e-3"]["threshold"]

    manifest = pytest.importorskip("cdface.core.manifest")
    assert manifest.read_eval_report(path).threshold_at(1e-3) == loaded["thresholds"]["1e-3"]


@pytest.fixture(scope="module")
def embedder():
    torch.manual_seed(0)
    return TorchEmbedder(create_backbone("ir18", width=0.125))


def _save(path, rng):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, size=(112, 112, 3), dtype=np.uint8)).save(path)


def test_pairs_csv(tmp_path, embedder):
    rng = np.random.default_rng(0)
    for i in range(6):
        _save(tmp_path / "img" / f"{i}.png", rng)
    rows = ["path1,path2,label"] + [f"img/{i}.png,img/{i}.png,1" for i in range(6)]
    rows += [f"img/{i}.png,img/{(i + 1) % 6}.png,0" for i in range(6)]
    (tmp_path / "mine.csv").write_text("\n".join(rows) + "\n")
    first, second, labels = read_pairs_csv(tmp_path / "mine.csv")
    assert len(first) == 12 and labels.sum() == 6 and first[0] == tmp_path / "img" / "0.png"

    report = evaluate_pairs(embedder, tmp_path / "mine.csv", batch_size=4)
    assert report["images"] == 6 and report["pairs"] == 12
    np.testing.assert_allclose(report["scores"][:6], 1.0, atol=1e-5)  # an image against itself
    assert report["accuracy"] == 1.0  # identical images vs different random images: separable

    (tmp_path / "bad.csv").write_text("img/0.png,img/1.png,maybe\nimg/0.png,img/1.png,2\n")
    with pytest.raises(CdfaceError, match="bad.csv:2"):
        read_pairs_csv(tmp_path / "bad.csv")


def test_rank_on_identity_folders(tmp_path, embedder):
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, size=(3, 112, 112, 3), dtype=np.uint8)
    for identity in range(3):
        folder = tmp_path / f"id{identity}"
        folder.mkdir()
        for k in range(3):
            # Probes are slight perturbations of the identity's gallery image: rank-1 must be perfect.
            noisy = np.clip(base[identity].astype(int) + rng.integers(-3, 4, size=base[identity].shape), 0, 255)
            Image.fromarray(noisy.astype(np.uint8)).save(folder / f"{k}.png")
    _save(tmp_path / "loner" / "0.png", rng)  # one image only: a gallery distractor
    report = evaluate_rank(embedder, tmp_path, batch_size=8)
    assert report["identities"] == 4 and report["probes"] == 6
    assert report["rank1"] == 1.0 and report["rank5"] == 1.0


def test_rank_ties_count_against_the_probe():
    similarities = np.array([[0.5, 0.5, 0.1], [0.9, 0.2, 0.3], [0.0, 0.0, 0.0]])
    assert list(true_match_ranks(similarities, np.array([0, 0, 2]))) == [2, 1, 3]
