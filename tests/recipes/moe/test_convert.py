"""Conversion: step-0 equivalence with the dense parent, scaling, Drop-Upcycling, clustering, the calibrated
router, bad inputs, and the checkpoint round trip (bitwise logits; re-classed like bank-sparse)."""

import copy
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

import upcycle
from upcycle.recipes import registry
from upcycle.recipes.moe import MoESwiGLU, MoEUpcycleConfig, moe_layers, upcycle_ffn
from upcycle.recipes.moe.partition import cluster_partition, contiguous_partition

from .conftest import make_parent

EQUIVALENT = {
    "copy-renorm": {"num_experts": 4, "top_k": 2},
    "copy-topk_softmax": {"num_experts": 4, "top_k": 1, "router": "topk_softmax"},
    "copy-cube-root": {"num_experts": 4, "top_k": 2, "weight_scaling": "cube_root"},  # s = 1: nothing to scale
    "granular-virtual-group": {
        "init": "granular", "granularity": 4, "num_experts": 8, "top_k": 4, "router_init": "virtual_group",
    },
    "granular-shared": {
        "init": "granular", "granularity": 4, "shared_experts": 1, "num_experts": 6, "top_k": 3,
        "router_init": "virtual_group",
    },
    "split-all-experts": {"init": "split", "num_experts": 4, "top_k": 4, "router_init": "virtual_group"},
    "granular-virtual-group-large-router": {
        # virtual group + exact scaling is insensitive to the router rows' values
        "init": "granular", "granularity": 2, "num_experts": 4, "top_k": 2, "router_init": "virtual_group",
        "router_init_std": 5.0,
    },
}  # fmt: skip


@pytest.mark.parametrize("parent", ["llama", "qwen2"])
@pytest.mark.parametrize("name", list(EQUIVALENT))
def test_step0_logits_equal_dense(parent, name, ids):
    dense = make_parent(parent)
    with torch.no_grad():
        ref = dense(ids).logits
        moe = upcycle.convert(copy.deepcopy(dense), MoEUpcycleConfig(**EQUIVALENT[name]), progress=False)
        assert len(moe_layers(moe)) == 2 and registry.for_model(moe).name == "moe"
        torch.testing.assert_close(moe(ids).logits, ref, atol=1e-5, rtol=1e-5)


def test_step0_control_granular_without_virtual_group_is_not_dense(ids):
    """Control: a random router picks slices of different copies, so the step-0 function changes."""
    dense = make_parent("llama")
    cfg = MoEUpcycleConfig(init="granular", granularity=4, num_experts=8, top_k=4, router_init_std=1.0)
    with torch.no_grad():
        moe = upcycle.convert(copy.deepcopy(dense), cfg, progress=False)
        assert (moe(ids).logits - dense(ids).logits).abs().max() > 1e-3


def _mlp(seed: int = 0, d: int = 32, f: int = 128) -> LlamaMLP:
    torch.manual_seed(seed)
    mlp = LlamaMLP(LlamaConfig(hidden_size=d, intermediate_size=f))
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return mlp.eval()


def test_granular_without_scaling_is_dense_over_g():
    """Negative control: skipping the activation scale leaves exactly 1/G of the dense output."""
    mlp, x = _mlp(), torch.randn(40, 32)
    cfg = MoEUpcycleConfig(init="granular", granularity=4, num_experts=8, top_k=4, router_init="virtual_group",
                           weight_scaling="none")
    with torch.no_grad():
        torch.testing.assert_close(upcycle_ffn(mlp, cfg)(x) * 4, mlp(x), atol=1e-5, rtol=1e-5)


