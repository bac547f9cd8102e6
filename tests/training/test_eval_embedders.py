"""Embedders: TorchEmbedder equals a manual forward, flip sums the mirror, ONNX agrees with the checkpoint."""

import numpy as np
import pytest
import torch

from cdface.core.errors import CdfaceError
from cdface.training.backbones import create_backbone
from cdface.training.checkpoint import save_checkpoint
from cdface.training.evaluation.embedders import (
    OnnxEmbedder,
    TorchEmbedder,
    embed_files,
    embed_images,
    l2_normalize,
    open_embedder,
)

TINY = {"name": "ir18", "kwargs": {"width": 0.125}}


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_backbone(TINY["name"], **TINY["kwargs"])
    # Non-trivial BN statistics, so eval mode (running stats) and train mode (batch stats) really differ.
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 112, 112))
    return model.eval()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(5, 112, 112, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_model):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, {"backbone": TINY, "model": tiny_model.state_dict(), "config": {}})
    return path


def _manual(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    x = (x - 127.5) / 127.5
    with torch.no_grad():
        return model.eval()(x).numpy()


def test_torch_embedder_equals_manual_forward_across_batches(tiny_model, images):
    embedder = TorchEmbedder(tiny_model, batch_size=2)  # 5 images -> batches of 2, 2, 1
    got = embedder(images)
    assert got.dtype == np.float32 and got.shape == (5, 512)
    np.testing.assert_allclose(got, _manual(tiny_model, images), rtol=1e-4, atol=1e-5)


def test_torch_embedder_restores_train_mode(tiny_model, images):
    tiny_model.train()
    try:
        TorchEmbedder(tiny_model)(images[:2])
        assert tiny_model.training
    finally:
        tiny_model.eval()


def test_flip_sums_the_mirror_embeddings(tiny_model, images):
    embedder = TorchEmbedder(tiny_model)
    plain = embedder(images)
    mirrored = embedder(np.ascontiguousarray(images[:, :, ::-1, :]))
    expected = l2_normalize(plain + mirrored)
    got = embed_images(embedder, images, flip=True, batch_size=2)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    # Without flip: just the normalised embedding, and a different one.
    no_flip = embed_images(embedder, images, flip=False)
    np.testing.assert_allclose(no_flip, l2_normalize(plain), rtol=1e-4, atol=1e-5)
    assert not np.allclose(no_flip, got, atol=1e-3)


def test_from_checkpoint_and_open_embedder(checkpoint, tiny_model, images):
    embedder = open_embedder(checkpoint)
    assert isinstance(embedder, TorchEmbedder)
    np.testing.assert_allclose(embedder(images), _manual(tiny_model, images), rtol=1e-4, atol=1e-5)


def test_embed_files_reads_aligned_crops_and_rejects_other_sizes(tmp_path, tiny_model, images):
    from PIL import Image

    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(image).save(paths[-1])
    embedder = TorchEmbedder(tiny_model)
    np.testing.assert_allclose(embed_files(embedder, paths, batch_size=2), embed_images(embedder, images),
                               rtol=1e-4, atol=1e-5)
    Image.fromarray(images[0][:100, :100]).save(tmp_path / "small.png")
    with pytest.raises(CdfaceError, match="112x112"):
        embed_files(embedder, [tmp_path / "small.png"])


def test_open_embedder_errors(tmp_path):
    with pytest.raises(CdfaceError, match="not found"):
        open_embedder(tmp_path / "missing.pt")
    (tmp_path / "model.txt").write_text("x")
    with pytest.raises(CdfaceError, match=r"\.pt checkpoint or an \.onnx"):
        open_embedder(tmp_path / "model.txt")
    (tmp_path / "broken.onnx").write_bytes(b"not a graph")
    with pytest.raises(CdfaceError, match="not a loadable ONNX"):
        open_embedder(tmp_path / "broken.onnx")
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CdfaceError):
        open_embedder(tmp_path / "broken.pt")


def test_onnx_export_agrees_with_checkpoint(tmp_path, checkpoint, images):
    onnx_export = pytest.importorskip("cdface.export.onnx_export")
    result = onnx_export.export_checkpoint(checkpoint, tmp_path / "exported", name="tiny", simplify=False)
    onnx_embedder = open_embedder(result.onnx_path)
    assert isinstance(onnx_embedder, OnnxEmbedder)
    torch_embedder = open_embedder(checkpoint)
    for flip in (False, True):
        a = embed_images(onnx_embedder, images, flip=flip, batch_size=3)
        b = embed_images(torch_embedder, images, flip=flip, batch_size=3)
        assert np.sum(a * b, axis=1).min() >= 0.9999
