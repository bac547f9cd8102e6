"""Re-embedding a gallery for another model: side by side, streamed, resumable after kill -9, idempotent.

Real components: a tritonserver serving two versions of one model (two different exports of the project's
own small model: ``face:1`` makes ``test-face:1`` embeddings, ``face:2`` makes ``test-face:2``), a real
SQLite gallery with sealed crops, and ``cdface gallery reembed`` as its own process.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cdface.core.imaging import encode_png
from cdface.core.manifest import read_manifest
from cdface.serving.crop_cipher import CropCipher
from cdface.serving.store import Face, ModelKey, NewFace, SQLiteStore

from .conftest import CROP_KEYS, REPO_ROOT

pytestmark = pytest.mark.slow

TRITON_MODEL = "face"
A, B = ModelKey("test-face", 1), ModelKey("test-face", 2)  # the manifests' keys of Triton face:1 and face:2
DIM = 512  # the embedding size of the small exported model (tests/triton_fixtures.py)


@pytest.fixture(scope="module")
def two_versions(exported_model, exported_model_v2, tmp_path_factory):
    """A tritonserver of its own serving face:1 and face:2 (the session ``triton``'s repository stays as it is)."""
    from cdface.devtools.triton_local import TritonServer
    from cdface.export.triton_repo import add_model_version

    repo = tmp_path_factory.mktemp("reembed-repo")
    add_model_version(repo, TRITON_MODEL, exported_model.dir, backend="python", max_batch_size=32)
    add_model_version(repo, TRITON_MODEL, exported_model_v2.dir, backend="python", version_policy="all")
    assert (read_manifest(repo / TRITON_MODEL / "1").name, read_manifest(repo / TRITON_MODEL / "2").version) == \
        (A.name, B.version)
    with TritonServer(repo, log_path=tmp_path_factory.mktemp("reembed-log") / "tritonserver.log") as server:
        yield repo, server


def embed(server, version: int, crops: np.ndarray) -> np.ndarray:
    """What Triton's ``face:version`` answers for these crops (the reference the stored embeddings must equal)."""
    from cdface.serving.triton import TritonEmbedder
    from cdface.serving.usecases.images import embed_crops

    async def run() -> np.ndarray:
        embedder = TritonEmbedder(server.grpc_url, TRITON_MODEL, version, dim=DIM, timeout_s=30)
        try:
            return np.concatenate([await embed_crops(embedder, crops[i:i + 32]) for i in range(0, len(crops), 32)])
        finally:
            await embedder.close()

    return asyncio.run(run())


def crops(n: int, seed: int) -> np.ndarray:
    """Synthetic aligned crops (the model does not care that they are not faces)."""
    return np.random.default_rng(seed).integers(0, 256, (n, 112, 112, 3), dtype=np.uint8)


def enrolled_by_a(path: Path, server, images: np.ndarray, *, crop_less: int = 0) -> tuple[SQLiteStore, list[Face]]:
    """A gallery whose faces model A (face:1) enrolled, with sealed crops; the last ``crop_less`` without one."""
    store = SQLiteStore(path)
    store.use_crop_cipher(CropCipher.from_setting(CROP_KEYS))
    vectors = embed(server, 1, images)
    faces: list[Face] = []
    for start in range(0, len(images), 50):  # 50 faces per identity
        person = store.create_identity(None, None, {})
        faces += store.add_faces(person.id, [
            NewFace(vectors[i], A, encode_png(images[i]) if i < len(images) - crop_less else None)
            for i in range(start, min(start + 50, len(images)))])
    return store, faces


def reembed_command(db: Path, repo: Path, server, *args: str) -> list[str]:
    return [sys.executable, "-m", "cdface.serving.cli", "gallery", "reembed", "--db", str(db), "--model-repository",
            str(repo), "--triton-url", server.grpc_url, *args]


ENV = {**os.environ, "CDFACE_SERVE_CROP_KEYS": CROP_KEYS}  # the crops are sealed with it


def run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300, env=ENV)


def rows_per_face_and_model(store: SQLiteStore) -> dict[tuple[int, ModelKey], int]:
    rows = store._read("SELECT face_id, model_name, model_version, COUNT(*) FROM face_embeddings "
                       "GROUP BY face_id, model_name, model_version")
    return {(int(r[0]), ModelKey(r[1], int(r[2]))): int(r[3]) for r in rows}


