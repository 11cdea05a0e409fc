import copy

import pytest
import torch

import upcycle
from upcycle.recipes.bank_sparse.convert import oracle_scores, predictor_bytes_fraction, predictor_recall
from upcycle.recipes.bank_sparse.modules import BankSparseSwiGLU, sparse_ffns
from upcycle.recipes.bank_sparse.predictors import (
    choose_predictor,
    fake_quantize,
    lowrank_bytes_fraction,
    shadow_bytes_fraction,
)
from upcycle.testing import tiny_model


def _ffn(d=128, d_ff=512, shadow=(4, 32)):
    lin = lambda i, o: torch.nn.Linear(i, o, bias=False)  # noqa: E731
    return BankSparseSwiGLU(lin(d, d_ff), lin(d, d_ff), lin(d_ff, d), torch.nn.SiLU(), 64, 16, shadow=shadow)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_fake_quantize_uses_at_most_2_pow_bits_levels_per_group(bits):
    w = torch.randn(48, 96)
    q = fake_quantize(w, bits, 32)
    for group in q.reshape(-1, 32):
        assert len(torch.unique(group)) <= 2**bits
    g = w.reshape(-1, 32)
    # never worse than plain min-max round-to-nearest (the first clipping candidate), up to the bf16
    # rounding of the stored scale and minimum
    step = (g.amax(-1) - g.amin(-1)) / (2**bits - 1)
    minmax = ((g - g.amin(-1, keepdim=True)) / step[:, None]).round() * step[:, None] + g.amin(-1, keepdim=True)
    got, plain = (q.reshape(-1, 32) - g).pow(2).sum(-1), (minmax - g).pow(2).sum(-1)
    if bits < 6:  # (at 8 bits the bf16 minimum's rounding is a fair part of a step)
        assert got.sum() <= plain.sum() * 1.03
        assert got.sum() < (0.9 if bits == 2 else 1.0) * plain.sum()  # clipping pays on Gaussian weights


