"""Triton's model configuration (``config.pbtxt``) for the face model, as typed settings.

``ModelSettings`` holds what cdface decides per model - backend, batching, instances, the version
policy - and turns it into a ``ModelConfig`` protobuf (the schema Triton itself parses, shipped in
``tritonclient``) written as protobuf text, so a misspelt field fails here rather than in the server.
Reading a config back gives the same settings, so a new version keeps the model's tuning.

Three backends, one contract: input ``images`` uint8 [112, 112, 3] and output ``embedding`` float32
[D], batched on the first dimension. ``onnxruntime_onnx`` and ``tensorrt_plan`` are for GPU nodes
(KIND_GPU instances); ``python`` runs the same ONNX file in ONNX Runtime on CPU, for servers that have
only the Python backend (the ``tritonserver`` in the ``nvidia-pytriton`` wheel).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeGuard, get_args

from cdface.core.atomic import atomic_write_text
from cdface.core.contract import INPUT_NAME, INPUT_SIZE, OUTPUT_NAME
from cdface.core.errors import CdfaceError
from cdface.core.manifest import NAME_PATTERN

Backend = Literal["python", "onnxruntime_onnx", "tensorrt_plan"]
BACKENDS: tuple[Backend, ...] = get_args(Backend)


def is_backend(name: str) -> TypeGuard[Backend]:
    """Whether ``name`` is one of the backends cdface writes (narrows a user's string to ``Backend``)."""
    return name in BACKENDS


CONFIG_FILE = "config.pbtxt"

# Triton's (platform, backend) names for each of ours.
_TRITON_NAMES: dict[Backend, tuple[str, str]] = {
    "onnxruntime_onnx": ("onnxruntime_onnx", "onnxruntime"),
    "tensorrt_plan": ("tensorrt_plan", "tensorrt"),
    "python": ("", "python"),
}

# Tunables used when neither the caller nor an existing config says otherwise.
DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_QUEUE_DELAY_US = 2000  # long enough to gather a batch, short next to a face model's latency
DEFAULT_INSTANCES = 1
DEFAULT_ORT_THREADS = 1  # python backend: one ONNX Runtime thread per instance; scale with instances

MODEL_NAME_RE = re.compile(NAME_PATTERN)  # the manifest's rule: Triton model names are manifest names


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
    # onnxruntime_onnx on GPU only: ONNX Runtime's TensorRT accelerator, engines (FP16) built by Triton for its
    # own GPU when a version loads and kept in this directory, so a newly published version needs no engine
    # built beforehand, and a pod restart reuses them. None: ONNX Runtime's CUDA provider.
    tensorrt_cache: str | None = None

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise CdfaceError(f"unknown Triton backend {self.backend!r}; choose one of {', '.join(BACKENDS)}.")
        if not MODEL_NAME_RE.match(self.name):
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
        if self.tensorrt_cache is not None and (self.backend != "onnxruntime_onnx" or self.device != "gpu"):
            raise CdfaceError("the TensorRT accelerator (an engine cache) is for onnxruntime_onnx on GPU instances; "
                              "tensorrt_plan serves a prebuilt engine and the python backend runs on CPU.")
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
        if self.tensorrt_cache is not None:
            config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt", parameters={
                "precision_mode": "FP16", "trt_engine_cache_enable": "true",
                "trt_engine_cache_path": self.tensorrt_cache})
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
            tensorrt_cache=next((a.parameters.get("trt_engine_cache_path", "") for a in
                                 config.optimization.execution_accelerators.gpu_execution_accelerator
                                 if a.name == "tensorrt"), None),
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
