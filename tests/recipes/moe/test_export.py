"""Export to native Mixtral / Qwen2-MoE: reloaded by AutoModelForCausalLM (no remote code), the logits equal the
upcycled model's; settings a target cannot represent are refused with the target that works."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, MixtralForCausalLM, Qwen2MoeForCausalLM

import upcycle
from upcycle.cli import main
from upcycle.recipes.moe import MoEUpcycleConfig
from upcycle.recipes.moe.export import choose_target, export, export_hf, representable

from .conftest import make_parent, spread_routers

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # a size-0 shared expert
DROP = {"drop_upcycle": 0.5}  # experts differ, so a wrong expert order or slice would show
CASES = {
    "llama-mixtral-copy": ("llama", "mixtral", {"num_experts": 4, "top_k": 2, **DROP}, {}),
    "llama-mixtral-granular": ("llama", "mixtral", {"init": "granular", "granularity": 2, "num_experts": 4,
                                                     "top_k": 2, "router_init": "virtual_group", **DROP}, {}),
    "llama-mixtral-topk_softmax": ("llama", "mixtral", {"num_experts": 4, "top_k": 2, "router": "topk_softmax"}, {}),
    "llama-mixtral-tied-headdim": ("llama", "mixtral", {"num_experts": 4, "top_k": 1, **DROP},
                                   {"tie_word_embeddings": True, "head_dim": 32}),
    "mistral-mixtral-sliding": ("mistral", "mixtral", {"num_experts": 4, "top_k": 2, **DROP}, {"sliding_window": 6}),
    "qwen2-qwen2_moe-copy": ("qwen2", "qwen2_moe", {"num_experts": 4, "top_k": 2, **DROP}, {}),
    "qwen2-qwen2_moe-granular-shared": ("qwen2", "qwen2_moe", {"init": "granular", "granularity": 4,
                                                                "shared_experts": 1, "num_experts": 6, "top_k": 3,
                                                                **DROP}, {}),
    "qwen2-qwen2_moe-every-2nd-layer": ("qwen2", "qwen2_moe", {"num_experts": 4, "top_k": 2, "layers": 2, **DROP},
                                        {"num_hidden_layers": 3}),
    "llama-qwen2_moe-split-shared-unnormalised": ("llama", "qwen2_moe", {"init": "split", "shared_experts": 2,
                                                                          "num_experts": 6, "top_k": 2,
                                                                          "norm_topk_prob": False, **DROP}, {}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_native_checkpoint_reloads_with_equal_logits(name, ids, tmp_path):
    parent, target, moe_kw, parent_kw = CASES[name]
    model = upcycle.convert(make_parent(parent, **parent_kw), MoEUpcycleConfig(**moe_kw), progress=False).eval()
    spread_routers(model)
    with torch.no_grad():
        ref = model(ids).logits
    assert choose_target(model) == target  # what --to hf picks
    export(model, tmp_path / "native", "hf")
    native = AutoModelForCausalLM.from_pretrained(tmp_path / "native").eval()
    assert type(native) is {"mixtral": MixtralForCausalLM, "qwen2_moe": Qwen2MoeForCausalLM}[target]
    with torch.no_grad():
        diff = (native(ids).logits - ref).abs().max().item()
    assert diff <= 1e-4, diff
    assert "upcycle" not in json.loads((tmp_path / "native" / "config.json").read_text())


def test_checkpoint_keys_are_per_expert_and_llama_gets_zero_qkv_biases_in_qwen2_moe(ids, tmp_path):
    model = upcycle.convert(make_parent("llama"), MoEUpcycleConfig(num_experts=4, top_k=2, layers=[1], **DROP),
                            progress=False).eval()
    config, sd = export_hf(model, "qwen2_moe")
    assert config.mlp_only_layers == [0] and config.qkv_bias and config.shared_expert_intermediate_size == 0
    assert sd["model.layers.1.mlp.experts.gate_up_proj"].shape == (4, 512, 64)  # [E, 2f, d]
    assert sd["model.layers.1.mlp.experts.down_proj"].shape == (4, 64, 256)  # [E, d, f]
    assert not sd["model.layers.0.self_attn.q_proj.bias"].any()
    export(model, tmp_path / "q", "qwen2_moe")
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.1.mlp.experts.3.gate_proj.weight" in keys  # transformers' per-expert checkpoint layout
    assert "model.layers.1.mlp.experts.gate_up_proj" not in keys
    export(upcycle.convert(make_parent("llama"), MoEUpcycleConfig(num_experts=2, top_k=1), progress=False),
           tmp_path / "m", "mixtral")
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        assert {"model.layers.0.block_sparse_moe.gate.weight",
                "model.layers.0.block_sparse_moe.experts.1.w2.weight"} <= set(f.keys())


REFUSED = {
    "shared-expert-into-mixtral": ("llama", {"init": "granular", "granularity": 2, "shared_experts": 1,
                                             "num_experts": 2, "top_k": 1}, "no shared expert"),
    "softmax-topk-unnormalised-into-mixtral": ("llama", {"num_experts": 4, "top_k": 2, "norm_topk_prob": False},
                                               "norm_topk_prob=False"),
    "partial-layers-into-mixtral": ("llama", {"num_experts": 4, "top_k": 2, "layers": [0]}, "layers [1] are dense"),
    "qkv-bias-into-mixtral": ("qwen2", {"num_experts": 4, "top_k": 2}, "q/k/v bias"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_unrepresentable_mixtral_exports_name_qwen2_moe(name, tmp_path):
    parent, kw, what = REFUSED[name]
    model = upcycle.convert(make_parent(parent), MoEUpcycleConfig(**kw), progress=False)
    with pytest.raises(ValueError) as err:
        export(model, tmp_path / "out", "mixtral")
    assert what in str(err.value) and "--to qwen2_moe" in str(err.value)
    assert not (tmp_path / "out").exists()
    assert representable(model, "qwen2_moe") is None and choose_target(model) == "qwen2_moe"


def test_o_proj_bias_dense_models_and_unknown_targets_are_refused():
    model = upcycle.convert(make_parent("llama", attention_bias=True), MoEUpcycleConfig(num_experts=2, top_k=1),
                            progress=False)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.bias.fill_(0.1)
    with pytest.raises(ValueError, match="o_proj has a bias"):
        export_hf(model, "qwen2_moe")
    with pytest.raises(ValueError, match="no MoE layers"):
        export_hf(make_parent("llama"), "mixtral")
    with pytest.raises(ValueError, match="is not one of mixtral, qwen2_moe"):
        export_hf(model, "deepseek")


def test_cli_export_lists_formats_refuses_and_writes(moe_dir, tokenizer, ids, tmp_path, capsys):
    assert main(["export", str(moe_dir)]) == 0
    assert "hf, mixtral, qwen2_moe" in capsys.readouterr().out
    shared = upcycle.convert(make_parent("llama", vocab_size=len(tokenizer)), MoEUpcycleConfig(
        init="granular", granularity=2, shared_experts=1, num_experts=2, top_k=1), progress=False)
    upcycle.save(shared, tmp_path / "shared", tokenizer=tokenizer)
    assert main(["export", "--to", "mixtral", str(tmp_path / "shared"), str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "no shared expert" in err and "--to qwen2_moe" in err and "Traceback" not in err
    assert not (tmp_path / "m").exists()
    tokens = ids % len(tokenizer)
    for target, cls in (("hf", Qwen2MoeForCausalLM), ("mixtral", MixtralForCausalLM)):  # Qwen2 parent, zero biases
        assert main(["export", "--to", target, str(moe_dir), str(tmp_path / target)]) == 0
        native = AutoModelForCausalLM.from_pretrained(tmp_path / target).eval()
        assert type(native) is cls and (tmp_path / target / "tokenizer.json").exists()
        with torch.no_grad():
            assert (native(tokens).logits - upcycle.load(moe_dir)(tokens).logits).abs().max() <= 1e-4
