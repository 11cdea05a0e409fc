"""Router math: top-k variants, the load-balance loss (1.0 at balance), z-loss, routing statistics, jitter."""

import math

import pytest
import torch

from upcycle.recipes.moe.routing import load_balance_loss, route, routing_stats, z_loss


def test_topk_softmax_equals_renormalised_softmax_topk():
    logits = torch.randn(32, 8, requires_grad=True)
    w1, i1, _ = route(logits, 3, "topk_softmax")
    w2, i2, _ = route(logits, 3, "softmax_topk", norm_topk_prob=True)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(w1, w2)
    g1 = torch.autograd.grad((w1 * torch.arange(3.0)).sum(), logits)[0]
    g2 = torch.autograd.grad((w2 * torch.arange(3.0)).sum(), logits)[0]
    torch.testing.assert_close(g1, g2)


def test_unnormalised_weights_are_the_raw_probabilities():
    logits = torch.randn(16, 6)
    w, i, p = route(logits, 2, "softmax_topk", norm_topk_prob=False)
    torch.testing.assert_close(w, p.gather(1, i))
    assert (w.sum(-1) < 1).all()
    torch.testing.assert_close(p, torch.softmax(logits, -1))


def test_load_balance_is_one_at_perfect_balance_and_e_when_collapsed():
    t, e = 64, 8
    uniform = torch.full((t, e), 1.0 / e)
    balanced = torch.stack([torch.arange(t) % e, (torch.arange(t) + 1) % e], dim=1)
    assert load_balance_loss(uniform, balanced).item() == pytest.approx(1.0, abs=1e-6)
    onehot = torch.zeros(t, e)
    onehot[:, 0] = 1.0
    assert load_balance_loss(onehot, torch.zeros(t, 1, dtype=torch.long)).item() == pytest.approx(e)


def test_load_balance_matches_formula_and_has_gradient():
    logits = torch.randn(50, 4, requires_grad=True)
    _, idx, probs = route(logits, 2)
    loss = load_balance_loss(probs, idx)
    f = torch.stack([(idx == j).float().sum() for j in range(4)]) / idx.numel()
    expected = 4 * (f * probs.mean(0)).sum()
    torch.testing.assert_close(loss, expected)
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad.abs().sum() > 0


def test_z_loss_matches_naive_formula():
    logits = torch.randn(10, 5) * 3
    naive = torch.log(torch.exp(logits.double()).sum(-1)).pow(2).mean().float()
    torch.testing.assert_close(z_loss(logits), naive)


def test_routing_stats():
    e = 4
    probs = torch.full((6, e), 0.25)
    idx = torch.tensor([[0], [0], [0], [1], [1], [2]])  # expert 3 dead
    s = routing_stats(probs, idx)
    torch.testing.assert_close(s["load"], torch.tensor([0.5, 1 / 3, 1 / 6, 0.0]))
    assert s["dead_experts"] == 1
    assert s["max_violation"] == pytest.approx(0.5 * e - 1)
    assert s["entropy"] == pytest.approx(math.log(e))
    assert s["entropy_norm"] == pytest.approx(1.0)


def test_jitter_is_multiplicative_and_bounded():
    from upcycle.recipes.moe.routing import jitter

    x = torch.randn(100, 8)
    assert torch.equal(jitter(x, 0.0), x)
    y = jitter(x, 0.1)
    ratio = y / x
    assert (ratio >= 0.9 - 1e-6).all() and (ratio <= 1.1 + 1e-6).all() and (ratio != 1).any()
