"""TensorRT engines from the exported ONNX, built once per (model, GPU, TensorRT, precision, profile).

An engine is only valid for the GPU model and TensorRT version that built it, and building one
takes minutes, so engines are cached under a key of everything that changes the result:

    onnx sha256 | GPU name | TensorRT version | precision | optimisation profile (+ workspace)

The cache file is ``<key digest>.plan`` with a ``.json`` sidecar holding the key. When several
GPUs (or pods sharing a volume) start together, the first takes a file lock and builds; the
others wait on the lock, then find the finished engine and load it. A changed key is a new file,
so a new model or driver upgrade rebuilds instead of loading a stale engine.

TensorRT itself is imported only inside :func:`build_engine` (it cannot be installed on the CPU
machines); everything else here - keys, profile validation, the lock protocol - runs anywhere and
is what the unit tests cover, with an injected build function standing in for TensorRT.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np

from cdface.core.atomic import atomic_write_bytes, atomic_write_text
from cdface.core.contract import INPUT_NAME, INPUT_SIZE
from cdface.core.digest import sha256_bytes, sha256_file
from cdface.core.errors import CdfaceError
from cdface.core.imaging import read_aligned_crop

Precision = Literal["fp32", "fp16", "int8"]
PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_LOCK_TIMEOUT_S = 3600.0  # an IR-100 INT8 build with calibration can take tens of minutes

# A build function turns (onnx path, key) into serialized engine bytes. The real one is
# `build_engine`; tests pass a stand-in for it, so the cache and lock logic run without a GPU.
BuildFn = Callable[[Path, "EngineKey"], bytes]


@dataclass(frozen=True)
class Profile:
    """The batch sizes an engine accepts (TensorRT optimisation profile on ``images``)."""

    min_batch: int = 1
    opt_batch: int = 32
    max_batch: int = 128
    input_size: int = INPUT_SIZE

    def __post_init__(self) -> None:
        for field in ("min_batch", "opt_batch", "max_batch", "input_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise CdfaceError(f"{field.replace('_', '-')} must be a positive integer, got {value!r}")
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise CdfaceError(
                "the profile needs min-batch <= opt-batch <= max-batch, "
                f"got {self.min_batch}, {self.opt_batch}, {self.max_batch}"
            )

    def shapes(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) shapes of the uint8 NHWC input."""
        side = self.input_size
        return (self.min_batch, side, side, 3), (self.opt_batch, side, side, 3), (self.max_batch, side, side, 3)


@dataclass(frozen=True)
class EngineKey:
    onnx_sha256: str
    gpu_name: str
    tensorrt_version: str
    precision: Precision
    profile: Profile
    workspace_gb: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def digest(self) -> str:
        canonical = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return sha256_bytes(canonical.encode())

    @property
    def filename(self) -> str:
        return f"{self.digest[:24]}.plan"


def engine_key(
    onnx_path: str | os.PathLike,
    *,
    precision: Precision,
    profile: Profile,
    workspace_gb: float = 4.0,
    gpu_name: str | None = None,
    tensorrt_version: str | None = None,
    calib_digest: str | None = None,
) -> EngineKey:
    """The cache key. GPU name and TensorRT version default to what this machine has."""
    if precision not in PRECISIONS:
        raise CdfaceError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if not workspace_gb > 0:
        raise CdfaceError(f"workspace must be a positive number of GiB, got {workspace_gb!r}")
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise CdfaceError(f"ONNX model not found: {onnx_path}")
    digest = sha256_file(onnx_path)
    if precision == "int8" and calib_digest:
        # INT8 scales depend on the calibration images: a different set is a different engine.
        digest = sha256_bytes(f"{digest}:{calib_digest}".encode())
    return EngineKey(
        onnx_sha256=digest,
        gpu_name=gpu_name if gpu_name is not None else current_gpu_name(),
        tensorrt_version=tensorrt_version if tensorrt_version is not None else _tensorrt().__version__,
        precision=precision,
        profile=profile,
        workspace_gb=float(workspace_gb),
    )


