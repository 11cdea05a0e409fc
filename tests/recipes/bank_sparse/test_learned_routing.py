"""The default routing learns on the LM path: its parameters receive gradients from the LM loss, and the
shadow's learned bias reaches the decode kernels unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import upcycle
from upcycle.kernels import use_kernels
from upcycle.kernels.reference import bank_topk_mask, center_on_bank_threshold
from upcycle.recipes.bank_sparse import runtime
from upcycle.recipes.bank_sparse.modules import BankSparseSwiGLU, sparse_ffns
from upcycle.recipes.bank_sparse.predictors import fake_quantize
from upcycle.recipes.bank_sparse.training import is_predictor_param
from upcycle.testing import tiny_model


def _routing_grads(model, vocab):
    ids = torch.randint(0, vocab, (2, 24))
    model.train()
    model(ids, labels=ids).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if is_predictor_param(n)}


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("hidden, budget, kind", [(64, 0.03, "lowrank"), (64, 0.10, "shadow"), (128, 0.2, "shadow")])
def test_the_default_routing_has_parameters_the_lm_loss_trains(arch, hidden, budget, kind):
    model = tiny_model(arch, vocab_size=128, hidden_size=hidden, intermediate_size=4 * hidden)
    before = {n for n, _ in model.named_parameters()}
    upcycle.convert(model, upcycle.BankSparseConfig(predictor_budget=budget), progress=False)
    added = {n for n, _ in model.named_parameters()} - before
    assert added and all(".predictor." in n for n in added)  # the converted model has routing parameters
    grads = _routing_grads(model, 128)
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values()), grads.keys()
    kinds = {m.predictor.kind for _, m in sparse_ffns(model)}
    assert kinds == {kind}  # (0.03 fits no shadow at hidden 64; 0.10 a 1-bit one, 0.2 a 4-bit one)


def test_the_pure_shadow_stays_selectable_and_has_no_parameter():
    model = tiny_model(vocab_size=128, hidden_size=128, intermediate_size=512)
    before = {n for n, _ in model.named_parameters()}
    upcycle.convert(model, upcycle.BankSparseConfig(predictor="shadow", predictor_budget=0.2, shadow_bias=False),
                    progress=False)
    assert {n for n, _ in model.named_parameters()} == before


def test_centred_scores_are_positive_exactly_on_the_kept_channels():
    z = torch.randn(5, 128)
    assert torch.equal(center_on_bank_threshold(z, 64, 16) > 0, bank_topk_mask(z, 64, 16))
    assert torch.equal(center_on_bank_threshold(z, 64, 64) > 0, torch.ones_like(z, dtype=torch.bool))


def _shadow_ffn(bias: bool, d=128, d_ff=512) -> BankSparseSwiGLU:
    lin = lambda i, o: nn.Linear(i, o, bias=False)  # noqa: E731
    m = BankSparseSwiGLU(lin(d, d_ff), lin(d, d_ff), lin(d_ff, d), nn.SiLU(), 64, 16, shadow=(4, 64),
                         shadow_bias=bias).eval()
    if bias:
        with torch.no_grad():
            m.predictor.bias.normal_(0, 1.0)  # strong enough to change the ranking
    return m


def test_learned_bias_changes_the_ranking_and_the_decode_kernel_follows_it():
    m = _shadow_ffn(True)
    x = torch.randn(3, 1, 128)
    with torch.no_grad():
        plain = bank_topk_mask(m.predictor.magnitudes(x), 64, 16)
        assert not torch.equal(m.kept_mask(x), plain)
        fast = runtime.decode_forward(m, x)
        with use_kernels("reference"):
            ref = m(x)
    assert fast is not None
    assert ((fast - ref).norm() / ref.norm()).item() < 1e-5
    with torch.no_grad():  # a trained bias (in place, as an optimizer step) rebuilds the packed shadow
        m.predictor.bias.mul_(-1)
        fast2 = runtime.decode_forward(m, x)
        with use_kernels("reference"):
            ref2 = m(x)
    assert ((fast2 - ref2).norm() / ref2.norm()).item() < 1e-5 and not torch.allclose(fast2, fast)


def test_training_reuses_the_clip_search_and_evaluation_does_the_exact_one():
    m = _shadow_ffn(True)
    pred = m.predictor
    x = torch.randn(4, 128)
    with torch.no_grad():
        exact = pred.shadow_weights(exact=True)
    m.train()
    for _ in range(3):
        m(x).pow(2).mean().backward()
        with torch.no_grad():
            m.gate_proj.weight.add_(1e-4 * torch.randn_like(m.gate_proj.weight))  # what an optimizer step does
    assert 0 < pred._since_search < pred.REFIT_EVERY  # cached factors, one pass per re-quantisation
    with torch.no_grad():
        gq, _ = pred.shadow_weights()  # no grad: exact search on the current weights
        assert torch.equal(gq, fake_quantize(m.gate_proj.weight, 4, 64)) and pred._since_search == 0
    assert not torch.equal(exact[0], gq)


def test_checkpoints_without_the_bias_load_as_pure_shadows():
    from upcycle.recipes.bank_sparse.convert import config_from_section

    cfg = config_from_section({"bank_size": 64, "keep": 16, "predictor": "shadow", "shadow_bits": 4,
                               "shadow_group_size": 32})
    assert cfg.shadow_bias is False


def test_mass_allocation_keeps_the_total_and_gives_spread_layers_more():
    from upcycle.recipes.bank_sparse.convert import allocate_keep

    torch.manual_seed(0)
    lin = lambda i, o: nn.Linear(i, o, bias=False)  # noqa: E731
    peaked, spread = (BankSparseSwiGLU(lin(32, 256), lin(32, 256), lin(256, 32), nn.SiLU(), 64, 16, 8)
                      for _ in range(2))
    with torch.no_grad():  # a few channels of the peaked layer dominate every bank
        peaked.up_proj.weight.mul_(torch.where(torch.arange(256) % 64 < 4, 30.0, 0.1)[:, None])
    x = torch.randn(256, 32)
    keeps = allocate_keep([peaked, spread, spread], [x, x, x], 64, 16)
    assert sum(keeps) == 3 * 16 and keeps[0] < 16 < min(keeps[1:])


def test_mass_allocation_through_convert_is_recorded_and_reloads(tmp_path):
    model = tiny_model(vocab_size=128, num_hidden_layers=3)
    ids = torch.randint(0, 128, (4, 32))
    upcycle.convert(model, upcycle.BankSparseConfig(keep_allocation="mass"), calibration_ids=ids, progress=False)
    keeps = [m.keep for _, m in sparse_ffns(model)]
    assert sum(keeps) == 3 * 16 and all(k % 4 == 0 for k in keeps)
    upcycle.save(model, tmp_path / "m")
    assert [m.keep for _, m in sparse_ffns(upcycle.load(tmp_path / "m"))] == keeps
    with pytest.raises(ValueError, match="needs calibration_ids"):
        upcycle.convert(tiny_model(vocab_size=128), upcycle.BankSparseConfig(keep_allocation="mass"), progress=False)
