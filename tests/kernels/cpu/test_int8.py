"""The int8 kernels (bank-sparse FFN rows, the linear layer) against the float reference on their dequantised
weights, on fresh random inputs."""

from __future__ import annotations

import pytest
import torch

from upcycle.kernels import cpu, use_kernels
from upcycle.kernels.cpu import features
from upcycle.kernels.packing import pack_shadow
from upcycle.kernels.reference import sparse_swiglu_gather_reference, sparse_swiglu_reference

needs_fused = pytest.mark.skipif(cpu._compiler() is None, reason="no C compiler: fused CPU kernel not built")


def _q(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = w.abs().amax(1) / 127
    return (w / s[:, None]).round().to(torch.int8), s


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@needs_fused
@pytest.mark.parametrize("T,d,d_ff,bank,keep", [(1, 96, 512, 64, 16), (3, 72, 384, 64, 16), (17, 40, 240, 48, 12)])
@pytest.mark.parametrize("alpha", [None, 0.5])
def test_int8_rows_lowrank_match_reference(T, d, d_ff, bank, keep, alpha):
    g, u, dn = torch.randn(d_ff, d), torch.randn(d_ff, d), torch.randn(d, d_ff)
    (gq, gs), (uq, us), (dq, ds) = _q(g), _q(u), _q(dn.t().contiguous())
    r = 8
    w_in, w_out, b_out = torch.randn(r, d), torch.randn(d_ff, r), torch.randn(d_ff)
    x = torch.randn(T, d)
    y = cpu.fused_sparse_decode(x, gq, uq, dq, w_in, w_out, b_out, bank, keep, alpha, row_scales=(gs, us, ds))
    deq = lambda q, s: q.float() * s[:, None]  # noqa: E731
    ref = sparse_swiglu_reference(x, deq(gq, gs), deq(uq, us), deq(dq, ds).t(), w_in, w_out, b_out, bank, keep,
                                  None if alpha is None else torch.tensor(alpha))
    assert _rel(y, ref) < 1e-5


@needs_fused
@pytest.mark.parametrize("path", list(features.DOT_PATHS))
@pytest.mark.parametrize("T", [1, 4])
def test_int8_rows_shadow_and_bundled_rows(T, path):
    """One token: gate/up by the int8 linear's dots (x in int16 per group of 64) on each path; more: float dots."""
    if not features.dot_path_supported(path):
        pytest.skip(f"this CPU lacks {', '.join(features.missing(path)) or 'x86-64'} for the {path} path")
    d, d_ff = 128, 256
    g, u, dn = torch.randn(d_ff, d), torch.randn(d_ff, d), torch.randn(d, d_ff)
    (gq, gs), (uq, us), (dq, ds) = _q(g), _q(u), _q(dn.t().contiguous())
    deq = lambda q, s: q.float() * s[:, None]  # noqa: E731
    pack = pack_shadow(deq(gq, gs), deq(uq, us), 4, 64)
    bundle = torch.cat([gq, uq, dq], 1)  # the bundle layout: strided int8 rows
    x = torch.randn(T, d)
    idx = torch.empty(T, d_ff // 64 * 16, dtype=torch.int32)
    with use_kernels(int8_dots=path):
        y = cpu.fused_sparse_decode(x, bundle[:, :d], bundle[:, d:2 * d], bundle[:, 2 * d:], None, None, None, 64,
                                    16, idx_out=idx, shadow=pack, row_scales=(gs, us, ds))
    expected = path.removesuffix("8") if path in features.SPLIT_PATHS else path
    assert features.DISPATCH["bank_sparse.int8_dots"] == (expected if T == 1 else "float")
    ref = sparse_swiglu_gather_reference(x, deq(gq, gs), deq(uq, us), deq(dq, ds).t(), idx.long())
    assert _rel(y, ref) < (1e-4 if T == 1 and path != "float" else 1e-5)


@needs_fused
def test_int8_rows_need_their_scales_and_a_float32_predictor():
    d, d_ff = 32, 128
    q = torch.zeros(d_ff, d, dtype=torch.int8)
    s = torch.ones(d_ff)
    w_in, w_out = torch.randn(4, d), torch.randn(d_ff, 4)
    with pytest.raises(ValueError, match="row_scales"):
        cpu.fused_sparse_decode(torch.randn(1, d), q, q, q, w_in, w_out, None, 64, 16)
    with pytest.raises(ValueError, match="float32 predictor"):
        cpu.fused_sparse_decode(torch.randn(1, d), q, q, q, w_in.bfloat16(), w_out.bfloat16(), None, 64, 16,
                                row_scales=(s, s, s))


@needs_fused
@pytest.mark.parametrize("path", list(features.DOT_PATHS))
@pytest.mark.parametrize("T,N,K", [(1, 1000, 576), (3, 33, 128), (16, 257, 64), (2, 37, 70), (1, 5, 1)])
def test_int8_linear_matches_reference_and_is_thread_count_independent(path, T, N, K):
    if not features.dot_path_supported(path):
        pytest.skip(f"this CPU lacks {', '.join(features.missing(path)) or 'x86-64'} for the {path} path")
    w = torch.randn(N, K)
    q, s = _q(w)
    b = torch.randn(N)
    x = torch.randn(T, K)
    x[:, 0] *= 30  # an outlier input
    ref = x @ (q.float() * s[:, None]).t() + b
    with use_kernels(int8_dots=path):
        ys = [cpu.int8_linear(x, q, s, b, num_threads=n) for n in (1, 2, 3)]
        ran = features.DISPATCH["int8_linear"]
        assert all(torch.equal(y, ys[0]) for y in ys[1:])
        # integer paths quantise x to int16 per group of 64 (rows of other lengths run the float dots)
        expected = path.removesuffix("8") if path in features.SPLIT_PATHS else path  # split forms: shadow only
        assert ran == (expected if K % 64 == 0 else "float")
        assert _rel(ys[0], ref) < (1e-5 if ran == "float" else 1e-4)
        assert _rel(cpu.int8_linear(x, q, None), x @ q.float().t()) < 1e-4
    with pytest.raises(ValueError):
        cpu.int8_linear(x, q.float(), s)
