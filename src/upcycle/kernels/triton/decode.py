"""Triton decode kernels for the bank-sparse SwiGLU FFN (CUDA; tested on CPU under TRITON_INTERPRET=1).

Four launches, no host synchronisation, fixed-size buffers (CUDA-graph safe):
  1. `_pred_in_kernel`     a = W_in x, split over d: partial sums [S_a, T, r] (fp32).
  2. `_route_gateup_kernel` one program per (token, bank): sums the partials of a, the bank's logits
     W_out[bank] a + b, an exact in-register top-`keep` (rank by pairwise comparison, ties to the
     lower channel), then the gather-GEMV of the kept gate and up rows (contiguous rows of the
     original weights) with SiLU * up * gate fused: h [T, k] fp32 and idx [T, k] int32.
  3. `_down_kernel`        split-K gather of rows of the transposed down copy W_down^T [d_ff, d]:
     partial sums [S_k, T, d] fp32.
  4. `_reduce_kernel`      sums the split-K partials, casts to the output dtype. A two-stage
     reduction instead of atomics: deterministic, and no bf16/fp16 atomics needed.
With a shadow predictor (`shadow_sparse_decode`) `_shadow_route_gateup_kernel` replaces 1 and 2: it
scores the bank's channels from the packed low-bit gate/up (`kernels.packing`), then routes and gathers.
Any dtype Triton loads (fp32, bf16, fp16); arithmetic in fp32. Batches 1..16 are per-token gathers.
Tile sizes are first guesses: unmeasured on a GPU (see bench/decode.py --device cuda).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from upcycle.kernels.packing import ShadowPack


@triton.jit
def _pred_in_kernel(x_ptr, w_ptr, a_ptr, T, D, R, SPLIT_LEN, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    rb = tl.program_id(1)
    s = tl.program_id(2)
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    d_start = s * SPLIT_LEN
    for d0 in range(0, SPLIT_LEN, BLOCK_D):
        cols = d_start + d0 + tl.arange(0, BLOCK_D)
        cmask = cols < D
        xv = tl.load(x_ptr + t * D + cols, mask=cmask, other=0.0).to(tl.float32)
        w = tl.load(
            w_ptr + rows[:, None].to(tl.int64) * D + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0
        ).to(tl.float32)
        acc += tl.sum(w * xv[None, :], axis=1)
    tl.store(a_ptr + (s * T + t) * R + rows, acc, mask=rmask)


@triton.jit
def _route_gateup_kernel(
    x_ptr,
    a_ptr,
    wout_ptr,
    bout_ptr,
    wg_ptr,
    wu_ptr,
    LDG,
    LDU,
    alpha_ptr,
    h_ptr,
    idx_ptr,
    T,
    D,
    R,
    N_SPLIT_A,
    BANK,
    KEEP,
    HAS_BIAS: tl.constexpr,
    SIGMOID: tl.constexpr,
    BANK_P2: tl.constexpr,
    KEEP_P2: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    b = tl.program_id(1)
    n_banks = tl.num_programs(1)
    i = tl.arange(0, BANK_P2)
    imask = i < BANK
    ch = (b * BANK + i).to(tl.int64)

    # Logits of this bank's channels: z = W_out[bank] a + b_out.
    z = tl.zeros([BANK_P2], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        rmask = rr < R
        av = tl.zeros([BLOCK_R], dtype=tl.float32)
        for s in range(N_SPLIT_A):
            av += tl.load(a_ptr + (s * T + t) * R + rr, mask=rmask, other=0.0)
        w = tl.load(wout_ptr + ch[:, None] * R + rr[None, :], mask=imask[:, None] & rmask[None, :], other=0.0)
        z += tl.sum(w.to(tl.float32) * av[None, :], axis=1)
    if HAS_BIAS:
        z += tl.load(bout_ptr + ch, mask=imask, other=0.0).to(tl.float32)
    z = tl.where(imask, z, float("-inf"))
    h, rows, sel, k, kmask = _keep_and_gather(z, i, imask, t, b, x_ptr, wg_ptr, wu_ptr, LDG, LDU, D, BANK, KEEP,
                                              KEEP_P2, BLOCK_D)
    if SIGMOID:
        zsel = tl.sum(tl.where(sel, z[None, :], 0.0), axis=1)
        alpha = tl.load(alpha_ptr).to(tl.float32)
        h = h * 2.0 / (1.0 + tl.exp(-alpha * zsel))
    out = t * (n_banks * KEEP) + b * KEEP + k
    tl.store(h_ptr + out, h, mask=kmask)
    tl.store(idx_ptr + out, rows.to(tl.int32), mask=kmask)


@triton.jit
def _shadow_route_gateup_kernel(
    x_ptr,
    qg_ptr,
    qu_ptr,
    sg_ptr,
    lg_ptr,
    su_ptr,
    lu_ptr,
    cs_ptr,
    wg_ptr,
    wu_ptr,
    LDG,
    LDU,
    h_ptr,
    idx_ptr,
    T,
    D,
    BANK,
    KEEP,
    HAS_CS: tl.constexpr,
    CB: tl.constexpr,
    G: tl.constexpr,
    GB: tl.constexpr,
    GB_P2: tl.constexpr,
    BANK_P2: tl.constexpr,
    KEEP_P2: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """As `_route_gateup_kernel`, the scores |silu(x.Gq) * (x.Uq)| from the packed shadow (kernels.packing)."""
    t = tl.program_id(0)
    b = tl.program_id(1)
    n_banks = tl.num_programs(1)
    i = tl.arange(0, BANK_P2)
    imask = i < BANK
    ch = (b * BANK + i).to(tl.int64)
    # GB: bytes per group of G inputs, G // (8 // CB); plane p of a group pairs with x[p * GB : (p + 1) * GB]
    n_groups = D // G
    row_bytes = n_groups * GB
    kk = tl.arange(0, GB_P2)
    kmask2 = imask[:, None] & (kk < GB)[None, :]
    zg = tl.zeros([BANK_P2], dtype=tl.float32)
    zu = tl.zeros([BANK_P2], dtype=tl.float32)
    for g in range(n_groups):
        offs = ch[:, None] * row_bytes + g * GB + kk[None, :]
        bg = tl.load(qg_ptr + offs, mask=kmask2, other=0).to(tl.int32)
        bu = tl.load(qu_ptr + offs, mask=kmask2, other=0).to(tl.int32)
        dg = tl.zeros([BANK_P2], dtype=tl.float32)
        du = tl.zeros([BANK_P2], dtype=tl.float32)
        xsum = 0.0
        for p in tl.static_range(8 // CB):
            xv = tl.load(x_ptr + t * D + g * G + p * GB + kk, mask=kk < GB, other=0.0).to(tl.float32)
            dg += tl.sum(((bg >> (CB * p)) & ((1 << CB) - 1)).to(tl.float32) * xv[None, :], axis=1)
            du += tl.sum(((bu >> (CB * p)) & ((1 << CB) - 1)).to(tl.float32) * xv[None, :], axis=1)
            xsum += tl.sum(xv, axis=0)
        q = ch * n_groups + g
        zg += tl.load(sg_ptr + q, mask=imask, other=0.0).to(tl.float32) * dg
        zg += tl.load(lg_ptr + q, mask=imask, other=0.0).to(tl.float32) * xsum
        zu += tl.load(su_ptr + q, mask=imask, other=0.0).to(tl.float32) * du
        zu += tl.load(lu_ptr + q, mask=imask, other=0.0).to(tl.float32) * xsum
    z = tl.where(imask, tl.abs(zg / (1.0 + tl.exp(-zg)) * zu), float("-inf"))
    if HAS_CS:  # a learned per-channel weight on the scores (exp of the predictor's log-score bias)
        z = z * tl.load(cs_ptr + ch, mask=imask, other=1.0)
    h, rows, _, k, kmask = _keep_and_gather(z, i, imask, t, b, x_ptr, wg_ptr, wu_ptr, LDG, LDU, D, BANK, KEEP,
                                            KEEP_P2, BLOCK_D)
    out = t * (n_banks * KEEP) + b * KEEP + k
    tl.store(h_ptr + out, h, mask=kmask)
    tl.store(idx_ptr + out, rows.to(tl.int32), mask=kmask)


@triton.jit
def _keep_and_gather(z, i, imask, t, b, x_ptr, wg_ptr, wu_ptr, LDG, LDU, D, BANK, KEEP, KEEP_P2: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """Both route kernels' second half: bank b's top-KEEP by z, then token t's gate/up gather-GEMV.
    Returns h [KEEP_P2] fp32, the kept rows (absolute channels), the selection, the slots and their mask."""
    sel, local, k, kmask = _bank_topk(z, i, imask, KEEP, KEEP_P2)
    rows = (b * BANK + local).to(tl.int64)
    h = _gateup_rows(x_ptr + t * D, wg_ptr, wu_ptr, LDG, LDU, rows, kmask, D, KEEP_P2, BLOCK_D)
    return h, rows, sel, k, kmask


@triton.jit
def _bank_topk(z, i, imask, KEEP, KEEP_P2: tl.constexpr):
    """Exact top-KEEP of a bank's scores z [BANK_P2] (padding -inf): channel i is kept iff fewer
    than KEEP channels beat it (ties: the lower index wins). Returns the one-hot [KEEP_P2, BANK_P2]
    selection, the kept channels' local indices in ascending order, the slot index and its mask."""
    beats = (z[None, :] > z[:, None]) | ((z[None, :] == z[:, None]) & (i[None, :] < i[:, None]))
    rank = tl.sum(beats.to(tl.int32), axis=1)
    kept = (rank < KEEP) & imask
    pos = tl.cumsum(kept.to(tl.int32), axis=0) - 1  # slot of each kept channel, ascending channel order
    k = tl.arange(0, KEEP_P2)
    kmask = k < KEEP
    sel = (pos[None, :] == k[:, None]) & kept[None, :]
    local = tl.sum(tl.where(sel, i[None, :], 0), axis=1)
    return sel, local, k, kmask


