"""The model manifest: the JSON file beside every exported model, and the only thing serving trusts.

An exported model is a directory holding ``model.onnx`` and ``manifest.json``. The manifest says
what the graph expects (uint8 NHWC RGB crops, normalisation folded in), what it returns
(L2-normalised float32 embeddings of ``embedding_size``), where it came from (a trained checkpoint
and the digest of its training configuration, or a wrapped third-party model and its licence),
how well it verified, the thresholds to use at each target false accept rate, and the sha256 of
the ONNX file, so a server can refuse a model file that is not the one described.

Torch-free on purpose: serving imports it.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cdface.core.atomic import atomic_write_bytes, atomic_write_text
from cdface.core.contract import INPUT_NAME, INPUT_SIZE, OUTPUT_NAME
from cdface.core.digest import sha256_bytes, sha256_file
from cdface.core.errors import CdfaceError

FORMAT: Final = "cdface-model/1"  # Final keeps the literal type the manifest field needs
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
ONNX_FILENAME = "model.onnx"
MANIFEST_FILENAME = "manifest.json"


class _Strict(BaseModel):
    # A manifest with fields we do not know is from a newer or a foreign writer: refuse, don't guess.
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    name: str = Field(INPUT_NAME, pattern=f"^{INPUT_NAME}$")  # the contract's one input
    dtype: Literal["uint8"] = "uint8"
    layout: Literal["NHWC"] = "NHWC"
    shape: list[int] = Field(default_factory=lambda: [-1, INPUT_SIZE, INPUT_SIZE, 3])
    pixel_format: Literal["RGB"] = "RGB"

    @field_validator("shape")
    @classmethod
    def _nhwc(cls, shape: list[int]) -> list[int]:
        if len(shape) != 4 or shape[0] != -1 or shape[3] != 3 or min(shape[1:]) < 1:
            raise ValueError("input shape must be [-1, H, W, 3] (dynamic batch, three channels)")
        return shape


class Normalisation(_Strict):
    """What the graph does to pixel values before the network: ``(pixel - mean) / std``, per RGB channel."""

    folded: Literal[True] = True
    mean: list[float]
    std: list[float]

    @field_validator("mean", "std")
    @classmethod
    def _three(cls, values: list[float]) -> list[float]:
        if len(values) != 3:
            raise ValueError("give one value per RGB channel")
        return values

    @field_validator("std")
    @classmethod
    def _nonzero(cls, values: list[float]) -> list[float]:
        if any(v == 0 for v in values):
            raise ValueError("std must be non-zero")
        return values


class OutputSpec(_Strict):
    name: str = Field(OUTPUT_NAME, pattern=f"^{OUTPUT_NAME}$")  # the contract's one output
    dtype: Literal["float32"] = "float32"
    shape: list[int]
    l2_normalised: Literal[True] = True


class Evaluation(_Strict):
    """An evaluation report: free-form per-benchmark results and a threshold per target FAR."""

    results: list[dict[str, Any]] = Field(default_factory=list)
    thresholds: dict[str, float] = Field(default_factory=dict)

    @field_validator("thresholds")
    @classmethod
    def _far_keys(cls, thresholds: dict[str, float]) -> dict[str, float]:
        for key in thresholds:
            try:
                far = float(key)
            except ValueError:
                raise ValueError(f"threshold key {key!r} is not a false accept rate like '1e-3'") from None
            if not 0.0 < far < 1.0:
                raise ValueError(f"threshold key {key!r} is not a false accept rate in (0, 1)")
        return thresholds

    def threshold_at(self, far: float) -> float:
        """The verification threshold for ``far``; a KeyError names the FARs the report has."""
        for key, value in self.thresholds.items():
            if abs(float(key) - far) <= 1e-12 * max(far, 1e-300):
                return value
        raise KeyError(f"no threshold at FAR {far:g}; the report has {sorted(self.thresholds)}")


class Source(_Strict):
    kind: Literal["checkpoint", "wrapped"]
    path: str
    sha256: str
    licence: str | None = None
    url: str | None = None


class ModelManifest(_Strict):
    format: Literal["cdface-model/1"] = FORMAT
    name: str = Field(min_length=1, pattern=NAME_PATTERN)
    version: int = Field(ge=1)
    backbone: str
    embedding_size: int = Field(ge=1)
    input: InputSpec = Field(default_factory=InputSpec)
    normalisation: Normalisation
    output: OutputSpec
    flip_augmented: bool = False
    config_digest: str | None = None
    evaluation: Evaluation | None = None
    onnx_file: str = ONNX_FILENAME
    onnx_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    opset: int | None = None
    source: Source
    created: _dt.datetime

    @model_validator(mode="after")
    def _consistent(self) -> "ModelManifest":
        if self.output.shape != [-1, self.embedding_size]:
            raise ValueError(f"output shape {self.output.shape} does not match embedding_size {self.embedding_size}")
        return self


# ----------------------------------------------------------------------------------------------
# helpers


def config_digest(config: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a training configuration (sorted keys, no whitespace)."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return sha256_bytes(canonical.encode("utf-8"))


def check_name_version(name: str, version: int) -> None:
    """Fail fast, before an export does any work, on a name or version the manifest would refuse."""
    if not re.match(NAME_PATTERN, name or ""):
        raise CdfaceError(f"model name {name!r} must start with a letter or digit "
                          "and use only letters, digits, '_', '.', '-'")
    if not isinstance(version, int) or version < 1:
        raise CdfaceError(f"model version must be a positive integer, got {version!r}")


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)


def read_eval_report(path: str | os.PathLike) -> Evaluation:
    """Read ``{"results": [...], "thresholds": {"1e-3": t, ...}}`` written by the evaluation stage."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CdfaceError(f"evaluation report not found: {path}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise CdfaceError(f"evaluation report {path} is not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CdfaceError(f"evaluation report {path} must hold a JSON object")
    try:
        return Evaluation.model_validate({"results": data.get("results", []), "thresholds": data.get("thresholds", {})})
    except ValidationError as exc:
        raise CdfaceError(f"evaluation report {path} is invalid: {_one_line(exc)}") from None


def _one_line(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors())


# ----------------------------------------------------------------------------------------------
# reading and writing


def write_manifest(path: str | os.PathLike, manifest: ModelManifest) -> Path:
    path = Path(path)
    atomic_write_text(path, manifest.model_dump_json(indent=2) + "\n")
    return path


def read_manifest(path: str | os.PathLike) -> ModelManifest:
    """Read and validate a manifest file, or a model directory holding ``manifest.json``."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_FILENAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise CdfaceError(f"model manifest not found: {path}") from None
    try:
        return ModelManifest.model_validate_json(text)
    except ValidationError as exc:
        raise CdfaceError(f"model manifest {path} is invalid: {_one_line(exc)}") from None


def verify_onnx_hash(manifest: ModelManifest, onnx_path: str | os.PathLike) -> None:
    """Raise unless ``onnx_path`` is byte for byte the file the manifest describes."""
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise CdfaceError(f"model file not found: {onnx_path}")
    actual = sha256_file(onnx_path)
    if actual != manifest.onnx_sha256:
        raise CdfaceError(
            f"model file {onnx_path} does not match its manifest (sha256 {actual[:12]}..., "
            f"manifest says {manifest.onnx_sha256[:12]}...)"
        )


@dataclass(frozen=True)
class ExportResult:
    onnx_path: Path
    manifest_path: Path
    manifest: ModelManifest


def publish_model(out_dir: str | os.PathLike, onnx_bytes: bytes, *, name: str, version: int, backbone: str,
                  embedding_size: int, mean: list[float], std: list[float], source: Source, opset: int | None,
                  flip_augmented: bool = False, config_digest: str | None = None,
                  evaluation: Evaluation | None = None) -> ExportResult:
    """Describe ``onnx_bytes`` with a manifest and write both into ``out_dir``: how every export is published.

    ``mean``/``std``: what the graph does to RGB pixel values before the network. The ONNX file
    goes first, each file atomically: whoever finds a manifest also finds the file it describes,
    and a reader that sees an older manifest beside a newer ONNX file is stopped by the hash check.
    """
    manifest = ModelManifest(
        name=name, version=version, backbone=backbone, embedding_size=embedding_size,
        normalisation=Normalisation(mean=list(mean), std=list(std)), output=OutputSpec(shape=[-1, embedding_size]),
        flip_augmented=flip_augmented, config_digest=config_digest, evaluation=evaluation,
        onnx_sha256=sha256_bytes(onnx_bytes), opset=opset, source=source, created=utc_now(),
    )
    out_dir = Path(out_dir)
    onnx_path = out_dir / manifest.onnx_file
    atomic_write_bytes(onnx_path, onnx_bytes)
    manifest_path = write_manifest(out_dir / MANIFEST_FILENAME, manifest)
    return ExportResult(onnx_path, manifest_path, manifest)
