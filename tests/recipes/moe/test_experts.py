"""Expert compute: grouped GEMM and the per-expert loop against the all-experts dense reference (forward and
gradients), and the layer against transformers' own Mixtral / Qwen2-MoE blocks on the same weights."""

import pytest
import torch
from transformers import MixtralConfig, Qwen2MoeConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

from upcycle.recipes.moe import GroupedExperts, MoESwiGLU, MoEUpcycleConfig, dense_reference, grouped_mm_supported
from upcycle.recipes.moe.routing import route

BACKENDS = ["loop"] + (["grouped_mm"] if grouped_mm_supported("cpu", torch.float32, 24, 40) else [])


def _case(t: int, e: int, k: int, seed: int, starve: bool = True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, 24, generator=gen)
    logits = torch.randn(t, e, generator=gen)
    if starve:
        logits[:, -1] -= 30.0  # last expert receives no token: empty groups must work
    weights, idx, _ = route(logits, k)
    return x, idx, weights


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("t", "e", "k"), [(37, 6, 2), (16, 4, 1), (9, 5, 4), (1, 6, 2)])
def test_forward_and_grads_match_dense_reference(backend, t, e, k):
    torch.manual_seed(t * 10 + e)
    experts = GroupedExperts(e, 24, 40, backend=backend)
    experts.reset_parameters(std=0.2)
    x, idx, w = _case(t, e, k, seed=t + e, starve=t > 1 and k < e - 1)
    x.requires_grad_(True)
    w.requires_grad_(True)
    out = experts(x, idx, w)
    ref = dense_reference(x, idx, w, experts.gate_up_proj, experts.down_proj)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, w, experts.gate_up_proj, experts.down_proj), g)
    ref_grads = torch.autograd.grad(ref, (x, w, experts.gate_up_proj, experts.down_proj), g)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_reference_catches_wrong_expert_order():
    """Control: permuting the experts' weights must break the comparison."""
    experts = GroupedExperts(4, 24, 40, backend="loop")
    experts.reset_parameters(std=0.2)
    x, idx, w = _case(20, 4, 2, seed=3, starve=False)
    ref = dense_reference(x, idx, w, experts.gate_up_proj.flip(0), experts.down_proj.flip(0))
    assert (experts(x, idx, w) - ref).abs().max() > 1e-3


@pytest.mark.skipif("grouped_mm" not in BACKENDS, reason="grouped_mm unavailable on this torch/CPU")
def test_grouped_mm_bf16_close_to_fp32_reference():
    experts = GroupedExperts(6, 24, 40, backend="grouped_mm")
    experts.reset_parameters(std=0.2)
    x, idx, w = _case(64, 6, 2, seed=5)
    ref = dense_reference(x, idx, w, experts.gate_up_proj, experts.down_proj)
    out = experts.to(torch.bfloat16)(x.bfloat16(), idx, w)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


def _moe(config: MoEUpcycleConfig, backend: str = "auto") -> MoESwiGLU:
    torch.manual_seed(0)
    m = MoESwiGLU(32, 48, config, backend=backend)
    m.reset_parameters(std=0.1)
    return m.eval()


def test_matches_transformers_mixtral_block():
    moe = _moe(MoEUpcycleConfig(num_experts=4, top_k=2))
    hf = MixtralSparseMoeBlock(
        MixtralConfig(hidden_size=32, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)
    ).eval()
    hf.gate.weight.data.copy_(moe.gate.weight)
    hf.experts.gate_up_proj.data.copy_(moe.experts.gate_up_proj)
    hf.experts.down_proj.data.copy_(moe.experts.down_proj)
    x = torch.randn(2, 11, 32)
    torch.testing.assert_close(moe(x), hf(x), atol=1e-6, rtol=1e-5)


def test_matches_transformers_qwen2_moe_block_with_always_on_shared_expert():
    cfg = MoEUpcycleConfig(
        init="granular", granularity=4, shared_experts=2, num_experts=4, top_k=2, norm_topk_prob=False
    )
    moe = _moe(cfg)
    hf = Qwen2MoeSparseMoeBlock(
        Qwen2MoeConfig(
            hidden_size=32,
            moe_intermediate_size=48,
            shared_expert_intermediate_size=96,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=False,
        )
    ).eval()
    hf.load_state_dict(
        {
            **moe.state_dict(),
            "shared_expert_gate.weight": torch.zeros(1, 32),
            "shared_expert.down_proj.weight": 2 * moe.shared_expert.down_proj.weight,
        },
        strict=True,
    )
    x = torch.randn(3, 7, 32)
    torch.testing.assert_close(moe(x), hf(x), atol=1e-6, rtol=1e-5)


def test_dropless_token_output_independent_of_batch():
    moe = _moe(MoEUpcycleConfig(num_experts=4, top_k=2))
    x = torch.randn(1, 20, 32)
    full = moe(x)
    single = torch.cat([moe(x[:, i : i + 1]) for i in range(20)], dim=1)  # decode-style, one token at a time
    torch.testing.assert_close(full, single, atol=1e-6, rtol=1e-5)


@pytest.mark.skipif("grouped_mm" not in BACKENDS, reason="grouped_mm unavailable on this torch/CPU")
def test_backends_agree_inside_the_layer():
    x = torch.randn(2, 9, 32, requires_grad=True)
    outs = []
    for backend in ("loop", "grouped_mm"):
        moe = _moe(MoEUpcycleConfig(num_experts=4, top_k=2), backend).train()
        out = moe(x)
        (g,) = torch.autograd.grad(out.square().sum() + moe.aux_losses()["load_balance"], moe.gate.weight)
        outs.append((out, g))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-6, rtol=1e-5)


def test_the_grouped_mm_probe_is_not_fooled_by_no_grad_or_inference_mode():
    """The first MoE forward of a process is often an eval: the capability probe must still see autograd."""
    grouped_mm_supported.cache_clear()
    with torch.inference_mode():
        under_inference = grouped_mm_supported("cpu", torch.float32, 24, 40)
    grouped_mm_supported.cache_clear()
    with torch.no_grad():
        under_no_grad = grouped_mm_supported("cpu", torch.float32, 24, 40)
    grouped_mm_supported.cache_clear()
    assert under_inference == under_no_grad == grouped_mm_supported("cpu", torch.float32, 24, 40)