@triton.jit
def _gateup_rows(xt_ptr, wg_ptr, wu_ptr, LDG, LDU, rows, kmask, D, KEEP_P2: tl.constexpr, BLOCK_D: tl.constexpr):
    """silu(W_gate[rows] . x) * (W_up[rows] . x) over contiguous rows of d weights: [KEEP_P2] fp32."""
    acc_g = tl.zeros([KEEP_P2], dtype=tl.float32)
    acc_u = tl.zeros([KEEP_P2], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cmask = cols < D
        xv = tl.load(xt_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        m2 = kmask[:, None] & cmask[None, :]
        wg = tl.load(wg_ptr + rows[:, None] * LDG + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        wu = tl.load(wu_ptr + rows[:, None] * LDU + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        acc_g += tl.sum(wg * xv[None, :], axis=1)
        acc_u += tl.sum(wu * xv[None, :], axis=1)
    return acc_g / (1.0 + tl.exp(-acc_g)) * acc_u


@triton.jit
def _down_kernel(
    h_ptr, idx_ptr, wdt_ptr, LDD, part_ptr, T, D, K, K_PER_SPLIT, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr
):
    t = tl.program_id(0)
    nb = tl.program_id(1)
    s = tl.program_id(2)
    n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < D
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    k_start = s * K_PER_SPLIT
    for k0 in range(0, K_PER_SPLIT, BLOCK_K):
        kk = k_start + k0 + tl.arange(0, BLOCK_K)
        kmask = kk < K
        hv = tl.load(h_ptr + t * K + kk, mask=kmask, other=0.0)
        rows = tl.load(idx_ptr + t * K + kk, mask=kmask, other=0).to(tl.int64)
        w = tl.load(wdt_ptr + rows[:, None] * LDD + n[None, :], mask=kmask[:, None] & nmask[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * hv[:, None], axis=0)
    tl.store(part_ptr + (s * T + t) * D + n, acc, mask=nmask)


@triton.jit
def _reduce_kernel(part_ptr, y_ptr, N, SPLIT, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(SPLIT):
        acc += tl.load(part_ptr + s * N + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# Programs to aim for per launch: a few waves of an H100's 132 SMs (unmeasured guess).
_TARGET_PROGRAMS = 264


def sparse_decode(
    x: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down_t: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    b_out: Tensor | None,
    bank_size: int,
    keep: int,
    gate_scale: Tensor | None = None,
    out: Tensor | None = None,
    idx_out: Tensor | None = None,
    block_d: int = 256,
    block_n: int = 128,
    block_k: int = 32,
    split_k: int | None = None,
) -> Tensor:
    """x [T, d] -> y [T, d] (x's dtype), all tensors on one device; w_down_t is W_down^T [d_ff, d].

    w_gate, w_up, w_down_t need unit stride within a row, any row stride (e.g. views of one
    [d_ff, 3d] bundle, so one channel's three rows are adjacent); the predictor is contiguous.

    `gate_scale` None is the `ste` gate, a one-element tensor alpha the `sigmoid` gate (read on the
    device, so no host sync). `out` [T, d] and `idx_out` (int32 [T, n_banks * keep]) are optional.
    """
    T, D = x.shape
    d_ff, R = w_out.shape
    n_banks = d_ff // bank_size
    K = n_banks * keep
    dev = x.device
    f32 = torch.float32
    x = x.contiguous()

    # 1. predictor in-projection, split over d so enough programs stream W_in.
    block_r = 16
    split_len = max(block_d, _cdiv(_cdiv(D, max(1, _TARGET_PROGRAMS // (T * _cdiv(R, block_r)))), block_d) * block_d)
    n_split_a = _cdiv(D, split_len)
    a_part = torch.empty(n_split_a, T, R, dtype=f32, device=dev)
    _pred_in_kernel[(T, _cdiv(R, block_r), n_split_a)](
        x, w_in, a_part, T, D, R, split_len, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4
    )

    # 2. routing + gate/up gather-GEMV.
    h = torch.empty(T, K, dtype=f32, device=dev)
    idx = idx_out if idx_out is not None else torch.empty(T, K, dtype=torch.int32, device=dev)
    sigmoid = gate_scale is not None
    _route_gateup_kernel[(T, n_banks)](
        x,
        a_part,
        w_out,
        b_out if b_out is not None else w_out,
        w_gate,
        w_up,
        w_gate.stride(0),
        w_up.stride(0),
        gate_scale if sigmoid else w_out,
        h,
        idx,
        T,
        D,
        R,
        n_split_a,
        bank_size,
        keep,
        HAS_BIAS=b_out is not None,
        SIGMOID=sigmoid,
        BANK_P2=triton.next_power_of_2(bank_size),
        KEEP_P2=triton.next_power_of_2(keep),
        BLOCK_R=min(64, triton.next_power_of_2(R)),
        BLOCK_D=block_d,
        num_warps=4,
    )

    return _down_and_reduce(x, h, idx, w_down_t, out, block_n, block_k, split_k)


def _down_and_reduce(x: Tensor, h: Tensor, idx: Tensor, w_down_t: Tensor, out: Tensor | None, block_n: int,
                     block_k: int, split_k: int | None) -> Tensor:
    """Steps 3 and 4: y [T, d] = sum_j h[:, j] * W_down^T[idx[:, j]], split-K then a deterministic reduction."""
    T, K = h.shape
    D = w_down_t.shape[1]
    # 3. down projection, split-K over the kept channels.
    n_blocks = _cdiv(D, block_n)
    if split_k is None:
        split_k = max(1, min(_cdiv(K, 8 * block_k), _TARGET_PROGRAMS // max(1, T * n_blocks)))
    k_per_split = _cdiv(_cdiv(K, split_k), block_k) * block_k
    split_k = _cdiv(K, k_per_split)
    part = torch.empty(split_k, T, D, dtype=torch.float32, device=x.device)
    _down_kernel[(T, n_blocks, split_k)](
        h, idx, w_down_t, w_down_t.stride(0), part, T, D, K, k_per_split, BLOCK_K=block_k, BLOCK_N=block_n, num_warps=4
    )

    # 4. deterministic split-K reduction + cast.
    y = out if out is not None else torch.empty(T, D, dtype=x.dtype, device=x.device)
    block = 1024
    _reduce_kernel[(_cdiv(T * D, block),)](part, y, T * D, split_k, BLOCK=block, num_warps=4)
    return y


def shadow_sparse_decode(
    x: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down_t: Tensor,
    shadow: ShadowPack,
    bank_size: int,
    keep: int,
    out: Tensor | None = None,
    idx_out: Tensor | None = None,
    block_d: int = 256,
    block_n: int = 128,
    block_k: int = 32,
    split_k: int | None = None,
) -> Tensor:
    """`sparse_decode` with a shadow predictor (a `kernels.packing.ShadowPack` on x's device) instead
    of the low-rank one: three launches (route + gate/up, down, reduce). Same layouts and outputs."""
    T, D = x.shape
    d_ff = w_gate.shape[0]
    n_banks = d_ff // bank_size
    cb, G = shadow.container_bits, shadow.group_size
    gb = G // (8 // cb)
    if D % G or gb * (8 // cb) != G or shadow.gate_codes.shape != (d_ff, D // G * gb):
        raise ValueError("shadow_sparse_decode: the shadow pack does not match x and the weights")
    x = x.contiguous()
    h = torch.empty(T, n_banks * keep, dtype=torch.float32, device=x.device)
    idx = idx_out if idx_out is not None else torch.empty(T, n_banks * keep, dtype=torch.int32, device=x.device)
    cs = shadow.channel_scale
    _shadow_route_gateup_kernel[(T, n_banks)](
        x,
        *shadow.tensors()[:6],
        cs if cs is not None else shadow.gate_scale,  # not read without HAS_CS
        w_gate,
        w_up,
        w_gate.stride(0),
        w_up.stride(0),
        h,
        idx,
        T,
        D,
        bank_size,
        keep,
        HAS_CS=cs is not None,
        CB=cb,
        G=G,
        GB=gb,
        GB_P2=triton.next_power_of_2(gb),
        BANK_P2=triton.next_power_of_2(bank_size),
        KEEP_P2=triton.next_power_of_2(keep),
        BLOCK_D=block_d,
        num_warps=4,
    )
    return _down_and_reduce(x, h, idx, w_down_t, out, block_n, block_k, split_k)
