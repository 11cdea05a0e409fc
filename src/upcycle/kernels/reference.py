"""Pure-PyTorch reference of the bank-sparse SwiGLU FFN: the truth every fast kernel is tested against.

Shapes: x [T, d] (T tokens), W_gate/W_up [d_ff, d], W_down [d, d_ff], predictor in [r, d], out [d_ff, r],
out bias [d_ff]. Channels are cut into banks of `bank_size` consecutive channels; each bank keeps
its `keep` highest-logit channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Rows per chunk when building masks: bounds the transient top-k buffers for long sequences.
MASK_CHUNK_ROWS = 4096


def bank_topk_indices(logits: Tensor, bank_size: int, keep: int) -> Tensor:
    """Absolute channel indices of the kept channels, [..., n_banks * keep], ascending within each bank."""
    *lead, d_ff = logits.shape
    n_banks = d_ff // bank_size
    local = logits.reshape(*lead, n_banks, bank_size).topk(keep, dim=-1, sorted=False).indices
    local = local.sort(dim=-1).values
    offsets = torch.arange(n_banks, device=logits.device).unsqueeze(-1) * bank_size
    return (local + offsets).reshape(*lead, n_banks * keep)


def bank_topk_mask(logits: Tensor, bank_size: int, keep: int) -> Tensor:
    """Boolean mask, same shape as `logits`: exactly `keep` True per bank of `bank_size` channels."""
    d_ff = logits.shape[-1]
    if keep >= bank_size:
        return torch.ones_like(logits, dtype=torch.bool)
    flat = logits.reshape(-1, d_ff)
    mask = torch.empty(flat.shape, dtype=torch.bool, device=logits.device)
    for start in range(0, flat.shape[0], MASK_CHUNK_ROWS):
        rows = flat[start : start + MASK_CHUNK_ROWS].reshape(-1, d_ff // bank_size, bank_size)
        idx = rows.topk(keep, dim=-1, sorted=False).indices
        chunk = torch.zeros(rows.shape, dtype=torch.bool, device=logits.device)
        chunk.scatter_(-1, idx, True)
        mask[start : start + MASK_CHUNK_ROWS] = chunk.reshape(-1, d_ff)
    return mask.reshape(logits.shape)


def center_on_bank_threshold(z: Tensor, bank_size: int, keep: int) -> Tensor:
    """z minus, per bank, the midpoint between its keep-th and (keep+1)-th largest value (no gradient through the
    threshold): positive exactly on the kept channels, so a sigmoid surrogate of the 0/1 mask is centred on the
    bank's decision boundary whatever the scale of the scores. keep >= bank_size: every channel kept, z - min + 1."""
    *lead, d_ff = z.shape
    zb = z.reshape(*lead, d_ff // bank_size, bank_size)
    with torch.no_grad():
        if keep >= bank_size:
            thr = zb.amin(-1) - 1
        else:
            top = zb.topk(keep + 1, dim=-1).values
            thr = (top[..., keep - 1] + top[..., keep]) / 2
    return (zb - thr[..., None]).reshape(z.shape)


def predictor_logits(x: Tensor, w_in: Tensor, w_out: Tensor, b_out: Tensor | None) -> Tensor:
    """Low-rank routing logits B(A(x)): [T, d] -> [T, d_ff]."""
    return F.linear(F.linear(x, w_in), w_out, b_out)


# Range shrink factors tried per group below 6 bits (the MSE-optimal clipping of low-bit quantisers):
# on SmolLM2-135M it lifted the 2-bit shadow's recall of the oracle mask from 0.63 to 0.71.
CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)


