"""Backbones by name: ``create_backbone("ir50", width=0.25)``."""

from cdface.training.backbones import iresnet as _iresnet  # noqa: F401  (registers the IResNet family)
from cdface.training.backbones.registry import create_backbone, list_backbones, register_backbone

__all__ = ["create_backbone", "list_backbones", "register_backbone"]
