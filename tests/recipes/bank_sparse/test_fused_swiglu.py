"""The fused training path of BankSparseSwiGLU equals the unfused one (full logits + _MaskedSwiGLU)."""

import pytest
import torch
import torch.nn.functional as F

import upcycle
from upcycle.kernels.reference import bank_topk_mask
from upcycle.recipes.bank_sparse import modules as bank_sparse
from upcycle.recipes.bank_sparse.modules import _FusedMaskedSwiGLU, _FusedShadowSwiGLU, _MaskedSwiGLU, sparse_ffns


@pytest.mark.parametrize("alpha", [None, 0.7])
@pytest.mark.parametrize("aux", [False, True])
def test_fused_equals_unfused_values_and_gradients(monkeypatch, alpha, aux):
    monkeypatch.setattr(bank_sparse, "TRAIN_CHUNK_ELEMENTS", 3 * 128)  # 3 rows per chunk: 5 chunks
    torch.manual_seed(0)
    t, d_ff, r = 13, 128, 8
    g, u = (torch.randn(t, d_ff, dtype=torch.float64, requires_grad=True) for _ in range(2))
    a = torch.randn(t, r, dtype=torch.float64, requires_grad=True)
    w = torch.randn(d_ff, r, dtype=torch.float64, requires_grad=True)
    b = torch.randn(d_ff, dtype=torch.float64, requires_grad=True)
    al = None if alpha is None else torch.tensor(alpha, dtype=torch.float64, requires_grad=True)
    inputs = [g, u, a, w, b] + ([al] if al is not None else [])
    out, aux_loss = _FusedMaskedSwiGLU.apply(g, u, a, w, b, al, 64, 16, 2.0, 16 if aux else 0)
    dout = torch.randn_like(out)
    total = (out * dout).sum() + (3.0 * aux_loss if aux else 0)
    got = torch.autograd.grad(total, inputs)
    # unfused: full logits, the module's original function and aux loss
    z = F.linear(a, w, b)
    ref = _MaskedSwiGLU.apply(g, u, z, bank_topk_mask(z.detach(), 64, 16), al, 2.0)
    ref_total = (ref * dout).sum()
    if aux:
        target = bank_topk_mask((F.silu(g) * u).abs().detach(), 64, 16)
        ref_aux = F.binary_cross_entropy_with_logits(z, target.double())
        assert torch.allclose(aux_loss.double(), ref_aux, atol=1e-6)
        ref_total = ref_total + 3.0 * ref_aux
    want = torch.autograd.grad(ref_total, inputs)
    assert torch.allclose(out, ref)
    for name, x, y in zip("g u a w b alpha".split(), got, want):
        assert torch.allclose(x, y, atol=1e-5), name  # aux sums in fp32


def _forward_counting(model, ids, fn):
    """A training forward of `model` on `ids` and the calls it made to the autograd function `fn`."""
    calls = []
    orig = fn.apply
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fn, "apply", lambda *a: calls.append(1) or orig(*a))
        return model(ids).logits, calls


def test_module_training_forward_uses_the_fused_path_and_matches_inference():
    from upcycle.testing import tiny_model

    model = tiny_model(vocab_size=512)
    upcycle.convert(model, upcycle.BankSparseConfig(keep=16, predictor="lowrank"), progress=False)
    ids = torch.randint(0, 512, (2, 24))
    train_logits, calls = _forward_counting(model, ids, _FusedMaskedSwiGLU)
    with torch.no_grad():
        eval_logits = model(ids).logits
    assert len(calls) == len(list(sparse_ffns(model)))
    assert torch.allclose(train_logits, eval_logits, atol=1e-5)


def _shadow_reference(g, u, x, gq, uq, bias, keep, tau):
    """The unfused shadow path: full scores, mask, centred surrogate, _MaskedSwiGLU."""
    from upcycle.kernels.reference import center_on_bank_threshold

    with torch.no_grad():
        mag = (F.silu(F.linear(x, gq)) * F.linear(x, uq)).abs()
    z = mag if bias is None else mag.clamp_min(1e-30).log() + bias
    mask = bank_topk_mask(z.detach(), 64, keep)
    if bias is not None:
        z = center_on_bank_threshold(z, 64, keep)
    return _MaskedSwiGLU.apply(g, u, z, mask, None, tau)


@pytest.mark.parametrize("learned_bias", [False, True])
@pytest.mark.parametrize("keep", [16, 64])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_fused_shadow_equals_unfused_values_and_gradients(monkeypatch, learned_bias, keep, tau):
    monkeypatch.setattr(bank_sparse, "TRAIN_CHUNK_ELEMENTS", 3 * 128)  # 3 rows per chunk: 5 chunks
    torch.manual_seed(1)
    t, d, d_ff = 13, 32, 128
    g, u = (torch.randn(t, d_ff, dtype=torch.float64, requires_grad=True) for _ in range(2))
    x = torch.randn(t, d, dtype=torch.float64)
    gq, uq = torch.randn(d_ff, d, dtype=torch.float64), torch.randn(d_ff, d, dtype=torch.float64)
    bias = torch.randn(d_ff, dtype=torch.float64, requires_grad=True) if learned_bias else None
    inputs = [g, u] + ([bias] if learned_bias else [])
    out = _FusedShadowSwiGLU.apply(g, u, x, gq, uq, None, None, bias, 64, keep, tau)
    dout = torch.randn_like(out)
    got = torch.autograd.grad((out * dout).sum(), inputs)
    ref = _shadow_reference(g, u, x, gq, uq, bias, keep, tau)
    want = torch.autograd.grad((ref * dout).sum(), inputs)
    assert torch.equal(out, ref)
    for name, a, b in zip(("g", "u", "bias"), got, want):
        assert torch.allclose(a, b, atol=1e-6), name  # the bias gradient sums in fp32


def test_shadow_module_training_takes_the_fused_path_and_matches_inference():
    from upcycle.testing import tiny_model

    model = tiny_model(vocab_size=512)
    upcycle.convert(model, upcycle.BankSparseConfig(keep=16, predictor="shadow", shadow_bits=4), progress=False)
    ffns = [m for _, m in sparse_ffns(model)]
    assert all(m.predictor.kind == "shadow" and m.predictor.bias is not None for m in ffns)
    for m in ffns:  # a non-zero learned bias, so the test sees it in the ranking
        torch.nn.init.normal_(m.predictor.bias, std=0.5)
    ids = torch.randint(0, 512, (2, 24))
    train_logits, calls = _forward_counting(model, ids, _FusedShadowSwiGLU)
    train_logits.float().pow(2).mean().backward()
    assert len(calls) == len(ffns)
    assert all(m.predictor.bias.grad is not None and m.predictor.bias.grad.abs().sum() > 0 for m in ffns)
    with torch.no_grad():
        eval_logits = model(ids).logits
    assert torch.allclose(train_logits, eval_logits, atol=1e-5)