def test_unnormalised_copy_scales_by_selected_mass():
    """softmax_topk without renorm + exact scaling: y = (E/k) * sum(selected p) * dense(x)."""
    mlp, x = _mlp(), torch.randn(40, 32)
    moe = upcycle_ffn(mlp, MoEUpcycleConfig(num_experts=4, top_k=2, norm_topk_prob=False, router_init_std=1.0))
    with torch.no_grad():
        mass = torch.softmax(moe.gate(x), -1).topk(2, -1).values.sum(-1, keepdim=True)
        torch.testing.assert_close(moe(x), 2.0 * mass * mlp(x), atol=1e-5, rtol=1e-5)
    assert (mass < 0.99).any()  # so the test would notice a missing factor


def test_cube_root_scaling_puts_factor_on_all_three_matrices():
    mlp = _mlp()
    cfg = dict(init="granular", granularity=2, num_experts=4, top_k=2, norm_topk_prob=False)
    s = MoEUpcycleConfig(**cfg).activation_scale()  # E * R / k = 4
    plain = upcycle_ffn(mlp, MoEUpcycleConfig(**cfg, weight_scaling="none"))
    cube = upcycle_ffn(mlp, MoEUpcycleConfig(**cfg, weight_scaling="cube_root"))
    exact = upcycle_ffn(mlp, MoEUpcycleConfig(**cfg, weight_scaling="exact"))
    c = s ** (1 / 3)
    torch.testing.assert_close(cube.experts.gate_up_proj, c * plain.experts.gate_up_proj)
    torch.testing.assert_close(cube.experts.down_proj, c * plain.experts.down_proj)
    torch.testing.assert_close(exact.experts.down_proj, s * plain.experts.down_proj)
    torch.testing.assert_close(exact.experts.gate_up_proj, plain.experts.gate_up_proj)
    override = upcycle_ffn(mlp, MoEUpcycleConfig(**cfg, expert_scale=1.5))
    torch.testing.assert_close(override.experts.down_proj, 1.5 * plain.experts.down_proj)


def test_expert_layout_matches_partition():
    mlp = _mlp()
    moe = upcycle_ffn(mlp, MoEUpcycleConfig(init="granular", granularity=4, shared_experts=1, num_experts=6, top_k=3,
                                            weight_scaling="none"))
    f = 32
    wg, wu, wd = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    torch.testing.assert_close(moe.shared_expert.gate_proj.weight, wg[:f])
    for e in range(6):
        j = 1 + e % 3  # expert c*R + j holds slice S + j
        sl = slice(j * f, (j + 1) * f)
        torch.testing.assert_close(moe.experts.gate_up_proj[e], torch.cat([wg[sl], wu[sl]]))
        torch.testing.assert_close(moe.experts.down_proj[e], wd[:, sl])


def test_drop_upcycle_redraws_exactly_r_channels_per_expert():
    mlp = _mlp(f=256)
    moe = upcycle_ffn(mlp, MoEUpcycleConfig(num_experts=4, top_k=2, drop_upcycle=0.5))
    wg, wu, wd = (p.detach() for p in (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight))
    changed_sets, new_vals = [], []
    for e in range(4):
        gu, down = moe.experts.gate_up_proj[e].detach(), moe.experts.down_proj[e].detach()
        g_changed = (gu[:256] != wg).any(1)
        assert torch.equal(g_changed, (gu[256:] != wu).any(1))
        assert torch.equal(g_changed, (down != wd).any(0))
        assert int(g_changed.sum()) == 128
        changed_sets.append(g_changed)
        new_vals.append(gu[:256][g_changed])
    assert not torch.equal(changed_sets[0], changed_sets[1])
    drawn = torch.cat(new_vals)
    assert drawn.mean().item() == pytest.approx(wg.mean().item(), abs=0.01)
    assert drawn.std().item() == pytest.approx(wg.std().item(), rel=0.05)