def cached_engine(
    cache_dir: str | os.PathLike,
    onnx_path: str | os.PathLike,
    key: EngineKey,
    build: BuildFn,
    *,
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
) -> tuple[Path, bool]:
    """The engine for ``key`` from ``cache_dir``, building it with ``build`` if absent.

    Returns (engine path, whether this call built it). Safe across processes: the build runs
    under ``<digest>.lock``; whoever waited re-checks the cache after getting the lock.
    """
    from filelock import FileLock, Timeout

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    engine = cache_dir / key.filename
    sidecar = engine.with_suffix(".json")
    if _valid(engine, sidecar, key):  # the common case: no lock needed to read a finished engine
        return engine, False
    try:
        with FileLock(str(engine.with_suffix(".lock")), timeout=lock_timeout_s):
            if _valid(engine, sidecar, key):  # someone else built it while we waited
                return engine, False
            started = time.monotonic()
            data = build(Path(onnx_path), key)
            if not data:
                raise CdfaceError("the TensorRT build produced no engine")
            # Engine first, sidecar last: a sidecar is the mark of a complete engine.
            atomic_write_bytes(engine, data)
            record = {"key": key.as_dict(), "digest": key.digest, "engine_sha256": sha256_bytes(data),
                      "build_seconds": round(time.monotonic() - started, 3)}
            atomic_write_text(sidecar, json.dumps(record, indent=2) + "\n")
            return engine, True
    except Timeout:
        raise CdfaceError(
            f"waited {lock_timeout_s:.0f} s for another process to build {engine.name}; "
            f"remove {engine.with_suffix('.lock')} if no build is running"
        ) from None


def _valid(engine: Path, sidecar: Path, key: EngineKey) -> bool:
    if not (engine.is_file() and sidecar.is_file()):
        return False
    try:
        record = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return record.get("digest") == key.digest and record.get("engine_sha256") == sha256_file(engine)


# ----------------------------------------------------------------------------------------------
# TensorRT (guarded)


def _tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise CdfaceError(
            "TensorRT is not installed here: build engines where it exists (the NGC TensorRT or Triton image, "
            "or `pip install tensorrt` from NVIDIA's index on a CUDA machine)"
        ) from None
    return trt


