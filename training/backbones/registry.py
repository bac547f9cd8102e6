"""A name -> constructor registry, so configs and checkpoints refer to backbones by name."""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

from cdface.core.errors import CdfaceError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def decorate(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn

    return decorate


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


def create_backbone(name: str, **kwargs) -> nn.Module:
    try:
        fn = _REGISTRY[name]
    except KeyError:
        raise CdfaceError(f"unknown backbone {name!r}; known: {', '.join(list_backbones())}") from None
    return fn(**kwargs)
