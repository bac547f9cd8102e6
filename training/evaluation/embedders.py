"""Model-agnostic embedding: anything that maps aligned face crops to vectors can be evaluated.

An *embedder* is a callable ``embed(images: uint8 [N, 112, 112, 3] RGB) -> float32 [N, D]`` (not necessarily
normalised). ``TorchEmbedder`` wraps a live backbone or a checkpoint, ``OnnxEmbedder`` an exported graph;
``open_embedder`` picks one by file suffix. ``embed_images`` / ``embed_files`` add the evaluation protocol on
top: batching, a progress bar, flip augmentation and L2 normalisation.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from cdface.core.contract import INPUT_NAME, OUTPUT_NAME
from cdface.core.errors import CdfaceError
from cdface.core.imaging import read_aligned_crop

Embedder = Callable[[np.ndarray], np.ndarray]

CHECKPOINT_SUFFIXES = (".pt", ".pth")
ONNX_SUFFIXES = (".onnx",)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def _check_images(images: np.ndarray) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 [N, H, W, 3] RGB images, got {images.dtype} {images.shape}")


class TorchEmbedder:
    """A PyTorch backbone as an embedder: ``to_model_input`` then the model, in eval mode, without autograd.

    A live training model can be passed: its train/eval mode is restored after each call.
    """

    def __init__(self, model, device: str = "cpu", batch_size: int = 64):
        import torch

        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.batch_size = batch_size

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str = "cpu", batch_size: int = 64) -> "TorchEmbedder":
        from cdface.training.checkpoint import load_backbone

        model, _ = load_backbone(path, map_location="cpu")
        return cls(model, device=device, batch_size=batch_size)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        import torch

        from cdface.training.preprocess import to_model_input

        _check_images(images)
        was_training = self.model.training
        self.model.eval()
        outputs = []
        try:
            with torch.inference_mode():
                for start in range(0, images.shape[0], self.batch_size):
                    batch = torch.from_numpy(np.ascontiguousarray(images[start : start + self.batch_size]))
                    batch = to_model_input(batch.to(self.device, non_blocking=True))
                    outputs.append(self.model(batch).float().cpu().numpy())
        finally:
            self.model.train(was_training)
        if not outputs:
            return np.zeros((0, 0), dtype=np.float32)
        return np.concatenate(outputs).astype(np.float32, copy=False)


class OnnxEmbedder:
    """An exported ONNX graph (input ``images`` uint8 [N,112,112,3], output ``embedding`` float32 [N,D])."""

    def __init__(self, path: str | os.PathLike, batch_size: int = 64, device: str = "cpu"):
        try:
            import onnxruntime as ort
        except ImportError:
            raise CdfaceError("evaluating an ONNX model needs onnxruntime: pip install 'cdface[export]'") from None
        path = Path(path)
        if not path.is_file():
            raise CdfaceError(f"ONNX model not found: {path}")
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise CdfaceError("--device cuda asked for, but this onnxruntime has no CUDA provider")
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(path), providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise CdfaceError(f"{path} is not a loadable ONNX model ({type(exc).__name__})") from None
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if INPUT_NAME not in inputs or OUTPUT_NAME not in outputs:
            raise CdfaceError(
                f"{path} does not follow the cdface ONNX contract (input {INPUT_NAME!r}, output {OUTPUT_NAME!r}); "
                f"it has inputs {inputs} and outputs {outputs}"
            )
        self.batch_size = batch_size

    def __call__(self, images: np.ndarray) -> np.ndarray:
        _check_images(images)
        outputs = []
        for start in range(0, images.shape[0], self.batch_size):
            batch = np.ascontiguousarray(images[start : start + self.batch_size])
            outputs.append(self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0])
        if not outputs:
            return np.zeros((0, 0), dtype=np.float32)
        return np.concatenate(outputs).astype(np.float32, copy=False)


def open_embedder(path: str | os.PathLike, device: str = "cpu", batch_size: int = 64) -> Embedder:
    """A ``.pt``/``.pth`` checkpoint -> ``TorchEmbedder``; ``.onnx`` -> ``OnnxEmbedder``."""
    path = Path(path)
    if not path.is_file():
        raise CdfaceError(f"model not found: {path}")
    suffix = path.suffix.lower()
    if suffix in CHECKPOINT_SUFFIXES:
        if device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise CdfaceError("--device cuda asked for, but torch sees no CUDA device")
        return TorchEmbedder.from_checkpoint(path, device=device, batch_size=batch_size)
    if suffix in ONNX_SUFFIXES:
        return OnnxEmbedder(path, batch_size=batch_size, device=device)
    raise CdfaceError(f"cannot tell the model type of {path}: expected a .pt checkpoint or an .onnx file")


def l2_normalize(embeddings: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return (embeddings / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


def mirror(images: np.ndarray) -> np.ndarray:
    """Horizontal flip of NHWC images."""
    return images[:, :, ::-1, :]


def _embed_batch(embedder: Embedder, images: np.ndarray, flip: bool) -> np.ndarray:
    if not flip:
        return embedder(images)
    # One call for both views (eval-mode models treat rows independently), then the two views are summed.
    both = embedder(np.concatenate([images, mirror(images)]))
    return both[: images.shape[0]] + both[images.shape[0] :]


def _progress(total: int, desc: str | None):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=desc is None, leave=False, dynamic_ncols=True)


def embed_images(
    embedder: Embedder, images: np.ndarray, flip: bool = True, batch_size: int = 64, progress: str | None = None
) -> np.ndarray:
    """L2-normalised embeddings of ``images``; with ``flip``: ``normalize(embed(img) + embed(mirror(img)))``.

    ``progress``: a label for a tqdm bar, or ``None`` for no bar.
    """
    _check_images(images)
    return embed_batches(embedder, (images[s : s + batch_size] for s in range(0, len(images), batch_size)),
                         total=len(images), flip=flip, progress=progress)


def embed_batches(
    embedder: Embedder, batches: Iterable[np.ndarray], total: int, flip: bool = True, progress: str | None = None
) -> np.ndarray:
    """Embed a stream of image batches (so large sets never sit in memory as pixels)."""
    outputs = []
    with _progress(total, progress) as bar:
        for batch in batches:
            outputs.append(_embed_batch(embedder, batch, flip))
            bar.update(len(batch))
    if not outputs:
        raise CdfaceError("no images to embed")
    embeddings = np.concatenate(outputs).astype(np.float32, copy=False)
    if not np.all(np.isfinite(embeddings)):
        raise CdfaceError("the model produced NaN or infinite embeddings")
    return l2_normalize(embeddings)


def load_aligned_image(path: str | os.PathLike) -> np.ndarray:
    """An aligned face crop as uint8 [112, 112, 3] RGB; anything else is a user error, not silently resized."""
    return read_aligned_crop(path)


def embed_files(
    embedder: Embedder,
    paths: Sequence[str | os.PathLike],
    flip: bool = True,
    batch_size: int = 64,
    progress: str | None = None,
) -> np.ndarray:
    """L2-normalised embeddings of aligned image files, read batch by batch."""

    def batches():
        for start in range(0, len(paths), batch_size):
            yield np.stack([load_aligned_image(p) for p in paths[start : start + batch_size]])

    return embed_batches(embedder, batches(), total=len(paths), flip=flip, progress=progress)


def list_images(directory: str | os.PathLike) -> list[Path]:
    """Image files directly inside ``directory``, sorted by name."""
    return sorted(p for p in Path(directory).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
