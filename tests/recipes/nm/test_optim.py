"""AdamS (CAST) and SR-STE's refined decay against hand computations on a few weights."""

from __future__ import annotations

import math

import pytest
import torch

from upcycle.recipes.nm.optim import AdamS

W0 = [0.5, -0.1, 0.3, -0.05]  # one row, one group of 4: |w| ranks 0 > 2 > 1 > 3, so 2:4 prunes inputs 1 and 3
GRADS = [[0.1, 0.2, -0.3, 0.4], [-0.2, 0.1, 0.05, -0.3]]
LR, B1, B2, EPS, DECAY, RAMP = 0.01, 0.9, 0.999, 1e-8, 0.05, 4


def _sign(x: float) -> float:
    return math.copysign(1.0, x) if x else 0.0


def _hand_adams(w: list[float], grads: list[list[float]], pruned: list[bool]) -> list[float]:
    """The update rule written out per weight in plain floats."""
    w, m, v = list(w), [0.0] * 4, [0.0] * 4
    for t, g in enumerate(grads, start=1):
        a = min(1.0, t / RAMP)
        for i in range(4):
            m[i] = B1 * m[i] + (1 - B1) * g[i]
            mhat = m[i] / (1 - B1**t)
            if pruned[i]:
                mt = (1 - a) * mhat + a * DECAY * _sign(w[i])
                v[i] = B2 * v[i] + (1 - B2) * mt * mt  # the second moment of the decayed first moment
            else:
                mt = mhat
                v[i] = B2 * v[i] + (1 - B2) * g[i] * g[i]
            w[i] -= LR * mt / (math.sqrt(v[i] / (1 - B2**t)) + EPS)
    return w


def _run(mode: str | None, grads=GRADS, **kw) -> torch.Tensor:
    p = torch.nn.Parameter(torch.tensor([W0], dtype=torch.float64).float())
    opt = AdamS([p], lr=LR, betas=(B1, B2), eps=EPS, decay=DECAY, ramp_steps=RAMP, nm=(2, 4), nm_mode=mode, **kw)
    for g in grads:
        p.grad = torch.tensor([g])
        opt.step()
    return p.detach()[0]


def test_adams_step_matches_the_hand_computation():
    got = _run("cast")
    want = _hand_adams(W0, GRADS, [False, True, False, True])
    assert torch.allclose(got, torch.tensor(want), atol=1e-6, rtol=0), (got, want)
    # step 1 literally: Adam moves every weight by lr * sign(its first moment)
    one = _run("cast", grads=GRADS[:1])
    mt1 = 0.75 * 0.2 + 0.25 * DECAY * -1, 0.75 * 0.4 + 0.25 * DECAY * -1  # pruned inputs 1 and 3
    assert torch.allclose(one, torch.tensor([0.5 - LR, -0.1 - LR * _sign(mt1[0]), 0.3 + LR, -0.05 - LR]), atol=1e-6)


def test_a_fully_decayed_weight_moves_by_lr_toward_zero_whatever_its_gradient():
    p = torch.nn.Parameter(torch.tensor([W0]))
    opt = AdamS([p], lr=LR, decay=1.0, ramp_steps=1, nm=(2, 4), nm_mode="cast")
    p.grad = torch.tensor([[0.0, -1e-9, 0.0, 1e-9]])  # gradients far below the decay
    opt.step()
    assert torch.allclose(p.detach()[0, [1, 3]], torch.tensor([-0.1 + LR, -0.05 + LR]), atol=1e-7)


def test_pull_lr_mult_scales_the_step_of_the_to_be_pruned_weights_only():
    grads = [[1e-3, -1e-9, 2e-3, 1e-9]]
    base = _run("cast", grads=grads)
    fast = _run("cast", grads=grads, pull_lr_mult=5.0)
    assert torch.equal(fast[[0, 2]], base[[0, 2]])  # kept weights: plain Adam, untouched
    assert torch.allclose(fast[[1, 3]] - torch.tensor(W0)[[1, 3]], 5 * (base[[1, 3]] - torch.tensor(W0)[[1, 3]]),
                          atol=1e-6)
    with pytest.raises(ValueError, match="pull_lr_mult"):
        AdamS([torch.nn.Parameter(torch.zeros(1, 4))], nm=(2, 4), nm_mode="cast", pull_lr_mult=float("nan"))


def test_without_a_mode_it_is_torch_adam():
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    grads = [torch.randn(8, 16) for _ in range(3)]
    p, q = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    ours, ref = AdamS([p], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1), torch.optim.AdamW(
        [q], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    for g in grads:
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert torch.allclose(p, q, atol=1e-6)


def test_srste_adds_the_refined_decay_once_per_step():
    lam = 0.5
    got = _run("srste", grads=GRADS[:1], srste_lambda=lam)
    g = [GRADS[0][i] + (lam * W0[i] if i in (1, 3) else 0.0) for i in range(4)]
    # step 1 of Adam: -lr * sign(g_eff)
    assert torch.allclose(got, torch.tensor([W0[i] - LR * _sign(g[i]) for i in range(4)]), atol=1e-6)
    assert _sign(g[3]) == 1.0 and _sign(GRADS[0][3] + lam * W0[3]) == 1.0


def test_the_mask_refresh_follows_the_magnitudes_and_bf16_params_keep_an_fp32_master():
    p = torch.nn.Parameter(torch.tensor([W0], dtype=torch.bfloat16))
    opt = AdamS([p], lr=1e-4, decay=1.0, ramp_steps=1, nm=(2, 4), nm_mode="cast")
    opt.refresh_masks()
    assert opt.state[p]["prune_mask"].tolist() == [[0, 1, 0, 1]] and opt.state[p]["master"].dtype == torch.float32
    with torch.no_grad():
        p.copy_(torch.tensor([[0.01, 0.9, 0.3, -0.05]]))
        opt.state[p]["master"].copy_(p.float())
    opt.refresh_masks()
    assert opt.state[p]["prune_mask"].tolist() == [[1, 0, 0, 1]]
    before = opt.state[p]["master"].clone()
    for _ in range(3):  # steps of 1e-4 are below bf16's resolution at 0.3: the master copy keeps them
        p.grad = torch.zeros_like(p)
        opt.step()
    assert (opt.state[p]["master"] != before).any()


def test_bad_groups_are_refused():
    p = torch.nn.Parameter(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="needs nm"):
        AdamS([p], nm_mode="cast")
    with pytest.raises(ValueError, match="nm_mode"):
        AdamS([p], nm=(2, 4), nm_mode="sgd")


def test_an_optimizer_state_saved_before_pull_lr_mult_loads_and_steps_as_cast():
    p = torch.nn.Parameter(torch.tensor([W0]))
    opt = AdamS([p], lr=LR, decay=DECAY, ramp_steps=RAMP, nm=(2, 4), nm_mode="cast")
    state = opt.state_dict()
    for g in state["param_groups"]:
        del g["pull_lr_mult"]  # what a checkpoint written before the option holds
    q = torch.nn.Parameter(torch.tensor([W0]))
    again = AdamS([q], lr=LR, decay=DECAY, ramp_steps=RAMP, nm=(2, 4), nm_mode="cast")
    again.load_state_dict(state)
    p.grad, q.grad = torch.tensor([GRADS[0]]), torch.tensor([GRADS[0]])
    opt.step()
    again.step()
    assert torch.equal(p, q)
