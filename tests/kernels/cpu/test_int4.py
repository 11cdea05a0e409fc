"""The 4-bit kernels (the linear layer, the bank-sparse FFN rows) against the float reference on their unpacked
weights, on fresh random inputs, on every dot path this CPU has."""

from __future__ import annotations

import pytest
import torch

from upcycle.kernels import cpu, use_kernels
from upcycle.kernels.cpu import features
from upcycle.kernels.cpu.int4 import fused_sparse_decode_int4, int4_linear
from upcycle.kernels.packing import pack_q4, pack_shadow, unpack_q4
from upcycle.kernels.reference import sparse_swiglu_gather_reference, sparse_swiglu_reference

needs_fused = pytest.mark.skipif(cpu._compiler() is None, reason="no C compiler: fused CPU kernel not built")


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def _path_or_skip(path: str) -> None:
    if not features.dot_path_supported(path):
        pytest.skip(f"this CPU lacks {', '.join(features.missing(path)) or 'x86-64'} for the {path} path")


def _ran(path: str) -> str:
    return path.removesuffix("8") if path in features.SPLIT_PATHS else path  # split forms: the shadow's only


def _dots(x: torch.Tensor, rows, path: str) -> tuple[torch.Tensor, float]:
    """x [T, K] . each 4-bit row as the kernel computes it on `path`, and the tolerance against it. With groups of 32
    an integer path quantises x per group to int8 exactly as here (absmax / 127, round half to even) for the codes'
    part, while the minimum's part uses x's exact group sums; other groups use int16 x (~1e-5 of the group's
    largest |x|, not reproduced here)."""
    w = unpack_q4(rows)
    if path == "float" or rows.group_size != 32:
        return x @ w.t(), (1e-5 if path == "float" else 1e-3)
    G = rows.group_size
    xg = x.reshape(x.shape[0], -1, G)
    amax = xg.abs().amax(-1, keepdim=True)
    xq = (torch.round(xg * torch.where(amax > 0, 127.0 / amax, 0.0)) * (amax / 127.0)).reshape(x.shape)
    lo = rows.lo.float().repeat_interleave(G, 1)
    return xq @ (w - lo).t() + x @ lo.t(), 1e-5


def test_pack_q4_round_trip_error_is_4_bit_sized():
    w = torch.randn(64, 256)
    rows = pack_q4(w, 32)
    assert rows.codes.shape == (64, 128) and rows.scale.shape == (64, 8) and rows.nbytes == 64 * 128 + 2 * 2 * 64 * 8
    err = _rel(unpack_q4(rows), w)
    assert 0.02 < err < 0.12  # 16 levels per group: a few percent, not exact and not garbage
    assert torch.equal(unpack_q4(rows, slice(3, 7)), unpack_q4(rows)[3:7])


@needs_fused
@pytest.mark.parametrize("path", list(features.DOT_PATHS))
@pytest.mark.parametrize("T,N,K,G", [(1, 1000, 576, 32), (3, 33, 128, 64), (16, 257, 64, 32), (2, 37, 70, 14)])
def test_int4_linear_matches_reference_and_is_thread_count_independent(path, T, N, K, G):
    _path_or_skip(path)
    rows = pack_q4(torch.randn(N, K), G)
    b = torch.randn(N)
    x = torch.randn(T, K)
    x[:, 0] *= 30  # an outlier input
    ref, tol = _dots(x, rows, _ran(path))
    with use_kernels(int4_dots=path):
        ys = [int4_linear(x, rows, b, num_threads=n) for n in (1, 2, 3)]
        assert features.DISPATCH["int4_linear"] == _ran(path)
        assert _rel(int4_linear(x, rows), ref) < tol
    assert all(torch.equal(y, ys[0]) for y in ys[1:])
    assert _rel(ys[0], ref + b) < tol
    assert _rel(ys[0], x @ unpack_q4(rows).t() + b) < 0.03  # what x's own rounding costs, with an outlier


