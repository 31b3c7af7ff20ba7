"""contrastive_loss against hand-computed values and against the paper's formula."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from coun_tune.core.losses import contrastive_loss


def _ce_row(logits: list[float], target: int) -> float:
    """-log softmax(logits)[target], by hand."""
    return -(logits[target] - math.log(sum(math.exp(v) for v in logits)))


def test_hand_computed_n2():
    # z1 = (1,0), (0,1); z2 = (1,0), (1,1)  ->  S = [[1, 1/sqrt2], [0, 1/sqrt2]]
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    tau = 0.5
    r = 1 / math.sqrt(2)
    s = [[1.0, r], [0.0, r]]
    rows = [_ce_row([v / tau for v in s[i]], i) for i in range(2)]
    cols = [_ce_row([s[j][i] / tau for j in range(2)], i) for i in range(2)]
    expected = sum(rows) / 2 + sum(cols) / 2
    # written out: row 0 = -log(e^2/(e^2+e^sqrt2)), row 1 = -log(e^sqrt2/(1+e^sqrt2)),
    # col 0 = -log(e^2/(e^2+1)), col 1 = log 2
    by_formula = (
        (math.log(math.e**2 + math.exp(math.sqrt(2))) - 2) + (math.log(1 + math.exp(math.sqrt(2))) - math.sqrt(2))
    ) / 2 + ((math.log(math.e**2 + 1) - 2) + math.log(2)) / 2
    assert expected == pytest.approx(by_formula, rel=1e-12)
    got = contrastive_loss(z1, z2, tau).item()
    assert got == pytest.approx(expected, rel=1e-5)


def test_hand_computed_n3_orthogonal():
    # z1 = z2 = the 3 unit axes: S = I; each row's softmax over [1/tau, 0, 0]
    z = torch.eye(3)
    tau = 0.5
    one_dir = -(2.0 - math.log(math.exp(2.0) + 2.0))  # identical for every row
    expected = 2 * one_dir  # the two directions are summed, not averaged
    assert contrastive_loss(z, z.clone(), tau).item() == pytest.approx(expected, rel=1e-5)


def test_hand_computed_identical_features_is_2_log_n():
    # all features equal: S is all ones, every softmax is uniform -> log N per direction
    z = torch.ones(4, 3)
    assert contrastive_loss(z, z, 0.2).item() == pytest.approx(2 * math.log(4), rel=1e-6)


@pytest.mark.parametrize("n,d,tau", [(2, 3, 0.1), (7, 16, 0.05), (32, 64, 0.3)])
def test_matches_cross_entropy_formula(n, d, tau):
    g = torch.Generator().manual_seed(n * 100 + d)
    z1, z2 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    s = F.normalize(z1, dim=1) @ F.normalize(z2, dim=1).T
    target = torch.arange(n)
    expected = F.cross_entropy(s / tau, target) + F.cross_entropy(s.T / tau, target)
    torch.testing.assert_close(contrastive_loss(z1, z2, tau), expected, rtol=1e-5, atol=1e-6)


def test_symmetric_in_views_and_scale_invariant():
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(10, 8, generator=g), torch.randn(10, 8, generator=g)
    base = contrastive_loss(z1, z2, 0.1)
    torch.testing.assert_close(contrastive_loss(z2, z1, 0.1), base, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(contrastive_loss(3.7 * z1, 0.02 * z2, 0.1), base, rtol=1e-5, atol=1e-6)
    # a per-sample positive scale does not matter either (cosine)
    scale = torch.rand(10, 1, generator=g) * 10 + 0.1
    torch.testing.assert_close(contrastive_loss(z1 * scale, z2, 0.1), base, rtol=1e-5, atol=1e-6)


def test_gradient_flows_to_both_views():
    g = torch.Generator().manual_seed(4)
    z1 = torch.randn(5, 4, generator=g, requires_grad=True)
    z2 = torch.randn(5, 4, generator=g, requires_grad=True)
    contrastive_loss(z1, z2, 0.1).backward()
    assert z1.grad is not None and z1.grad.abs().sum() > 0
    assert z2.grad is not None and z2.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "z1,z2",
    [
        (torch.randn(4), torch.randn(4)),  # 1-d
        (torch.randn(4, 3), torch.randn(5, 3)),  # different N
        (torch.randn(4, 3), torch.randn(4, 2)),  # different D
        (torch.randn(2, 3, 1), torch.randn(2, 3, 1)),  # 3-d
    ],
)
def test_bad_shapes_raise(z1, z2):
    with pytest.raises(ValueError):
        contrastive_loss(z1, z2, 0.1)


def test_single_sample_raises():
    with pytest.raises(ValueError):
        contrastive_loss(torch.randn(1, 3), torch.randn(1, 3), 0.1)


@pytest.mark.parametrize("tau", [0.0, -0.1, float("nan")])
def test_bad_temperature_raises(tau):
    with pytest.raises(ValueError):
        contrastive_loss(torch.randn(3, 2), torch.randn(3, 2), tau)
