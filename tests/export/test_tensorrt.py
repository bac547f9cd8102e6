"""The TensorRT engine cache without TensorRT: keys, profiles, the cross-process lock, the CLI message.

Where a build is needed, an injected build function stands in for the TensorRT builder
(``export.tensorrt.build_engine``): it returns bytes derived from the key and records each call,
so the tests see exactly how often a build ran.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cdface.core.errors import CdfaceError
from cdface.export.tensorrt import EngineKey, Profile, cached_engine, engine_key

REPO = Path(__file__).resolve().parents[2]
CDFACE = Path(sys.executable).parent / "cdface"


@pytest.fixture
def onnx_file(tmp_path) -> Path:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"stand-in model bytes")  # the cache only hashes the file
    return path


def _key(onnx_file, **overrides) -> EngineKey:
    args = dict(precision="fp16", profile=Profile(1, 32, 128), workspace_gb=4.0, gpu_name="NVIDIA H200",
                tensorrt_version="10.9.0")
    args.update(overrides)
    return engine_key(onnx_file, **args)


def test_key_changes_with_everything_that_changes_the_engine(onnx_file, tmp_path):
    base = _key(onnx_file)
    assert _key(onnx_file) == base and _key(onnx_file).digest == base.digest
    other_model = tmp_path / "other.onnx"
    other_model.write_bytes(b"another model")
    variants = [
        engine_key(other_model, precision="fp16", profile=Profile(1, 32, 128), gpu_name="NVIDIA H200", tensorrt_version="10.9.0"),
        _key(onnx_file, gpu_name="NVIDIA A100-SXM4-80GB"),
        _key(onnx_file, tensorrt_version="10.10.0"),
        _key(onnx_file, precision="int8"),
        _key(onnx_file, precision="int8", calib_digest="abc"),
        _key(onnx_file, profile=Profile(1, 16, 128)),
        _key(onnx_file, profile=Profile(1, 32, 256)),
        _key(onnx_file, workspace_gb=8.0),
    ]
    digests = {v.digest for v in variants}
    assert base.digest not in digests and len(digests) == len(variants)


@pytest.mark.parametrize(
    "args, message",
    [((4, 2, 8), "min-batch <= opt-batch <= max-batch"), ((1, 64, 32), "min-batch <= opt-batch"),
     ((0, 1, 8), "min-batch must be a positive"), ((1, 1, 2.5), "max-batch must be a positive")],
)
def test_profile_validation(args, message):
    with pytest.raises(CdfaceError, match=message):
        Profile(*args)


def test_profile_shapes_are_uint8_nhwc_crops():
    assert Profile(1, 8, 64).shapes() == ((1, 112, 112, 3), (8, 112, 112, 3), (64, 112, 112, 3))


def test_key_validation(onnx_file, tmp_path):
    with pytest.raises(CdfaceError, match="precision"):
        _key(onnx_file, precision="fp8")
    with pytest.raises(CdfaceError, match="workspace"):
        _key(onnx_file, workspace_gb=0)
    with pytest.raises(CdfaceError, match="not found"):
        _key(tmp_path / "missing.onnx")


def test_cache_builds_once_reuses_and_rebuilds_on_a_new_key(onnx_file, tmp_path):
    calls = []

    def stand_in_builder(path: Path, key: EngineKey) -> bytes:  # stand-in for TensorRT's build_engine
        calls.append(key.digest)
        return f"engine for {key.digest}".encode()

    cache = tmp_path / "engines"
    first, built = cached_engine(cache, onnx_file, _key(onnx_file), stand_in_builder)
    assert built and first.read_bytes() == f"engine for {_key(onnx_file).digest}".encode()
    again, built = cached_engine(cache, onnx_file, _key(onnx_file), stand_in_builder)
    assert again == first and not built and len(calls) == 1
    sidecar = json.loads(first.with_suffix(".json").read_text())
    assert sidecar["key"]["gpu_name"] == "NVIDIA H200" and sidecar["key"]["profile"]["opt_batch"] == 32

    upgraded, built = cached_engine(cache, onnx_file, _key(onnx_file, tensorrt_version="10.10.0"), stand_in_builder)
    assert built and upgraded != first and len(calls) == 2

    first.write_bytes(b"truncated")  # a damaged engine is rebuilt, not loaded
    repaired, built = cached_engine(cache, onnx_file, _key(onnx_file), stand_in_builder)
    assert built and repaired == first and len(calls) == 3


def test_two_processes_one_builds_the_other_waits_and_reuses(onnx_file, tmp_path):
    cache, log = tmp_path / "engines", tmp_path / "builds.log"
    script = tmp_path / "start_gpu.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys, time
        from pathlib import Path
        from cdface.export.tensorrt import Profile, cached_engine, engine_key

        here = Path({str(tmp_path)!r})
        (here / ("started-" + sys.argv[1])).touch()

        def stand_in_builder(path, key):  # stand-in for TensorRT's build_engine: slow, and it leaves a trace
            with open({str(log)!r}, "a") as f:
                f.write(sys.argv[1] + "\\n")
            # Keep building until both "GPUs" have started, so the other one really meets the lock.
            deadline = time.monotonic() + 60
            while len(list(here.glob("started-*"))) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(1.0)
            return b"engine " + key.digest.encode()

        key = engine_key({str(onnx_file)!r}, precision="fp16", profile=Profile(1, 32, 128),
                         gpu_name="NVIDIA H200", tensorrt_version="10.9.0")
        path, built = cached_engine({str(cache)!r}, {str(onnx_file)!r}, key, stand_in_builder)
        print(json.dumps({{"path": str(path), "built": built, "bytes": Path(path).read_bytes().decode()}}))
    """))
    procs = [subprocess.Popen([sys.executable, str(script), f"gpu{i}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=REPO) for i in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(json.loads(out))
    assert sorted(r["built"] for r in results) == [False, True]
    assert results[0]["path"] == results[1]["path"] and results[0]["bytes"] == results[1]["bytes"]
    assert len(log.read_text().splitlines()) == 1  # exactly one build ran


def test_cli_says_tensorrt_is_missing(onnx_file, tmp_path):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    done = subprocess.run([str(CDFACE), "export", "tensorrt", str(onnx_file), "--out", str(tmp_path / "engines"),
                           "--precision", "fp16"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "TensorRT is not installed" in done.stderr
    assert not (tmp_path / "engines").exists()


def test_cli_rejects_a_bad_profile(onnx_file, tmp_path):
    done = subprocess.run([str(CDFACE), "export", "tensorrt", str(onnx_file), "--out", str(tmp_path / "e"),
                           "--min-batch", "8", "--opt-batch", "4"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2 and "min-batch <= opt-batch <= max-batch" in done.stderr