@needs_fused
@pytest.mark.parametrize("path", list(features.DOT_PATHS))
@pytest.mark.parametrize("T,d,d_ff,bank,keep", [(1, 96, 512, 64, 16), (5, 64, 256, 64, 16), (17, 32, 240, 48, 12)])
@pytest.mark.parametrize("alpha", [None, 0.5])
def test_int4_rows_lowrank_match_reference(path, T, d, d_ff, bank, keep, alpha):
    _path_or_skip(path)
    g, u, dn = pack_q4(torch.randn(d_ff, d)), pack_q4(torch.randn(d_ff, d)), pack_q4(torch.randn(d_ff, d))
    r = 8
    w_in, w_out, b_out = torch.randn(r, d), torch.randn(d_ff, r), torch.randn(d_ff)
    x = torch.randn(T, d)
    idx = torch.empty(T, d_ff // bank * keep, dtype=torch.int32)
    with use_kernels(int4_dots=path):
        y = fused_sparse_decode_int4(x, g, u, dn, w_in, w_out, b_out, bank, keep, alpha, idx_out=idx)
        assert features.DISPATCH["bank_sparse.int4_dots"] == _ran(path)
    # the routing sees float x; the kept channels' gate/up dots see x as the path quantises it
    routed = torch.empty_like(idx)
    with use_kernels(int4_dots="float"):
        fused_sparse_decode_int4(x, g, u, dn, w_in, w_out, b_out, bank, keep, alpha, idx_out=routed)
    assert torch.equal(idx, routed)
    if alpha is None:
        ref = sparse_swiglu_reference(x, unpack_q4(g), unpack_q4(u), unpack_q4(dn).t(), w_in, w_out, b_out, bank,
                                      keep, None)
        assert _rel(y, ref) < (1e-5 if path == "float" else 0.03)
    (gd, tol), (ud, _) = _dots(x, g, _ran(path)), _dots(x, u, _ran(path))  # [T, d_ff]
    i = idx.long()
    h = torch.nn.functional.silu(gd.gather(1, i)) * ud.gather(1, i)
    if alpha is not None:  # the sigmoid gate of the kept logits, from the float predictor
        h = h * 2 * torch.sigmoid(alpha * ((x @ w_in.t()) @ w_out.t() + b_out).gather(1, i))
    ref = (h[:, :, None] * unpack_q4(dn)[i]).sum(1)
    assert _rel(y, ref) < tol * 10


@needs_fused
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("bits", [1, 2])
def test_int4_rows_shadow_keep_the_shadows_channels(T, bits):
    d, d_ff = 128, 256
    g, u, dn = pack_q4(torch.randn(d_ff, d)), pack_q4(torch.randn(d_ff, d)), pack_q4(torch.randn(d_ff, d))
    pack = pack_shadow(unpack_q4(g), unpack_q4(u), bits, 64)
    x = torch.randn(T, d)
    idx = torch.empty(T, d_ff // 64 * 16, dtype=torch.int32)
    idx8 = torch.empty_like(idx)
    y = fused_sparse_decode_int4(x, g, u, dn, None, None, None, 64, 16, shadow=pack, idx_out=idx)
    # the float rows' kernel with the same shadow picks the same channels
    cpu.fused_sparse_decode(x, unpack_q4(g), unpack_q4(u), unpack_q4(dn), None, None, None, 64, 16, shadow=pack,
                            idx_out=idx8)
    assert torch.equal(idx, idx8)
    (gd, tol), (ud, _) = _dots(x, g, features.auto_path("int4")), _dots(x, u, features.auto_path("int4"))
    i = idx.long()
    ref = ((torch.nn.functional.silu(gd.gather(1, i)) * ud.gather(1, i))[:, :, None] * unpack_q4(dn)[i]).sum(1)
    assert _rel(y, ref) < tol * 10
    assert _rel(y, sparse_swiglu_gather_reference(x, unpack_q4(g), unpack_q4(u), unpack_q4(dn).t(), i)) < 0.03


@needs_fused
def test_int4_bad_rows_are_refused_with_the_fix():
    rows = pack_q4(torch.randn(16, 64), 32)
    with pytest.raises(ValueError, match="pack_q4"):
        int4_linear(torch.randn(1, 32), rows)
    with pytest.raises(ValueError, match="1..64"):
        int4_linear(torch.randn(65, 64), rows)
    with pytest.raises(ValueError, match="shadow or a contiguous float32"):
        fused_sparse_decode_int4(torch.randn(1, 64), rows, rows, rows, None, None, None, 16, 4)
