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

The config is built as a ``ModelConfig`` protobuf (the schema Triton itself parses, shipped in
``tritonclient``) and written as protobuf text, so a misspelt field fails here rather than in the server.

Versions are immutable once written: a new export becomes a new version directory, older versions
stay on disk, and the config's ``version_policy`` decides which of them Triton serves.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeGuard, get_args

from cdface.core.atomic import atomic_write_text
from cdface.core.contract import INPUT_NAME, INPUT_SIZE, OUTPUT_NAME
from cdface.core.errors import CdfaceError

Backend = Literal["python", "onnxruntime_onnx", "tensorrt_plan"]
BACKENDS: tuple[Backend, ...] = get_args(Backend)


def is_backend(name: str) -> TypeGuard[Backend]:
    """Whether ``name`` is one of the backends cdface writes (narrows a user's string to ``Backend``)."""
    return name in BACKENDS


MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.pbtxt"

# The file Triton loads from each version directory, per backend.
_MODEL_FILE: dict[Backend, str] = {
    "onnxruntime_onnx": "model.onnx", "tensorrt_plan": "model.plan", "python": "model.py",
}
# Triton's (platform, backend) names for each of ours.
_TRITON_NAMES: dict[Backend, tuple[str, str]] = {
    "onnxruntime_onnx": ("onnxruntime_onnx", "onnxruntime"),
    "tensorrt_plan": ("tensorrt_plan", "tensorrt"),
    "python": ("", "python"),
}
_PYTHON_MODEL_SOURCE = Path(__file__).resolve().parent / "python_backend" / "model.py"

# Tunables used when neither the caller nor an existing config says otherwise.
DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_QUEUE_DELAY_US = 2000  # long enough to gather a batch, short next to a face model's latency
DEFAULT_INSTANCES = 1
DEFAULT_ORT_THREADS = 1  # python backend: one ONNX Runtime thread per instance; scale with instances

_MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _model_config_pb2():
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise CdfaceError("writing Triton configs needs tritonclient: pip install 'cdface[export]'.") from exc
    return model_config_pb2