@pytest.mark.parametrize(("layers", "expected"), [(2, [1, 3]), ([0, 2], [0, 2]), (None, [0, 1, 2, 3])])
def test_layer_selection_leaves_the_other_ffns_dense(layers, expected, ids):
    dense = make_parent("qwen2", num_hidden_layers=4)
    moe = upcycle.convert(copy.deepcopy(dense), MoEUpcycleConfig(num_experts=2, top_k=1, layers=layers),
                          progress=False)
    assert sorted(moe_layers(moe)) == expected
    assert all(type(moe.model.layers[i].mlp).__name__ == "Qwen2MLP" for i in range(4) if i not in expected)
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, atol=1e-5, rtol=1e-5)


def _planted(seed: int = 0, d: int = 32, f: int = 128, groups: int = 4, n: int = 2048):
    """MLP whose channels come in `groups` co-activating families, in shuffled order, and matching tokens."""
    g = torch.Generator().manual_seed(seed)
    mlp = LlamaMLP(LlamaConfig(hidden_size=d, intermediate_size=f))
    dirs = torch.linalg.qr(torch.randn(d, groups, generator=g))[0].t()  # [groups, d] orthonormal
    truth = torch.randperm(f, generator=g) % groups
    with torch.no_grad():
        mlp.gate_proj.weight.copy_(3 * dirs[truth] + 0.3 * torch.randn(f, d, generator=g))
        mlp.up_proj.weight.copy_(3 * dirs[truth] + 0.3 * torch.randn(f, d, generator=g))
        mlp.down_proj.weight.normal_(std=0.1, generator=g)
    x = 1.5 * dirs[torch.randint(groups, (2 * n,), generator=g)] + 0.3 * torch.randn(2 * n, d, generator=g)
    return mlp.eval(), truth, x[:n], x[n:]


def _purity(parts: torch.Tensor, truth: torch.Tensor) -> float:
    return sum(torch.bincount(truth[p], minlength=4).max().item() for p in parts) / truth.numel()


def test_cluster_split_recovers_planted_channel_groups():
    mlp, truth, x, _ = _planted()
    h = (mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)).detach()
    parts = cluster_partition(h, 4)
    assert parts.shape == (4, 32)
    assert torch.equal(parts.flatten().sort().values, torch.arange(128))
    assert _purity(parts, truth) > 0.95
    assert _purity(contiguous_partition(128, 4), truth) < 0.6  # control


def _top1_accuracy(moe, x: torch.Tensor) -> float:
    """How often the router's top-1 is the expert with the largest output norm."""
    f = moe.expert_size
    with torch.no_grad():
        norms = []
        for e in range(moe.num_experts):
            gu, dn = moe.experts.gate_up_proj[e], moe.experts.down_proj[e]
            norms.append(((moe.act_fn(x @ gu[:f].t()) * (x @ gu[f:].t())) @ dn.t()).norm(dim=-1))
        return (torch.stack(norms, 1).argmax(1) == moe.gate(x).argmax(1)).float().mean().item()


def test_calibrated_router_picks_the_strongest_expert_on_held_out_tokens():
    mlp, _, calib, held_out = _planted()
    kw = dict(init="split", split_by="cluster", num_experts=4, top_k=1)
    calibrated = upcycle_ffn(mlp, MoEUpcycleConfig(**kw, router_init="calibrate"), calib_x=calib)
    random = upcycle_ffn(mlp, MoEUpcycleConfig(**kw, router_init="random"), calib_x=calib)
    assert _top1_accuracy(calibrated, held_out) > 0.9
    assert _top1_accuracy(random, held_out) < 0.6


def test_calibration_ids_end_to_end_and_the_missing_calibration_error(ids):
    dense = make_parent("llama")
    cfg = MoEUpcycleConfig(init="split", split_by="cluster", num_experts=4, top_k=2, router_init="calibrate")
    with pytest.raises(ValueError, match="split_by='cluster' and router_init='calibrate' need calibration text"):
        upcycle.convert(copy.deepcopy(dense), cfg, progress=False)
    moe = upcycle.convert(copy.deepcopy(dense), cfg, calibration_ids=torch.randint(0, 512, (4, 64)), progress=False)
    with torch.no_grad():
        assert torch.isfinite(moe(ids).logits).all()


