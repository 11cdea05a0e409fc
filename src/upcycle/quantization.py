"""`upcycle.quantize(model, "int8")`: int8 weights for CPU decode, in place, after loading (dense or converted).

Every linear layer the decode step streams becomes an `Int8Linear` (int8 codes + float32 scales, symmetric
round-to-nearest with absmax scales, no calibration data): the attention projections and the LM head with one
scale per output row; a dense FFN's gate/up/down likewise; a bank-sparse FFN's gate and up with one scale per
channel (row) and its down projection with one scale per channel too (per *input* column of W_down, so row c
of the transposed copy the decode kernel reads is q[c] * s[c]): the fused kernel then reads only the kept
channels' int8 rows, a quarter of the fp32 bytes. The embedding, the norms and a low-rank predictor stay in
float (a shadow predictor is re-derived from the dequantised gate/up, as from any weights).

`upcycle.quantize(model, "int4")` does the same with `Int4Linear`s: 4-bit codes with a bf16 scale and minimum per
group of 32 inputs (5 bits per weight, as llama.cpp's Q4_1; each group's range clipped for the least squared
error, `kernels.reference.shadow_quantize`), a bank-sparse FFN's down projection stored as the rows of W_down^T
(grouped along d) so that the fused kernel reads a kept channel's down row in one run; the LM head stays int8 (as
llama.cpp's 4-bit files keep output.weight at 6-8 bits; `lm_head_format="int4"` quantises it too). At decode shapes
they run `kernels.cpu.int4` (int8 x per group of 32, as llama.cpp's Q8_0 activations).

At decode shapes (<= 16 rows) an `Int8Linear` runs the C kernel `kernels.cpu.int8_linear` (float32 arithmetic
on the fused kernel's helper pool); longer inputs (prefill, evaluation) multiply by the dequantised weight a
block of rows at a time. Training an int8 model is not supported (no gradients reach the codes). The
quantised model lives in memory only: quantise again after `upcycle.load` (it takes well under a second for
135M parameters); `upcycle generate --quantize int8` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FORMATS", "Int4Linear", "Int8Linear", "quantize", "quantize_rows"]

FORMATS = ("int8", "int4")
INT4_GROUP = 32
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_FFN = ("gate_proj", "up_proj", "down_proj")
# Rows of a dequantised block in the long-input path (bounds its float copy to ~4M values).
_BLOCK_ELEMENTS = 1 << 22


def quantize_rows(w: Tensor, axis: str = "out") -> tuple[Tensor, Tensor]:
    """(q int8, scale float32) with w ~= q * scale: one scale per row (`out`) or per column (`in`), absmax / 127."""
    w = w.detach().float()
    dim = 1 if axis == "out" else 0
    scale = (w.abs().amax(dim) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(w / (scale[:, None] if axis == "out" else scale[None, :])).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


class Int8Linear(nn.Module):
    """y = x W^T + b with W = q * scale held as int8 codes q [out, in] and float32 scales.

    `axis`: `out` (scale [out], one per row: W[i, :] = q[i, :] * s[i]) or `in` (scale [in], one per input
    column: W[:, j] = q[:, j] * s[j], i.e. y = q (s * x)). The output has the input's dtype. `weight` (the
    dequantised float matrix) is built on first access and kept: a shadow predictor's reference path reads it.
    """

    def __init__(self, qweight: Tensor, scale: Tensor, bias: Tensor | None, axis: str = "out",
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if axis not in ("out", "in"):
            raise ValueError(f"axis must be 'out' or 'in', got {axis!r}")
        if qweight.dtype != torch.int8 or qweight.dim() != 2:
            raise ValueError("qweight must be a 2-D int8 tensor")
        self.axis = axis
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scale", scale.to(torch.float32).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).contiguous())
        self.weight_dtype = dtype  # the float dtype `weight` dequantises to (the model's)
        self._dequantized: Tensor | None = None

    @classmethod
    def from_linear(cls, lin: nn.Linear, axis: str = "out") -> Int8Linear:
        q, s = quantize_rows(lin.weight, axis)
        return cls(q, s, lin.bias, axis, lin.weight.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8, scale per {self.axis}"

    def dequantize(self, rows: slice = slice(None)) -> Tensor:
        """W[rows] in float32 (not kept)."""
        q = self.qweight[rows].float()
        return q * (self.scale[rows, None] if self.axis == "out" else self.scale[None, :])

    @property
    def weight(self) -> Tensor:
        if self._dequantized is None or self._dequantized.device != self.qweight.device:
            self._dequantized = self.dequantize().to(self.weight_dtype)
        return self._dequantized

    def forward(self, x: Tensor) -> Tensor:
        from upcycle.kernels import cpu

        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        if (x2.shape[0] <= cpu.LINEAR_MAX_TOKENS and x.device.type == "cpu" and not torch.is_grad_enabled()
                and x2.shape[0] > 0 and cpu.fused_available()):
            if self.axis == "out":
                y = cpu.int8_linear(x2, self.qweight, self.scale, self.bias)
            else:
                y = cpu.int8_linear(x2.float() * self.scale, self.qweight, None, self.bias)
        elif self._dequantized is not None:
            y = F.linear(x2, self._dequantized, None if self.bias is None else self.bias.to(x2.dtype)).float()
        else:  # a block of dequantised rows at a time: never the whole float matrix
            xf = x2.float()
            y = torch.empty(x2.shape[0], self.out_features, dtype=torch.float32, device=x.device)
            step = max(1, _BLOCK_ELEMENTS // max(1, self.in_features))
            for start in range(0, self.out_features, step):
                rows = slice(start, min(start + step, self.out_features))
                torch.matmul(xf, self.dequantize(rows).t(), out=y[:, rows])
            if self.bias is not None:
                y += self.bias
        return y.to(x.dtype).reshape(*lead, self.out_features)


class Int4Linear(nn.Module):
    """y = x W^T + b with W held as 4-bit rows (`kernels.packing.Q4Rows`): `axis` `out` stores W's rows [out, in]
    grouped along `in`; `in` stores the rows of W^T [in, out] grouped along `out` (a sparse FFN's down projection:
    row c is what kept channel c adds). `weight` (the dequantised W) is built on first access and kept."""

    def __init__(self, rows, bias: Tensor | None, axis: str = "out", dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if axis not in ("out", "in"):
            raise ValueError(f"axis must be 'out' or 'in', got {axis!r}")
        self.axis = axis
        self.group_size = rows.group_size
        n, k = rows.shape
        self.out_features, self.in_features = (n, k) if axis == "out" else (k, n)
        self.register_buffer("codes", rows.codes)
        self.register_buffer("scale", rows.scale)
        self.register_buffer("lo", rows.lo)
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).contiguous())
        self.weight_dtype = dtype
        self._dequantized: Tensor | None = None

    @classmethod
    def from_linear(cls, lin: nn.Linear, axis: str = "out", group_size: int = INT4_GROUP) -> Int4Linear:
        from upcycle.kernels.packing import pack_q4

        w = lin.weight.detach()
        return cls(pack_q4(w if axis == "out" else w.t(), group_size), lin.bias, axis, lin.weight.dtype)

    @property
    def rows(self):
        from upcycle.kernels.packing import Q4Rows

        return Q4Rows(self.codes, self.scale, self.lo, self.group_size)

    def extra_repr(self) -> str:
        stored = "W" if self.axis == "out" else "W^T"
        return f"in={self.in_features}, out={self.out_features}, int4, group {self.group_size}, rows of {stored}"

    def dequantize(self, rows: slice = slice(None)) -> Tensor:
        """Stored rows[rows] in float32 (W's rows for axis `out`, W^T's for `in`; not kept)."""
        from upcycle.kernels.packing import unpack_q4

        return unpack_q4(self.rows, rows)

    @property
    def weight(self) -> Tensor:
        if self._dequantized is None or self._dequantized.device != self.codes.device:
            w = self.dequantize()
            self._dequantized = (w if self.axis == "out" else w.t().contiguous()).to(self.weight_dtype)
        return self._dequantized

    def forward(self, x: Tensor) -> Tensor:
        from upcycle.kernels import cpu

        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        if (self.axis == "out" and x2.shape[0] <= cpu.LINEAR_MAX_TOKENS and x.device.type == "cpu"
                and not torch.is_grad_enabled() and x2.shape[0] > 0 and cpu.fused_available()):
            from upcycle.kernels.cpu.int4 import int4_linear

            y = int4_linear(x2, self.rows, self.bias)
        elif self._dequantized is not None:
            y = F.linear(x2, self._dequantized, None if self.bias is None else self.bias.to(x2.dtype)).float()
        else:  # a block of dequantised stored rows at a time: never the whole float matrix
            xf = x2.float()
            n = self.codes.shape[0]
            step = max(1, _BLOCK_ELEMENTS // max(1, self.codes.shape[1] * 2))
            if self.axis == "out":
                y = torch.empty(x2.shape[0], self.out_features, dtype=torch.float32, device=x.device)
                for start in range(0, n, step):
                    rows = slice(start, min(start + step, n))
                    torch.matmul(xf, self.dequantize(rows).t(), out=y[:, rows])
            else:
                y = torch.zeros(x2.shape[0], self.out_features, dtype=torch.float32, device=x.device)
                for start in range(0, n, step):
                    rows = slice(start, min(start + step, n))
                    y.addmm_(xf[:, rows], self.dequantize(rows))
            if self.bias is not None:
                y += self.bias
        return y.to(x.dtype).reshape(*lead, self.out_features)


def _swap(parent: nn.Module, name: str, axis: str, fmt: str = "int8") -> nn.Module | None:
    lin = getattr(parent, name, None)
    if type(lin) is not nn.Linear:
        return None  # already quantised, absent, or another module (a LoRA wrapper, an N:M layer): left alone
    new = Int8Linear.from_linear(lin, axis) if fmt == "int8" else Int4Linear.from_linear(lin, axis)
    setattr(parent, name, new)
    return new


def _release_decode_caches(module: nn.Module) -> None:
    for attr in [a for a in module.__dict__ if a.startswith("_upcycle_")]:
        module.__dict__.pop(attr)  # the sparse runtime's caches of the float weights: rebuilt from the new ones


@torch.no_grad()
def quantize(model: nn.Module, fmt: str = "int8", lm_head: bool = True, attention: bool = True,
             ffn: bool = True, lm_head_format: str | None = None) -> nn.Module:
    """Quantise `model`'s linear layers to `fmt` ("int8" or "int4") in place and return it (the module docstring).

    Which parts: the attention projections, the LM head and the FFNs (dense SwiGLU or bank-sparse), each
    switchable. Linears of other kinds (already quantised, LoRA, N:M, MoE experts) are left as they are.
    `lm_head_format`: the LM head's own format; None = int8 for both formats (llama.cpp's 4-bit types keep the
    output projection at 6-8 bits too: the logits are the most sensitive product of the model).
    """
    head_fmt = lm_head_format or "int8"
    if fmt not in FORMATS or head_fmt not in FORMATS:
        raise ValueError(f"quantization format {fmt!r} / {head_fmt!r} is not one of {FORMATS}")
    if not getattr(model, "model", None) or not hasattr(model.model, "layers"):
        raise ValueError("upcycle.quantize needs a decoder-only causal LM with model.model.layers")
    for layer in model.model.layers:
        attn = getattr(layer, "self_attn", None)
        if attention and attn is not None:
            for name in _ATTN:
                _swap(attn, name, "out", fmt)
        mlp = getattr(layer, "mlp", None)
        if ffn and mlp is not None and all(hasattr(mlp, n) for n in _FFN):
            sparse = getattr(mlp, "sparse_decode", False)
            gate, up = _swap(mlp, "gate_proj", "out", fmt), _swap(mlp, "up_proj", "out", fmt)
            _swap(mlp, "down_proj", "in" if sparse else "out", fmt)
            pred = getattr(mlp, "predictor", None)
            if sparse and getattr(pred, "kind", None) == "shadow" and gate is not None and up is not None:
                pred._sources = (gate, up)  # the shadow follows the weights the FFN now computes with
                pred._cache = None
            _release_decode_caches(mlp)
    if lm_head and type(getattr(model, "lm_head", None)) is nn.Linear:
        model.lm_head = (Int8Linear if head_fmt == "int8" else Int4Linear).from_linear(model.lm_head, "out")
    model.upcycle_quantized = fmt  # what `upcycle generate` and the benchmarks report
    return model
