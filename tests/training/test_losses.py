"""Closeness and diversity losses against hand computation; gradients against the supplement's Eq. 3-5."""

import math

import pytest
import torch
import torch.nn.functional as F

from cdface.training.losses import closeness_loss, diversity_loss, similarity_terms


def unit(*v):
    t = torch.tensor(v, dtype=torch.float64)
    return t / t.norm()


def test_closeness_equals_mean_pairwise_squared_distance():
    a, b, c = unit(1, 0, 0), unit(0, 1, 0), unit(1, 1, 0)
    d, e, f = unit(0, 0, 1), unit(0, 0, 1), unit(0, 1, 1)
    easy = torch.stack([torch.stack([a, b, c]), torch.stack([d, e, f])]) * 3.0  # scale: loss normalises
    pairs = [(a, b), (a, c), (b, c), (d, e), (d, f), (e, f)]
    expected = sum(float(((x - y) ** 2).sum()) for x, y in pairs) / len(pairs)
    # by hand: |a-b|^2 = 2, |a-c|^2 = |b-c|^2 = 2 - sqrt(2), |d-e|^2 = 0, |d-f|^2 = |e-f|^2 = 2 - sqrt(2)
    by_hand = (2 + 4 * (2 - math.sqrt(2)) + 0) / 6
    assert expected == pytest.approx(by_hand)
    assert float(closeness_loss(easy)) == pytest.approx(by_hand, rel=1e-6)


def test_closeness_needs_two_easy_samples():
    with pytest.raises(ValueError):
        closeness_loss(torch.randn(2, 1, 4))


def test_diversity_equals_log_mean_exp_of_truncated_squared_cosine():
    s = 64.0
    x = unit(1, 0)
    angles = [0.3, 1.2, 2.0]  # cosines 0.955, 0.362, -0.416: the last one is truncated to zero
    protos = torch.stack([torch.tensor([math.cos(a), math.sin(a)], dtype=torch.float64) for a in angles])
    terms = [s * max(0.0, math.copysign(1, math.cos(a))) * math.cos(a) ** 2 for a in angles]
    expected = math.log(sum(math.exp(t) for t in terms) / len(terms))
    got = diversity_loss(x[None], protos[None], scale=s)
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_diversity_averages_over_hard_samples():
    torch.manual_seed(0)
    hard, protos = torch.randn(3, 8), torch.randn(3, 5, 8)
    each = [float(diversity_loss(hard[i:i + 1], protos[i:i + 1])) for i in range(3)]
    assert float(diversity_loss(hard, protos)) == pytest.approx(sum(each) / 3, rel=1e-5)


@pytest.mark.parametrize("theta", [0.2, 0.9, 1.4, 2.2, 2.9])
def test_similarity_gradients_match_supplement(theta):
    w = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    x = torch.tensor([[math.cos(theta), math.sin(theta), 0.0]], dtype=torch.float64, requires_grad=True)
    cos = math.cos(theta)
    expected = {
        "d1": 2 * (w - x.detach()),  # g1 = 2(w - x)
        "d2": w,  # g2 = w
        "d3": 2 * cos * w,  # g3 = 2 cos(theta) w
        "d3_truncated": (2 * cos * w) if cos > 0 else torch.zeros_like(w),
    }
    for name, term in similarity_terms(x, w).items():
        (grad,) = torch.autograd.grad(term.sum(), x, retain_graph=True)
        torch.testing.assert_close(grad, expected[name], msg=name)


def test_truncated_term_is_exactly_zero_for_non_positive_cosine():
    w = F.normalize(torch.randn(200, 16, dtype=torch.float64), dim=1)
    x = F.normalize(torch.randn(200, 16, dtype=torch.float64), dim=1).requires_grad_(True)
    term = similarity_terms(x, w)["d3_truncated"]
    (grad,) = torch.autograd.grad(term.sum(), x)
    non_positive = (x * w).sum(1) <= 0
    assert non_positive.any() and (~non_positive).any()
    assert torch.all(term[non_positive] == 0)
    assert torch.all(grad[non_positive] == 0)
    assert torch.all(grad[~non_positive].abs().sum(1) > 0)


def test_diversity_gradient_vanishes_when_all_prototypes_are_beyond_orthogonal():
    x = torch.tensor([[1.0, 0.0]], requires_grad=True)
    protos = torch.tensor([[[-0.6, 0.8], [0.0, 1.0]]])  # cos -0.6 and 0
    (grad,) = torch.autograd.grad(diversity_loss(x, protos), x)
    assert torch.all(grad == 0)
