"""The study harness at smoke size: it trains every arm and the sweep, and writes a report that says something.

The numbers of a smoke study are meaningless; what is tested is that every row is there, that each value is a
number or says plainly that it is unavailable, that the verdict is written, and that a second invocation
reuses the finished runs.
"""

from __future__ import annotations

import json
import re

import pytest

from benchmarks import study

pytestmark = pytest.mark.slow

NUMBER_OR_UNAVAILABLE = re.compile(r"^(-?\d+\.\d+( ± \d+\.\d+ \[\d+\.\d+–\d+\.\d+\])?|unavailable)$")


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def table(markdown: str, header_start: str) -> tuple[list[str], list[list[str]]]:
    """(header, body rows) of the first table whose header line starts with ``header_start``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(cells(line))
    return cells(lines[start]), rows


def table_rows(markdown: str, header_start: str) -> list[list[str]]:
    return table(markdown, header_start)[1]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    paths = {"doc": root / "study.md", "figures": root / "figures", "results": root / "results"}
    argv = ["--size", "smoke", "--workdir", str(root / "work"), "--doc", str(paths["doc"]),
            "--figures", str(paths["figures"]), "--results-dir", str(paths["results"])]
    study.main(argv)
    return root, paths, argv


def test_report_has_one_row_per_arm_and_sweep_point(smoke):
    _, paths, _ = smoke
    markdown = paths["doc"].read_text()
    assert "Do not edit by hand" in markdown
    assert "python -m benchmarks.study --size smoke" in markdown

    header, arms = table(markdown, "| arm |")
    assert {"accuracy", "TAR@FAR=1e-3", "TAR@FAR=1e-4"} <= set(header)
    assert [row[0] for row in arms] == ["pretrain only (start of every arm)", *(arm.label for arm in study.ARMS)]
    for row in arms:
        assert len(row) == len(header)
        for cell in row[2:]:
            assert NUMBER_OR_UNAVAILABLE.match(cell), row
    # The smoke held-out set has a few hundred impostor pairs: FAR 1e-3 cannot be measured and must say so,
    # while 1e-2 can.
    assert arms[1][header.index("TAR@FAR=1e-3")] == "unavailable"
    assert arms[1][header.index("TAR@FAR=1e-2")] != "unavailable"

    header, sweep = table(markdown, "| varies |")
    points = [row for row in sweep if row[0] in ("lambda1", "lambda2")]
    assert [row[1] for row in points] == [f"{l1:g} / {l2:g}" for l1, l2 in study.SWEEP]
    metric_columns = [i for i, name in enumerate(header) if name == "accuracy" or name.startswith("TAR@")]
    for row in points:
        for i in metric_columns:
            assert NUMBER_OR_UNAVAILABLE.match(row[i]), row


def test_report_states_a_verdict_and_shows_the_losses_were_computed(smoke):
    _, paths, _ = smoke
    markdown = paths["doc"].read_text()
    verdict = re.search(r"\*\*In short: (.+)\*\*", markdown)
    assert verdict and ("helps" in verdict.group(1) or "hurts" in verdict.group(1)
                        or "not distinguishable" in verdict.group(1))
    losses = table_rows(markdown, "| run | lambdas |")
    assert len(losses) == sum(arm.refined for arm in study.ARMS)  # one seed
    for row in losses:
        assert int(row[2]) > 0 and "→" in row[3] and "→" in row[4], row


def test_report_has_paired_differences_curves_and_gradient_terms(smoke):
    _, paths, _ = smoke
    markdown = paths["doc"].read_text()
    paired = table_rows(markdown, "| comparison |")
    assert [row[0] for row in paired] == [arm.label for arm in study.ARMS if arm.key != study.REFERENCE]
    header, epochs = table(markdown, "| epoch |")
    assert header[1:] == [arm.label for arm in study.ARMS if arm.curve] and len(header) >= 3  # both arms
    assert epochs[0][0] == "0" and len(epochs) >= 2  # the pretrain start, then the end of the (short) run
    assert all(" / " in cell for row in epochs for cell in row[1:])
    gradients = table_rows(markdown, "| arm | log windows with probes |")
    assert len(gradients) == sum(arm.refined for arm in study.ARMS)
    for row in gradients:
        assert int(row[1]) > 0 and row[5] in ("ArcFace", "closeness", "diversity"), row
        assert float(row[2]) > 0  # ArcFace's own gradient, on every arm
    baseline = next(row for row in gradients if row[0].startswith(study.ARMS[0].label))
    assert float(baseline[3]) == 0.0 and float(baseline[4]) == 0.0  # zero weights: nothing weighed
    assert "| Gradient clipping | off |" in markdown and "| Diversity scale s |" in markdown
    floor = table_rows(markdown, "| arm | TAR@FAR=1e-2, no hard image |")
    assert [row[0] for row in floor] == [arm.label for arm in study.ARMS]
    assert all(row[-2].endswith("%") or row[-2] == "unavailable" for row in floor)
    assert all(NUMBER_OR_UNAVAILABLE.match(row[-1]) for row in floor)  # the hard genuine pairs' TAR
    faithful, dose = markdown.split("## Dose-response")
    for text, changes in ((faithful, study.VARIANTS), (dose, study.doses(study.SIZES["smoke"]))):
        rows = table_rows(text, "| change |")
        assert [row[0] for row in rows[1:]] == [label for _, label, _ in changes]
        for row in rows[1:]:
            assert NUMBER_OR_UNAVAILABLE.match(row[1]), row
            assert all(re.match(r"^[+-]\d+\.\d+$|^unavailable$", cell) for cell in row[-2:]), row


def test_doses_bracket_the_sizes_own_settings():
    size = study.SIZES["cpu2h"]
    overrides = {key: extra[0] for key, _, extra in study.doses(size)}
    assert overrides == {"np10": "head.num_hard_negatives=10", "np150": "head.num_hard_negatives=150",
                         "k1": "method.identities=1", "k4": "method.identities=4",
                         "interval2": "method.interval=2", "interval10": "method.interval=10",
                         "lambda2_0.25": "method.lambda_diversity=0.25", "lambda2_0.5": "method.lambda_diversity=0.5"}


def test_result_json_and_figures(smoke):
    _, paths, _ = smoke
    record = json.loads((paths["results"] / "study_ablation_smoke.json").read_text())
    assert "TAR@FAR=1e-3" in record["metric"] and "paired 95% CI excluding 0" in record["target"]
    details = record["details"]
    # The smoke held-out set cannot measure TAR@FAR=1e-3: the headline says so instead of inventing a number.
    assert record["value"] is None and details["headline_comparison"]["verdict"] == "unavailable"
    assert len(details["sweep"]) == len(study.SWEEP)
    assert len(details["per_seed"]) == study.SIZES["smoke"].seeds
    assert set(details["curves"]) == {arm.key for arm in study.ARMS if arm.curve} == {"baseline", "method"}
    for arm in details["arms"]:
        for s in [arm["accuracy"], *arm["tar"].values()]:
            assert s["mean"] is None or isinstance(s["mean"], float)
    assert details["pairs"]["measurable_fars"] and "1e-3" not in details["pairs"]["measurable_fars"]
    for figure in details["figures"].values():
        size = (paths["figures"] / figure.rsplit("/", 1)[-1]).stat().st_size
        assert 0 < size < 200_000


def test_second_invocation_reuses_the_finished_runs(smoke):
    root, paths, argv = smoke
    models = sorted((root / "work" / "runs").rglob("model.pt"))
    sweep_only = set(study.SWEEP) - {arm.lambdas for arm in study.ARMS if arm.refined}
    # pretrain, every arm, the other sweep points, each faithful setting undone, each dose
    doses = study.doses(study.SIZES["smoke"])
    assert len(models) == 1 + len(study.ARMS) + len(sweep_only) + len(study.VARIANTS) + len(doses)
    before = {p: p.stat().st_mtime_ns for p in models}
    study.main(argv)
    assert {p: p.stat().st_mtime_ns for p in models} == before


def test_smoke_never_writes_the_committed_result():
    paths = study.default_paths(study.SIZES["smoke"])
    assert paths["results"] != study.RESULTS_DIR and paths["doc"].parent != study.REPO / "docs"
    assert study.result_name(study.SIZES["cpu2h"]) == "study_ablation"
    assert study.result_name(study.SIZES["smoke"]) != "study_ablation"


def test_cpu2h_size_answers_the_issue():
    size = study.SIZES["cpu2h"]
    assert size.refined_steps >= 150 and size.identities >= 300 and size.seeds >= 3
    assert study.SIZES["gpu"].amp == "bf16" and study.SIZES["gpu"].device == "cuda"


def test_verdict_rules():
    # Seeds that disagree in sign are not a result, however large the mean gap.
    assert study.compare([0.80, 0.84, 0.82], [0.81, 0.83, 0.84], "acc")["verdict"] == "not distinguishable"
    assert study.compare([0.80, 0.80, 0.80], [0.85, 0.85, 0.79], "acc")["verdict"] == "not distinguishable"
    # Every seed agrees, but the paired differences scatter so widely that their 95% CI holds 0.
    wide = study.compare([0.80, 0.80, 0.80], [0.79, 0.75, 0.799], "acc")
    assert wide["verdict"] == "not distinguishable" and wide["ci95"][0] < 0 < wide["ci95"][1]
    # Paired: a 1-point loss in every seed is a result even where the arms' own seed spread is 5 points,
    # since each seed's luck is shared by both of its arms.
    paired = study.compare([0.80, 0.85, 0.90], [0.79, 0.84, 0.89], "acc")
    assert paired["verdict"] == "hurts" and paired["seed_std"] > 0.04 and paired["ci95"][1] < 0
    helps = study.compare([0.800, 0.805, 0.802], [0.830, 0.834, 0.829], "acc")
    assert helps["verdict"] == "helps" and "helps by 2.87 points" in helps["text"]
    assert study.compare([0.83, 0.834, 0.829], [0.80, 0.805, 0.802], "acc")["verdict"] == "hurts"
    assert study.compare([0.8], [0.9], "acc")["verdict"] == "one seed"
    assert study.compare([None, 0.8], [0.8, 0.8], "acc")["verdict"] == "unavailable"


def _scores(accuracy: float, tar: float) -> dict:
    far = {"1e-2": tar + 0.1, "1e-3": tar, "1e-4": tar - 0.1}
    return {"accuracy": accuracy, "tar_at_far": far, "tar_at_far_no_hard": far, "top_impostors_both_hard": 0.0,
            "hard_genuine_tar": 0.0}


def test_a_one_seed_lead_is_judged_paired_over_every_seed():
    # Three seeds of every arm; one dose beat ArcFace alone at seed 0 and was rerun with seeds 1 and 2.
    reference = [_scores(0.95, t) for t in (0.70, 0.60, 0.66)]
    per_seed = [{"seed": seed, "pretrain": reference[seed],
                 **{arm.key: reference[seed] for arm in study.ARMS}} for seed in range(3)]
    dose = {"key": "lambda2_0.5", "label": "lambda2 = 0.5", "is_arm": False, "scores": _scores(0.95, 0.71)}
    assert study.beats_reference(dose["scores"], per_seed[0]["baseline"])
    assert not study.beats_reference(_scores(0.95, 0.69), per_seed[0]["baseline"])

    def summarise(lead_tars):
        trained = {"per_seed": per_seed, "gradients": [], "sweep": [], "variants": [], "doses": [dose],
                   "leads": [{"group": "doses", "label": dose["label"],
                              "per_seed": [_scores(0.95, t) for t in lead_tars]}]}
        return study.summarise(trained)

    held = summarise((0.71, 0.61, 0.67))  # +1 point at every seed
    assert [c["verdict"] for c in held["leads"][0]["comparisons"]][2] == "helps"
    assert "Seed-0 lead lambda2 = 0.5 (doses), rerun with 3 seeds: helps" in held["headline"]
    faded = summarise((0.71, 0.58, 0.66))  # the seed-0 lead does not hold at the other seeds
    assert faded["leads"][0]["comparisons"][2]["verdict"] == "not distinguishable"
    assert "rerun with 3 seeds: not distinguishable" in faded["headline"]
