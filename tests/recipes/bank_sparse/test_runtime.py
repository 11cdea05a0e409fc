"""The module's no-grad forward through `runtime.decode_forward` equals the reference path."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import upcycle
from upcycle.kernels import cpu
from upcycle.recipes.bank_sparse import runtime
from upcycle.recipes.bank_sparse.modules import BankSparseSwiGLU, sparse_ffns
from upcycle.testing import tiny_model


def _module(d=64, d_ff=256, mode="ste", keep=16, bank=64, dtype=torch.float32) -> BankSparseSwiGLU:
    lin = lambda i, o: nn.Linear(i, o, bias=False, dtype=dtype)  # noqa: E731
    m = BankSparseSwiGLU(
        lin(d, d_ff), lin(d, d_ff), lin(d_ff, d), nn.SiLU(), bank, keep, 16, gate_mode=mode, sigmoid_scale_init=0.8
    )
    with torch.no_grad():
        m.predictor.out_proj.bias.normal_(0, 0.1)
    return m.eval()


def _both(m, x):
    """(fast-path output or None, reference-path output), both under no_grad."""
    with torch.no_grad():
        fast = runtime.decode_forward(m, x)
        with runtime.use_kernels("reference"):
            ref = m(x)
    return fast, ref


def _close(a, b, rtol=1e-5):
    return ((a - b).float().norm() / b.float().norm()).item() < rtol


def _untied_input(m, shape, min_gap=1e-3):
    """A random input whose shadow scores leave no near-tie at any bank's keep boundary.

    A 1-bit shadow's scores are coarse: a near-tie (relative gap ~5e-5) between the 16th and 17th
    channel of a bank flips with summation order, and the two paths then keep different channels.
    """
    for _ in range(100):
        x = torch.randn(*shape)
        with torch.no_grad():
            s = m.predictor(x).reshape(-1, m.bank_size).sort(-1, descending=True).values
        k = m.keep
        if ((s[:, k - 1] - s[:, k]) / s[:, k - 1].abs()).min() > min_gap:
            return x
    raise AssertionError("no untied input in 100 draws")


@pytest.mark.parametrize("mode", ["ste", "sigmoid"])
@pytest.mark.parametrize("impl", ["auto", "torch"])
@pytest.mark.parametrize("shape", [(1, 1), (4, 1), (2, 3)])
def test_decode_matches_reference(mode, impl, shape):
    m = _module(mode=mode)
    x = torch.randn(*shape, 64)
    with runtime.use_kernels(impl):
        fast, ref = _both(m, x)
        with torch.no_grad():
            via_forward = m(x)
    assert fast is not None and fast.shape == x.shape and fast.dtype == x.dtype
    assert _close(fast, ref)
    assert torch.equal(via_forward, fast)


@pytest.mark.parametrize("mode", ["ste", "sigmoid"])
def test_bf16_decode_matches_reference(mode):
    """bf16: logits made exactly representable (bias only), so both paths keep the same channels."""
    m = _module(mode=mode, dtype=torch.bfloat16)
    with torch.no_grad():
        m.predictor.out_proj.weight.zero_()
        m.predictor.out_proj.bias.copy_(torch.randperm(256).float() / 64)
    x = torch.randn(3, 1, 64, dtype=torch.bfloat16)
    fast, ref = _both(m, x)
    assert fast is not None and fast.dtype == torch.bfloat16
    assert _close(fast, ref, 2e-2)


def test_per_layer_keep_and_bank():
    for keep, bank in [(8, 64), (1, 32), (20, 32)]:
        m = _module(keep=keep, bank=bank)
        fast, ref = _both(m, torch.randn(2, 1, 64))
        assert fast is not None and _close(fast, ref)


def test_no_fast_path_when_it_must_not_apply(monkeypatch):
    m = _module()
    x = torch.randn(1, 1, 64)
    assert runtime.decode_forward(m, x) is None  # autograd on
    with torch.no_grad():
        prefill = torch.randn(1, runtime.max_tokens("cpu") + 1, 64)
        assert runtime.decode_forward(m, prefill) is None
        with runtime.use_kernels("reference"):
            assert runtime.decode_forward(m, x) is None
        monkeypatch.setenv("UPCYCLE_KERNELS", "reference")
        assert runtime.decode_forward(m, x) is None
        monkeypatch.delenv("UPCYCLE_KERNELS")
        assert runtime.decode_forward(m, x) is not None
        m.keep = m.bank_size  # dense
        assert runtime.decode_forward(m, x) is None
        m.keep = 16
        m.mask_fn = lambda mod, x, g, u, z: torch.ones_like(z, dtype=torch.bool)
        assert runtime.decode_forward(m, x) is None
        m.mask_fn = None
        h = m.down_proj.register_forward_hook(lambda *a: None)  # hooks must see the real call
        assert runtime.decode_forward(m, x) is None
        h.remove()
        m.up_proj.bias = nn.Parameter(torch.zeros(256))
        assert runtime.decode_forward(m, x) is None


def test_prefill_runs_reference_path():
    m = _module()
    x = torch.randn(2, 40, 64)
    with torch.no_grad():
        y = m(x)
        with runtime.use_kernels("reference"):
            ref = m(x)
    assert torch.equal(y, ref)


def test_cache_invalidated_when_weights_change():
    m = _module()
    x = torch.randn(1, 1, 64)
    sd_keys = set(m.state_dict())
    fast, ref = _both(m, x)
    assert _close(fast, ref)
    assert set(m.state_dict()) == sd_keys  # the packed copy is not state
    with torch.no_grad():
        m.down_proj.weight.mul_(-2.0)  # in place: same storage, new version
    fast2, ref2 = _both(m, x)
    assert _close(fast2, ref2) and not _close(fast2, fast)
    m.load_state_dict({k: v.clone() * 0.5 for k, v in m.state_dict().items()})
    fast3, ref3 = _both(m, x)
    assert _close(fast3, ref3)
    # Training between decodes: an optimizer step changes every weight in place.
    m.train()
    m(torch.randn(3, 5, 64)).pow(2).mean().backward()
    with torch.no_grad():
        for p in m.parameters():  # what an optimizer step does: in-place updates
            p.sub_(0.5 * p.grad / (p.grad.norm() + 1e-12))
    m.eval()
    fast4, ref4 = _both(m, x)
    assert _close(fast4, ref4) and not _close(fast4, fast3)
    runtime.release(m)
    assert runtime.prepare(m) == m.down_proj.weight.nbytes  # split layout: W_down^T only


def test_bundle_layout_matches_and_tracks_gate_up_changes():
    m = _module(mode="sigmoid")
    x = torch.randn(3, 1, 64)
    with runtime.use_kernels("auto", layout="bundle"):
        fast, ref = _both(m, x)
        assert fast is not None and _close(fast, ref)
        with torch.no_grad():
            m.gate_proj.weight.mul_(-1.0)  # the bundle copies gate rows too: must be rebuilt
            m.up_proj.weight.add_(0.1)
        fast2, ref2 = _both(m, x)
        assert _close(fast2, ref2) and not _close(fast2, fast)
    assert runtime.prepare(m, "bundle") == 3 * m.down_proj.weight.nbytes


@pytest.mark.skipif(cpu._compiler() is None, reason="no C compiler: fused CPU kernel not built")
def test_fused_path_is_taken_on_cpu(monkeypatch):
    m = _module()
    calls = []
    real = cpu.fused_sparse_decode
    monkeypatch.setattr(cpu, "fused_sparse_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        m(torch.randn(1, 1, 64))
    assert calls == [1]


@pytest.mark.parametrize("arch,mode", [("qwen2", "ste"), ("llama", "sigmoid")])
def test_generate_matches_reference_generate(arch, mode):
    model = tiny_model(arch, vocab_size=512)
    upcycle.convert(model, upcycle.BankSparseConfig(predictor="lowrank", predictor_init="random", gate_mode=mode),
                    progress=False)
    for _, m in sparse_ffns(model):
        with torch.no_grad():
            m.predictor.out_proj.bias.normal_(0, 0.5)
    ids = torch.randint(0, 512, (2, 7))
    runs = []
    real = runtime._run
    calls = []

    def spy(*a, **k):
        calls.append(a[2].shape)
        return real(*a, **k)

    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        runtime._run = spy
        try:
            runs.append(model.generate(ids, **kw))
        finally:
            runtime._run = real
        with runtime.use_kernels("reference"):
            runs.append(model.generate(ids, **kw))
    assert torch.equal(runs[0], runs[1])
    assert len(calls) >= 2 * 11  # every decode step of both layers took the fast path


@pytest.mark.skipif(not os.environ.get("UPCYCLE_SLOW_TESTS"), reason="compiles (~10-60 s); set UPCYCLE_SLOW_TESTS=1")
@pytest.mark.skipif(cpu._compiler() is None, reason="no C compiler: fused CPU kernel not built")
@pytest.mark.parametrize("predictor", ["lowrank", "shadow"])
def test_torch_compile_fullgraph_uses_fused_op(predictor):
    if predictor == "shadow":
        lin = lambda i, o: nn.Linear(i, o, bias=False)  # noqa: E731
        m = BankSparseSwiGLU(lin(64, 256), lin(64, 256), lin(256, 64), nn.SiLU(), 64, 16, shadow=(2, 32)).eval()
    else:
        m = _module(mode="sigmoid")
    runtime.prepare(m)  # builds the cache and the library outside the compiled graph
    x = torch.randn(2, 1, 64)
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    with torch.no_grad():
        y = torch.compile(m, fullgraph=True)(x)
        torch.compile(m, fullgraph=True, backend=recording_backend)(x)
        with runtime.use_kernels("reference"):
            ref = m(x)
    assert _close(y, ref)
    op = "bank_sparse_shadow_decode_cpu" if predictor == "shadow" else "bank_sparse_decode_cpu"
    assert graphs and op in graphs[0]


@pytest.mark.skipif(cpu._compiler() is None, reason="no C compiler: fused CPU kernel not built")
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_shadow_decode_takes_the_fused_path_and_matches_reference(bits):
    lin = lambda i, o: nn.Linear(i, o, bias=False)  # noqa: E731
    m = BankSparseSwiGLU(lin(128, 512), lin(128, 512), lin(512, 128), nn.SiLU(), 64, 16, shadow=(bits, 64)).eval()
    x = _untied_input(m, (1, 1, 128))
    fast, ref = _both(m, x)
    assert fast is not None and _close(fast, ref)
    with runtime.use_kernels("torch"):
        assert runtime.decode_forward(m, x) is None  # no torch-ops shadow path: the reference runs
    with torch.no_grad():  # the shadow's own, lower token crossover
        limit = runtime.max_tokens("cpu", shadow=True)
        assert limit < runtime.max_tokens("cpu")
        assert runtime.decode_forward(m, torch.randn(1, limit, 128)) is not None
        assert runtime.decode_forward(m, torch.randn(1, limit + 1, 128)) is None
    with torch.no_grad():  # the packed shadow follows in-place weight updates
        m.up_proj.weight.mul_(-1.0)
    x = _untied_input(m, (1, 1, 128))
    fast, ref = _both(m, x)
    assert _close(fast, ref)
    runtime.release(m)
    assert runtime._SHADOW_ATTR not in m.__dict__
    # the op torch.compile sees runs the same kernel
    pack = runtime._shadow_pack(m)
    w_dt = runtime._cache(m, "split").w_down_t
    y_op = cpu.shadow_sparse_decode_op(x.reshape(1, 128), m.gate_proj.weight, m.up_proj.weight, w_dt, *pack.tensors(),
                                       pack.container_bits, pack.group_size, 64, 16)
    assert torch.equal(y_op, fast.reshape(1, 128))
