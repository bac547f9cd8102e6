"""Data minimisation: who else resembled a face is disclosed only to keys with the ``candidates`` scope,
and no request can loosen the decision threshold below the server's floor."""

from __future__ import annotations

import json
import sqlite3
from types import SimpleNamespace

import numpy as np
import pytest

from cdface.core.manifest import Evaluation
from cdface.serving.errors import InvalidRequest
from cdface.serving.settings import Settings
from cdface.serving.usecases.recognition import decide

from .conftest import b64

# A model whose evaluation report has thresholds at four FARs (looser FAR, lower threshold).
THRESHOLDS = {"1e-2": 0.25, "1e-3": 0.36, "1e-4": 0.45, "1e-5": 0.52}


def _service(**settings):
    """What ``decide`` reads: the settings and the answering model's manifest (its evaluation report)."""
    return Settings(**settings), SimpleNamespace(evaluation=Evaluation(thresholds=THRESHOLDS))


def test_stricter_fars_are_granted_looser_ones_refused_by_default():
    service = _service(far=1e-3)
    assert decide(*service, None).threshold == 0.36
    assert decide(*service, 1e-4).threshold == 0.45
    assert decide(*service, 1e-3).threshold == 0.36  # the server's own FAR, asked for explicitly
    with pytest.raises(InvalidRequest) as refused:
        decide(*service, 1e-2)
    assert refused.value.code == "threshold_below_floor" and "0.2500" in str(refused.value)


def test_the_floor_is_a_setting():
    assert decide(*_service(far=1e-3, threshold_floor=0.2), 1e-2).threshold == 0.25  # an operator allowed it
    with pytest.raises(InvalidRequest, match="floor of 0.5000"):
        decide(*_service(far=1e-5, threshold_floor=0.5), 1e-4)
    assert decide(*_service(far=1e-5, threshold_floor=0.5), None).threshold == 0.52


@pytest.mark.slow
def test_identify_names_non_matches_only_to_keys_with_the_candidates_scope(gateway, photos):
    with gateway.client("admin") as admin:
        for person in ("obama", "biden"):
            r = admin.post("/v1/identities", json={"name": f"minimisation {person}",
                                                   "images": [{"data": b64(photos[person])}]})
            assert r.status_code == 201, r.text
        probe = {"image": {"data": b64(photos["obama2"])}, "top_k": 5}
        full = admin.post("/v1/identify", json=probe).json()["faces"][0]
    with gateway.client("identify") as identify_only:
        minimal = identify_only.post("/v1/identify", json=probe).json()["faces"][0]
    assert full["match"] is not None and any(not c["match"] for c in full["candidates"])  # something to withhold
    assert minimal["candidates"] and all(c["match"] for c in minimal["candidates"])
    assert minimal["match"] == full["match"]
    assert [c for c in full["candidates"] if c["match"]] == minimal["candidates"]


@pytest.mark.slow
def test_the_audit_row_records_the_best_candidate_whatever_the_callers_scope(gateway, photos):
    """Minimisation trims the answer, never the audit log: both keys' rows name the same best candidate."""
    with gateway.client("admin") as admin:
        r = admin.post("/v1/identities", json={"name": "audit top1 biden", "images": [{"data": b64(photos["biden"])}]})
        assert r.status_code == 201, r.text
        # A random direction matches no enrolled face (cosine near 0, threshold 0.363), whatever else the
        # session's gateway holds: the identify-only key is shown no candidate, yet a best one exists.
        direction = np.random.default_rng(1234).standard_normal(128)
        probe = {"embedding": (direction / np.linalg.norm(direction)).tolist(), "top_k": 5}
        ids = []
        for client in (admin, gateway.client("identify")):
            r = client.post("/v1/identify", json=probe)
            assert r.status_code == 200, r.text
            ids.append(r.headers["X-Request-ID"])
    with sqlite3.connect(gateway.db) as db:
        rows = {rid: json.loads(outcome) for rid, outcome in db.execute(
            "SELECT request_id, outcome FROM audit_log WHERE action = 'identify'") if rid in ids}
    assert len(rows) == 2 and rows[ids[0]]["match"] == rows[ids[1]]["match"] == [False]
    assert rows[ids[0]]["top1"] == rows[ids[1]]["top1"] and rows[ids[0]]["top1"][0] is not None