def test_fake_quantize_error_falls_with_bits():
    w = torch.randn(64, 128)
    errors = [(fake_quantize(w, b, 32) - w).pow(2).mean().item() for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 1e-4


def test_fake_quantize_rejects_group_that_does_not_divide():
    with pytest.raises(ValueError, match="does not divide"):
        fake_quantize(torch.randn(4, 100), 4, 32)


@pytest.mark.parametrize("d,d_ff", [(576, 1536), (896, 4864), (128, 512), (64, 256), (4096, 14336)])
@pytest.mark.parametrize("budget", [0.03, 0.05, 0.10, 0.2, 0.35])
def test_chosen_predictor_fits_the_budget(d, d_ff, budget):
    spec = choose_predictor(budget, d, d_ff)
    if spec["predictor"] == "shadow":
        used = shadow_bytes_fraction(spec["shadow_bits"], spec["shadow_group_size"])
        assert d % spec["shadow_group_size"] == 0
        # the most bits that fit: one more bit would not, at any group size
        if spec["shadow_bits"] < 8:
            assert shadow_bytes_fraction(spec["shadow_bits"] + 1, d) > budget
    else:
        used = lowrank_bytes_fraction(d, d_ff, spec["predictor_rank"])
        assert lowrank_bytes_fraction(d, d_ff, spec["predictor_rank"] + 1) > budget
    assert used <= budget + 1e-9


def test_budget_picks_shadow_bits_for_smollm2_shape():
    assert choose_predictor(0.10, 576, 1536) == {"predictor": "shadow", "shadow_bits": 2, "shadow_group_size": 96}
    assert choose_predictor(0.20, 576, 1536)["shadow_bits"] == 4
    # groups of a multiple of 32 inputs when one fits (the kernels' vector steps): 128 over 112, 64 over 56
    assert choose_predictor(0.10, 896, 4864)["shadow_group_size"] == 128
    assert choose_predictor(0.20, 896, 4864)["shadow_group_size"] == 64


def test_pinned_bits_and_group_are_kept_and_priced_as_pinned(caplog):
    cfg = upcycle.BankSparseConfig(shadow_bits=4, shadow_group_size=48, predictor_budget=0.10)
    with caplog.at_level("WARNING"):
        spec = cfg.predictor_spec(576, 1536)
    assert spec == {"predictor": "shadow", "shadow_bits": 4, "shadow_group_size": 48}
    assert f"{shadow_bytes_fraction(4, 48):.3f}" in caplog.text  # the pinned group's bytes, not another's
    assert choose_predictor(0.03, 576, 1536)["predictor"] == "lowrank"  # below any shadow's bytes
    with pytest.raises(ValueError, match="raise the budget"):
        choose_predictor(0.03, 576, 1536, kind="shadow")
    # 0.05: no 2-bit shadow fits; auto takes a 1-bit one in groups of 192 (0.049), as a pinned 1 bit does
    one_bit = {"predictor": "shadow", "shadow_bits": 1, "shadow_group_size": 192}
    assert choose_predictor(0.05, 576, 1536) == one_bit == choose_predictor(0.05, 576, 1536, bits=1)


def test_shadow_at_8_bits_finds_the_oracle_channels():
    m = _ffn(shadow=(8, 32))
    x = torch.randn(256, 128)
    assert predictor_recall(m, x) > 0.97
    assert predictor_recall(_ffn(shadow=(2, 128)), x) < predictor_recall(m, x)


def test_shadow_scores_track_the_live_weights():
    m = _ffn(shadow=(8, 32))
    x = torch.randn(64, 128)
    before = m.predictor(x)
    with torch.no_grad():
        m.up_proj.weight.mul_(-3.0).add_(torch.randn_like(m.up_proj.weight))  # in place, as an optimizer step is
    after = m.predictor(x)
    assert not torch.allclose(before, after)
    assert torch.corrcoef(torch.stack([after.flatten(), oracle_scores(m, x).flatten()]))[0, 1] > 0.99


def test_shadow_training_sends_gradients_to_the_ffn_and_keeps_16_of_64():
    m = _ffn(shadow=(4, 32))
    assert not list(m.predictor.parameters())
    x = torch.randn(2, 8, 128, requires_grad=True)
    seen = []
    m.down_proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    m(x).square().sum().backward()
    for p in (m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight, x):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert (seen[0] != 0).reshape(-1, 8, 64).sum(-1).max() <= 16


def test_shadow_deepcopy_follows_the_copy():
    m = _ffn()
    c = copy.deepcopy(m)
    with torch.no_grad():
        c.gate_proj.weight.zero_()
    x = torch.randn(4, 128)
    assert c.predictor._sources[0] is c.gate_proj
    assert torch.allclose(c.predictor(x), torch.zeros(4, 512))
    assert m.predictor(x).abs().sum() > 0


def test_auto_predictor_by_model_size_and_pinned_rank():
    big = tiny_model("llama", hidden_size=128, intermediate_size=512, vocab_size=256)
    upcycle.convert(big, upcycle.BankSparseConfig(), progress=False)
    preds = [m.predictor for _, m in sparse_ffns(big)]
    assert {p.kind for p in preds} == {"shadow"} and preds[0].bits == 2
    assert predictor_bytes_fraction(big) <= 0.10
    small = tiny_model("llama", hidden_size=128, intermediate_size=512, vocab_size=256)
    upcycle.convert(small, upcycle.BankSparseConfig(predictor_rank=8), progress=False)
    assert {m.predictor.kind for _, m in sparse_ffns(small)} == {"lowrank"}


def test_shadow_with_sigmoid_gate_is_refused():
    model = tiny_model("llama", hidden_size=128, intermediate_size=512, vocab_size=256)
    with pytest.raises(ValueError, match="gate_mode='ste'"):
        upcycle.convert(model, upcycle.BankSparseConfig(predictor="shadow", gate_mode="sigmoid"), progress=False)


def test_shadow_checkpoint_round_trip(tmp_path):
    model = tiny_model("qwen2", hidden_size=128, intermediate_size=512, vocab_size=256)
    upcycle.convert(model, upcycle.BankSparseConfig(predictor="shadow", predictor_budget=0.2), progress=False)
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        want = model(ids).logits
    path = upcycle.save(model, tmp_path / "m")
    meta = model.config.upcycle["bank_sparse"]
    assert (meta["predictor"], meta["shadow_bits"]) == ("shadow", 4)
    loaded = upcycle.load(path)
    assert {m.predictor.kind for _, m in sparse_ffns(loaded)} == {"shadow"}
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)
