"""CPU decode kernels vs the pure-PyTorch reference, on fresh random inputs."""

from __future__ import annotations

import os

import pytest
import torch

from upcycle.kernels import cpu
from upcycle.kernels.packing import pack_codes, pack_shadow
from upcycle.kernels.reference import bank_topk_indices, predictor_logits, sparse_swiglu_reference

# Relative (Frobenius) error bound of the output per weight dtype; the kernel accumulates in fp32.
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}

# Skipped only without a C compiler: with one, a kernel that fails to build must fail the tests.
needs_fused = pytest.mark.skipif(cpu._compiler() is None, reason="no C compiler: fused CPU kernel not built")


def _weights(d: int, d_ff: int, r: int, dtype: torch.dtype, bias: bool = True) -> dict:
    w = dict(
        w_gate=torch.randn(d_ff, d) / d**0.5,
        w_up=torch.randn(d_ff, d) / d**0.5,
        w_down=torch.randn(d, d_ff) / d_ff**0.5,
        w_in=torch.randn(r, d) / d**0.5,
        w_out=torch.randn(d_ff, r) / r**0.5,
        b_out=torch.randn(d_ff) * 0.1 if bias else None,
    )
    return {k: None if v is None else v.to(dtype) for k, v in w.items()}


def _reference(x, w, bank, keep, alpha):
    """The reference in float32 on the same (exactly upcast) weights, and its kept indices."""
    f = {k: None if v is None else v.float() for k, v in w.items()}
    a = None if alpha is None else torch.tensor(alpha)
    y = sparse_swiglu_reference(
        x.float(), f["w_gate"], f["w_up"], f["w_down"], f["w_in"], f["w_out"], f["b_out"], bank, keep, a
    )
    idx = bank_topk_indices(predictor_logits(x.float(), f["w_in"], f["w_out"], f["b_out"]), bank, keep)
    return y, idx


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@needs_fused
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("alpha", [None, 0.7])
@pytest.mark.parametrize(
    "T,d,d_ff,r,bank,keep",
    [(1, 96, 512, 16, 64, 16), (3, 72, 384, 12, 64, 16), (17, 40, 240, 8, 48, 12), (64, 33, 128, 5, 32, 1)],
)
def test_fused_matches_reference(T, d, d_ff, r, bank, keep, alpha, dtype):
    if not cpu.fused_supports(dtype):
        pytest.skip(f"compiler lacks {dtype}")
    w = _weights(d, d_ff, r, dtype, bias=T != 3)
    x = torch.randn(T, d).to(dtype)
    out = torch.full((T, d), float("nan"))
    idx = torch.full((T, d_ff // bank * keep), -1, dtype=torch.int32)
    w_down_t = w["w_down"].t().contiguous()
    y = cpu.fused_sparse_decode(
        x, w["w_gate"], w["w_up"], w_down_t, w["w_in"], w["w_out"], w["b_out"], bank, keep, alpha, out=out, idx_out=idx
    )
    ref, ref_idx = _reference(x, w, bank, keep, alpha)
    assert y.dtype == dtype and y.shape == (T, d)
    assert torch.isfinite(out).all(), "every output element must be written"
    assert torch.equal(idx.long(), ref_idx)
    assert _rel(y, ref) < RTOL[dtype]


@needs_fused
def test_fused_reads_bundled_rows():
    """Strided rows: gate, up and down^T as views of one [d_ff, 3d] bundle (the `bundle` layout)."""
    d, d_ff, r, T = 48, 256, 8, 2
    w = _weights(d, d_ff, r, torch.float32)
    bundle = torch.cat([w["w_gate"], w["w_up"], w["w_down"].t()], 1)
    g, u, dt = bundle[:, :d], bundle[:, d : 2 * d], bundle[:, 2 * d :]
    x = torch.randn(T, d)
    y = cpu.fused_sparse_decode(x, g, u, dt, w["w_in"], w["w_out"], w["b_out"], 64, 16, 0.3)
    ref, _ = _reference(x, w, 64, 16, 0.3)
    assert _rel(y, ref) < RTOL[torch.float32]


@needs_fused
def test_fused_rejects_bad_inputs():
    w = _weights(32, 128, 8, torch.float32)
    args = (w["w_gate"], w["w_up"], w["w_down"].t().contiguous(), w["w_in"], w["w_out"], w["b_out"], 64, 16)
    with pytest.raises(ValueError):
        cpu.fused_sparse_decode(torch.randn(cpu.FUSED_MAX_TOKENS + 1, 32), *args)
    with pytest.raises(ValueError):  # down not transposed
        cpu.fused_sparse_decode(torch.randn(1, 32), *args[:2], w["w_down"], *args[3:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("alpha", [None, 0.7])
def test_torch_path_matches_reference(dtype, alpha):
    d, d_ff, r, T = 64, 256, 16, 5
    w = _weights(d, d_ff, r, dtype)
    x = torch.randn(T, d).to(dtype)
    a = None if alpha is None else torch.tensor(alpha, dtype=dtype)
    y = cpu.torch_sparse_decode(
        x, w["w_gate"], w["w_up"], w["w_down"].t().contiguous(), w["w_in"], w["w_out"], w["b_out"], 64, 16, a
    )
    # Same dtype as the reference: both compute the logits with the same torch ops, so the masks agree.
    ref = sparse_swiglu_reference(x, w["w_gate"], w["w_up"], w["w_down"], w["w_in"], w["w_out"], w["b_out"], 64, 16, a)
    assert y.dtype == dtype
    assert _rel(y, ref) < 3 * RTOL[dtype]


@needs_fused
def test_fused_helper_threads_and_concurrent_callers():
    """The helper pool (explicit thread counts; tiny shapes otherwise run on one thread), called
    repeatedly, with changing counts and from two Python threads at once (ctypes drops the GIL)."""
    import threading

    d, d_ff, r = 64, 1024, 16
    w = _weights(d, d_ff, r, torch.float32)
    args = (w["w_gate"], w["w_up"], w["w_down"].t().contiguous(), w["w_in"], w["w_out"], w["b_out"], 64, 16)
    xs = [torch.randn(T, d) for T in (1, 3, 1, 5)]
    refs = [_reference(x, w, 64, 16, None)[0] for x in xs]
    for i in range(24):
        y = cpu.fused_sparse_decode(xs[i % 4], *args, num_threads=1 + i % 3)
        assert _rel(y, refs[i % 4]) < RTOL[torch.float32]
    errors = []

    def worker(k):
        for i in range(10):
            y = cpu.fused_sparse_decode(xs[(i + k) % 4], *args, num_threads=2)
            if _rel(y, refs[(i + k) % 4]) >= RTOL[torch.float32]:
                errors.append((k, i))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_kernel_threads_fixes_the_count_over_the_environment_and_the_pool(monkeypatch):
    """kernel_threads(n) > UPCYCLE_CPU_THREADS > pool_threads > torch's count, for large calls; small calls run on
    one thread unless a count is fixed; the adaptive 1-or-N choice is off whenever a count is fixed."""
    big = 1 << 20
    monkeypatch.delenv("UPCYCLE_CPU_THREADS", raising=False)
    assert cpu._adaptive(None) and cpu._threads(big) == torch.get_num_threads() and cpu._threads(16) == 1
    with cpu.pool_threads(3):
        assert cpu._threads(big) == 3 and not cpu._adaptive(None)
        monkeypatch.setenv("UPCYCLE_CPU_THREADS", "2")
        assert cpu._threads(big) == 2
        with cpu.kernel_threads(5):
            assert cpu._threads(big) == 5 and cpu._threads(16) == 5 and not cpu._adaptive(None)
        assert cpu._threads(big) == 2  # restored on exit
    monkeypatch.delenv("UPCYCLE_CPU_THREADS")
    with cpu.kernel_threads(0):
        assert cpu._threads(big) == 1
    assert cpu._adaptive(None) and cpu._adaptive(2) is False


@needs_fused
@pytest.mark.parametrize("T", [1, 4])
def test_fused_is_bitwise_deterministic_across_thread_counts(T):
    """Same input, same bits out, whatever the thread count: the thread chooser changes it per call,
    so otherwise repeated `generate` calls (and a save/load round trip) would differ in the last bits."""
    d, d_ff, r = 64, 2048, 16
    w = _weights(d, d_ff, r, torch.float32)
    args = (w["w_gate"], w["w_up"], w["w_down"].t().contiguous(), w["w_in"], w["w_out"], w["b_out"], 64, 16)
    x = torch.randn(T, d)
    ys = [cpu.fused_sparse_decode(x, *args, num_threads=n) for n in (1, 2, 3, 1, 2, 5)]
    assert all(torch.equal(y, ys[0]) for y in ys[1:])


@needs_fused
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fused_after_fork():
    """A forked child has no helper threads: the kernel must notice and start its own."""
    d, d_ff, r = 64, 1024, 16
    w = _weights(d, d_ff, r, torch.float32)
    args = (w["w_gate"], w["w_up"], w["w_down"].t().contiguous(), w["w_in"], w["w_out"], w["b_out"], 64, 16)
    x = torch.randn(2, d)
    ref = _reference(x, w, 64, 16, None)[0]
    cpu.fused_sparse_decode(x, *args, num_threads=2)  # the parent's helpers exist now
    pid = os.fork()
    if pid == 0:  # child: exit code 0 iff correct
        ok = _rel(cpu.fused_sparse_decode(x, *args, num_threads=2), ref) < RTOL[torch.float32]
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


@needs_fused
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits,group", [(2, 96), (3, 32), (4, 48), (8, 96), (2, 32), (2, 48), (2, 12), (8, 12),
                                        (1, 192), (1, 64), (1, 24), (1, 8)])
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("dots", ["int16", "float"])  # int16: the AVX2 path where the CPU has it
def test_fused_shadow_matches_reference(T, bits, group, dtype, dots, monkeypatch):
    if dots == "float":
        monkeypatch.setenv("UPCYCLE_SHADOW_FLOAT_DOTS", "1")
    from upcycle.kernels.reference import (
        shadow_dequantize,
        shadow_quantize,
        shadow_scores,
        sparse_swiglu_gather_reference,
    )

    d, d_ff, bank, keep = 192, 384, 64, 16
    w = _weights(d, d_ff, 4, dtype)
    x = torch.randn(T, d).to(dtype)
    pack = pack_shadow(w["w_gate"], w["w_up"], bits, group)
    assert pack.container_bits == (bits if bits <= 2 else 4 if bits <= 4 else 8)
    idx = torch.full((T, d_ff // bank * keep), -1, dtype=torch.int32)
    out = torch.full((T, d), float("nan"))
    y = cpu.fused_sparse_decode(x, w["w_gate"], w["w_up"], w["w_down"].t().contiguous(), None, None, None, bank,
                                keep, out=out, idx_out=idx, shadow=pack)
    assert torch.isfinite(out).all() and y.dtype == dtype
    gq, uq = (shadow_dequantize(*shadow_quantize(w[k], bits, group)) for k in ("w_gate", "w_up"))
    ref_idx = bank_topk_indices(shadow_scores(x.float(), gq, uq), bank, keep)
    # the kernel sums in another order: a near-tie may flip, nothing more
    assert (idx.long() == ref_idx).float().mean() > 0.99
    f = {k: v.float() for k, v in w.items() if v is not None}
    ref = sparse_swiglu_gather_reference(x.float(), f["w_gate"], f["w_up"], f["w_down"], idx.long())
    assert _rel(y, ref) < RTOL[dtype]


@needs_fused
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits,group,T", [(2, 96, 1), (4, 48, 5)])
def test_fused_shadow_with_channel_scale_matches_reference(T, bits, group, dtype):
    """A learned per-channel weight on the shadow's scores (exp of its log-score bias) changes which channels the
    kernel keeps exactly as it changes the reference's."""
    from upcycle.kernels.reference import shadow_dequantize, shadow_quantize, shadow_scores

    d, d_ff, bank, keep = 192, 384, 64, 16
    w = _weights(d, d_ff, 4, dtype)
    x = torch.randn(T, d).to(dtype)
    cs = torch.randn(d_ff).mul_(1.5).exp_()
    pack = pack_shadow(w["w_gate"], w["w_up"], bits, group, cs)
    idx = torch.full((T, d_ff // bank * keep), -1, dtype=torch.int32)
    cpu.fused_sparse_decode(x, w["w_gate"], w["w_up"], w["w_down"].t().contiguous(), None, None, None, bank, keep,
                            idx_out=idx, shadow=pack)
    gq, uq = (shadow_dequantize(*shadow_quantize(w[k], bits, group)) for k in ("w_gate", "w_up"))
    ref_idx = bank_topk_indices(shadow_scores(x.float(), gq, uq, cs), bank, keep)
    plain_idx = bank_topk_indices(shadow_scores(x.float(), gq, uq), bank, keep)
    assert (idx.long() == ref_idx).float().mean() > 0.99
    assert (idx.long() == plain_idx).float().mean() < 0.9  # the weights did change the ranking


def test_pack_codes_layout():
    codes = torch.randint(0, 4, (3, 64), dtype=torch.uint8)
    packed = pack_codes(codes, 2, 32)
    assert packed.shape == (3, 16)
    # byte k of group g holds inputs g*32 + k + 8p at bits 2p
    for g in range(2):
        for k in range(8):
            for p in range(4):
                got = (packed[:, g * 8 + k] >> (2 * p)) & 3
                assert torch.equal(got, codes[:, g * 32 + k + 8 * p])


def test_unpack_inverts_pack_and_unpack_shadow_matches_the_quantiser():
    from upcycle.kernels.packing import unpack_codes, unpack_shadow
    from upcycle.kernels.reference import shadow_dequantize, shadow_quantize

    for bits, group in [(1, 32), (1, 96), (2, 32), (3, 48), (4, 16), (8, 24)]:
        codes = torch.randint(0, 2**bits, (5, 96), dtype=torch.uint8)
        cb = bits if bits <= 2 else 4 if bits <= 4 else 8
        assert torch.equal(unpack_codes(pack_codes(codes, bits, group), cb, group), codes)
        w = torch.randn(7, 96)
        gq, uq = unpack_shadow(pack_shadow(w, 2 * w, bits, group))
        assert torch.equal(gq, shadow_dequantize(*shadow_quantize(w, bits, group)))
        assert torch.equal(uq, shadow_dequantize(*shadow_quantize(2 * w, bits, group)))
