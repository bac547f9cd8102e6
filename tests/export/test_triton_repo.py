"""The Triton model repository writer: layout, versions, version policy and the config text (no server)."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from tritonclient.grpc import model_config_pb2 as mc
from typer.testing import CliRunner

from cdface.core.errors import CdfaceError
from cdface.export.triton_config import ModelSettings, VersionPolicy, parse_config, read_settings
from cdface.export.triton_repo import add_model_version, list_versions, read_version_manifest, set_version_policy


def _key_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("backend, platform", [("onnxruntime_onnx", "onnxruntime_onnx"),
                                                ("tensorrt_plan", "tensorrt_plan")])
def test_gpu_config_text_has_gpu_instances_and_dynamic_batching(backend, platform):
    settings = ModelSettings(name="face", backend=backend, embedding_size=512, max_batch_size=64,
                             preferred_batch_sizes=(16, 32, 64), queue_delay_us=500, instances=2, gpus=(0,),
                             version_policy=VersionPolicy.latest(2))
    text = settings.to_pbtxt()
    lines = _key_lines(text)

    # The lines a reviewer (and Triton) looks for, in the text itself.
    assert f'platform: "{platform}"' in lines
    assert "max_batch_size: 64" in lines
    assert "kind: KIND_GPU" in lines and "count: 2" in lines
    assert [ln for ln in lines if ln.startswith("preferred_batch_size")] == [
        "preferred_batch_size: 16", "preferred_batch_size: 32", "preferred_batch_size: 64"]
    assert "max_queue_delay_microseconds: 500" in lines
    assert "KIND_CPU" not in text

    # And parsed back through Triton's own schema.
    config = parse_config(text)
    assert config.name == "face" and config.platform == platform
    assert config.instance_group[0].kind == config.instance_group[0].KIND_GPU
    assert list(config.instance_group[0].gpus) == [0]
    assert list(config.dynamic_batching.preferred_batch_size) == [16, 32, 64]
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert config.version_policy.latest.num_versions == 2
    (inp,), (out,) = config.input, config.output
    assert (inp.name, list(inp.dims)) == ("images", [112, 112, 3])
    assert (inp.data_type, out.data_type) == (mc.TYPE_UINT8, mc.TYPE_FP32)
    assert (out.name, list(out.dims)) == ("embedding", [512])
    assert ModelSettings.from_proto(config) == settings


def test_python_config_runs_on_cpu_with_thread_parameters():
    text = ModelSettings(name="face", backend="python", embedding_size=128, ort_threads=2).to_pbtxt()
    config = parse_config(text)
    assert config.backend == "python" and not config.platform
    assert config.instance_group[0].kind == config.instance_group[0].KIND_CPU
    assert config.parameters["intra_op_threads"].string_value == "2"
    assert list(config.output[0].dims) == [128]
    # Defaults: half the maximum batch and the maximum are preferred.
    assert list(config.dynamic_batching.preferred_batch_size) == [16, 32]


def test_tensorrt_accelerator_builds_engines_into_a_cache_when_a_version_loads(tmp_path, exported_model):
    settings = ModelSettings(name="face", backend="onnxruntime_onnx", embedding_size=512,
                             preferred_batch_sizes=(16, 32), tensorrt_cache="/engine-cache")
    config = parse_config(settings.to_pbtxt())
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt" and dict(accelerator.parameters) == {
        "precision_mode": "FP16", "trt_engine_cache_enable": "true", "trt_engine_cache_path": "/engine-cache"}
    assert ModelSettings.from_proto(config) == settings
    assert not parse_config(ModelSettings(name="face", backend="onnxruntime_onnx", embedding_size=512).to_pbtxt()
                            ).HasField("optimization")
    # A version added later keeps the model's accelerator, as it keeps the other tuning.
    add_model_version(tmp_path, "face", exported_model.dir, backend="onnxruntime_onnx", tensorrt_cache="/engine-cache")
    add_model_version(tmp_path, "face", exported_model.dir, backend="onnxruntime_onnx")
    assert read_settings(tmp_path, "face").tensorrt_cache == "/engine-cache"
    for wrong in ({"backend": "python"}, {"backend": "onnxruntime_onnx", "device": "cpu"}):
        with pytest.raises(CdfaceError, match="TensorRT accelerator"):
            ModelSettings(name="face", embedding_size=512, tensorrt_cache="/c", **wrong).validate()


def test_settings_refuse_nonsense():
    with pytest.raises(CdfaceError, match="preferred batch sizes"):
        ModelSettings(name="face", backend="python", embedding_size=8, max_batch_size=8,
                      preferred_batch_sizes=(16,)).to_pbtxt()
    with pytest.raises(CdfaceError, match="unknown Triton backend"):
        ModelSettings(name="face", backend="tensorflow", embedding_size=8).to_pbtxt()


@pytest.mark.parametrize("text, expected", [
    ("latest", VersionPolicy.latest(1)), ("latest:3", VersionPolicy.latest(3)),
    ("all", VersionPolicy.all()), ("specific:1,3", VersionPolicy.specific(1, 3)),
])
def test_version_policy_parses_and_prints(text, expected):
    policy = VersionPolicy.parse(text)
    assert policy == expected
    assert VersionPolicy.parse(str(policy)) == policy


@pytest.mark.parametrize("text", ["newest", "latest:x", "specific", "latest:0", "all:2"])
def test_version_policy_rejects_bad_text(text):
    with pytest.raises(CdfaceError, match="version policy"):
        VersionPolicy.parse(text)


def test_version_policy_chooses_served_versions():
    assert VersionPolicy.latest(2).served([1, 2, 3]) == [2, 3]
    assert VersionPolicy.specific(1, 3).served([1, 2, 3]) == [1, 3]
    assert VersionPolicy.all().served([3, 1]) == [1, 3]


def test_versions_accumulate_and_config_follows(tmp_path, exported_model, exported_model_v2):
    repo = tmp_path / "repo"
    v1 = add_model_version(repo, "face", exported_model.dir, backend="python", max_batch_size=16, queue_delay_us=700)
    assert v1.version == 1
    assert sorted(p.name for p in v1.path.iterdir()) == ["manifest.json", "model.onnx", "model.py"]
    assert json.loads(v1.manifest_path.read_text()) == exported_model.manifest
    assert read_version_manifest(repo, "face", 1).onnx_sha256 == exported_model.manifest["onnx_sha256"]
    assert (v1.path / "model.onnx").read_bytes() == exported_model.onnx_path.read_bytes()

    # A second version: the first stays, tuning given earlier is kept unless overridden.
    v2 = add_model_version(repo, "face", exported_model_v2.dir, backend="python", version_policy="latest:2")
    assert v2.version == 2 and list_versions(repo, "face") == [1, 2]
    settings = read_settings(repo, "face")
    assert (settings.max_batch_size, settings.queue_delay_us) == (16, 700)
    assert settings.version_policy == VersionPolicy.latest(2)

    # An explicit number; taken numbers are refused (versions are immutable).
    assert add_model_version(repo, "face", exported_model.dir, backend="python", version=7).version == 7
    with pytest.raises(CdfaceError, match="already exists"):
        add_model_version(repo, "face", exported_model.dir, backend="python", version=7)
    assert add_model_version(repo, "face", exported_model.dir, backend="python").version == 8

    # The policy alone can change; no staging leftovers anywhere.
    assert set_version_policy(repo, "face", "specific:2,7").version_policy == VersionPolicy.specific(2, 7)
    assert parse_config((repo / "face" / "config.pbtxt").read_text()).version_policy.specific.versions == [2, 7]
    assert not [p for p in (repo / "face").iterdir() if p.name.startswith(".staging")]


def test_one_backend_per_model(tmp_path, exported_model):
    repo = tmp_path / "repo"
    add_model_version(repo, "face", exported_model.dir, backend="python")
    with pytest.raises(CdfaceError, match="needs a new model name"):
        add_model_version(repo, "face", exported_model.dir, backend="onnxruntime_onnx")


def test_gpu_backends_write_their_model_files(tmp_path, exported_model):
    repo = tmp_path / "repo"
    onnx = add_model_version(repo, "face-ort", exported_model.dir, backend="onnxruntime_onnx", instances=2)
    assert sorted(p.name for p in onnx.path.iterdir()) == ["manifest.json", "model.onnx"]
    assert "KIND_GPU" in onnx.config_path.read_text()

    with pytest.raises(CdfaceError, match="model.plan"):
        add_model_version(repo, "face-trt", exported_model.dir, backend="tensorrt_plan")
    export = tmp_path / "with-plan"
    shutil.copytree(exported_model.dir, export)
    (export / "model.plan").write_bytes(b"serialized engine")  # contents are TensorRT's business
    trt = add_model_version(repo, "face-trt", export, backend="tensorrt_plan")
    assert sorted(p.name for p in trt.path.iterdir()) == ["manifest.json", "model.plan"]
    assert parse_config(trt.config_path.read_text()).platform == "tensorrt_plan"


def test_exports_that_break_the_contract_are_refused(tmp_path, exported_model):
    repo = tmp_path / "repo"
    with pytest.raises(CdfaceError, match="does not exist"):
        add_model_version(repo, "face", tmp_path / "missing")

    tampered = tmp_path / "tampered"
    shutil.copytree(exported_model.dir, tampered)
    with open(tampered / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(CdfaceError, match="does not match its manifest"):
        add_model_version(repo, "face", tampered)

    unvouched = tmp_path / "unvouched"
    shutil.copytree(exported_model.dir, unvouched)
    (unvouched / "manifest.json").write_text(json.dumps({"name": "face"}))
    with pytest.raises(CdfaceError, match="manifest .* is invalid"):
        add_model_version(repo, "face", unvouched)

    wrong_size = tmp_path / "wrong-size"
    shutil.copytree(exported_model.dir, wrong_size)
    manifest = json.loads((wrong_size / "manifest.json").read_text())
    manifest.update(embedding_size=7, output={**manifest["output"], "shape": [-1, 7]})
    (wrong_size / "manifest.json").write_text(json.dumps(manifest))
    add_model_version(repo, "face", exported_model.dir)
    with pytest.raises(CdfaceError, match="embedding size 7|outputs 7-d"):
        add_model_version(repo, "face", wrong_size)
    assert list_versions(repo, "face") == [1]


def test_cli_add_version(tmp_path, exported_model):
    from cdface.export.cli import app

    repo = tmp_path / "repo"
    runner = CliRunner()
    result = runner.invoke(app, ["triton", str(repo), str(exported_model.dir), "--model", "face",
                                 "--backend", "onnxruntime_onnx", "--preferred", "4,8", "--queue-delay-us", "300",
                                 "--instances", "3", "--version-policy", "all"])
    assert result.exit_code == 0, result.output
    assert "added face version 1" in result.output
    config = parse_config((repo / "face" / "config.pbtxt").read_text())
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert config.instance_group[0].count == 3 and config.version_policy.HasField("all")
    assert hashlib.sha256((repo / "face" / "1" / "model.onnx").read_bytes()).hexdigest() == \
        exported_model.manifest["onnx_sha256"]

    bad = runner.invoke(app, ["triton", str(repo), str(exported_model.dir), "--model", "face",
                              "--backend", "tensorflow"])
    assert bad.exit_code != 0 and isinstance(bad.exception, CdfaceError)


def test_onnxruntime_on_cpu_instances_and_tensorrt_refuses_cpu():
    cpu = ModelSettings(name="face", backend="onnxruntime_onnx", embedding_size=512, device="cpu")
    text = cpu.to_pbtxt()
    assert "kind: KIND_CPU" in _key_lines(text) and "KIND_GPU" not in text
    assert ModelSettings.from_proto(parse_config(text)).device == "cpu"
    with pytest.raises(CdfaceError, match="only on a GPU"):
        ModelSettings(name="face", backend="tensorrt_plan", embedding_size=512, device="cpu").to_pbtxt()
