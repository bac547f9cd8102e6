"""`cdface serve` on day one (issue 14): a bad setting, repository or gallery path is one line on
stderr and exit status 2 before anything starts, never a traceback; unknown CDFACE_SERVE_* variables
are named; a gallery file that does not exist is created only when asked for (--create).

Each case runs the real command line in its own process, against real files: the wrapped SFace
model repository of the serving fixtures, real SQLite files, a real gateway where one must start.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.serving.conftest import MODEL, start_gateway

pytestmark = pytest.mark.slow


def serve(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """``cdface serve ARGS`` with a clean CDFACE_SERVE_* environment plus ``env``."""
    environ = {k: v for k, v in os.environ.items() if not k.upper().startswith("CDFACE_SERVE_")}
    environ.update({"CDFACE_SERVE_LOG_LEVEL": "warning", **env})
    return subprocess.run([sys.executable, "-m", "cdface.cli", "serve", *args], cwd=cwd, env=environ,
                          capture_output=True, text=True, timeout=60)  # a refusal takes a few seconds


def refused(done: subprocess.CompletedProcess) -> str:
    """The one error line of a refused start (exit status 2, nothing else on stderr, no traceback)."""
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("cdface: error: "), lines
    assert "Traceback" not in done.stderr and done.stdout == ""
    return lines[0].removeprefix("cdface: error: ")


@pytest.fixture
def good(model_repo, tmp_path) -> list[str]:
    """Arguments that would start a gateway on the wrapped SFace repository with a new gallery."""
    return ["--model-repository", str(model_repo), "--model", MODEL, "--db", str(tmp_path / "gallery.db"), "--create"]


def copy_repo(model_repo: Path, tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(model_repo, repo)
    return repo


def test_the_model_repository_is_checked_before_start(model_repo, tmp_path):
    db = ["--db", str(tmp_path / "g.db"), "--create"]
    assert refused(serve(*db, cwd=tmp_path)) == \
        "set CDFACE_SERVE_MODEL_REPOSITORY (the Triton model repository) or CDFACE_SERVE_MANIFEST"

    missing = tmp_path / "no-such-repo"
    assert refused(serve("--model-repository", str(missing), *db, cwd=tmp_path)) == \
        f"model repository {missing} does not exist or is not a directory"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert refused(serve("--model-repository", str(empty), *db, cwd=tmp_path)) == \
        f"model 'face' is not in the model repository {empty} (the repository is empty)"

    assert refused(serve("--model-repository", str(model_repo), "--model", "fcae", *db, cwd=tmp_path)) == \
        f"model 'fcae' is not in the model repository {model_repo} (it has: face)"

    assert refused(serve("--model-repository", str(model_repo), *db, cwd=tmp_path,
                         CDFACE_SERVE_MODEL_VERSION="7")) == "model 'face' has no version 7 (it has [1])"

    no_versions = tmp_path / "bare"
    (no_versions / MODEL).mkdir(parents=True)
    (no_versions / MODEL / "config.pbtxt").write_text("")
    assert refused(serve("--model-repository", str(no_versions), *db, cwd=tmp_path)) == \
        f"model 'face' has no numbered version directories in {no_versions / MODEL}"
    assert not (tmp_path / "g.db").exists()  # nothing was created on the way to the refusal


def test_a_bad_manifest_is_one_line(model_repo, tmp_path):
    repo = copy_repo(model_repo, tmp_path)
    manifest = repo / MODEL / "1" / "manifest.json"
    db = ["--db", str(tmp_path / "g.db"), "--create"]

    manifest.write_text("{not json")
    message = refused(serve("--model-repository", str(repo), *db, cwd=tmp_path))
    assert message.startswith(f"model manifest {manifest} is invalid: ")

    fields = json.loads((model_repo / MODEL / "1" / "manifest.json").read_text())
    manifest.write_text(json.dumps({**fields, "embedding_size": "wide"}))
    message = refused(serve("--model-repository", str(repo), *db, cwd=tmp_path))
    assert message.startswith(f"model manifest {manifest} is invalid: ") and "embedding_size" in message

    manifest.unlink()
    assert refused(serve("--model-repository", str(repo), *db, cwd=tmp_path)) == \
        f"model manifest not found: {manifest}"


@pytest.mark.parametrize(("env", "expected"), [
    ({"CDFACE_SERVE_PORT": "eighty"}, "invalid serving settings: CDFACE_SERVE_PORT: Input should be a valid "
                                      "integer, unable to parse string as an integer (got 'eighty')"),
    ({"CDFACE_SERVE_FAR": "2"}, "invalid serving settings: CDFACE_SERVE_FAR: Input should be less than 1 (got '2')"),
    ({"CDFACE_SERVE_LOG_LEVEL": "loud"}, "invalid serving settings: CDFACE_SERVE_LOG_LEVEL: Input should be "
                                         "'debug', 'info', 'warning' or 'error' (got 'loud')"),
    ({"CDFACE_SERVE_CORS_ORIGINS": "https://a.example"},
     "invalid serving settings: CDFACE_SERVE_CORS_ORIGINS is not valid JSON (lists are written as JSON, "
     "e.g. [\"https://app.example\"])"),
    ({"CDFACE_SERVE_TRITON_URL": "http://127.0.0.1:8001"}, "invalid serving settings: CDFACE_SERVE_TRITON_URL: "),
])
def test_invalid_setting_values_are_named_in_one_line(good, tmp_path, env, expected):
    message = "cdface: error: " + refused(serve(*good, cwd=tmp_path, **env))
    assert message.startswith("cdface: error: " + expected), message
    assert not (tmp_path / "gallery.db").exists()


def test_an_option_out_of_range_is_named_too(good, tmp_path):
    assert refused(serve(*good, "--port", "70000", cwd=tmp_path)) == \
        "invalid serving settings: CDFACE_SERVE_PORT: Input should be less than or equal to 65535 (got 70000)"


def test_a_secret_value_is_never_echoed(good, tmp_path):
    done = serve(*good, cwd=tmp_path, CDFACE_SERVE_PORT="x", CDFACE_SERVE_KEY_PEPPER="pepper-sekrit-42")
    refused(done)
    assert "pepper-sekrit-42" not in done.stderr


def test_a_gallery_that_does_not_exist_is_refused_without_create(model_repo, tmp_path):
    typo = tmp_path / "galery.db"
    args = ["--model-repository", str(model_repo), "--db", str(typo)]
    assert refused(serve(*args, cwd=tmp_path)) == \
        f"gallery database {typo} does not exist; pass --create (or set CDFACE_SERVE_CREATE_DB=1) to create it"
    assert not typo.exists()
    # The other gallery commands refuse it the same way, and create nothing either.
    for command in (["keys", "list"], ["keys", "create", "--name", "app", "--scope", "admin"], ["gallery", "status"]):
        done = subprocess.run([sys.executable, "-m", "cdface.cli", *command, "--db", str(typo)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert refused(done).startswith(f"gallery database {typo} does not exist; pass --create"), command
    assert not typo.exists()


def test_an_unreadable_gallery_path_is_one_line(model_repo, tmp_path):
    args = ["--model-repository", str(model_repo)]
    directory = tmp_path / "a-directory.db"
    directory.mkdir()
    assert refused(serve(*args, "--db", str(directory), cwd=tmp_path)) == \
        f"cannot open the gallery database {directory}: unable to open database file"
    not_sqlite = tmp_path / "notes.db"
    not_sqlite.write_text("these are my notes, not a gallery\n" * 100)
    assert refused(serve(*args, "--db", str(not_sqlite), cwd=tmp_path)) == \
        f"cannot open the gallery database {not_sqlite}: file is not a database"
    assert not_sqlite.read_text().startswith("these are my notes")  # left as it was


def test_create_makes_the_gallery_and_unknown_variables_are_named(triton, model_repo, tmp_path):
    """The happy path, for real: `cdface serve --create` on a new file starts a gateway that answers,
    and each unknown CDFACE_SERVE_* variable got one warning line with the closest known name."""
    db = tmp_path / "new" / "gallery.db"
    gw = start_gateway(tmp_path / "gw", triton.grpc_url, model_repo, db=db, keys={}, args=("--create",),
                       extra_env={"CDFACE_SERVE_DB": "typo.db", "CDFACE_SERVE_THRESHHOLD": "0.5",
                                  "CDFACE_SERVE_ZZZ_NOTHING_LIKE_IT": "1", "CDFACE_SERVE_AUTH": "false"})
    try:
        assert httpx.get(gw.url + "/readyz", timeout=10).status_code == 200
        listing = httpx.get(gw.url + "/v1/identities", timeout=10)
        assert listing.status_code == 200 and listing.json()["items"] == []
        assert db.is_file()
    finally:
        gw.stop()
    warnings = [line for line in gw.log.read_text().splitlines() if line.startswith("cdface: warning: ")]
    assert warnings == [
        "cdface: warning: unknown setting CDFACE_SERVE_DB is ignored; did you mean CDFACE_SERVE_DB_PATH?",
        "cdface: warning: unknown setting CDFACE_SERVE_THRESHHOLD is ignored; did you mean CDFACE_SERVE_THRESHOLD?",
        "cdface: warning: unknown setting CDFACE_SERVE_ZZZ_NOTHING_LIKE_IT is ignored",
    ]
    assert not (tmp_path / "gw" / "typo.db").exists()


def test_keys_create_with_create_makes_the_gallery(tmp_path):
    db = tmp_path / "fresh.db"
    done = subprocess.run([sys.executable, "-m", "cdface.cli", "keys", "create", "--name", "app", "--scope", "admin",
                           "--db", str(db), "--create"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("cdf_") and db.is_file()
    listed = subprocess.run([sys.executable, "-m", "cdface.cli", "keys", "list", "--db", str(db)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and "\tapp\tadmin\t" in listed.stdout
