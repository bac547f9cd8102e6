"""Shared pieces of the trainer tests: a tiny image-folder dataset, a BN-free backbone, a DDP worker.

The BN-free backbone exists because batch-norm statistics are per rank by design (and SyncBatchNorm
needs CUDA), so only a model without BN can show that 2 ranks and 1 rank take identical steps.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from cdface.training.backbones import list_backbones, register_backbone


def write_tiny_folder_dataset(root: Path, identities: int = 8, per_identity: int = 8, seed: int = 0) -> Path:
    """Identity folders of noisy 112x112 JPEGs around a per-identity base image."""
    rng = np.random.default_rng(seed)
    for i in range(identities):
        folder = root / f"id{i:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, (112, 112, 3))
        for j in range(per_identity):
            image = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(folder / f"{j:03d}.jpg", quality=95)
    return root


class NoNormNet(nn.Module):
    def __init__(self, embedding_size: int = 16, width: float = 1.0, dropout: float = 0.0):
        super().__init__()
        c = max(int(8 * width), 4)
        self.body = nn.Sequential(
            nn.Conv2d(3, c, 5, stride=4, padding=2), nn.PReLU(c),
            nn.Conv2d(c, c, 3, stride=2, padding=1), nn.PReLU(c),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Dropout(dropout), nn.Linear(c * 16, embedding_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


if "test_nonorm" not in list_backbones():
    register_backbone("test_nonorm")(NoNormNet)


def ddp_worker(rank: int, world_size: int, port: int, overrides: list[str], preset: str, out_dir: str) -> None:
    """One rank, started the way torchrun would start it: through the environment."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from cdface.training.config import load_config
    from cdface.training.trainer import train

    result = train(load_config(preset, overrides))
    torch.save({"bank": result.bank, "steps": result.steps}, Path(out_dir) / f"rank{rank}.pt")
