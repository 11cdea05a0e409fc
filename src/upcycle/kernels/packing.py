"""The shadow predictor's packed form, shared by the fused CPU kernel and the Triton kernels.

A shadow (see `modules.predictors.ShadowPredictor`) is gate and up quantised to `bits` per weight in
groups of `group_size` inputs (`reference.shadow_quantize`). Packed, each row of codes is cut into
its groups; a group of G inputs takes G / (8 / cb) bytes, where cb, the container width, is 1, 2, 4
or 8 bits (3-bit codes travel in 4-bit containers, 5-7 in 8). Byte k of a group holds inputs
k + p * G / (8 / cb) for p = 0, 1, ... at bit offset cb * p: every bit plane of a group pairs with a
contiguous run of x, so a kernel unpacks with constant shifts and reads x without shuffles.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from upcycle.kernels.reference import shadow_quantize


@dataclass
class ShadowPack:
    """gate/up codes packed `container_bits` wide, bf16 scale and minimum per group: w ~ code * scale + lo."""

    gate_codes: Tensor  # uint8 [d_ff, d * container_bits / 8]
    up_codes: Tensor
    gate_scale: Tensor  # bf16 [d_ff, d / group_size]
    gate_lo: Tensor
    up_scale: Tensor
    up_lo: Tensor
    container_bits: int
    group_size: int
    channel_scale: Tensor | None = None  # float32 [d_ff]: a learned per-channel weight on the scores, or None

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors() if t is not None)

    def tensors(self) -> tuple[Tensor | None, ...]:
        """The fields a kernel reads, in the order of the decode ops' arguments (channel_scale may be None)."""
        return (self.gate_codes, self.up_codes, self.gate_scale, self.gate_lo, self.up_scale, self.up_lo,
                self.channel_scale)


def container_bits(bits: int) -> int:
    return bits if bits <= 2 else 4 if bits <= 4 else 8


