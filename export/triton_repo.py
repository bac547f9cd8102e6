"""Write and update a Triton model repository from exported models.

Layout (what Triton reads)::

    <repo>/<model>/config.pbtxt            one config for all versions, written here, never by hand
    <repo>/<model>/<version>/model.onnx    onnxruntime_onnx, and the python backend's model file
    <repo>/<model>/<version>/model.plan    tensorrt_plan
    <repo>/<model>/<version>/model.py      python backend: ONNX Runtime inside Triton's Python stub
    <repo>/<model>/<version>/manifest.json the model manifest, beside the model it describes

Three backends, one contract: input ``images`` uint8 [112, 112, 3] and output ``embedding`` float32
[D], batched on the first dimension. ``onnxruntime_onnx`` and ``tensorrt_plan`` are for GPU nodes
(KIND_GPU instances); ``python`` runs the same ONNX file in ONNX Runtime on CPU, for servers that have
only the Python backend (the ``tritonserver`` in the ``nvidia-pytriton`` wheel).

The config is written from typed settings (``cdface.export.triton_config``).

Versions are immutable once written: a new export becomes a new version directory, older versions
stay on disk, and the config's ``version_policy`` decides which of them Triton serves.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cdface.core.contract import INPUT_NAME, INPUT_SIZE, OUTPUT_NAME
from cdface.core.errors import CdfaceError
from cdface.export.triton_config import (
    BACKENDS,
    CONFIG_FILE,
    DEFAULT_INSTANCES,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_ORT_THREADS,
    DEFAULT_QUEUE_DELAY_US,
    MODEL_NAME_RE,
    Backend,
    ModelSettings,
    VersionPolicy,
    read_settings,
    write_settings,
)

MANIFEST_FILE = "manifest.json"

# The file Triton loads from each version directory, per backend.
_MODEL_FILE: dict[Backend, str] = {
    "onnxruntime_onnx": "model.onnx", "tensorrt_plan": "model.plan", "python": "model.py",
}
_PYTHON_MODEL_SOURCE = Path(__file__).resolve().parent / "python_backend" / "model.py"


# --------------------------------------------------------------------------------------------------
# Versions
# --------------------------------------------------------------------------------------------------


def list_versions(repo: str | os.PathLike, model_name: str) -> list[int]:
    model_dir = Path(repo) / model_name
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


@dataclass(frozen=True)
class ModelVersion:
    """One version written into a repository."""

    repo: Path
    model_name: str
    version: int
    settings: ModelSettings

    @property
    def path(self) -> Path:
        return self.repo / self.model_name / str(self.version)

    @property
    def config_path(self) -> Path:
        return self.repo / self.model_name / CONFIG_FILE

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_FILE


def _onnx_embedding_size(onnx_path: Path) -> int | None:
    """Check the ONNX graph against the contract; return its embedding size D (None when symbolic)."""
    import onnx

    try:
        graph = onnx.load(str(onnx_path), load_external_data=False).graph
    except Exception as exc:
        raise CdfaceError(f"{onnx_path} is not a readable ONNX model: {exc}.") from None
    inputs = {i.name: i for i in graph.input}
    outputs = {o.name: o for o in graph.output}
    if INPUT_NAME not in inputs or OUTPUT_NAME not in outputs:
        raise CdfaceError(f"{onnx_path} must have input {INPUT_NAME!r} and output {OUTPUT_NAME!r}; it has "
                          f"inputs {sorted(inputs)} and outputs {sorted(outputs)}.")
    tin, tout = inputs[INPUT_NAME].type.tensor_type, outputs[OUTPUT_NAME].type.tensor_type
    in_dims = [d.dim_value or d.dim_param for d in tin.shape.dim]
    if tin.elem_type != onnx.TensorProto.UINT8 or in_dims[1:] != [INPUT_SIZE, INPUT_SIZE, 3]:
        raise CdfaceError(f"{onnx_path} input {INPUT_NAME!r} must be uint8 [N, {INPUT_SIZE}, {INPUT_SIZE}, 3], "
                          f"got elem type {tin.elem_type} {in_dims}.")
    out_dims = [d.dim_value or d.dim_param for d in tout.shape.dim]
    if tout.elem_type != onnx.TensorProto.FLOAT or len(out_dims) != 2:
        raise CdfaceError(f"{onnx_path} output {OUTPUT_NAME!r} must be float32 [N, D], got {out_dims}.")
    if isinstance(in_dims[0], int) and in_dims[0] > 0:
        raise CdfaceError(f"{onnx_path} has a fixed batch size {in_dims[0]}; Triton batching needs a dynamic one.")
    # Some exporters leave D symbolic (e.g. after a normalisation op); the manifest then says it.
    return out_dims[1] if isinstance(out_dims[1], int) and out_dims[1] > 0 else None


def _read_export(export_dir: Path, backend: Backend) -> tuple[list[Path], int]:
    """(files to copy into the version directory, embedding size D) for one exported model.

    The manifest is validated (``cdface.core.manifest``) and the ONNX file must be the one it describes:
    the repository serves only what the manifest vouches for.
    """
    from cdface.core.manifest import read_manifest, verify_onnx_hash

    if not export_dir.is_dir():
        raise CdfaceError(f"export directory {export_dir} does not exist.")
    manifest_path = export_dir / MANIFEST_FILE
    manifest = read_manifest(manifest_path)
    if manifest.onnx_file != "model.onnx":
        # Triton and model.py look for model.onnx; a renamed file would need per-version config.
        raise CdfaceError(f"{manifest_path} names ONNX file {manifest.onnx_file!r}; "
                          "Triton repositories need model.onnx.")

    files = [manifest_path]
    onnx_path = export_dir / manifest.onnx_file
    if backend in ("onnxruntime_onnx", "python"):
        verify_onnx_hash(manifest, onnx_path)
        onnx_size = _onnx_embedding_size(onnx_path)
        if onnx_size is not None and onnx_size != manifest.embedding_size:
            raise CdfaceError(f"{manifest_path} says embedding size {manifest.embedding_size} but "
                              f"{onnx_path.name} outputs {onnx_size}.")
        files.append(onnx_path)
        # Large graphs keep their weights beside the .onnx file; they must travel with it.
        files += sorted(p for p in export_dir.glob("model.onnx.data*") if p.is_file())
        if backend == "python":
            files.append(_PYTHON_MODEL_SOURCE)
    else:
        plan = export_dir / "model.plan"
        if not plan.exists():
            raise CdfaceError(f"{export_dir} has no model.plan; build a TensorRT engine before using tensorrt_plan.")
        files.append(plan)
    return files, manifest.embedding_size


def _copy_version(files: list[Path], model_dir: Path, version: int) -> Path:
    """Copy files into ``model_dir/<version>`` atomically: stage in a hidden sibling, then one rename.

    Triton (and a reader polling the repository) sees either no version directory or a complete one.
    A non-numeric directory name is ignored by Triton's version scan.
    """
    target = model_dir / str(version)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{version}-", dir=model_dir))
    try:
        for f in files:
            dst = staging / f.name
            shutil.copyfile(f, dst)
            with open(dst, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(staging, 0o755)  # mkdtemp makes it private; the server may run as another user
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def add_model_version(
    repo: str | os.PathLike,
    model_name: str,
    export_dir: str | os.PathLike,
    *,
    backend: Backend = "python",
    version: int | None = None,
    max_batch_size: int | None = None,
    preferred: tuple[int, ...] | list[int] | None = None,
    queue_delay_us: int | None = None,
    instances: int | None = None,
    version_policy: "str | VersionPolicy | None" = None,
    dynamic_batching: bool | None = None,
    ort_threads: int | None = None,
    gpus: tuple[int, ...] | list[int] | None = None,
    device: str | None = None,
    tensorrt_cache: str | None = None,
) -> ModelVersion:
    """Add ``export_dir`` (``model.onnx`` / ``model.plan`` + ``manifest.json``) as a new version.

    ``version=None`` takes the next number. Older versions stay; ``version_policy`` chooses what is
    served. Tunables left as None keep the model's current config (or the defaults for a new model),
    so adding a version never silently resets tuning. The config is rewritten after the version
    directory is complete; both writes are atomic.
    """
    from filelock import FileLock

    repo = Path(repo)
    export_dir = Path(export_dir)
    if backend not in BACKENDS:
        raise CdfaceError(f"unknown Triton backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
    if not MODEL_NAME_RE.match(model_name):
        raise CdfaceError(f"model name {model_name!r} must be letters, digits, '_', '-' or '.'.")
    files, embedding_size = _read_export(export_dir, backend)

    model_dir = repo / model_name
    model_dir.mkdir(parents=True, exist_ok=True)
    # One writer per model at a time: version numbering and the config are read-modify-write.
    with FileLock(str(model_dir / ".cdface-write.lock")):
        current = read_settings(repo, model_name)
        if current is not None:
            if current.backend != backend:
                raise CdfaceError(f"model {model_name!r} is served by the {current.backend} backend; a version for "
                                  f"{backend} needs a new model name.")
            if current.embedding_size != embedding_size:
                raise CdfaceError(f"model {model_name!r} outputs {current.embedding_size}-d embeddings; this export "
                                  f"outputs {embedding_size}-d, so it needs a new model name.")

        def pick(value, field, default):
            if value is not None:
                return value
            return getattr(current, field) if current is not None else default

        preferred_sizes: tuple[int, ...] | None
        if preferred is not None:
            preferred_sizes = tuple(preferred)
        elif current is not None and max_batch_size in (None, current.max_batch_size):
            preferred_sizes = current.preferred_batch_sizes
        else:
            preferred_sizes = None  # derived from the (new) maximum

        settings = ModelSettings(
            name=model_name,
            backend=backend,
            embedding_size=embedding_size,
            max_batch_size=pick(max_batch_size, "max_batch_size", DEFAULT_MAX_BATCH_SIZE),
            preferred_batch_sizes=preferred_sizes,
            queue_delay_us=pick(queue_delay_us, "queue_delay_us", DEFAULT_QUEUE_DELAY_US),
            dynamic_batching=pick(dynamic_batching, "dynamic_batching", True),
            instances=pick(instances, "instances", DEFAULT_INSTANCES),
            gpus=tuple(pick(gpus, "gpus", ())),
            device=pick(device, "device", "gpu"),
            version_policy=VersionPolicy.parse(version_policy) if version_policy is not None else (
                current.version_policy if current is not None else VersionPolicy()),
            ort_threads=pick(ort_threads, "ort_threads", DEFAULT_ORT_THREADS),
            tensorrt_cache=pick(tensorrt_cache, "tensorrt_cache", None),
        )
        settings.validate()

        existing = list_versions(repo, model_name)
        if version is None:
            version = (existing[-1] + 1) if existing else 1
        elif version < 1:
            raise CdfaceError(f"version must be a positive number, got {version}.")
        elif version in existing:
            raise CdfaceError(f"{model_dir / str(version)} already exists; versions are immutable, add a new one.")

        _copy_version(files, model_dir, version)
        write_settings(repo, settings)
    return ModelVersion(repo, model_name, version, settings)


def set_version_policy(repo: str | os.PathLike, model_name: str, policy: "str | VersionPolicy") -> ModelSettings:
    """Change which versions are served (takes effect when Triton next loads the model)."""
    from dataclasses import replace

    from filelock import FileLock

    model_dir = Path(repo) / model_name
    if not (model_dir / CONFIG_FILE).exists():
        raise CdfaceError(f"{model_dir} has no {CONFIG_FILE}; add a version first.")
    with FileLock(str(model_dir / ".cdface-write.lock")):
        current = read_settings(repo, model_name)
        if current is None:  # removed between the check above and taking the lock
            raise CdfaceError(f"{model_dir} has no {CONFIG_FILE}; add a version first.")
        settings = replace(current, version_policy=VersionPolicy.parse(policy))
        write_settings(repo, settings)
    return settings


def read_version_manifest(repo: str | os.PathLike, model_name: str, version: int):
    """The validated manifest of one served version (a ``cdface.core.manifest.ModelManifest``)."""
    from cdface.core.manifest import read_manifest

    return read_manifest(Path(repo) / model_name / str(version) / MANIFEST_FILE)
