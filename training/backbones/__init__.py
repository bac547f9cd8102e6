"""Backbones by name: ``create_backbone("ir50", width=0.25)``."""

from training.backbones.registry import create_backbone, list_backbones, register_backbone
from training.backbones import iresnet as _iresnet  # noqa: F401  (registers the IResNet family)

__all__ = ["create_backbone", "list_backbones", "register_backbone"]