def _groups(w: Tensor, group_size: int) -> Tensor:
    out_features, in_features = w.shape
    if in_features % group_size:
        raise ValueError(f"group_size={group_size} does not divide in_features={in_features}.")
    return w.detach().float().reshape(out_features, in_features // group_size, group_size)


def _quantize_groups(wg: Tensor, bits: int, factor) -> tuple[Tensor, Tensor, Tensor]:
    """(q, scale, lo) of groups wg [out, n_groups, G], their [min, max] range shrunk by `factor` about its middle."""
    levels = 2**bits - 1
    w_lo, w_hi = wg.amin(-1), wg.amax(-1)
    mid, half = (w_lo + w_hi) / 2, (w_hi - w_lo) / 2
    lo = (mid - half * factor).bfloat16().float()
    scale = (2 * half * factor / levels).clamp_min(1e-20).bfloat16().float()
    q = (wg - lo[..., None]).div_(scale[..., None]).round_().clamp_(0, levels)
    return q, scale, lo


def clip_search(w: Tensor, bits: int, group_size: int) -> Tensor:
    """Per group of `group_size` inputs of w [out, in], the CLIP_GRID factor with the least squared error
    (below 6 bits; 1.0 above): [out, in / group] float32."""
    wg = _groups(w, group_size)
    if bits >= 6:
        return torch.ones(wg.shape[:2])
    errs = []
    for factor in CLIP_GRID:
        q, scale, lo = _quantize_groups(wg, bits, factor)
        errs.append((q.mul_(scale[..., None]).add_(lo[..., None]).sub_(wg)).pow_(2).sum(-1))
    best = torch.stack(errs).argmin(0)  # the first of equal errors: the widest range
    return torch.tensor(CLIP_GRID, dtype=torch.float32, device=w.device)[best]


def shadow_quantize(w: Tensor, bits: int, group_size: int, factors: Tensor | None = None
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Round-to-nearest asymmetric quantisation of groups of `group_size` inputs of w [out, in].

    Each group's range [min, max] is shrunk about its middle by the factor of CLIP_GRID with the
    least squared error (below 6 bits; min-max above), or by the given `factors` [out, in / group]
    (a cached `clip_search`: one pass instead of one per grid point). Returns (codes uint8 [out, in],
    scale [out, in / group], lo [out, in / group]); scale and lo are rounded to bfloat16 (what a shadow
    stores) and returned as float32. w ~ codes * scale + lo.
    """
    out_features, in_features = w.shape
    wg = _groups(w, group_size)
    if factors is None:
        factors = clip_search(w, bits, group_size)
    q, scale, lo = _quantize_groups(wg, bits, factors.to(wg.device))
    return q.to(torch.uint8).reshape(out_features, in_features), scale, lo


def shadow_dequantize(codes: Tensor, scale: Tensor, lo: Tensor) -> Tensor:
    """codes [out, in] (uint8), scale / lo [out, in / group] -> float32 weights [out, in]."""
    out_features, in_features = codes.shape
    n_groups = scale.shape[-1]
    q = codes.float().reshape(out_features, n_groups, in_features // n_groups)
    return (q * scale[..., None] + lo[..., None]).reshape(out_features, in_features)


def shadow_scores(x: Tensor, gate_q: Tensor, up_q: Tensor, channel_scale: Tensor | None = None) -> Tensor:
    """Channel scores of a shadow predictor: |silu(x Gq^T) * (x Uq^T)| (times a per-channel weight, the exp of a
    learned log-score bias), [T, d] -> [T, d_ff]."""
    s = (F.silu(F.linear(x, gate_q)) * F.linear(x, up_q)).abs()
    return s if channel_scale is None else s * channel_scale


def sparse_swiglu_reference(
    x: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    w_pred_in: Tensor,
    w_pred_out: Tensor,
    b_pred_out: Tensor | None,
    bank_size: int,
    keep: int,
    gate_scale: Tensor | None = None,
) -> Tensor:
    """y = W_down (mask * gate * silu(W_gate x) * (W_up x)), computed densely then masked.

    `gate_scale` None means the `ste` forward (gate value exactly 1 on kept channels); a scalar
    tensor alpha means the `sigmoid` gate 2 * sigmoid(alpha * logits) on kept channels.
    """
    logits = predictor_logits(x, w_pred_in, w_pred_out, b_pred_out)
    mask = bank_topk_mask(logits, bank_size, keep)
    h = F.silu(F.linear(x, w_gate)) * F.linear(x, w_up)
    if gate_scale is not None:
        h = h * (2 * torch.sigmoid(gate_scale * logits)).to(h.dtype)
    return F.linear(h * mask, w_down)


def sparse_swiglu_gather_reference(
    x: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    idx: Tensor,
    gate_values: Tensor | None = None,
) -> Tensor:
    """Decode form: given kept indices idx [T, k] (k = n_banks * keep), read only those rows.

    y[t] = sum_j W_down[:, idx[t, j]] * silu(W_gate[idx[t, j]] . x[t]) * (W_up[idx[t, j]] . x[t]) * g[t, j]
    """
    g = torch.einsum("tkd,td->tk", w_gate[idx], x)
    u = torch.einsum("tkd,td->tk", w_up[idx], x)
    h = F.silu(g) * u
    if gate_values is not None:
        h = h * gate_values
    return torch.einsum("tk,tdk->td", h, w_down[:, idx].permute(1, 0, 2))


def nm24_linear_reference(x: Tensor, pack, bias: Tensor | None = None) -> Tensor:
    """y = x W^T + b for a 2:4 weight in the compressed form (`nm_packing.NM24Pack`), in float32 (the N:M decode
    kernel's accumulation precision): x [..., in] -> [..., out]."""
    from upcycle.kernels.nm_packing import unpack_nm24

    return F.linear(x.float(), unpack_nm24(pack).float(), None if bias is None else bias.float())
