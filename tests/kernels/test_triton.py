"""Triton decode kernels vs the reference, run on CPU tensors through the Triton interpreter.

The interpreter executes the same kernel code (indexing, masks, the in-register top-k, split-K
reduction) with NumPy; it does not check GPU-only properties (performance, shared memory limits).
Tiny shapes: the interpreter is slow.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

# Without a GPU the kernels run in the Triton interpreter, which must be on before triton is first
# imported (its own jit helpers, e.g. tl.sum's combine function, are decorated at import time).
INTERPRET = not torch.cuda.is_available()
_imported_before = "triton" in sys.modules
if INTERPRET and not _imported_before:
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")
DEVICE = "cpu" if INTERPRET else "cuda"
# Something imported triton earlier in this session without the interpreter: rerun this file alone.
RERUN = INTERPRET and _imported_before and os.environ.get("TRITON_INTERPRET") != "1"

from upcycle.kernels.reference import bank_topk_indices, predictor_logits, sparse_swiglu_reference  # noqa: E402

RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
skip_if_rerun = pytest.mark.skipif(RERUN, reason="run in a fresh interpreter-mode process by test_rerun_in_subprocess")


@pytest.fixture(scope="module")
def kernels():
    from upcycle.kernels.triton import decode

    return decode


@pytest.mark.skipif(not RERUN, reason="only needed when triton was imported before the interpreter was enabled")
def test_rerun_in_subprocess():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


@skip_if_rerun
@pytest.mark.parametrize(
    "dtype,T,alpha,d,d_ff,r,bank,keep,bias",
    [
        (torch.float32, 1, None, 80, 256, 24, 64, 16, True),
        (torch.bfloat16, 2, 0.7, 64, 256, 16, 64, 16, True),
        (torch.float16, 3, None, 40, 96, 8, 48, 12, False),  # bank and keep not powers of two, d not a block multiple
        (torch.float32, 16, 0.5, 16, 64, 4, 32, 5, True),
    ],
)
def test_triton_matches_reference(kernels, dtype, T, alpha, d, d_ff, r, bank, keep, bias):
    w_gate, w_up = (torch.randn(d_ff, d) / d**0.5).to(dtype), (torch.randn(d_ff, d) / d**0.5).to(dtype)
    w_down = (torch.randn(d, d_ff) / d_ff**0.5).to(dtype)
    w_in, w_out = (torch.randn(r, d) / d**0.5).to(dtype), (torch.randn(d_ff, r) / r**0.5).to(dtype)
    b_out = (torch.randn(d_ff) * 0.1).to(dtype) if bias else None
    x = torch.randn(T, d).to(dtype)
    a = None if alpha is None else torch.tensor(alpha, dtype=dtype)
    w_gate, w_up, w_down, w_in, w_out, b_out, x, a = (
        None if t is None else t.to(DEVICE) for t in (w_gate, w_up, w_down, w_in, w_out, b_out, x, a)
    )
    k = d_ff // bank * keep
    out = torch.full((T, d), float("nan"), dtype=dtype, device=DEVICE)
    idx = torch.full((T, k), -1, dtype=torch.int32, device=DEVICE)
    y = kernels.sparse_decode(
        x,
        w_gate,
        w_up,
        w_down.t().contiguous(),
        w_in,
        w_out,
        b_out,
        bank,
        keep,
        a,
        out=out,
        idx_out=idx,
        block_d=32,
        block_n=16,
        block_k=16,
        split_k=2,
    )
    f = lambda t: None if t is None else t.float()  # noqa: E731
    ref = sparse_swiglu_reference(f(x), f(w_gate), f(w_up), f(w_down), f(w_in), f(w_out), f(b_out), bank, keep, f(a))
    ref_idx = bank_topk_indices(predictor_logits(f(x), f(w_in), f(w_out), f(b_out)), bank, keep)
    assert y is out and torch.isfinite(out).all(), "every output element must be written"
    assert torch.equal(idx.long(), ref_idx)
    assert ((y.float() - ref).norm() / ref.norm()).item() < RTOL[dtype]


@skip_if_rerun
def test_triton_default_tiles(kernels):
    """The launcher's own tile and split choices (as used on the GPU), float32, one token."""
    d, d_ff, r = 96, 512, 16
    w = [torch.randn(s, device=DEVICE) / s[-1] ** 0.5 for s in [(d_ff, d), (d_ff, d), (d, d_ff), (r, d), (d_ff, r)]]
    b = torch.randn(d_ff, device=DEVICE) * 0.1
    x = torch.randn(1, d, device=DEVICE)
    ref = sparse_swiglu_reference(x, w[0], w[1], w[2], w[3], w[4], b, 64, 16)
    y = kernels.sparse_decode(x, w[0], w[1], w[2].t().contiguous(), w[3], w[4], b, 64, 16)
    assert ((y - ref).norm() / ref.norm()).item() < 1e-5  # TF32 is not involved: no tl.dot
    bundle = torch.cat([w[0], w[1], w[2].t()], 1)  # the `bundle` layout: strided row views
    y2 = kernels.sparse_decode(x, bundle[:, :d], bundle[:, d : 2 * d], bundle[:, 2 * d :], w[3], w[4], b, 64, 16)
    assert ((y2 - ref).norm() / ref.norm()).item() < 1e-5