@pytest.mark.parametrize(("cfg", "message"), [
    (dict(init="split", num_experts=5, top_k=1), "d_ff=256 is not divisible into 5 slices"),
    (dict(init="granular", granularity=3, num_experts=3, top_k=3), "not divisible into 3 slices"),
    (dict(num_experts=2, top_k=1, layers=[7]), "indices [7] >= num_layers=2"),
])
def test_impossible_conversions_are_refused_before_any_change(cfg, message):
    model = make_parent("llama")
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        upcycle.convert(model, MoEUpcycleConfig(**cfg), progress=False)
    assert not any(isinstance(m, MoESwiGLU) for m in model.modules())
    assert type(model).__name__ == "LlamaForCausalLM"


def test_biased_mlps_and_converted_models_are_refused():
    with pytest.raises(ValueError, match="mlp_bias"):
        upcycle.convert(make_parent("llama", mlp_bias=True), MoEUpcycleConfig(num_experts=2, top_k=1), progress=False)
    moe = upcycle.convert(make_parent("llama"), MoEUpcycleConfig(num_experts=2, top_k=1), progress=False)
    with pytest.raises(ValueError, match="already converted to MoE"):
        upcycle.convert(moe, MoEUpcycleConfig(num_experts=2, top_k=1), progress=False)
    with pytest.raises(ValueError, match="has no dense form"):
        upcycle.to_dense(moe)


@pytest.mark.parametrize("parent", ["llama", "qwen2"])
def test_save_load_round_trip_is_bitwise_and_reclassed(parent, ids, tmp_path):
    cfg = MoEUpcycleConfig(init="granular", granularity=2, shared_experts=1, num_experts=2, top_k=1, drop_upcycle=0.5,
                           layers=[1])
    model = upcycle.convert(make_parent(parent), cfg, progress=False).eval()
    with torch.no_grad():
        ref = model(ids).logits
    upcycle.save(model, tmp_path / "ck")
    loaded = upcycle.load(tmp_path / "ck")
    assert loaded.config.model_type == f"upcycle_{parent}" and sorted(moe_layers(loaded)) == [1]
    assert loaded.model.layers[1].mlp.config == cfg
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ck").eval()  # after `import upcycle`
    assert type(plain).__name__ == f"Upcycle{type(make_parent(parent)).__name__}"
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)
        assert torch.equal(plain(ids).logits, ref)
    plain.save_pretrained(tmp_path / "again")  # the HF class round trip keeps the recipe
    with torch.no_grad():
        assert torch.equal(upcycle.load(tmp_path / "again")(ids).logits, ref)


def test_plain_transformers_refuses_an_moe_checkpoint(moe_dir):
    code = ("import sys; from transformers import AutoModelForCausalLM\n"
            "try:\n    AutoModelForCausalLM.from_pretrained(sys.argv[1])\nexcept Exception as e:\n"
            "    print('REFUSED', type(e).__name__); sys.exit(0)\nprint('LOADED'); sys.exit(1)\n")
    r = subprocess.run([sys.executable, "-c", code, str(moe_dir)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "REFUSED" in r.stdout, r.stdout + r.stderr[-2000:]


def test_decode_with_kv_cache_matches_the_full_forward():
    """Prefill + token-by-token decode through the same module equals one full forward; generate runs."""
    model = upcycle.convert(make_parent("qwen2"), MoEUpcycleConfig(num_experts=4, top_k=2, drop_upcycle=0.5),
                            progress=False)
    tokens = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        full = model(tokens).logits
        out = model(tokens[:, :8], use_cache=True)
        cache, steps = out.past_key_values, [out.logits]
        for i in range(8, 12):
            out = model(tokens[:, i: i + 1], cache=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert model.generate(tokens[:, :4], max_new_tokens=4, do_sample=False).shape == (1, 8)