def test_reembedding_adds_the_new_models_embeddings_beside_the_old_ones(two_versions, tmp_path):
    repo, server = two_versions
    images = crops(41, seed=1)
    store, faces = enrolled_by_a(tmp_path / "g.db", server, images, crop_less=1)
    face_ids = [f.id for f in faces]
    before_a = store.load_embeddings(A, DIM)
    # The pointer names B the candidate: `gallery reembed` without --to embeds for it.
    store.set_model_state(ModelKey(TRITON_MODEL, 1), ModelKey(TRITON_MODEL, 2), None, action="model_candidate")

    first = run(reembed_command(tmp_path / "g.db", repo, server, "--batch", "8"))
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout) == {"model": "test-face:2", "reembedded": 40, "need_reenrolment": 1,
                                        "coverage": 40 / 41, "faces_total": 41}
    assert "40/40" in first.stderr and "face/s" in first.stderr  # tqdm's bar: done/total, rate, ETA

    # A's embeddings are untouched, bit for bit; B's are what Triton face:2 answers for the retained crops.
    after_a = store.load_embeddings(A, DIM)
    assert after_a[0].tolist() == before_a[0].tolist() and after_a[3].tobytes() == before_a[3].tobytes()
    ids, _, _, vectors = store.load_embeddings(B, DIM)
    assert ids.tolist() == face_ids[:40]
    np.testing.assert_allclose(vectors, embed(server, 2, images[:40]), atol=1e-5)  # PNG crops are lossless
    assert not np.allclose(vectors, after_a[3][:40], atol=1e-2)  # two different models
    assert store.count_faces_by_model() == {A: 41, B: 40}

    # The crop-less face is re-enrolled the way a gateway does while B is the candidate: with both embeddings.
    store.delete_face(faces[-1].identity_id, faces[-1].id)
    again = images[-1:]
    store.add_faces(faces[-1].identity_id, [NewFace(embed(server, 1, again)[0], A, encode_png(again[0]),
                                          also=((B, embed(server, 2, again)[0]),))])
    second = run(reembed_command(tmp_path / "g.db", repo, server, "--to", "face:2"))
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout) == {"model": "test-face:2", "reembedded": 0, "need_reenrolment": 0,
                                         "coverage": 1.0, "faces_total": 41}
    assert set(rows_per_face_and_model(store).values()) == {1} and store.count_faces_by_model() == {A: 41, B: 41}
    reembeds = [e.outcome for e in store.audit_entries() if e.action == "reembed"]
    assert sum(o["faces"] for o in reembeds) == 40 and {o["model"] for o in reembeds} == {"test-face:2"}
    store.close()


def test_a_reembed_killed_halfway_resumes_with_one_embedding_per_face_and_model(two_versions, tmp_path):
    repo, server = two_versions
    images = crops(300, seed=2)
    store, faces = enrolled_by_a(tmp_path / "g.db", server, images)
    face_ids = [f.id for f in faces]
    before_a = store.load_embeddings(A, DIM)[3].tobytes()

    def done() -> int:
        return store.count_faces_by_model().get(B, 0)

    # One crop per Triton call and per transaction: the run lasts long enough to be caught a third of the way.
    with open(tmp_path / "killed.stderr", "wb") as stderr:
        proc = subprocess.Popen(reembed_command(tmp_path / "g.db", repo, server, "--to", "face:2", "--batch", "1"),
                                cwd=REPO_ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 120
        while done() < len(images) // 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)  # polling the store, not timing the run
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = done()
    assert 0 < killed_at < len(images), f"the kill did not land mid-run ({killed_at} of {len(images)} done)"

    resumed = run(reembed_command(tmp_path / "g.db", repo, server, "--to", "face:2", "--batch", "16"))
    assert resumed.returncode == 0, resumed.stderr
    result = json.loads(resumed.stdout)
    assert result == {"model": "test-face:2", "reembedded": len(images) - killed_at, "need_reenrolment": 0,
                      "coverage": 1.0, "faces_total": len(images)}
    assert f"{len(images) - killed_at}/{len(images) - killed_at}" in resumed.stderr  # the bar counts what was left

    # Every face: exactly one embedding per model, none lost; A's as enrolled, B's what face:2 answers.
    assert rows_per_face_and_model(store) == {(f, m): 1 for f in face_ids for m in (A, B)}
    assert store.load_embeddings(A, DIM)[3].tobytes() == before_a
    ids, _, _, vectors = store.load_embeddings(B, DIM)
    assert ids.tolist() == face_ids
    np.testing.assert_allclose(vectors, embed(server, 2, images), atol=1e-5)
    again = run(reembed_command(tmp_path / "g.db", repo, server, "--to", "face:2"))
    assert again.returncode == 0 and json.loads(again.stdout)["reembedded"] == 0, again.stderr
    store.close()


def test_reembed_command_errors_are_one_line(two_versions, tmp_path):
    repo, server = two_versions
    SQLiteStore(tmp_path / "g.db").close()
    for args, message in ((("--to", "face"), "is not NAME:VERSION"),
                          (("--to", "face:0"), "is not NAME:VERSION"),
                          (("--to", "face:9"), "not in the model repository"),
                          ((), "no candidate model")):
        failed = run(reembed_command(tmp_path / "g.db", repo, server, *args))
        assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr
        assert len(failed.stderr.strip().splitlines()) == 1 and message in failed.stderr, (args, failed.stderr)


def test_gallery_status_shows_faces_per_model_and_the_pointer(tmp_path):
    store = SQLiteStore(tmp_path / "g.db")
    person = store.create_identity(None, None, {})
    faces = store.add_faces(person.id, [NewFace(np.ones(4, np.float32) / 2, A) for _ in range(3)])
    store.add_embeddings([(faces[0].id, np.ones(4, np.float32) / 2)], B)
    store.set_model_state(ModelKey(TRITON_MODEL, 1), ModelKey(TRITON_MODEL, 2), None, action="model_candidate")
    store.close()
    shown = subprocess.run([sys.executable, "-m", "cdface.serving.cli", "gallery", "status", "--db",
                            str(tmp_path / "g.db")], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)
    assert {k: v for k, v in status.items() if k not in ("promoted", "last_change")} == {
        "faces_total": 3, "faces_by_model": {"test-face:1": 3, "test-face:2": 1}, "active": "face:1",
        "candidate": "face:2", "previous": None}
    assert status["promoted"] is not None and status["last_change"] > 0