@skip_if_rerun
@pytest.mark.parametrize(
    "dtype,T,bits,group,d,d_ff,bank,keep",
    [
        (torch.float32, 1, 2, 32, 96, 256, 64, 16),
        (torch.bfloat16, 3, 4, 48, 96, 192, 64, 16),  # 24 bytes per group: a masked, non-power-of-two tile
        (torch.float16, 2, 3, 32, 64, 96, 48, 12),  # 3 bits in 4-bit containers, bank not a power of two
        (torch.float32, 2, 8, 16, 32, 128, 32, 5),
        (torch.float32, 2, 1, 64, 128, 256, 64, 16),  # 1 bit: eight planes per byte
    ],
)
@pytest.mark.parametrize("scaled", [False, True])  # True: a learned per-channel weight on the scores
def test_triton_shadow_matches_reference(kernels, dtype, T, bits, group, d, d_ff, bank, keep, scaled):
    """The shadow route kernel unpacks the same codes the CPU kernel reads and scores, routes and
    gathers like the reference on the dequantised shadow."""
    from upcycle.kernels.packing import pack_shadow
    from upcycle.kernels.reference import (
        shadow_dequantize,
        shadow_quantize,
        shadow_scores,
        sparse_swiglu_gather_reference,
    )

    w_gate, w_up = (torch.randn(d_ff, d) / d**0.5).to(dtype), (torch.randn(d_ff, d) / d**0.5).to(dtype)
    w_down = (torch.randn(d, d_ff) / d_ff**0.5).to(dtype)
    x = torch.randn(T, d).to(dtype)
    w_gate, w_up, w_down, x = (t.to(DEVICE) for t in (w_gate, w_up, w_down, x))
    cs = torch.rand(d_ff, device=DEVICE).mul_(3).exp_() if scaled else None
    pack = pack_shadow(w_gate, w_up, bits, group, cs)
    assert pack.gate_codes.device.type == DEVICE
    k = d_ff // bank * keep
    out = torch.full((T, d), float("nan"), dtype=dtype, device=DEVICE)
    idx = torch.full((T, k), -1, dtype=torch.int32, device=DEVICE)
    y = kernels.shadow_sparse_decode(x, w_gate, w_up, w_down.t().contiguous(), pack, bank, keep, out=out, idx_out=idx,
                                     block_d=32, block_n=16, block_k=16, split_k=2)
    assert y is out and torch.isfinite(out).all(), "every output element must be written"
    gq, uq = (shadow_dequantize(*shadow_quantize(w, bits, group)) for w in (w_gate, w_up))
    ref_idx = bank_topk_indices(shadow_scores(x.float(), gq, uq, cs), bank, keep)
    assert (idx.long() == ref_idx).float().mean() > 0.99  # summation order differs: a near-tie may flip
    ref = sparse_swiglu_gather_reference(x.float(), w_gate.float(), w_up.float(), w_down.float(), idx.long())
    assert ((y.float() - ref).norm() / ref.norm()).item() < RTOL[dtype]


@skip_if_rerun
@pytest.mark.parametrize("predictor", ["lowrank", "shadow"])
def test_dispatch_triton_path_matches_module_reference(predictor):
    """What `decode_forward` runs on CUDA (`runtime._run('triton', ...)`, and the custom op that
    torch.compile / CUDA graphs see), exercised here on the interpreter: equal to the module's
    reference forward."""
    from torch import nn

    from upcycle.kernels import triton as triton_kernels
    from upcycle.recipes.bank_sparse import runtime
    from upcycle.recipes.bank_sparse.modules import BankSparseSwiGLU

    lin = lambda i, o: nn.Linear(i, o, bias=False, device=DEVICE)  # noqa: E731
    kw = dict(shadow=(2, 32)) if predictor == "shadow" else dict(rank=8)
    m = BankSparseSwiGLU(lin(64, 256), lin(64, 256), lin(256, 64), nn.SiLU(), 64, 16, **kw).eval()
    x = torch.randn(2, 64, device=DEVICE)
    with torch.no_grad():
        with runtime.use_kernels("reference"):
            ref = m(x)
        y = runtime._run("triton", m, x, x.shape)
        assert ((y - ref).norm() / ref.norm()).item() < 1e-5
        if predictor == "shadow":
            pack = runtime._shadow_pack(m)
            w_dt = runtime._cache(m, "split").w_down_t
            y_op = triton_kernels.shadow_sparse_decode_op(x, m.gate_proj.weight, m.up_proj.weight, w_dt,
                                                          *pack.tensors(), pack.container_bits, pack.group_size, 64, 16)
            assert torch.equal(y_op, y)