# --------------------------------------------------------------------------------------------------
# Version policy
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions Triton serves: the newest N, all of them, or a fixed list.

    Written on the command line as ``latest``, ``latest:2``, ``all`` or ``specific:1,3``.
    """

    kind: Literal["latest", "all", "specific"] = "latest"
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    @classmethod
    def latest(cls, n: int = 1) -> "VersionPolicy":
        return cls("latest", num_versions=n)

    @classmethod
    def all(cls) -> "VersionPolicy":
        return cls("all")

    @classmethod
    def specific(cls, *versions: int) -> "VersionPolicy":
        return cls("specific", versions=tuple(versions))

    @classmethod
    def parse(cls, text: "str | VersionPolicy") -> "VersionPolicy":
        if isinstance(text, VersionPolicy):
            return text
        kind, _, arg = text.strip().partition(":")
        try:
            if kind == "latest":
                policy = cls.latest(int(arg) if arg else 1)
            elif kind == "all" and not arg:
                policy = cls.all()
            elif kind == "specific" and arg:
                policy = cls.specific(*(int(v) for v in arg.split(",")))
            else:
                raise ValueError
        except ValueError:
            raise CdfaceError(f"version policy {text!r} is not one of 'latest[:N]', 'all', 'specific:V1,V2'.") from None
        if policy.kind == "latest" and policy.num_versions < 1 or any(v < 1 for v in policy.versions):
            raise CdfaceError(f"version policy {text!r} must name positive numbers.")
        return policy

    def __str__(self) -> str:
        if self.kind == "latest":
            return f"latest:{self.num_versions}"
        if self.kind == "specific":
            return "specific:" + ",".join(map(str, self.versions))
        return "all"

    def apply(self, config) -> None:
        config.ClearField("version_policy")
        if self.kind == "latest":
            config.version_policy.latest.num_versions = self.num_versions
        elif self.kind == "all":
            config.version_policy.all.SetInParent()
        else:
            config.version_policy.specific.versions.extend(self.versions)

    @classmethod
    def from_config(cls, config) -> "VersionPolicy":
        which = config.version_policy.WhichOneof("policy_choice")
        if which == "all":
            return cls.all()
        if which == "specific":
            return cls.specific(*config.version_policy.specific.versions)
        if which == "latest":
            return cls.latest(config.version_policy.latest.num_versions)
        return cls.latest(1)  # Triton's default when the config says nothing

    def served(self, available: list[int]) -> list[int]:
        """The versions Triton would serve out of ``available``."""
        if self.kind == "latest":
            return sorted(available)[-self.num_versions:]
        if self.kind == "specific":
            return [v for v in sorted(available) if v in self.versions]
        return sorted(available)


# --------------------------------------------------------------------------------------------------
# config.pbtxt
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSettings:
    """Everything ``config.pbtxt`` says about one model (all its versions)."""

    name: str
    backend: Backend
    embedding_size: int
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    preferred_batch_sizes: tuple[int, ...] | None = None  # None: half the maximum and the maximum
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US
    dynamic_batching: bool = True
    instances: int = DEFAULT_INSTANCES
    gpus: tuple[int, ...] = ()  # GPU backends: which devices get instances; () = all of them
    # onnxruntime_onnx only: "cpu" puts its instances on CPU (a cluster trial without GPUs);
    # tensorrt_plan is GPU-only and the python backend always runs ONNX Runtime on CPU.
    device: Literal["gpu", "cpu"] = "gpu"
    version_policy: VersionPolicy = VersionPolicy()
    ort_threads: int = DEFAULT_ORT_THREADS  # python backend only

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise CdfaceError(f"unknown Triton backend {self.backend!r}; choose one of {', '.join(BACKENDS)}.")
        if not _MODEL_NAME_RE.match(self.name):
            raise CdfaceError(f"model name {self.name!r} must be letters, digits, '_', '-' or '.'.")
        if self.max_batch_size < 1:
            raise CdfaceError("max_batch_size must be at least 1 (the model is always served batched).")
        bad = [b for b in self.preferred if not 1 <= b <= self.max_batch_size]
        if bad:
            raise CdfaceError(f"preferred batch sizes {bad} must lie between 1 and "
                              f"max_batch_size {self.max_batch_size}.")
        if self.device not in ("gpu", "cpu"):
            raise CdfaceError(f"device must be gpu or cpu, not {self.device!r}.")
        if self.backend == "tensorrt_plan" and self.device == "cpu":
            raise CdfaceError("a TensorRT plan runs only on a GPU; use onnxruntime_onnx or python for CPU instances.")
        if self.queue_delay_us < 0 or self.instances < 1 or self.ort_threads < 1 or self.embedding_size < 1:
            raise CdfaceError("queue delay must be >= 0 and instances, threads and embedding size >= 1.")

    @property
    def preferred(self) -> tuple[int, ...]:
        if self.preferred_batch_sizes is not None:
            return tuple(sorted(set(self.preferred_batch_sizes)))
        return tuple(sorted({max(1, self.max_batch_size // 2), self.max_batch_size}))

    def to_proto(self):
        self.validate()
        mc = _model_config_pb2()
        platform, backend = _TRITON_NAMES[self.backend]
        config = mc.ModelConfig(name=self.name, backend=backend, max_batch_size=self.max_batch_size)
        if platform:
            config.platform = platform
        self.version_policy.apply(config)
        # Dims exclude the batch dimension: Triton adds it because max_batch_size > 0.
        config.input.add(name=INPUT_NAME, data_type=mc.TYPE_UINT8, dims=[INPUT_SIZE, INPUT_SIZE, 3])
        config.output.add(name=OUTPUT_NAME, data_type=mc.TYPE_FP32, dims=[self.embedding_size])
        if self.backend == "python":
            config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=self.instances)
            config.parameters["intra_op_threads"].string_value = str(self.ort_threads)
            config.parameters["inter_op_threads"].string_value = "1"
        elif self.device == "cpu":
            config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=self.instances)
        else:
            config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=self.instances, gpus=list(self.gpus))
        if self.dynamic_batching:
            config.dynamic_batching.preferred_batch_size.extend(self.preferred)
            config.dynamic_batching.max_queue_delay_microseconds = self.queue_delay_us
        return config

    def to_pbtxt(self) -> str:
        from google.protobuf import text_format

        header = (f"# Triton model configuration for {self.name!r}, written by cdface (export/triton_repo.py).\n"
                  "# Regenerate it with `cdface export triton` rather than editing it by hand.\n")
        return header + text_format.MessageToString(self.to_proto())

    @classmethod
    def from_proto(cls, config) -> "ModelSettings":
        backend = next((ours for ours, (plat, be) in _TRITON_NAMES.items()
                        if (plat and config.platform == plat) or config.backend == be), None)
        if backend is None:
            raise CdfaceError(f"model {config.name!r} uses a backend cdface does not write "
                              f"({config.platform or config.backend!r}).")
        threads = config.parameters["intra_op_threads"].string_value if "intra_op_threads" in config.parameters else ""
        return cls(
            name=config.name,
            backend=backend,
            embedding_size=int(config.output[0].dims[-1]) if config.output else 0,
            max_batch_size=config.max_batch_size,
            preferred_batch_sizes=tuple(config.dynamic_batching.preferred_batch_size),
            queue_delay_us=config.dynamic_batching.max_queue_delay_microseconds,
            dynamic_batching=config.HasField("dynamic_batching"),
            instances=config.instance_group[0].count if config.instance_group else 1,
            gpus=tuple(config.instance_group[0].gpus) if config.instance_group else (),
            device="cpu" if config.instance_group and config.instance_group[0].kind == config.instance_group[0].KIND_CPU
            else "gpu",
            version_policy=VersionPolicy.from_config(config),
            ort_threads=int(threads or DEFAULT_ORT_THREADS),
        )


def parse_config(text: str):
    """Parse ``config.pbtxt`` text into Triton's ``ModelConfig`` protobuf."""
    from google.protobuf import text_format

    mc = _model_config_pb2()
    try:
        return text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError as exc:
        raise CdfaceError(f"config.pbtxt is not a valid Triton model configuration: {exc}.") from None


def read_settings(repo: str | os.PathLike, model_name: str) -> ModelSettings | None:
    """The settings in ``<repo>/<model>/config.pbtxt``, or None when the model has no config yet."""
    path = Path(repo) / model_name / CONFIG_FILE
    if not path.exists():
        return None
    return ModelSettings.from_proto(parse_config(path.read_text()))


def write_settings(repo: str | os.PathLike, settings: ModelSettings) -> Path:
    path = Path(repo) / settings.name / CONFIG_FILE
    atomic_write_text(path, settings.to_pbtxt())
    return path


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
    if not _MODEL_NAME_RE.match(model_name):
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
