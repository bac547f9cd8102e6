"""The one definition of uint8 face crops -> backbone input, shared by data loading, evaluation and export."""

from __future__ import annotations

import torch

from cdface.core.contract import PIXEL_MEAN, PIXEL_STD


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, 3] RGB -> float32 [N, 3, H, W] scaled to [-1, 1]."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 [N, H, W, 3] RGB images, got {images.dtype} {tuple(images.shape)}")
    # contiguous(): the permuted view has channels-last strides, and on CPU (torch 2.13) the
    # backward of a strided 1x1 convolution in that layout crashes the process.
    return ((images.permute(0, 3, 1, 2).float() - PIXEL_MEAN) / PIXEL_STD).contiguous()
