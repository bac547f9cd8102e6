"""``cdface retrain`` end to end on CPU: train -> eval -> export -> publish -> load -> reembed -> promote.

Real pieces throughout: the demo preset trained on synthetic identities, the exporter's parity gate, a
model repository served by a real ``tritonserver`` in explicit model-control mode, and a SQLite gallery of
real face photos (YuNet-aligned crops, sealed) enrolled with a first version. The command runs as its own
process, as the chart's Jobs run it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL = "face"
CROP_KEYS = "ckretrain:" + base64.b64encode(os.urandom(32)).decode()
# The smallest demo run that still learns: 32 synthetic identities, 8 pretrain + 4 joint steps of 64 images.
TRAIN = ["--preset", "demo", "--set", "run.pretrain_epochs=2", "--set", "optim.epochs=1", "--set", "data.workers=0",
         "--set", "run.progress=false", "--set", "run.tensorboard=false"]
# 200 held-out pairs measure TAR at FAR 1e-2 on 100 impostor pairs: one pair moves it by 0.01.
MARGIN = "0.05"


def cdface(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cdface.cli", *args], capture_output=True, text=True, cwd=REPO_ROOT,
                          env=env, timeout=600)


def synthetic_data(out: Path) -> Path:
    done = subprocess.run([sys.executable, "-m", "cdface.cli", "data", "synth", "--out", str(out), "--identities",
                           "32", "--per-identity", "8", "--val-identities", "32", "--val-pairs", "200"],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    return out


def untrained_version(data: Path, out: Path) -> Path:
    """Version 1: an untrained IR-18 (1/8 width), evaluated on the same held-out set and exported."""
    import torch

    from cdface.export.onnx_export import export_checkpoint
    from cdface.training.backbones import create_backbone
    from cdface.training.checkpoint import save_checkpoint
    from cdface.training.evaluation.embedders import open_embedder
    from cdface.training.evaluation.report import build_report, write_report
    from cdface.training.evaluation.run import evaluate_bins

    torch.manual_seed(0)
    spec = {"name": "ir18", "kwargs": {"width": 0.125}}
    checkpoint = out / "untrained.pt"
    out.mkdir(parents=True)
    backbone = create_backbone(spec["name"], **spec["kwargs"])
    save_checkpoint(checkpoint, {"backbone": spec, "model": backbone.state_dict()})
    report = out / "eval.json"
    write_report(report, build_report(str(checkpoint), evaluate_bins(open_embedder(checkpoint), [data / "val.bin"])))
    export_checkpoint(checkpoint, out / "export", name=MODEL, version=1, eval_report=report)
    return out / "export"


def aligned_faces(photos: dict[str, Path], yunet: Path) -> list[tuple[str, np.ndarray]]:
    """(person, aligned 112x112 crop) of real photos: Obama, Biden and the six people of t1.jpg."""
    from cdface.core.detection import Detector, extract_faces
    from cdface.core.imaging import decode_image

    detector = Detector(yunet)
    faces = []
    for name in ("obama", "biden", "t1"):
        rgb = decode_image(photos[name].read_bytes())
        mode = "detect_all" if name == "t1" else "detect"
        faces += [(f"{name}-{i}", face.crop) for i, face in enumerate(extract_faces(rgb, mode, detector=detector))]
    return faces


def embed(triton_url: str, version: int, crops: np.ndarray) -> np.ndarray:
    from cdface.serving.triton import TritonEmbedder
    from cdface.serving.usecases.images import embed_crops

    async def run() -> np.ndarray:
        embedder = TritonEmbedder(triton_url, MODEL, version, dim=512)
        try:
            return await embed_crops(embedder, crops)
        finally:
            await embedder.close()

    return asyncio.run(run())


def enroll(db: Path, triton_url: str, faces: list[tuple[str, np.ndarray]]) -> list[int]:
    """The gallery as a gateway on version 1 leaves it: faces with retained crops, face:1 active."""
    from cdface.core.imaging import encode_png
    from cdface.serving.service import open_store
    from cdface.serving.settings import Settings
    from cdface.serving.store import ModelKey, NewFace

    store = open_store(Settings(db_path=db, create_db=True, crop_keys=CROP_KEYS))
    try:
        vectors = embed(triton_url, 1, np.stack([crop for _, crop in faces]))
        ids = []
        for (person, crop), vector in zip(faces, vectors):
            _, added = store.create_identity_with_faces(person, person, {}, [
                NewFace(vector, ModelKey(MODEL, 1), crop=encode_png(crop))])
            ids += [face.id for face in added]
        store.set_model_state(ModelKey(MODEL, 1), None, None, action="model_activate")
        return ids
    finally:
        store.close()


def versions_on_disk(repo: Path) -> dict[str, float]:
    model_dir = repo / MODEL
    return {p.name: p.stat().st_mtime for p in model_dir.iterdir() if p.name.isdigit()}


@pytest.mark.slow
def test_retrain_end_to_end_and_a_second_run_publishes_nothing_new(tmp_path, face_photos, yunet_onnx):
    from cdface.devtools.triton_local import TritonServer
    from cdface.export.triton_config import read_settings
    from cdface.export.triton_repo import add_model_version, list_versions
    from cdface.serving.service import open_store
    from cdface.serving.settings import Settings
    from cdface.serving.store import ModelKey

    data = synthetic_data(tmp_path / "data")
    repo = tmp_path / "models"
    add_model_version(repo, MODEL, untrained_version(data, tmp_path / "v1"), backend="python", max_batch_size=16)
    faces = aligned_faces(face_photos, yunet_onnx)
    assert len(faces) == 8
    db = tmp_path / "gallery.db"
    work = tmp_path / "runs"
    with TritonServer(repo, explicit=True, load_models=[MODEL], log_path=tmp_path / "triton.log") as triton:
        face_ids = enroll(db, triton.grpc_url, faces)
        env = {**os.environ, "CDFACE_SERVE_CROP_KEYS": CROP_KEYS, "CDFACE_RETRAIN_MARGIN": MARGIN}
        common = ["retrain", "--run-id", "nightly-1", "--work-dir", str(work), "--model-repository", str(repo),
                  "--model", MODEL, "--triton-url", triton.grpc_url, "--db", str(db), *TRAIN,
                  "--set", f"data.path={data}", "--set", f"data.val=[{data / 'val.bin'}]"]

        # Killed (SIGKILL) once the pretrain stage has checkpointed (its first epoch, 4 of 8 steps): the run resumes.
        with open(tmp_path / "killed.log", "wb") as log:
            killed = subprocess.Popen([sys.executable, "-m", "cdface.cli", *common, "--steps", "train"],
                                      cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        checkpoint = work / "nightly-1" / "pretrain" / "checkpoints" / "last.pt"
        while not checkpoint.exists() and killed.poll() is None:
            time.sleep(0.02)
        killed.kill()
        assert killed.wait() == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
        assert not (work / "nightly-1" / "steps" / "train.json").exists()

        # Without the re-embedding, promotion refuses: the new version stays the candidate, one line, exit 2.
        refused = cdface(*common, "--steps", "train,eval,export,publish,load,promote", env=env)
        assert refused.returncode == 2, refused.stderr[-3000:]
        assert f"resumed from {checkpoint} at step 4" in refused.stderr
        assert json.loads((work / "nightly-1" / "steps" / "train.json").read_text())["result"]["steps"] == {
            "pretrain": 8, "joint": 4}
        error = [line for line in refused.stderr.splitlines() if line.startswith("cdface: error:")]
        assert len(error) == 1 and "face:2 stays the candidate" in error[0] and "covers 0 of 8 faces" in error[0]
        steps_dir = work / "nightly-1" / "steps"
        assert sorted(p.stem for p in steps_dir.glob("*.json")) == ["eval", "export", "load", "publish", "train"]
        assert list_versions(repo, MODEL) == [1, 2]
        config = read_settings(repo, MODEL)
        assert config is not None and config.version_policy.kind == "specific"
        assert config.version_policy.versions == (1, 2)  # the active one keeps serving beside the new one
        store = open_store(Settings(db_path=db, crop_keys=CROP_KEYS))
        state = store.model_state()
        store.close()
        assert (state.active, state.candidate) == (ModelKey(MODEL, 1), ModelKey(MODEL, 2))
        manifest = json.loads((repo / MODEL / "2" / "manifest.json").read_text())
        assert (manifest["name"], manifest["version"]) == (MODEL, 2)
        trained = {(r["dataset"], r["metric"]): r["value"] for r in manifest["evaluation"]["results"]}
        untrained = json.loads((repo / MODEL / "1" / "manifest.json").read_text())["evaluation"]["results"]
        assert trained["val", "accuracy"] > next(r["value"] for r in untrained if r["metric"] == "accuracy")

        # The same run again, all steps: what is done is skipped, the gallery is re-embedded, face:2 promoted.
        finished = cdface(*common, env=env)
        assert finished.returncode == 0, finished.stderr[-3000:]
        results = json.loads(finished.stdout)["steps"]
        assert all(f"retrain nightly-1: {step}: done earlier, skipped" in finished.stderr
                   for step in ("train", "eval", "export", "publish", "load"))
        assert results["publish"] == {"model": MODEL, "version": 2, "added": True, "backend": "python"}
        assert results["reembed"]["candidate"] == "face:2"
        assert results["promote"]["promoted"] is True and results["promote"]["active"] == "face:2"
        store = open_store(Settings(db_path=db, crop_keys=CROP_KEYS))
        try:
            state = store.model_state()
            assert (state.active, state.candidate, state.previous) == (ModelKey(MODEL, 2), None, ModelKey(MODEL, 1))
            assert store.count_faces_by_model() == {ModelKey(MODEL, 1): 8, ModelKey(MODEL, 2): 8}
            # Each face's new embedding is version 2's embedding of its own retained crop.
            found_ids, _, _, stored = store.embeddings_of(face_ids, ModelKey(MODEL, 2), 512)
        finally:
            store.close()
        assert list(found_ids) == face_ids
        fresh = embed(triton.grpc_url, 2, np.stack([crop for _, crop in faces]))
        assert np.min(np.sum(stored * fresh, axis=1)) > 0.999  # PNG crops are lossless
        assert np.max(np.abs(fresh - embed(triton.grpc_url, 1, np.stack([c for _, c in faces])))) > 0.1

        # A third run with the same id publishes nothing: every step skipped, the repository untouched.
        before = versions_on_disk(repo)
        again = cdface(*common, env=env)
        assert again.returncode == 0, again.stderr[-3000:]
        assert again.stderr.count("done earlier, skipped") == 7
        assert versions_on_disk(repo) == before and list_versions(repo, MODEL) == [1, 2]

    # Killed after copying its version but before recording it: the retry finds the version by its digest.
    (steps_dir / "publish.json").unlink()
    (repo / MODEL / ".cdface-runs" / "nightly-1.json").unlink()
    retried = cdface(*common, "--steps", "publish", env=env)
    assert retried.returncode == 0, retried.stderr[-3000:]
    assert json.loads(retried.stdout)["steps"]["publish"] == {"model": MODEL, "version": 2, "added": False}
    assert versions_on_disk(repo) == before
    assert json.loads((repo / MODEL / ".cdface-runs" / "nightly-1.json").read_text())["version"] == 2


@pytest.mark.parametrize(("args", "named"), [
    ([], "run_id"),
    (["--run-id", "../elsewhere"], "run_id"),
    (["--run-id", "r1", "--steps", "train,deploy"], "steps"),
    (["--run-id", "r1", "--backend", "tflite"], "backend"),
    (["--run-id", "r1", "--triton-url", "triton"], "triton_url"),
])
def test_bad_settings_are_refused_in_one_line(tmp_path, args, named):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDFACE_RETRAIN_")}
    done = cdface("retrain", "--work-dir", str(tmp_path), *args, env=env)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cdface: error: invalid ") and named in lines[0], done.stderr
    assert not (tmp_path / "r1").exists()


def test_a_step_refuses_to_run_before_the_steps_it_needs(tmp_path):
    done = cdface("retrain", "--run-id", "r1", "--work-dir", str(tmp_path), "--steps", "export,publish",
                  "--model-repository", str(tmp_path / "models"), env=dict(os.environ))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"cdface: error: run r1 has not done the eval step ({tmp_path / 'r1' / 'steps' / 'eval.json'} is missing): "
        "run it first (--steps eval,...)")
    assert not (tmp_path / "models").exists()


def test_the_load_step_reaches_every_server_a_target_names():
    from cdface.pipeline.retrain import triton_servers

    assert triton_servers("ipv4:10.0.0.1:8001,10.0.0.2:8001") == ["10.0.0.1:8001", "10.0.0.2:8001"]
    assert triton_servers("localhost:8001") == ["127.0.0.1:8001"]  # resolved: a headless Service name lists pods
    assert triton_servers("dns:///localhost:8001") == ["127.0.0.1:8001"]
    assert triton_servers("127.0.0.2:9001") == ["127.0.0.2:9001"]
