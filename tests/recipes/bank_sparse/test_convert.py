import pytest
import torch
from torch import nn

import upcycle
from upcycle.recipes.bank_sparse.convert import capture_ffn_inputs, find_swiglu_ffns, measure_recall, predictor_recall
from upcycle.recipes.bank_sparse.modules import BankSparseSwiGLU, sparse_ffns
from upcycle.testing import tiny_config, tiny_model


@pytest.mark.parametrize("arch", ["qwen2", "llama", "mistral", "qwen3"])
def test_converts_every_swiglu_ffn_and_keeps_hf_names(arch):
    model = tiny_model(arch, vocab_size=512, num_hidden_layers=3)
    gate_weights = [m.gate_proj.weight for _, _, m in find_swiglu_ffns(model)]
    assert upcycle.convert(model, progress=False) is model
    mods = [m for _, m in sparse_ffns(model)]
    assert [m.layer_idx for m in mods] == [0, 1, 2]
    assert all(m.gate_proj.weight is w for m, w in zip(mods, gate_weights))  # no copies
    keys = model.state_dict().keys()
    # the default at these shapes: a 1-bit shadow (no weights of its own) with a learned per-channel bias
    for suffix in ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight", "mlp.predictor.bias"):
        assert f"model.layers.1.{suffix}" in keys
    assert isinstance(mods[0].gate_proj, nn.Linear)
    lowrank = upcycle.convert(tiny_model(arch, vocab_size=512, num_hidden_layers=3),
                              upcycle.BankSparseConfig(predictor="lowrank"), progress=False)
    keys = lowrank.state_dict().keys()
    for suffix in ("mlp.predictor.in_proj.weight", "mlp.predictor.out_proj.weight", "mlp.predictor.out_proj.bias"):
        assert f"model.layers.1.{suffix}" in keys


def test_layer_selection_and_per_layer_keep():
    model = tiny_model(vocab_size=512, num_hidden_layers=3)
    cfg = upcycle.BankSparseConfig(layers=[0, 2], keep_per_layer={2: 64})
    upcycle.convert(model, cfg, progress=False)
    mods = dict((m.layer_idx, m) for _, m in sparse_ffns(model))
    assert sorted(mods) == [0, 2]
    assert mods[0].keep == 16 and mods[2].keep == 64 and mods[2].is_dense
    assert not isinstance(model.model.layers[1].mlp, BankSparseSwiGLU)


@pytest.mark.parametrize(
    "kwargs, cfg, match",
    [
        ({"intermediate_size": 200}, {}, r"intermediate_size=200 is not divisible by bank_size=64.*e\.g\. 50"),
        ({}, {"layers": [5]}, r"layers \[5\] have no SwiGLU FFN"),
        ({}, {"keep_per_layer": {1: 8}, "layers": [0]}, r"keep_per_layer names layers \[1\]"),
        ({}, {"predictor_init": "calibrate"}, r"needs calibration_ids"),
    ],
)
def test_bad_conversions_name_the_fix(kwargs, cfg, match):
    model = tiny_model(vocab_size=512, **kwargs)
    with pytest.raises(ValueError, match=match):
        upcycle.convert(model, upcycle.BankSparseConfig(**cfg), progress=False)


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"keep": 80}, r"keep=80 must lie in \[1, bank_size=64\]"),
        ({"keep": 0}, r"keep=0"),
        ({"keep_per_layer": {0: 65}}, r"keep_per_layer\[0\]=65"),
        ({"gate_mode": "relu"}, r"gate_mode='relu'"),
    ],
)
def test_bad_configs(cfg, match):
    with pytest.raises(ValueError, match=match):
        upcycle.BankSparseConfig(**cfg)


def test_unsupported_architectures():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel has no SwiGLU FFN.*Unsupported architecture"):
        upcycle.convert(gpt2, progress=False)
    gelu = tiny_model(vocab_size=512, hidden_act="gelu")
    with pytest.raises(ValueError, match=r"activation is .*not SiLU"):
        upcycle.convert(gelu, progress=False)
    model = upcycle.convert(tiny_model(vocab_size=512), progress=False)
    with pytest.raises(ValueError, match="already converted"):
        upcycle.convert(model, progress=False)


def test_full_rank_svd_init_reproduces_gate_preactivation():
    model = tiny_model(vocab_size=512)
    upcycle.convert(model, upcycle.BankSparseConfig(predictor_rank=64, predictor_init="svd"), progress=False)
    m = next(m for _, m in sparse_ffns(model))
    x = torch.randn(10, 64)
    assert torch.allclose(m.predictor(x), m.gate_proj(x), atol=1e-4)


def test_calibrated_predictor_beats_svd_and_random():
    # Real FFNs have uneven up_proj row norms: |h| ranking depends on them, an SVD of the gate cannot see them.
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(vocab_size=512, hidden_size=64, intermediate_size=256)
    ids = torch.randint(0, 512, (12, 64))
    calib, held = ids[:10], ids[10:]
    recalls = {}
    for init in ("random", "svd", "calibrate"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg).eval()
        for layer in model.model.layers:
            layer.mlp.up_proj.weight.data *= torch.randn(256, 1).exp()
        upcycle.convert(model, upcycle.BankSparseConfig(predictor="lowrank", predictor_init=init, calibrate_steps=100,
                                                        calibrate_lr=3e-2), calibration_ids=calib, progress=False)
        recalls[init] = sum(measure_recall(model, held).values()) / 2
    assert recalls["random"] < 0.3, recalls
    assert recalls["calibrate"] > recalls["svd"] + 0.1, recalls
    assert recalls["calibrate"] > 0.25 + 0.2, recalls


def test_recall_of_a_perfect_predictor_is_one():
    model = upcycle.convert(tiny_model(vocab_size=512), progress=False)
    m = next(m for _, m in sparse_ffns(model))
    x = capture_ffn_inputs(model, [m], torch.randint(0, 512, (2, 16)), progress=False)[0]
    assert predictor_recall(m, x) < 1.0
    m.predictor.forward = lambda inp: (m.act_fn(m.gate_proj(inp)) * m.up_proj(inp)).abs()
    assert predictor_recall(m, x) == 1.0


@pytest.mark.parametrize("steps", [None, 3])
def test_calibration_steps_scale_with_the_layer_unless_given_and_the_bar_counts_them(steps, capsys):
    from upcycle.recipes.bank_sparse.config import default_calibrate_steps
    from upcycle.recipes.bank_sparse.convert import saved_config

    model = tiny_model(vocab_size=512)  # 2 layers, intermediate_size 256
    ids = torch.randint(0, 512, (4, 32))
    upcycle.convert(model, upcycle.BankSparseConfig(predictor="lowrank", predictor_init="calibrate",
                                                    calibrate_steps=steps), calibration_ids=ids)
    ran = default_calibrate_steps(256) if steps is None else steps
    assert ran == (64 if steps is None else 3)  # a tiny layer: far fewer than a real LLM's 300
    err = capsys.readouterr().err
    assert "calibrate" in err and f"{2 * ran}/{2 * ran}" in err and "step" in err  # fit steps of both layers
    assert saved_config(model).calibrate_steps == ran  # the checkpoint records what ran
