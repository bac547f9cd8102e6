"""Typed configuration: a pydantic model, filled from a YAML preset, the environment and the CLI.

Precedence, lowest first: the model's defaults, the preset file, ``<PREFIX>SECTION__KEY``
environment variables, then ``--set section.key=value`` arguments. Values are parsed as YAML
scalars/lists so ``--set optim.milestones=[10,18,22]`` and ``--set run.amp=bf16`` both work.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from cdface.core.errors import CdfaceError

M = TypeVar("M", bound=BaseModel)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = [k for k in dotted.split(".") if k]
    if not keys:
        raise CdfaceError(f"empty configuration key in override {dotted!r}")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise CdfaceError(f"cannot set {dotted!r}: {key!r} is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise CdfaceError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def env_overrides(prefix: str, environ: Mapping[str, str] | None = None) -> list[tuple[str, Any]]:
    """``CDFACE_TRAIN__OPTIM__LR=0.05`` -> ``("optim.lr", 0.05)`` for prefix ``CDFACE_TRAIN__``."""
    environ = os.environ if environ is None else environ
    out = []
    for name, raw in sorted(environ.items()):
        if name.startswith(prefix) and len(name) > len(prefix):
            dotted = ".".join(part.lower() for part in name[len(prefix):].split("__"))
            out.append(parse_override(f"{dotted}={raw}"))
    return out


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise CdfaceError(f"configuration file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise CdfaceError(f"configuration file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CdfaceError(f"configuration file {path} must hold a mapping at the top level")
    return data


def build_config(
    model: type[M],
    base: dict | None = None,
    overrides: Iterable[str] = (),
    env_prefix: str | None = None,
) -> M:
    """Validate ``base`` + environment + CLI overrides into ``model``; errors become one readable line."""
    tree: dict = yaml.safe_load(yaml.safe_dump(base or {}))  # deep copy of plain data
    pairs = env_overrides(env_prefix) if env_prefix else []
    pairs += [parse_override(o) for o in overrides]
    for key, value in pairs:
        _set_dotted(tree, key, value)
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise CdfaceError(f"invalid configuration: {problems}") from None
