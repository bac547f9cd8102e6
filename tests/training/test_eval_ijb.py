"""IJB-style template pooling against brute force; readers; an end-to-end run on a tiny folder."""

from collections import defaultdict

import numpy as np
import pytest
import torch
from PIL import Image

from cdface.core.errors import CdfaceError
from cdface.training.backbones import create_backbone
from cdface.training.evaluation.embedders import TorchEmbedder, embed_files
from cdface.training.evaluation.ijb import (
    evaluate_ijb,
    pool_templates,
    read_face_tid_mid,
    read_template_pairs,
    template_pair_scores,
)


def _brute_force_templates(embeddings, template_ids, media_ids) -> dict[int, np.ndarray]:
    by_template: dict[int, dict[int, list[np.ndarray]]] = defaultdict(lambda: defaultdict(list))
    for embedding, template, media in zip(embeddings, template_ids, media_ids):
        by_template[int(template)][int(media)].append(embedding)
    pooled = {}
    for template, medias in by_template.items():
        media_means = [np.mean(images, axis=0) for images in medias.values()]
        vector = np.mean(media_means, axis=0)
        pooled[template] = vector / np.linalg.norm(vector)
    return pooled


def test_pooling_matches_brute_force():
    rng = np.random.default_rng(0)
    # Unsorted template ids; template 7 has a 4-frame video (media 3) and a still (media 9), so a plain
    # image mean would weight the video 4:1 while the protocol weights media 1:1; media 9 also appears in
    # template 2, which must not merge the two.
    template_ids = np.array([7, 7, 7, 7, 7, 2, 2, 5, 2, 5])
    media_ids = np.array([3, 3, 3, 3, 9, 9, 4, 6, 4, 8])
    embeddings = rng.normal(size=(10, 16))

    ids, pooled = pool_templates(embeddings, template_ids, media_ids)
    expected = _brute_force_templates(embeddings, template_ids, media_ids)
    assert list(ids) == [2, 5, 7]
    for template, vector in zip(ids, pooled):
        np.testing.assert_allclose(vector, expected[int(template)], rtol=1e-5, atol=1e-6)
    plain_mean = embeddings[:5].mean(axis=0)
    assert not np.allclose(pooled[2], plain_mean / np.linalg.norm(plain_mean), atol=1e-3)

    t1, t2 = np.array([7, 2, 5]), np.array([2, 5, 5])
    scores = template_pair_scores(ids, pooled, t1, t2)
    np.testing.assert_allclose(scores, [expected[a] @ expected[b] for a, b in zip(t1, t2)], rtol=1e-5)
    assert scores[2] == pytest.approx(1.0)
    with pytest.raises(CdfaceError, match="template 11"):
        template_pair_scores(ids, pooled, np.array([11]), np.array([2]))


def test_meta_readers(tmp_path):
    (tmp_path / "x_face_tid_mid.txt").write_text("a.jpg 1 10\nb.jpg 1 11\n\nc.jpg 2 12\n")
    names, templates, medias = read_face_tid_mid(tmp_path / "x_face_tid_mid.txt")
    assert names == ["a.jpg", "b.jpg", "c.jpg"] and list(templates) == [1, 1, 2] and list(medias) == [10, 11, 12]
    (tmp_path / "x_template_pair_label.txt").write_text("1 2 0\n1 1 1\n")
    t1, t2, labels = read_template_pairs(tmp_path / "x_template_pair_label.txt")
    assert list(t1) == [1, 1] and list(t2) == [2, 1] and list(labels) == [False, True]
    (tmp_path / "bad.txt").write_text("a.jpg 1\n")
    with pytest.raises(CdfaceError, match="bad.txt:1"):
        read_face_tid_mid(tmp_path / "bad.txt")
    with pytest.raises(CdfaceError, match="not found"):
        read_template_pairs(tmp_path / "missing.txt")


def test_evaluate_ijb_end_to_end(tmp_path):
    rng = np.random.default_rng(1)
    images_dir = tmp_path / "loose_crops"
    images_dir.mkdir()
    meta_lines, names, template_ids, media_ids = [], [], [], []
    for template in range(4):
        for image in range(3):
            name = f"t{template}_{image}.png"
            Image.fromarray(rng.integers(0, 256, size=(112, 112, 3), dtype=np.uint8)).save(images_dir / name)
            media = template * 10 + image // 2
            meta_lines.append(f"{name} {template} {media}")
            names.append(name), template_ids.append(template), media_ids.append(media)
    (tmp_path / "tiny_face_tid_mid.txt").write_text("\n".join(meta_lines) + "\n")
    pairs = [(0, 0, 1), (1, 1, 1), (0, 1, 0), (0, 2, 0), (1, 3, 0), (2, 3, 0)]
    (tmp_path / "tiny_template_pair_label.txt").write_text("".join(f"{a} {b} {l}\n" for a, b, l in pairs))

    torch.manual_seed(0)
    embedder = TorchEmbedder(create_backbone("ir18", width=0.125))
    report = evaluate_ijb(embedder, images_dir, tmp_path / "tiny_face_tid_mid.txt",
                          tmp_path / "tiny_template_pair_label.txt", batch_size=8)
    assert report["dataset"] == "tiny" and report["templates"] == 4 and report["pairs"] == 6

    expected = _brute_force_templates(embed_files(embedder, [images_dir / n for n in names]), template_ids, media_ids)
    np.testing.assert_allclose(report["scores"], [expected[a] @ expected[b] for a, b, _ in pairs], rtol=1e-4, atol=1e-5)
    # 4 impostor pairs: only FAR >= 1/4 is measurable, so every standard level is unavailable.
    assert all(point is None for point in report["tar_at_far"].values())
