"""The N:M decode runtime: decode-shaped no-grad forwards of 2:4 linears run the CPU kernel, everything else
(autograd, prefill, the reference switch, a weight that is not 2:4) runs dense F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import upcycle
from upcycle.kernels import use_kernels
from upcycle.kernels.cpu import build
from upcycle.kernels.cpu import nm as nm_kernel
from upcycle.recipes.nm import runtime
from upcycle.recipes.nm.convert import targets
from upcycle.testing import tiny_model

pytestmark = pytest.mark.skipif(build.compiler() is None, reason="no C compiler: the N:M CPU kernel is not built")


@pytest.fixture
def calls(monkeypatch):
    seen = []
    original = nm_kernel.nm24_linear

    def counting(x, *a, **kw):
        seen.append(x.shape)
        return original(x, *a, **kw)

    monkeypatch.setattr(nm_kernel, "nm24_linear", counting)
    return seen


def _model(dtype=torch.float32):
    model = tiny_model("llama", vocab_size=128).to(dtype)
    return upcycle.convert(model, upcycle.NMSparseConfig(targets=["ffn", "attention"]), progress=False)


def test_decode_shapes_take_the_kernel_and_match_dense(calls):
    model = _model()
    lin = model.model.layers[0].mlp.up_proj
    x = torch.randn(1, 1, lin.in_features)
    with torch.no_grad():
        y = lin(x)
        with use_kernels("reference"):
            ref = lin(x)
    assert len(calls) == 1 and torch.allclose(y, F.linear(x, lin.weight), atol=1e-5) and torch.equal(
        ref, F.linear(x, lin.weight))
    assert len(calls) == 1  # the reference switch ran dense
    lin(x)  # autograd on: dense (training never reaches the kernel)
    with torch.no_grad():
        lin(torch.randn(1, runtime.max_tokens(torch.float32) + 1, lin.in_features))  # prefill: dense
    assert len(calls) == 1


def test_the_cache_follows_in_place_updates_and_a_weight_that_is_not_2_4_runs_dense(calls):
    model = _model()
    lin = model.model.layers[1].self_attn.q_proj
    x = torch.randn(2, lin.in_features)
    with torch.no_grad():
        lin(x)
        lin.weight.mul_(2.0)  # still 2:4, new version: repacked
        assert torch.allclose(lin(x), F.linear(x, lin.weight), atol=1e-5)
        lin.weight.fill_(1.0)  # no longer 2:4: dense, remembered for this version
        assert torch.equal(lin(x), F.linear(x, lin.weight)) and torch.equal(lin(x), F.linear(x, lin.weight))
    assert len(calls) == 2
    assert runtime.prepare(model) > 0
    runtime.release(model)
    assert all(runtime._CACHE not in m.__dict__ for m in model.modules())


def test_greedy_generate_is_the_same_on_the_kernel_and_on_the_reference_path(calls):
    for dtype in (torch.float32, torch.bfloat16):
        model = _model(dtype).eval()
        ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(1))
        gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            fast = model.generate(ids, **gen)
            with use_kernels("reference"):
                ref = model.generate(ids, **gen)
        assert torch.equal(fast, ref), dtype
    assert len(calls) > 0


def test_loaded_checkpoints_get_the_runtime_and_kept_their_plain_class(tmp_path, calls):
    model = _model()
    loaded = upcycle.load(upcycle.save(model, tmp_path / "m"))
    lins = targets(loaded, upcycle.NMSparseConfig(targets=["ffn", "attention"]))
    assert all(type(lin) is torch.nn.Linear and "forward" in lin.__dict__ for lin in lins.values())
    with torch.no_grad():
        loaded(torch.randint(0, 128, (1, 1)))
    assert len(calls) == len(lins)