def pack_codes(codes: Tensor, bits: int, group_size: int) -> Tensor:
    """uint8 codes [out, in] -> [out, in * cb / 8] on codes' device (layout: the module docstring)."""
    cb = container_bits(bits)
    ppb = 8 // cb
    out_features, in_features = codes.shape
    if group_size % ppb or in_features % group_size:
        raise ValueError(f"group_size={group_size} must divide in_features={in_features} and be a multiple of "
                         f"{ppb} for {cb}-bit containers")
    planes = codes.to(torch.int32).reshape(out_features, in_features // group_size, ppb, group_size // ppb)
    packed = torch.zeros(planes.shape[:2] + planes.shape[3:], dtype=torch.int32, device=codes.device)
    for p in range(ppb):
        packed |= planes[:, :, p] << (cb * p)
    return packed.to(torch.uint8).reshape(out_features, -1).contiguous()


def unpack_codes(packed: Tensor, cb: int, group_size: int) -> Tensor:
    """The inverse of `pack_codes`: [out, in * cb / 8] uint8 -> codes [out, in] uint8."""
    ppb = 8 // cb
    out_features = packed.shape[0]
    b = packed.to(torch.int32).reshape(out_features, -1, 1, group_size // ppb)
    planes = torch.cat([(b >> (cb * p)) & ((1 << cb) - 1) for p in range(ppb)], dim=2)
    return planes.reshape(out_features, -1).to(torch.uint8)


def pack_shadow(w_gate: Tensor, w_up: Tensor, bits: int, group_size: int,
                channel_scale: Tensor | None = None) -> ShadowPack:
    """Quantise gate/up as `reference.shadow_quantize` does and pack them (on the weights' device); `channel_scale`
    (float32 [d_ff], e.g. exp of a learned log-score bias) multiplies each channel's score."""
    gq, gs, gl = shadow_quantize(w_gate, bits, group_size)
    uq, us, ul = shadow_quantize(w_up, bits, group_size)
    bf = lambda t: t.to(torch.bfloat16).contiguous()  # noqa: E731  (exact: already bf16-rounded)
    cs = None if channel_scale is None else channel_scale.to(torch.float32, copy=True).contiguous()
    return ShadowPack(pack_codes(gq, bits, group_size), pack_codes(uq, bits, group_size), bf(gs), bf(gl), bf(us),
                      bf(ul), container_bits(bits), group_size, cs)


def unpack_shadow(pack: ShadowPack) -> tuple[Tensor, Tensor]:
    """The float32 gate and up weights a pack stands for (what the kernels' scores must match)."""
    def one(codes: Tensor, scale: Tensor, lo: Tensor) -> Tensor:
        q = unpack_codes(codes, pack.container_bits, pack.group_size).float()
        q = q.reshape(q.shape[0], scale.shape[1], pack.group_size)
        return (q * scale.float()[..., None] + lo.float()[..., None]).reshape(q.shape[0], -1)

    return (one(pack.gate_codes, pack.gate_scale, pack.gate_lo), one(pack.up_codes, pack.up_scale, pack.up_lo))


@dataclass
class Q4Rows:
    """Rows of a weight in 4 bits (`upcycle.quantize(model, "int4")`): w ~ code * scale + lo per group of
    `group_size` inputs, packed as a 4-bit shadow is, bf16 scale and minimum (5 bits per weight at 32, as Q4_1)."""

    codes: Tensor  # uint8 [rows, cols / 2]
    scale: Tensor  # bf16 [rows, cols / group_size]
    lo: Tensor
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.codes.shape[1] * 2

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scale.nbytes + self.lo.nbytes


def pack_q4(w: Tensor, group_size: int = 32) -> Q4Rows:
    """w [rows, cols] -> its 4-bit rows: round to nearest within each group's MSE-clipped range
    (`reference.shadow_quantize`, the shadow's quantiser)."""
    q, scale, lo = shadow_quantize(w.detach().float(), 4, group_size)
    bf = lambda t: t.to(torch.bfloat16).contiguous()  # noqa: E731  (exact: already bf16-rounded)
    return Q4Rows(pack_codes(q, 4, group_size), bf(scale), bf(lo), group_size)


def unpack_q4(rows: Q4Rows, sl: slice = slice(None)) -> Tensor:
    """The float32 weights rows[sl] stand for."""
    q = unpack_codes(rows.codes[sl], 4, rows.group_size).float()
    scale, lo = rows.scale[sl].float(), rows.lo[sl].float()
    q = q.reshape(q.shape[0], scale.shape[1], rows.group_size)
    return (q * scale[..., None] + lo[..., None]).reshape(q.shape[0], -1)


def shadow_decode_op(name: str, decode: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """A torch custom op `upcycle::<name>` around `decode(x, w_gate, w_up, w_down_t, pack, bank_size, keep)`:
    what torch.compile and CUDA graphs see (a ShadowPack is not an op argument, so its fields are)."""

    @torch.library.custom_op(f"upcycle::{name}", mutates_args=())
    def op(
        x: Tensor,
        w_gate: Tensor,
        w_up: Tensor,
        w_down_t: Tensor,
        gate_codes: Tensor,
        up_codes: Tensor,
        gate_scale: Tensor,
        gate_lo: Tensor,
        up_scale: Tensor,
        up_lo: Tensor,
        channel_scale: Tensor | None,
        container_bits: int,
        group_size: int,
        bank_size: int,
        keep: int,
    ) -> Tensor:
        pack = ShadowPack(gate_codes, up_codes, gate_scale, gate_lo, up_scale, up_lo, container_bits, group_size,
                          channel_scale)
        return decode(x, w_gate, w_up, w_down_t, pack, bank_size, keep)

    @op.register_fake
    def _(x, w_gate, w_up, w_down_t, *pack_fields_and_sizes):
        return x.new_empty(x.shape[0], w_down_t.shape[1])

    return op
