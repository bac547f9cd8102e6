"""A model upgrade under live traffic: real PostgreSQL, a real Triton in explicit model control, two real gateways.

v1 is the wrapped SFace (``face:1``), v2 a different exported model (the project's IR-18 exporter, another
Triton model ``face-ir:1`` with 512-d embeddings). While an identify load runs through both gateways, the
operator's commands run as an operator types them: ``cdface model candidate``, ``cdface gallery reembed``,
``cdface model promote``, then ``cdface model rollback``. No request may fail, no answer may name a wrong
top-1 identity, and every answer names the model that made it.

The probes are the enrolled photos themselves: each model then scores a probe's own identity at cosine 1,
so a correct top-1 is known under both models, whatever the (untrained) v2 makes of other faces.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from .conftest import REPO_ROOT, b64, start_pg_gateway

pytestmark = pytest.mark.slow

V1, V2 = "face:1", "face-ir:1"
DEADLINE_S = 120.0  # a gateway builds the candidate's index in the background, Triton loads a version


def _with_evaluation(export_dir: Path, out: Path, value: float, threshold: float) -> Path:
    """A copy of an export whose manifest carries an evaluation report on a shared held-out set (``heldout``)."""
    import shutil

    shutil.copytree(export_dir, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["evaluation"] = {"results": [{"dataset": "heldout", "metric": "tar@far=1e-3", "value": value}],
                              "thresholds": {"1e-3": threshold}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def _cdface(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cdface.cli", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def _mirrored(path: Path) -> bytes:
    from PIL import Image, ImageOps

    out = io.BytesIO()
    ImageOps.mirror(Image.open(path).convert("RGB")).save(out, format="JPEG", quality=95)
    return out.getvalue()


class IdentifyLoad:
    """Identify requests, one after another per thread, through the gateways in turn until stopped; every
    answer is kept: (gateway, expected identity id, status, top-1 identity id or None, the model it names,
    the thread that asked, the decision threshold)."""

    def __init__(self, gateways, probes: dict[str, str], threads: int = 2) -> None:
        self.gateways, self.probes = gateways, probes  # identity id -> the probe image (base64)
        self.stop = threading.Event()
        self.answers: list[tuple[int, str, int, str | None, str | None, int, float | None]] = []
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, worker: int) -> None:
        clients = [gw.client("identify") for gw in self.gateways]
        n = worker
        while not self.stop.is_set():
            which = n % len(clients)
            items = list(self.probes.items())  # identities enrolled meanwhile are probed too
            expected, image = items[n % len(items)]
            n += 1
            try:
                r = clients[which].post("/v1/identify", json={"image": {"data": image}, "top_k": 3})
            except httpx.HTTPError as exc:
                self.answers.append((which, expected, -1, None, type(exc).__name__, worker, None))
                continue
            body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
            match = body.get("faces", [{}])[0].get("match") if r.status_code == 200 else None
            model = body.get("model") or {}
            self.answers.append((which, expected, r.status_code, match and match["identity_id"],
                                 f"{model.get('triton_model')}:{model.get('triton_version')}" if model else None,
                                 worker, body.get("threshold")))
        for c in clients:
            c.close()

    def __enter__(self) -> "IdentifyLoad":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def wait_for(self, model: str, gateways: int, deadline_s: float = DEADLINE_S) -> None:
        """Until each gateway has answered with ``model`` (answers are polled, never assumed after a sleep)."""
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            seen = {answer[0] for answer in list(self.answers)[-200:] if answer[4] == model}
            if len(seen) == gateways:
                return
            time.sleep(0.2)
        raise AssertionError(f"the gateways did not switch to {model} within {deadline_s} s")


def _metric(gw, name: str, **labels: str) -> float:
    text = httpx.get(gw.url + "/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_an_upgrade_and_a_rollback_under_identify_load_fail_no_request(sface_export, exported_model_v2, photos,
                                                                        postgres_url, tmp_path):
    from cdface.devtools.triton_local import TritonServer
    from cdface.export.triton_repo import add_model_version
    from cdface.serving.auth import create_key
    from cdface.serving.store.postgres import PostgresStore

    repo = tmp_path / "repo"
    # The candidate measures no worse on the shared held-out set: promotion is decided by coverage then.
    add_model_version(repo, "face", _with_evaluation(sface_export, tmp_path / "v1", 0.90, 0.363), backend="python",
                      version_policy="specific:1", max_batch_size=8, instances=1)
    add_model_version(repo, "face-ir", _with_evaluation(exported_model_v2.dir, tmp_path / "v2", 0.91, 0.5),
                      backend="python", version_policy="specific:1", max_batch_size=8, instances=1)
    store = PostgresStore(postgres_url)
    keys = {scope: create_key(store, f"test-{scope}", [scope])[0] for scope in ("admin", "identify")}
    store.close()
    with TritonServer(repo, explicit=True, load_models=["face"], log_path=tmp_path / "triton.log") as triton:
        env = {"CDFACE_SERVE_SHADOW_SHARE": "1.0", "CDFACE_SERVE_REPORT_INTERVAL_S": "1"}
        gateways = [start_pg_gateway(tmp_path / f"gw{i}", triton.grpc_url, repo, postgres_url, keys, **env)
                    for i in range(2)]
        ops = {"CDFACE_SERVE_DATABASE_URL": postgres_url, "CDFACE_SERVE_MODEL_REPOSITORY": str(repo),
               "CDFACE_SERVE_TRITON_URL": triton.grpc_url, "CDFACE_SERVE_CROP_KEYS": gateways[0].env[
                   "CDFACE_SERVE_CROP_KEYS"]}
        try:
            probes = {}
            with gateways[0].client("admin") as admin:
                for person in ("obama", "obama2", "biden", "tom_hanks_aligned"):
                    image = b64(photos[person])
                    r = admin.post("/v1/identities", json={"name": person, "images": [{"data": image}],
                                                           "retain_crop": True})
                    assert r.status_code == 201, r.text
                    probes[r.json()["id"]] = image
            with IdentifyLoad(gateways, probes) as load:
                load.wait_for(V1, gateways=2)

                candidate = _cdface("model", "candidate", V2, "--triton-url", triton.grpc_url, env=ops)
                assert candidate.returncode == 0, candidate.stderr
                # Shadow mode: both gateways built the candidate's index and score identifications with it.
                deadline = time.monotonic() + DEADLINE_S
                while any(_metric(gw, "cdface_shadow_compared", candidate=V2) == 0 for gw in gateways):
                    assert time.monotonic() < deadline, "no shadow comparison within the deadline"
                    time.sleep(0.5)
                # An enrolment while the candidate is ready is embedded by both models.
                late = _mirrored(photos["biden"])
                with gateways[1].client("admin") as admin:
                    r = admin.post("/v1/identities", json={"name": "late", "images": [{"data": b64(late)}]})
                    assert r.status_code == 201, r.text
                    probes[r.json()["id"]] = b64(late)  # the load threads pick it up as they cycle

                refused = _cdface("model", "promote", env=ops)  # the 4 enrolled first have no v2 embedding yet
                assert refused.returncode == 2 and "promotion refused" in refused.stderr, refused
                assert "covers 1 of 5 faces" in refused.stderr, refused.stderr

                reembedded = _cdface("gallery", "reembed", "--to", V2, env=ops)
                assert reembedded.returncode == 0, reembedded.stderr
                assert json.loads(reembedded.stdout.splitlines()[-1])["coverage"] == 1.0
                promoted = _cdface("model", "promote", "--triton-url", triton.grpc_url, env=ops)
                assert promoted.returncode == 0, promoted.stderr
                assert json.loads(promoted.stdout)["active"] == V2 and json.loads(promoted.stdout)["previous"] == V1
                load.wait_for(V2, gateways=2)

                status = json.loads(_cdface("model", "status", env=ops).stdout)
                assert status["active"] == V2 and status["previous"] == V1
                assert set(status["triton_versions"]) == {"face", "face-ir"}  # v1 kept through the grace period

                rolled = _cdface("model", "rollback", "--triton-url", triton.grpc_url, env=ops)
                assert rolled.returncode == 0, rolled.stderr
                load.wait_for(V1, gateways=2)
                since_rollback = len(load.answers)
                while len(load.answers) < since_rollback + 20:  # v1 answers again, the late identity included
                    time.sleep(0.2)
            # Each face holds both models' embeddings side by side, whichever model enrolled it.
            with gateways[0].client("admin") as admin:
                for identity in probes:
                    (face,) = admin.get(f"/v1/identities/{identity}/faces").json()["items"]
                    assert sorted(face["models"]) == ["sface:1", "test-face:2"] and face["current"], face
        finally:
            for gw in gateways:
                gw.stop()

    answers = load.answers
    failed = [a for a in answers if a[2] != 200]
    wrong = [a for a in answers if a[2] == 200 and a[3] != a[1]]
    unnamed = [a for a in answers if a[2] == 200 and a[4] not in (V1, V2)]
    by_model = Counter(a[4] for a in answers)
    assert len(answers) > 100 and by_model[V1] > 0 and by_model[V2] > 0, by_model
    assert failed == [], failed[:5]
    assert wrong == [], wrong[:5]
    assert unnamed == [], unnamed[:5]
    # The threshold switches with the model: each answer is decided with its own model's (from its manifest).
    assert {(a[4], a[6]) for a in answers} == {(V1, 0.363), (V2, 0.5)}
    # The models each gateway answered one thread's requests with, in order: v1, v2 after the promotion, then v1
    # again (one thread's requests are sequential; two threads' answers may complete out of order).
    for which in range(2):
        for worker in range(2):
            sequence = [a[4] for a in answers if a[0] == which and a[5] == worker]
            changes = [m for i, m in enumerate(sequence) if i == 0 or m != sequence[i - 1]]
            assert changes == [V1, V2, V1], (which, worker, changes)

    # Shadow-mode counts reached the store (both gateways' together), as `cdface model status` reads them.
    store = PostgresStore(postgres_url)
    try:
        from cdface.serving.store import ModelKey

        counts = store.shadow_counts(ModelKey("face", 1), ModelKey("face-ir", 1))
        assert counts.total > 0 and counts.same_top1 <= counts.total
    finally:
        store.close()
