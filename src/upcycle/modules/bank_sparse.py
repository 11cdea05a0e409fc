"""The predictor-gated bank-wise sparse SwiGLU FFN, a drop-in for HF `*MLP` modules.

The dense weights keep their Hugging Face names (`gate_proj`, `up_proj`, `down_proj`, plain
`nn.Linear`); the predictor adds `predictor.in_proj` (d -> r) and `predictor.out_proj` (r -> d_ff).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from upcycle.kernels.reference import bank_topk_mask


class LowRankPredictor(nn.Module):
    """Channel routing logits B(A(x)): [..., d] -> [..., d_ff]."""

    def __init__(self, hidden_size: int, intermediate_size: int, rank: int, dtype=None, device=None):
        super().__init__()
        self.in_proj = nn.Linear(hidden_size, rank, bias=False, dtype=dtype, device=device)
        self.out_proj = nn.Linear(rank, intermediate_size, bias=True, dtype=dtype, device=device)
        nn.init.zeros_(self.out_proj.bias)

    @property
    def rank(self) -> int:
        return self.in_proj.out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.out_proj(self.in_proj(x))


class _MaskedSwiGLU(torch.autograd.Function):
    """h = mask * gate(z) * silu(g) * u with a memory-lean backward.

    Saves g, u, z and the boolean mask (not silu(g), h or the gate values: they are recomputed),
    so a sparse step stores about what a dense SwiGLU stores. `ste` (alpha is None): the forward
    gate is exactly the 0/1 mask; the backward treats it as sigmoid(z / tau), so every channel,
    kept or dropped, tells the predictor whether it would have lowered the loss. `sigmoid`: the
    gate is 2 * sigmoid(alpha * z) on kept channels.
    """

    @staticmethod
    def forward(ctx, g, u, z, mask, alpha, tau: float):
        s = F.silu(g)
        h = s * u
        if alpha is not None:
            h = h * (2 * torch.sigmoid(alpha * z)).to(h.dtype)
        ctx.save_for_backward(g, u, z, mask, alpha)
        ctx.tau = tau
        return h * mask

    @staticmethod
    def backward(ctx, dout):
        g, u, z, mask, alpha = ctx.saved_tensors
        sig_g = torch.sigmoid(g)
        s = g * sig_g
        h = s * u
        dz = dalpha = None
        if alpha is None:
            dh = dout * mask
            if ctx.needs_input_grad[2]:
                soft = torch.sigmoid(z.float() / ctx.tau)
                dz = (dout * h).float() * soft * (1 - soft) / ctx.tau
                dz = dz.to(z.dtype)
        else:
            sig_z = torch.sigmoid(alpha * z.float())
            gate = (2 * sig_z).to(h.dtype)
            dh = dout * mask * gate
            dgate = (dout * mask * h).float() * 2 * sig_z * (1 - sig_z)
            if ctx.needs_input_grad[2]:
                dz = (dgate * alpha).to(z.dtype)
            if ctx.needs_input_grad[4]:
                dalpha = (dgate * z.float()).sum().to(alpha.dtype).reshape(alpha.shape)
        dg = dh * u * (sig_g * (1 + g * (1 - sig_g)))
        du = dh * s
        return dg, du, dz, None, dalpha, None


class BankSparseSwiGLU(nn.Module):
    """y = down_proj(mask * gate * silu(gate_proj(x)) * up_proj(x)); mask: top `keep` of every bank.

    `keep` is a plain attribute so schedules can move it between `bank_size` (dense) and
    `target_keep` during training.
    """

    def __init__(
        self,
        gate_proj: nn.Linear,
        up_proj: nn.Linear,
        down_proj: nn.Linear,
        act_fn: nn.Module,
        bank_size: int,
        keep: int,
        rank: int,
        gate_mode: str = "ste",
        ste_temperature: float = 1.0,
        sigmoid_scale_init: float = 0.1,
        layer_idx: int | None = None,
    ):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = gate_proj, up_proj, down_proj, act_fn
        self.hidden_size = gate_proj.in_features
        self.intermediate_size = gate_proj.out_features
        self.bank_size, self.keep, self.target_keep = bank_size, keep, keep
        self.gate_mode, self.ste_temperature = gate_mode, ste_temperature
        self.layer_idx = layer_idx
        w = gate_proj.weight
        self.predictor = LowRankPredictor(
            self.hidden_size, self.intermediate_size, rank, dtype=w.dtype, device=w.device
        )
        if gate_mode == "sigmoid":
            self.gate_scale = nn.Parameter(torch.full((), sigmoid_scale_init, dtype=w.dtype, device=w.device))
        else:
            self.register_parameter("gate_scale", None)
        # When set, forward stores a BCE loss pulling the logits toward the oracle top-k of |h|.
        self.record_aux = False
        self.aux_loss: Tensor | None = None
        # Post-hoc baselines swap the routing: mask_fn(module, x, g, u, z) -> bool mask [..., d_ff].
        self.mask_fn = None

    @property
    def n_banks(self) -> int:
        return self.intermediate_size // self.bank_size

    @property
    def is_dense(self) -> bool:
        return self.keep >= self.bank_size

    def extra_repr(self) -> str:
        return (
            f"layer={self.layer_idx}, bank_size={self.bank_size}, keep={self.keep}, "
            f"rank={self.predictor.rank}, gate_mode={self.gate_mode}"
        )

    def routing_logits(self, x: Tensor) -> Tensor:
        return self.predictor(x)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled() and self.mask_fn is None:
            from upcycle.kernels import dispatch

            y = dispatch.decode_forward(self, x)
            if y is not None:
                return y
            if self.is_dense and self.gate_scale is None:
                # Inference at keep == bank_size: the dense function, no predictor needed.
                return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        g, u = self.gate_proj(x), self.up_proj(x)
        z = self.predictor(x)
        with torch.no_grad():
            if self.mask_fn is not None:
                mask = self.mask_fn(self, x, g, u, z)
            else:
                mask = bank_topk_mask(z, self.bank_size, self.keep)
        if self.record_aux:
            self.aux_loss = self._oracle_aux_loss(g, u, z)
        h = _MaskedSwiGLU.apply(g, u, z, mask, self.gate_scale, self.ste_temperature)
        return self.down_proj(h)

    def _oracle_aux_loss(self, g: Tensor, u: Tensor, z: Tensor) -> Tensor:
        with torch.no_grad():
            target = bank_topk_mask((F.silu(g) * u).abs(), self.bank_size, self.target_keep)
        return F.binary_cross_entropy_with_logits(z.float(), target.float())


class DenseSwiGLU(nn.Module):
    """The plain dense SwiGLU under the same HF names: what `to_dense` swaps back in (teachers)."""

    def __init__(self, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear, act_fn: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = gate_proj, up_proj, down_proj, act_fn

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
