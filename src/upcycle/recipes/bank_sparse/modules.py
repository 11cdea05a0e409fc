"""The predictor-gated bank-wise sparse SwiGLU FFN, a drop-in for HF `*MLP` modules.

The dense weights keep their Hugging Face names (`gate_proj`, `up_proj`, `down_proj`, plain
`nn.Linear`); a low-rank predictor adds `predictor.in_proj` (d -> r) and `predictor.out_proj`
(r -> d_ff); a shadow predictor is derived from gate_proj / up_proj and adds at most its learned
per-channel bias (`predictor.bias`, d_ff values).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from upcycle.kernels.reference import bank_topk_mask, center_on_bank_threshold
from upcycle.recipes.bank_sparse import routing, runtime
from upcycle.recipes.bank_sparse.predictors import LowRankPredictor, ShadowPredictor


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
        # z only serves the backward's surrogate (a learned predictor) or the sigmoid gate: a plain shadow's
        # scores are not saved (d_ff values per token)
        ctx.save_for_backward(g, u, z if ctx.needs_input_grad[2] or alpha is not None else None, mask, alpha)
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


# Rows per block of the fused training path: about this many [rows, d_ff] elements at a time. A block's
# temporaries (a handful of them) must stay small next to the saved activations; on GPU larger blocks keep
# the kernel-launch count down. None: chosen by device.
TRAIN_CHUNK_ELEMENTS: int | None = None


def _row_chunks(n_rows: int, d_ff: int, device: torch.device):
    elements = TRAIN_CHUNK_ELEMENTS or (1 << 24 if device.type == "cuda" else 1 << 20)
    step = max(1, elements // d_ff)
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


class _FusedMaskedSwiGLU(torch.autograd.Function):
    """The training path: `_MaskedSwiGLU` with the predictor's output projection folded in.

    Inputs are g, u ([..., d_ff]) and the predictor's rank-r activations a ([..., r]) with the output
    projection W, b; the logits z = a W^T + b exist only a block of rows at a time, in the forward
    (for the mask and the sigmoid gate) and again in the backward (for the surrogate gradient). Saved
    for backward: g, u, a, the bool mask. So a sparse FFN stores less than a dense one (g, u, mask vs
    g, silu(g), u) and long sequences never hold [tokens, d_ff] logits or their gradient in full.
    The backward uses aten's fused silu/sigmoid derivative kernels: fewer passes over [rows, d_ff].
    `aux_keep > 0` also returns the BCE of z toward the oracle top-`aux_keep` of |silu(g) u| (mean
    over elements), whose gradient is added to z's inside the same backward.
    """

    @staticmethod
    def forward(ctx, g, u, a, w, b, alpha, bank_size: int, keep: int, tau: float, aux_keep: int, given=None,
                sink=None):
        # given: the mask to use (a checkpoint recomputation replays the forward's); sink: a list that receives
        # the mask computed here (see routing.py)
        ctx.set_materialize_grads(False)
        d_ff = g.shape[-1]
        g2, u2, a2 = g.reshape(-1, d_ff), u.reshape(-1, d_ff), a.reshape(-1, a.shape[-1])
        out = torch.empty_like(g2)
        if given is not None:
            mask = given.reshape(g2.shape)
        else:
            mask = torch.ones(g2.shape, dtype=torch.bool, device=g.device)
        target = torch.zeros_like(mask) if aux_keep else None
        aux = torch.zeros((), dtype=torch.float32, device=g.device)
        ctx.z_dtype = a.dtype
        for rows in _row_chunks(len(g2), d_ff, g.device):
            z = F.linear(a2[rows], w, b)
            ctx.z_dtype = z.dtype  # autocast's choice; the backward recomputes z in it
            if keep < bank_size and given is None:  # top `keep` of every bank, written straight into the saved mask
                _scatter_topk(mask[rows], z, bank_size, keep)
            h = F.silu(g2[rows]).mul_(u2[rows])
            if aux_keep:
                _scatter_topk(target[rows], h.abs(), bank_size, aux_keep)
                aux += F.binary_cross_entropy_with_logits(z.float(), target[rows].float(), reduction="sum")
            if alpha is not None:
                h.mul_((2 * torch.sigmoid(alpha * z)).to(h.dtype))
            torch.mul(h, mask[rows], out=out[rows])
        ctx.save_for_backward(g, u, a, w, b, mask, alpha, target)
        ctx.tau, ctx.n_elements = tau, g2.numel()
        if sink is not None:
            sink.append(mask)
        if not aux_keep:
            ctx.mark_non_differentiable(aux)
        return out.view(g.shape), aux / g2.numel()

    @staticmethod
    def backward(ctx, dout, daux):
        g, u, a, w, b, mask, alpha, target = ctx.saved_tensors
        d_ff, r = g.shape[-1], a.shape[-1]
        g2, u2, a2 = g.reshape(-1, d_ff), u.reshape(-1, d_ff), a.reshape(-1, r)
        dout2 = torch.zeros_like(g2) if dout is None else dout.reshape(-1, d_ff)
        need_a, need_w, need_b, need_alpha = (ctx.needs_input_grad[i] for i in (2, 3, 4, 5))
        need_z = need_a or need_w or need_b or (need_alpha and alpha is not None)
        zd, tau = ctx.z_dtype, ctx.tau
        wz, bz = w.to(zd), None if b is None else b.to(zd)
        dg, du = torch.empty_like(g2), torch.empty_like(u2)
        da = torch.empty_like(a2) if need_a else None
        dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        db = torch.zeros(d_ff, dtype=torch.float32, device=w.device) if need_b and b is not None else None
        dalpha = torch.zeros((), dtype=torch.float32, device=g.device) if need_alpha and alpha is not None else None
        for rows in _row_chunks(len(g2), d_ff, g.device):
            gc, uc, m, do = g2[rows], u2[rows], mask[rows], dout2[rows]
            s = F.silu(gc)
            p = do * uc  # d out / d silu(g), before mask and gate
            z = F.linear(a2[rows].to(zd), wz, bz) if need_z or alpha is not None else None
            dz = None
            if alpha is None:
                if need_z:  # straight-through: d/dz of sigmoid(z / tau) stands in for the 0/1 gate
                    soft = torch.sigmoid(z.float() / tau if tau != 1 else z.float())
                    dz = torch.ops.aten.sigmoid_backward((p * s).float(), soft)
                    if tau != 1:
                        dz.div_(tau)
                p.mul_(m)
                torch.mul(do, m, out=du[rows]).mul_(s)
            else:
                sig_z = torch.sigmoid(alpha * z.float())
                p.mul_(m)
                # gate = 2 sigmoid(alpha z): d gate / d(alpha z) = 2 sig_z (1 - sig_z)
                dpre = torch.ops.aten.sigmoid_backward((p * s).float(), sig_z).mul_(2)
                if dalpha is not None:
                    dalpha += (dpre * z.float()).sum()
                if need_z:
                    dz = dpre.mul_(alpha)
                gate = (2 * sig_z).to(s.dtype)
                p.mul_(gate)
                torch.mul(do, m, out=du[rows]).mul_(gate).mul_(s)
            if target is not None and daux is not None and need_z:
                dz = dz + (torch.sigmoid(z.float()) - target[rows].float()) * (daux / ctx.n_elements)
            torch.ops.aten.silu_backward.grad_input(p, gc, grad_input=dg[rows])
            if dz is not None:
                dz = dz.to(zd)
                if da is not None:
                    torch.matmul(dz, wz, out=da[rows])
                if dw is not None:
                    dw += (dz.t() @ a2[rows].to(zd)).float()
                if db is not None:
                    db += dz.float().sum(0)
        return (
            dg.view(g.shape), du.view(u.shape), None if da is None else da.view(a.shape),
            None if dw is None else dw.to(w.dtype), None if db is None else db.to(b.dtype),
            None if dalpha is None else dalpha.to(alpha.dtype).reshape(alpha.shape), None, None, None, None, None,
            None,
        )


class _FusedShadowSwiGLU(torch.autograd.Function):
    """The shadow predictor's training path: scores, mask and masked SwiGLU a block of rows at a time.

    Inputs: g, u ([..., d_ff]), x ([..., d]), the shadow's fake-quantised weights gq, uq (and the linears'
    biases) and the learned per-channel bias (None: the pure shadow). Per block: |h_q| = |silu(x gq^T) *
    (x uq^T)|, score = log|h_q| + bias, one top-(keep+1) per bank gives both the mask and the bank's
    threshold, and the centred score z = score - threshold (what the straight-through surrogate reads) is
    saved in g's dtype. So the [tokens, d_ff] shadow activations, float32 scores and their temporaries
    never exist in full: a step saves g, u, z and the bool mask, what a dense SwiGLU saves (g, silu(g), u,
    h), and without a learned bias not even z. Same function and gradients as shadow scores followed by
    `center_on_bank_threshold` and `_MaskedSwiGLU` (tests/recipes/bank_sparse/test_fused_swiglu.py).
    """

    @staticmethod
    def forward(ctx, g, u, x, gq, uq, gate_b, up_b, bias, bank_size: int, keep: int, tau: float, given=None,
                sink=None):
        ctx.set_materialize_grads(False)
        d_ff = g.shape[-1]
        g2, u2, x2 = g.reshape(-1, d_ff), u.reshape(-1, d_ff), x.reshape(-1, x.shape[-1])
        n, n_banks = len(g2), d_ff // bank_size
        out = torch.empty_like(g2)
        mask = given.reshape(g2.shape) if given is not None else torch.ones(g2.shape, dtype=torch.bool,
                                                                            device=g.device)
        learns = bias is not None and ctx.needs_input_grad[7]
        if torch.is_autocast_enabled(x.device.type):  # cast the shadow once, not once per block
            dt = torch.get_autocast_dtype(x.device.type)
            gq, uq = gq.to(dt), uq.to(dt)
        z_saved = torch.empty_like(g2) if learns else None
        sparse = keep < bank_size
        for rows in _row_chunks(n, d_ff, g.device):
            xs = x2[rows]
            if (sparse and given is None) or learns:
                mag = F.silu(F.linear(xs, gq, gate_b)).mul_(F.linear(xs, uq, up_b)).abs_()
                score = mag if bias is None else mag.float().clamp_min_(1e-30).log_().add_(bias.float())
                banks = score.view(-1, n_banks, bank_size)
                if sparse:
                    top = banks.topk(keep + 1 if learns else keep, dim=-1, sorted=learns)
                    if given is None:
                        _scatter_indices(mask[rows], top.indices[..., :keep])
                if learns:  # centred on the midpoint between the keep-th and (keep+1)-th score of each bank
                    thr = (top.values[..., keep - 1] + top.values[..., keep]) / 2 if sparse else banks.amin(-1) - 1
                    torch.sub(banks, thr[..., None], out=z_saved[rows].view(-1, n_banks, bank_size))
            h = F.silu(g2[rows]).mul_(u2[rows])
            torch.mul(h, mask[rows], out=out[rows])
        ctx.save_for_backward(g, u, mask, z_saved)
        ctx.tau, ctx.bias_dtype = tau, None if bias is None else bias.dtype
        if sink is not None:
            sink.append(mask)
        return out.view(g.shape)

    @staticmethod
    def backward(ctx, dout):
        g, u, mask, z = ctx.saved_tensors
        if dout is None:
            return (None,) * 13
        d_ff, tau = g.shape[-1], ctx.tau
        g2, u2, dout2 = g.reshape(-1, d_ff), u.reshape(-1, d_ff), dout.reshape(-1, d_ff)
        dg, du = torch.empty_like(g2), torch.empty_like(u2)
        dbias = torch.zeros(d_ff, dtype=torch.float32, device=g.device) if z is not None else None
        for rows in _row_chunks(len(g2), d_ff, g.device):
            gc, m, do = g2[rows], mask[rows], dout2[rows]
            s = F.silu(gc)
            p = do * u2[rows]  # d out / d silu(g), before the mask
            if dbias is not None:  # straight-through: d/dz of sigmoid(z / tau) stands in for the 0/1 gate
                soft = torch.sigmoid(z[rows].float() / tau if tau != 1 else z[rows].float())
                dz = torch.ops.aten.sigmoid_backward((p * s).float(), soft)
                dbias += dz.sum(0) / tau if tau != 1 else dz.sum(0)
            p.mul_(m)
            torch.mul(do, m, out=du[rows]).mul_(s)
            torch.ops.aten.silu_backward.grad_input(p, gc, grad_input=dg[rows])
        return (dg.view(g.shape), du.view(u.shape), None, None, None, None, None,
                None if dbias is None else dbias.to(ctx.bias_dtype), None, None, None, None, None)


def _scatter_topk(mask_rows: Tensor, scores: Tensor, bank_size: int, keep: int) -> None:
    """mask_rows[...] = bank_topk_mask(scores, bank_size, keep), written in place (no temporary mask)."""
    n, d_ff = scores.shape
    idx = scores.reshape(n, d_ff // bank_size, bank_size).topk(keep, dim=-1, sorted=False).indices
    _scatter_indices(mask_rows, idx)


def _scatter_indices(mask_rows: Tensor, idx: Tensor) -> None:
    """mask_rows [n, d_ff] = True exactly at the per-bank positions idx [n, n_banks, k], in place."""
    view = mask_rows.view(*idx.shape[:2], -1)
    view.zero_()
    view.scatter_(-1, idx, True)


class BankSparseSwiGLU(nn.Module):
    """y = down_proj(mask * gate * silu(gate_proj(x)) * up_proj(x)); mask: top `keep` of every bank.

    `keep` is a plain attribute so schedules can move it between `bank_size` (dense) and
    `target_keep` during training.
    """

    sparse_decode = True  # no-grad forwards go through `runtime.decode_forward` (fast kernels at decode shapes)
    # torch.utils.checkpoint's context_fn: recomputations replay the forward's masks (upcycle.train passes it)
    checkpoint_context_fn = staticmethod(routing.checkpoint_context_fn)

    def __init__(
        self,
        gate_proj: nn.Linear,
        up_proj: nn.Linear,
        down_proj: nn.Linear,
        act_fn: nn.Module,
        bank_size: int,
        keep: int,
        rank: int | None = None,
        gate_mode: str = "ste",
        ste_temperature: float = 1.0,
        sigmoid_scale_init: float = 0.1,
        layer_idx: int | None = None,
        shadow: tuple[int, int] | None = None,
        shadow_bias: bool = False,
    ):
        """`rank`: a low-rank predictor; `shadow=(bits, group_size)`: a low-bit shadow of gate/up instead
        (`shadow_bias`: with a learned per-channel bias on its log-score, trained on the LM path)."""
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = gate_proj, up_proj, down_proj, act_fn
        self.hidden_size = gate_proj.in_features
        self.intermediate_size = gate_proj.out_features
        self.bank_size, self.keep, self.target_keep = bank_size, keep, keep
        self.gate_mode, self.ste_temperature = gate_mode, ste_temperature
        self.layer_idx = layer_idx
        w = gate_proj.weight
        if (rank is None) == (shadow is None):
            raise ValueError("pass exactly one of rank (low-rank predictor) and shadow=(bits, group_size).")
        if shadow is not None:
            if gate_mode != "ste":
                raise ValueError("a shadow predictor works with gate_mode='ste' only.")
            self.predictor = ShadowPredictor(gate_proj, up_proj, *shadow, learned_bias=shadow_bias)
        else:
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
            f"predictor={self.predictor.kind}, gate_mode={self.gate_mode}"
        )

    def routing_logits(self, x: Tensor) -> Tensor:
        return self.predictor(x)

    @torch.no_grad()
    def kept_mask(self, x: Tensor) -> Tensor:
        """The channels a forward on `x` keeps, [..., d_ff] bool (what a fused kernel used without saying)."""
        return bank_topk_mask(self.routing_logits(x), self.bank_size, self.keep)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled() and self.mask_fn is None:
            y = runtime.decode_forward(self, x)
            if y is not None:
                return y
            if self.is_dense and self.gate_scale is None:
                # Inference at keep == bank_size: the dense function, no predictor needed.
                return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        g, u = self.gate_proj(x), self.up_proj(x)
        if torch.is_grad_enabled() and self.mask_fn is None and self.predictor.kind == "lowrank":
            # Training: the fused path never holds the [tokens, d_ff] logits in full (see _FusedMaskedSwiGLU).
            out = self.predictor.out_proj
            given = routing.replayed_mask(self)  # checkpoint recomputation: the forward's routing
            sink = [] if given is None and routing.current() is not None else None
            h, aux = _FusedMaskedSwiGLU.apply(
                g, u, self.predictor.in_proj(x), out.weight, out.bias, self.gate_scale, self.bank_size, self.keep,
                self.ste_temperature, self.target_keep if self.record_aux else 0, given, sink,
            )
            if sink:
                routing.record_mask(self, sink[0].view(g.shape))
            if self.record_aux:
                self.aux_loss = aux
            return self.down_proj(h)
        if torch.is_grad_enabled() and self.mask_fn is None and self.predictor.kind == "shadow":
            return self.down_proj(self._shadow_train_forward(x, g, u))
        z = self.predictor(x)
        with torch.no_grad():
            # under activation checkpointing the recomputation replays the forward's mask (routing.py)
            if self.mask_fn is not None:
                mask = routing.routed_mask(self, lambda: self.mask_fn(self, x, g, u, z))
            else:
                mask = routing.routed_mask(self, lambda: bank_topk_mask(z, self.bank_size, self.keep))
        shadow = self.predictor.kind == "shadow"
        if self.record_aux:
            # A shadow has nothing to learn from the oracle BCE: it follows the FFN weights (its bias learns
            # from the LM loss).
            learns = z.requires_grad and not shadow
            self.aux_loss = self._oracle_aux_loss(g, u, z) if learns else z.new_zeros((), dtype=torch.float32)
        if shadow and z.requires_grad:
            # log-scores: the straight-through surrogate is centred on each bank's keep boundary
            z = center_on_bank_threshold(z, self.bank_size, self.keep)
        h = _MaskedSwiGLU.apply(g, u, z, mask, self.gate_scale, self.ste_temperature)
        return self.down_proj(h)

    def _shadow_train_forward(self, x: Tensor, g: Tensor, u: Tensor) -> Tensor:
        """h of the shadow predictor in training, through `_FusedShadowSwiGLU` (its learned bias gets the gradient)."""
        gq, uq = self.predictor.shadow_weights()
        given = routing.replayed_mask(self)  # checkpoint recomputation: the forward's routing
        sink = [] if given is None and routing.current() is not None else None
        h = _FusedShadowSwiGLU.apply(g, u, x, gq, uq, self.gate_proj.bias, self.up_proj.bias, self.predictor.bias,
                                     self.bank_size, self.keep, self.ste_temperature, given, sink)
        if sink:
            routing.record_mask(self, sink[0].view(g.shape))
        if self.record_aux:  # a shadow has nothing to learn from the oracle BCE (its bias learns from the LM loss)
            self.aux_loss = g.new_zeros((), dtype=torch.float32)
        return h

    def aux_losses(self) -> dict[str, Tensor]:
        """The auxiliary losses of the last forward (the trainer's `Objective` collects them by name)."""
        return {"aux": self.aux_loss} if self.record_aux and self.aux_loss is not None else {}

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


def sparse_ffns(model: nn.Module):
    """(qualified name, module) of every bank-sparse FFN in `model`, in layer order."""
    for name, module in model.named_modules():
        if isinstance(module, BankSparseSwiGLU):
            yield name, module
