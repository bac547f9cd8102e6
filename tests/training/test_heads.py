"""Margin heads: ArcFace/CosFace logits and loss by hand; hard negatives against brute force."""

import math

import pytest
import torch
import torch.nn.functional as F

from cdface.training.heads import ArcFaceMargin, CosFaceMargin, MarginHead, init_class_centres, top_negatives


def ArcFace(embedding_size, num_classes, scale=64.0, margin=0.5, num_hard_negatives=500):  # noqa: N802
    return MarginHead(embedding_size, num_classes, ArcFaceMargin(margin), scale, num_hard_negatives)


def CosFace(embedding_size, num_classes, scale=64.0, margin=0.4, num_hard_negatives=500):  # noqa: N802
    return MarginHead(embedding_size, num_classes, CosFaceMargin(margin), scale, num_hard_negatives)


def _cosines(head, emb):
    return F.normalize(emb, dim=1) @ F.normalize(head.weight.detach(), dim=1).t()


def test_arcface_loss_matches_hand_computation_with_fallback():
    torch.manual_seed(0)
    head = ArcFace(8, 6, scale=64.0, margin=0.5, num_hard_negatives=3)
    emb, labels = torch.randn(5, 8), torch.tensor([0, 1, 2, 3, 4])
    # Force one sample's target angle past pi - m so the fallback applies.
    with torch.no_grad():
        head.weight[4] = -emb[4]
    out = head(emb, labels)
    cos = _cosines(head, emb).double()
    logits = cos.clone()
    for i, y in enumerate(labels.tolist()):
        theta = math.acos(float(cos[i, y]))
        if theta + 0.5 < math.pi:
            logits[i, y] = math.cos(theta + 0.5)
        else:
            logits[i, y] = float(cos[i, y]) - math.sin(math.pi - 0.5) * 0.5
    assert math.acos(float(cos[4, 4])) + 0.5 >= math.pi  # the fallback case is exercised
    expected = F.cross_entropy(64.0 * logits, labels)
    assert float(out.loss.detach()) == pytest.approx(float(expected), rel=1e-4)
    torch.testing.assert_close(out.target_cos.double(), cos[torch.arange(5), labels], atol=1e-6, rtol=0)


def test_cosface_loss_matches_hand_computation():
    torch.manual_seed(1)
    head = CosFace(8, 6, scale=30.0, margin=0.4, num_hard_negatives=2)
    emb, labels = torch.randn(4, 8), torch.tensor([5, 0, 2, 2])
    cos = _cosines(head, emb)
    logits = cos.clone()
    logits[torch.arange(4), labels] -= 0.4
    expected = F.cross_entropy(30.0 * logits, labels)
    assert float(head(emb, labels).loss.detach()) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("head_cls", [ArcFace, CosFace])
def test_hard_negatives_exclude_own_class_and_equal_brute_force_topk(head_cls):
    torch.manual_seed(2)
    classes, np_ = 40, 7
    head = head_cls(16, classes, num_hard_negatives=np_)
    labels = torch.randint(0, classes, (32,))
    emb = torch.randn(32, 16)
    # Make the own class the most similar centre for every sample: it must still be excluded.
    with torch.no_grad():
        head.weight[labels] = emb * 10
    out = head(emb, labels, negatives_for=torch.arange(32))
    cos = _cosines(head, emb)
    for i in range(32):
        assert int(labels[i]) not in out.hard_negatives[i].tolist()
        ranked = [c for c in torch.argsort(cos[i], descending=True).tolist() if c != int(labels[i])][:np_]
        assert set(out.hard_negatives[i].tolist()) == set(ranked)


def test_hard_negatives_capped_by_number_of_classes():
    head = ArcFace(4, 5, num_hard_negatives=500)
    out = head(torch.randn(3, 4), torch.tensor([0, 1, 2]), negatives_for=torch.tensor([0, 2]))
    assert out.hard_negatives.shape == (2, 4)
    assert head(torch.randn(3, 4), torch.tensor([0, 1, 2])).hard_negatives is None  # no search unless asked


def test_top_negatives_order_ties_by_index_whatever_topk_picks():
    # Many exact ties: the k-th value is shared by more columns than fit, so the lower indices win.
    cos = torch.tensor([[0.5, 0.25, 0.5, 0.5, 0.25, 0.5, 0.0],
                        [0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25]])
    values, indices = top_negatives(cos, torch.tensor([2, -1]), 4)
    assert indices.tolist() == [[0, 3, 5, 1], [0, 1, 2, 3]]
    assert values.tolist() == [[0.5, 0.5, 0.5, 0.25], [0.25] * 4]


def test_centre_init_by_blocks_is_the_same_stream_for_any_row_range():
    torch.manual_seed(3)
    full = init_class_centres(10_000, 16)
    for start, end in [(0, 4096), (4000, 4200), (9999, 10_000), (5000, 10_000)]:
        torch.manual_seed(3)
        assert torch.equal(init_class_centres(10_000, 16, start, end), full[start:end])
    torch.manual_seed(3)  # the same values as one normal_ call (the replicated head's init until now)
    blocked = init_class_centres(5000, 32)
    torch.manual_seed(3)
    assert torch.equal(blocked, torch.empty(5000, 32).normal_(std=0.01))
