from __future__ import annotations

import pytest
import torch

import upcycle
from upcycle import BankSparseConfig
from upcycle.eval.stats import FFNStats
from upcycle.recipes.bank_sparse import runtime
from upcycle.recipes.bank_sparse.convert import capture_ffn_inputs
from upcycle.recipes.bank_sparse.modules import sparse_ffns
from upcycle.testing import tiny_model


def _run(model, ids):
    with FFNStats(model) as st, torch.no_grad():
        model(ids)
    return st.summary()


def test_dense_model_density_one(arch):
    model = tiny_model(arch, vocab_size=128)
    s = _run(model, torch.randint(0, 128, (2, 24)))
    assert s["ffn_density"] == 1.0 and s["mass_kept"] == pytest.approx(1.0)
    assert s["recall"] is None  # no bank-sparse config: recall is undefined, not 1.0
    assert [layer["density"] for layer in s["layers"]] == [1.0, 1.0]
    assert s["tokens"] == 48


def test_converted_density_is_keep_over_bank(arch):
    model = tiny_model(arch, vocab_size=128, intermediate_size=256)
    upcycle.convert(model, BankSparseConfig(keep=16, keep_per_layer={1: 8}), progress=False)
    s = _run(model, torch.randint(0, 128, (3, 40)))
    assert s["layers"][0]["density"] == pytest.approx(16 / 64, abs=1e-6)
    assert s["layers"][1]["density"] == pytest.approx(8 / 64, abs=1e-6)
    assert s["ffn_density"] == pytest.approx(12 / 64, abs=1e-6)
    for layer in s["layers"]:  # bank-balanced: the fullest bank holds exactly `keep`
        assert layer["bank_load_max"] == pytest.approx(layer["density"], abs=1e-6)
        assert 0 < layer["mass_kept"] < 1 and 0 <= layer["recall"] <= 1


def test_recall_matches_predictor_recall():
    model = tiny_model("qwen2", vocab_size=128)
    upcycle.convert(model, BankSparseConfig(), progress=False)
    ids = torch.randint(0, 128, (2, 48))
    modules = [m for _, m in sparse_ffns(model)]
    inputs = capture_ffn_inputs(model, modules, ids, progress=False)
    s = _run(model, ids)
    for layer, m, x in zip(s["layers"], modules, inputs, strict=True):
        assert layer["recall"] == pytest.approx(upcycle.predictor_recall(m, x), abs=1e-6)


def test_fast_decode_path_is_counted():
    """A decode-sized forward may skip down_proj (fused kernel): the predictor's mask is counted instead."""
    model = tiny_model("qwen2", vocab_size=128)
    upcycle.convert(model, BankSparseConfig(), progress=False)
    ids = torch.randint(0, 128, (1, 1))
    for mode in ("reference", "auto"):
        with runtime.use_kernels(mode):
            s = _run(model, ids)
        assert s["ffn_density"] == pytest.approx(0.25, abs=1e-6) and s["tokens"] == 1


def test_measuring_leaves_decode_on_the_fused_kernel():
    """`upcycle eval` measures with FFNStats open: a bank-sparse FFN's decode step must run the same kernel as
    without it (a hook on down_proj used to switch it to the torch path, so eval scored another numeric path than
    `generate` runs and greedy task answers could flip)."""
    from upcycle.kernels import cpu

    if not cpu.fused_available():
        pytest.skip("no C compiler: fused CPU kernel not built")
    model = tiny_model("qwen2", vocab_size=128)
    upcycle.convert(model, BankSparseConfig(), progress=False)
    x = torch.randn(1, 1, model.config.hidden_size)
    with torch.no_grad():
        for _, m in sparse_ffns(model):
            plain = runtime.decode_forward(m, x)
            with FFNStats(model):
                measured = runtime.decode_forward(m, x)
            assert plain is not None and measured is not None and torch.equal(measured, plain)


def test_bank_utilisation_definition():
    """One layer, bank 4 keep 1: always channel 0 -> util 1/4, 2 dead of 4 banks' channels; uniform -> 1."""
    model = tiny_model("qwen2", vocab_size=64, hidden_size=32, intermediate_size=8, num_hidden_layers=1)
    upcycle.convert(model, BankSparseConfig(bank_size=4, keep=1), progress=False)
    (_, m), = sparse_ffns(model)
    fixed = torch.tensor([True, False, False, False] * 2)
    m.mask_fn = lambda mod, x, g, u, z: fixed.expand_as(g)
    s = _run(model, torch.randint(0, 64, (1, 8)))["layers"][0]
    assert s["bank_utilisation"] == pytest.approx(0.25) and s["dead_channels"] == pytest.approx(0.75)
    m.mask_fn = lambda mod, x, g, u, z: torch.eye(4, dtype=torch.bool).repeat(2, 2)[: g.shape[-2]].expand_as(g)
    s = _run(model, torch.randint(0, 64, (1, 8)))["layers"][0]
    assert s["bank_utilisation"] == pytest.approx(1.0) and s["dead_channels"] == 0.0


def test_hooks_removed_after_exit():
    model = tiny_model("qwen2", vocab_size=64)
    with FFNStats(model) as st, torch.no_grad():
        model(torch.randint(0, 64, (1, 8)))
    with torch.no_grad():
        model(torch.randint(0, 64, (1, 8)))
    assert st.summary()["tokens"] == 8