def current_gpu_name(device: int = 0) -> str:
    """The CUDA device's product name, from torch when it sees a GPU, else from nvidia-smi."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(device)
    except ImportError:
        pass
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", f"--id={device}", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True)
        name = out.stdout.strip().splitlines()[0].strip()
        if name:
            return name
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    raise CdfaceError("no CUDA GPU found: TensorRT engines are built on the GPU that will run them")


def read_calibration_images(calib_dir: str | os.PathLike, input_size: int = INPUT_SIZE,
                            limit: int = 1024) -> np.ndarray:
    """Aligned crops (JPEG, PNG or WebP files) from ``calib_dir`` as uint8 [N, S, S, 3] RGB."""
    calib_dir = Path(calib_dir)
    files = sorted(p for p in calib_dir.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".webp"})[:limit]
    if not files:
        raise CdfaceError(f"no calibration images (jpg/png/webp) found in {calib_dir}")
    return np.stack([read_aligned_crop(path, input_size) for path in files])


def calibration_digest(calib_dir: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(calib_dir).rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(calib_dir).as_posix().encode())
            digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def _make_calibrator(trt, images: np.ndarray, batch_size: int, cache_file: Path):
    """An IInt8EntropyCalibrator2 feeding uint8 crops in batches, with a calibration cache file."""
    import torch  # device buffers: torch is already a dependency of the export stage

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            super().__init__()  # TensorRT requires the base initialiser to run explicitly
            self.position = 0
            self.device_batch = torch.empty((batch_size, *images.shape[1:]), dtype=torch.uint8, device="cuda")

        def get_batch_size(self) -> int:
            return batch_size

        def get_batch(self, names):  # noqa: ARG002 - one input, `images`
            if self.position + batch_size > len(images):
                return None  # calibration done
            chunk = torch.from_numpy(images[self.position:self.position + batch_size])
            self.device_batch.copy_(chunk)
            self.position += batch_size
            return [int(self.device_batch.data_ptr())]

        def read_calibration_cache(self):
            return cache_file.read_bytes() if cache_file.is_file() else None

        def write_calibration_cache(self, cache) -> None:
            atomic_write_bytes(cache_file, bytes(cache))

    return EntropyCalibrator()


def build_engine(
    onnx_path: str | os.PathLike,
    *,
    precision: Precision,
    profile: Profile,
    workspace_gb: float = 4.0,
    calib_dir: str | os.PathLike | None = None,
    calib_cache: str | os.PathLike | None = None,
    calib_batch: int = 32,
) -> bytes:
    """Parse the ONNX file and build a serialized engine with NVIDIA's Python API."""
    trt = _tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit-batch (the flag is deprecated); 8.x needs it set.
    flags = 0
    if int(trt.__version__.split(".")[0]) < 10:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CdfaceError(f"TensorRT cannot parse {onnx_path}: {errors[:300]}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(INPUT_NAME, *profile.shapes())
    config.add_optimization_profile(opt_profile)

    if precision in ("fp16", "int8"):
        # Deprecated in TensorRT 10 (every supported GPU has fast FP16); still checked where it exists.
        if getattr(builder, "platform_has_fast_fp16", True) is False:
            raise CdfaceError("this GPU has no fast FP16; build with --precision fp32")
        config.set_flag(trt.BuilderFlag.FP16)  # INT8 engines fall back to FP16, not FP32, where INT8 cannot run
    if precision == "int8":
        if calib_dir is None:
            raise CdfaceError("INT8 needs calibration images: pass --calib-dir with aligned 112x112 crops")
        images = read_calibration_images(calib_dir, profile.input_size)
        batch = max(1, min(calib_batch, len(images), profile.max_batch))
        cache_file = Path(calib_cache) if calib_cache else Path(onnx_path).with_suffix(".calib")
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = _make_calibrator(trt, images, batch, cache_file)
        # With a dynamic batch, calibration runs at one fixed shape: the calibration batch.
        calib_profile = builder.create_optimization_profile()
        shape = (batch, profile.input_size, profile.input_size, 3)
        calib_profile.set_shape(INPUT_NAME, shape, shape, shape)
        config.set_calibration_profile(calib_profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CdfaceError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    return bytes(serialized)


def build_cached_engine(
    onnx_path: str | os.PathLike,
    cache_dir: str | os.PathLike,
    *,
    precision: Precision = "fp16",
    profile: Profile = Profile(),
    workspace_gb: float = 4.0,
    calib_dir: str | os.PathLike | None = None,
    build: BuildFn | None = None,
    gpu_name: str | None = None,
    tensorrt_version: str | None = None,
) -> tuple[Path, bool]:
    """The engine for this model on this GPU: from the cache, or built (by one process) and cached.

    ``build`` defaults to TensorRT (:func:`build_engine`); tests inject a stand-in.
    """
    if precision == "int8" and calib_dir is None:
        raise CdfaceError("INT8 needs calibration images: pass --calib-dir with aligned 112x112 crops")
    if build is None:
        _tensorrt()  # fail with the clear message before looking for a GPU

        def build(path: Path, key: EngineKey) -> bytes:
            calib_cache = Path(cache_dir) / f"{key.digest[:24]}.calib"
            return build_engine(path, precision=key.precision, profile=key.profile, workspace_gb=key.workspace_gb,
                                calib_dir=calib_dir, calib_cache=calib_cache)

    key = engine_key(
        onnx_path, precision=precision, profile=profile, workspace_gb=workspace_gb, gpu_name=gpu_name,
        tensorrt_version=tensorrt_version, calib_digest=calibration_digest(calib_dir) if calib_dir else None,
    )
    return cached_engine(cache_dir, onnx_path, key, build)
