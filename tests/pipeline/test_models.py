"""The lifecycle commands' gates (``cdface model``): a real SQLite gallery, a real model repository, the real CLI.

Promotion is refused, with one line and exit status 2, for a candidate that does not cover the gallery, that
measures worse than the active model on their shared held-out set, or that has no evaluation report; a
rollback returns to the previous model. Which Triton versions stay served follows the pointer, the grace
period and the gateways' reports.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cdface.pipeline.models import evaluation_regressions, needed_versions
from cdface.serving.store import ModelKey, NewFace, SQLiteStore
from cdface.serving.store.base import ModelState

REPO_ROOT = Path(__file__).resolve().parents[2]
V1, V2 = ModelKey("face", 1), ModelKey("face", 2)


def _evaluation(value: float | None) -> dict | None:
    if value is None:
        return None
    return {"results": [{"dataset": "heldout", "metric": "tar@far=1e-3", "value": value},
                        {"dataset": "heldout", "metric": "tar@far=1e-4", "value": None, "unavailable": "too few"}],
            "thresholds": {"1e-3": 0.4}}


def _report(manifest_path: Path, value: float | None) -> None:
    """Give a version's manifest an evaluation report (what `cdface retrain` writes at export)."""
    manifest = json.loads(manifest_path.read_text())
    manifest["evaluation"] = _evaluation(value)
    manifest_path.write_text(json.dumps(manifest))


def _model(ctx, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cdface.cli", "model", *args, "--db", str(ctx["db"]),
                           "--model-repository", str(ctx["repo"])], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ})


@pytest.fixture
def lifecycle(exported_model, exported_model_v2, tmp_path):
    """A repository with face:1 and face:2 (two exports of the project's IR-18), and a gallery of three faces
    embedded by face:1 only, whose active model is face:1 (as a gateway's first start leaves it)."""
    from cdface.export.triton_repo import add_model_version

    repo = tmp_path / "repo"
    add_model_version(repo, "face", exported_model.dir, backend="python")
    add_model_version(repo, "face", exported_model_v2.dir, backend="python")
    key1 = ModelKey(exported_model.manifest["name"], exported_model.manifest["version"])
    key2 = ModelKey(exported_model_v2.manifest["name"], exported_model_v2.manifest["version"])
    store = SQLiteStore(tmp_path / "gallery.db")
    rng = np.random.default_rng(0)
    faces = [NewFace(v / np.linalg.norm(v), key1) for v in rng.standard_normal((3, 512)).astype(np.float32)]
    _, stored = store.create_identity_with_faces(None, "someone", {}, faces)
    store.set_model_state(V1, None, None, action="model_activate")
    yield {"repo": repo, "db": tmp_path / "gallery.db", "store": store, "faces": [f.id for f in stored],
           "key2": key2}
    store.close()


def test_promotion_is_refused_until_the_candidate_covers_the_gallery_and_measures_no_worse(lifecycle):
    repo, store = lifecycle["repo"], lifecycle["store"]
    _report(repo / "face" / "1" / "manifest.json", 0.90)
    _report(repo / "face" / "2" / "manifest.json", 0.80)

    nothing = _model(lifecycle, "promote")
    assert nothing.returncode == 2 and "no candidate model to promote" in nothing.stderr, nothing
    named = _model(lifecycle, "candidate", "face:2")
    assert named.returncode == 0, named.stderr
    assert json.loads(named.stdout)["candidate"] == "face:2"

    incomplete = _model(lifecycle, "promote")
    assert incomplete.returncode == 2, incomplete
    assert "covers 0 of 3 faces" in incomplete.stderr and "Traceback" not in incomplete.stderr
    store.add_embeddings([(face_id, np.ones(512, np.float32) / np.sqrt(512)) for face_id in lifecycle["faces"]],
                         lifecycle["key2"])

    worse = _model(lifecycle, "promote")
    assert worse.returncode == 2 and "heldout tar@far=1e-3: 0.8000 vs the active model's 0.9000" in worse.stderr, worse
    _report(repo / "face" / "2" / "manifest.json", None)
    unmeasured = _model(lifecycle, "promote")
    assert unmeasured.returncode == 2 and "no evaluation report" in unmeasured.stderr, unmeasured
    assert store.model_state().active == V1  # every refusal left the pointer where it was

    _report(repo / "face" / "2" / "manifest.json", 0.897)  # lower, but within the default margin (0.005)
    promoted = _model(lifecycle, "promote")
    assert promoted.returncode == 0, promoted.stderr
    state = store.model_state()
    assert (state.active, state.candidate, state.previous) == (V2, None, V1)
    status = json.loads(_model(lifecycle, "status").stdout)
    assert status["active_coverage"]["share"] == 1.0 and status["previous_coverage"]["embedded"] == 3

    rolled = _model(lifecycle, "rollback")
    assert rolled.returncode == 0, rolled.stderr
    state = store.model_state()
    assert (state.active, state.previous) == (V1, V2)  # and the rollback itself can be undone
    actions = [e.action for e in store.audit_entries() if e.action.startswith("model_")]
    assert actions == ["model_activate", "model_candidate", "model_promote", "model_rollback"]


def test_a_candidate_must_exist_in_the_repository(lifecycle):
    missing = _model(lifecycle, "candidate", "face:9")
    assert missing.returncode == 2 and "face:9 is not in the model repository" in missing.stderr, missing
    malformed = _model(lifecycle, "candidate", "face")
    assert malformed.returncode == 2 and "is not NAME:VERSION" in malformed.stderr, malformed


def test_evaluation_regressions_compare_shared_measurements_within_the_margin():
    from cdface.core.manifest import Evaluation

    def report(**values: float) -> Evaluation:
        return Evaluation(results=[{"dataset": d, "metric": "accuracy", "value": v} for d, v in values.items()])

    assert evaluation_regressions(report(lfw=0.99), report(lfw=0.986), margin=0.005) == []
    assert evaluation_regressions(report(lfw=0.99), report(lfw=0.98), margin=0.005) == [
        "lfw accuracy: 0.9800 vs the active model's 0.9900"]
    assert evaluation_regressions(report(lfw=0.99, cfp=0.9), report(lfw=0.999, cfp=0.8), margin=0.0) == [
        "cfp accuracy: 0.8000 vs the active model's 0.9000"]  # better on one set does not buy a regression on another
    assert "share no held-out measurement" in evaluation_regressions(report(lfw=0.99), report(cfp=0.99), 0.0)[0]
    assert "candidate's manifest has no evaluation" in evaluation_regressions(report(lfw=0.9), None, 0.0)[0]


def test_triton_keeps_the_previous_version_through_the_grace_period_and_any_version_in_use():
    promoted = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.timezone.utc)
    state = ModelState(active=V2, candidate=ModelKey("face", 3), previous=V1, promoted=promoted.isoformat())
    within = promoted + dt.timedelta(hours=1)
    after = promoted + dt.timedelta(hours=25)
    assert needed_versions(state, set(), grace_s=86400, now=within) == {"face": [1, 2, 3]}
    assert needed_versions(state, set(), grace_s=86400, now=after) == {"face": [2, 3]}
    # A gateway still reporting v1 (it has not followed the pointer yet) keeps it served, grace or not.
    assert needed_versions(state, {V1}, grace_s=86400, now=after) == {"face": [1, 2, 3]}
    assert needed_versions(ModelState(active=ModelKey("sface", 1)), {V1}, 0) == {"face": [1], "sface": [1]}
