"""`MoESwiGLU`: drop-in replacement for an HF SwiGLU MLP (gate_proj / up_proj / down_proj / act_fn).

State-dict names (relative to the layer's ``mlp.``) follow transformers' in-memory MoE layout, so
export to Mixtral / Qwen2-MoE is a copy of tensors:

    gate.weight                      [E, d]       router (nn.Linear, no bias)
    experts.gate_up_proj             [E, 2f, d]   gate rows first, then up rows
    experts.down_proj                [E, d, f]
    shared_expert.{gate,up}_proj.weight  [S*f, d]  (only if shared_experts > 0; S experts fused)
    shared_expert.down_proj.weight       [d, S*f]

The same module serves training, prefill and decode: routing is dropless (no capacity factor), so the
output of a token never depends on the other tokens in the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from upcycle.recipes.moe.config import MoEUpcycleConfig
from upcycle.recipes.moe.experts import GroupedExperts
from upcycle.recipes.moe.routing import jitter, load_balance_loss, route, routing_stats, z_loss


class SharedExpert(nn.Module):
    """down(act(gate(x)) * up(x)): the S shared experts fused into one SwiGLU of size S*f (exact: a SwiGLU over
    concatenated channels is the sum of the per-slice SwiGLUs)."""

    def __init__(self, hidden_size: int, intermediate_size: int, act_fn: Callable | None = None, **kw) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False, **kw)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False, **kw)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False, **kw)
        self.act_fn = act_fn if act_fn is not None else nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MoESwiGLU(nn.Module):
    """Top-k routed SwiGLU experts plus optional always-on shared experts.

    Routing (per token, logits = gate(x) in the input dtype, then fp32):
      softmax_topk: p = softmax(logits); w, i = topk(p, k); w /= sum(w) if norm_topk_prob
      topk_softmax: l, i = topk(logits, k); w = softmax(l)
    Output: sum_k w_k * expert_{i_k}(x) + shared(x).

    `record_router` (None: in training mode only; the train hooks force it on between begin_aux and
    end_aux) keeps the last forward's logits and choices for `aux_losses()` (differentiable) and
    `routing_stats()`. `collect_stats` adds every forward's expert counts and router entropy to running
    totals (`take_stats()`), which the train hooks turn into per-step metrics.
    """

    def __init__(
        self,
        hidden_size: int,
        expert_size: int,
        config: MoEUpcycleConfig,
        act_fn: Callable | None = None,
        backend: str = "auto",
        layer_idx: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        act_fn = act_fn if act_fn is not None else nn.SiLU()
        self.config = config
        self.layer_idx = layer_idx
        self.hidden_size, self.expert_size = hidden_size, expert_size
        self.num_experts, self.top_k = config.num_experts, config.top_k
        self.gate = nn.Linear(hidden_size, config.num_experts, bias=False, **kw)
        self.experts = GroupedExperts(config.num_experts, hidden_size, expert_size, act_fn, backend, **kw)
        self.shared_expert = (
            SharedExpert(hidden_size, config.shared_experts * expert_size, act_fn, **kw)
            if config.shared_experts else None
        )
        self.record_router: bool | None = None
        self.collect_stats = False
        self._last: tuple[Tensor, Tensor, Tensor] | None = None  # logits, probs, idx
        self._stats: dict | None = None

    @property
    def act_fn(self) -> Callable:
        return self.experts.act_fn

    def reset_parameters(self, std: float = 0.02) -> None:
        """Random init, for using the layer without upcycling (tests, from-scratch MoE)."""
        nn.init.normal_(self.gate.weight, std=std)
        self.experts.reset_parameters(std)
        if self.shared_expert is not None:
            for lin in (self.shared_expert.gate_proj, self.shared_expert.up_proj, self.shared_expert.down_proj):
                nn.init.normal_(lin.weight, std=std)

    def router_logits(self, x: Tensor) -> Tensor:
        """x [T, d] -> logits [T, E]; jitter (training only) perturbs the router input, not the experts."""
        if self.training and self.config.router_jitter > 0:
            x = jitter(x, self.config.router_jitter)
        return self.gate(x)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x [T, d] -> (weights [T, k] fp32, idx [T, k], probs [T, E] fp32, logits [T, E])."""
        logits = self.router_logits(x)
        cfg = self.config
        weights, idx, probs = route(logits, cfg.top_k, cfg.router, cfg.norm_topk_prob)
        return weights, idx, probs, logits

    def forward(self, hidden_states: Tensor) -> Tensor:
        """hidden_states [..., d] -> [..., d]."""
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # [T, d]
        weights, idx, probs, logits = self.route(x)
        record = self.training if self.record_router is None else self.record_router
        self._last = (logits, probs, idx) if record else None
        if self.collect_stats:
            self._add_stats(probs.detach(), idx)
        out = self.experts(x, idx, weights.to(x.dtype))  # [T, d]
        if self.shared_expert is not None:
            out = out + self.shared_expert(x)
        return out.reshape(shape)

    @torch.no_grad()
    def _add_stats(self, probs: Tensor, idx: Tensor) -> None:
        s = self._stats
        if s is None:
            s = self._stats = {"counts": torch.zeros(self.num_experts, dtype=torch.float64), "tokens": 0,
                               "entropy_sum": 0.0}
        s["counts"] += torch.bincount(idx.reshape(-1), minlength=self.num_experts).double().cpu()
        s["tokens"] += probs.shape[0]
        s["entropy_sum"] += float(-(probs * probs.clamp_min(1e-30).log()).sum())

    def take_stats(self) -> dict | None:
        """The running totals since the last call ({"counts" [E], "tokens", "entropy_sum"}), then reset."""
        s, self._stats = self._stats, None
        return s

    def aux_losses(self) -> dict[str, Tensor]:
        """Unweighted losses of the last recorded forward: {"load_balance": 1.0 at balance, "z_loss": ...};
        empty when nothing was recorded (the trainer's `Objective` collects them by name)."""
        if self._last is None:
            return {}
        logits, probs, idx = self._last
        return {"load_balance": load_balance_loss(probs, idx), "z_loss": z_loss(logits)}

    def routing_stats(self) -> dict[str, float | Tensor]:
        """load [E], max_violation, dead_experts, entropy, entropy_norm of the last recorded forward."""
        if self._last is None:
            raise RuntimeError("no router state recorded: run a forward in training mode, or set "
                               "layer.record_router = True (set_router_recording(model, True)) before the forward.")
        _, probs, idx = self._last
        return routing_stats(probs.detach(), idx)

    def active_params_per_token(self) -> int:
        """Parameters one token reads: the router, its k routed experts and the shared experts."""
        f, d = self.expert_size, self.hidden_size
        shared = 0 if self.shared_expert is None else 3 * d * self.shared_expert.gate_proj.out_features
        return self.num_experts * d + self.top_k * 3 * d * f + shared

    def total_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        c = self.config
        return (f"layer={self.layer_idx}, experts={c.num_experts}, top_k={c.top_k}, expert_size={self.expert_size}, "
                f"shared={c.shared_experts}, router={c.router}, norm_topk_prob={c.norm_topk_prob}")


def moe_ffns(model: nn.Module) -> Iterator[tuple[str, MoESwiGLU]]:
    """(qualified name, module) of every MoE FFN in `model`, in layer order."""
    for name, module in model.named_modules():
        if isinstance(module, MoESwiGLU):
            yield name, module


def moe_layers(model: nn.Module) -> dict[int, MoESwiGLU]:
    """{decoder layer index: MoESwiGLU} of an upcycled model."""
    return {m.layer_idx: m for _, m in moe_ffns(model)}


def set_router_recording(model: nn.Module, on: bool | None) -> None:
    """Force router recording on/off in every MoE layer (None = training mode only); off drops the record."""
    for _, m in moe_ffns(model):
        m.record_router = on
        if on is False or on is None:
            m._last = None


def moe_aux_loss(model: nn.Module) -> Tensor:
    """aux_loss_coef * load_balance + z_loss_coef * z_loss, averaged over MoE layers (for your own loop; the
    upcycle trainer weights the two by name through the train hooks). Averaging keeps the coefficients'
    meaning independent of depth."""
    terms = []
    for _, m in moe_ffns(model):
        losses = m.aux_losses()
        if not losses:
            raise RuntimeError(f"MoE layer {m.layer_idx} recorded no router state: call model.train() (or "
                               "set_router_recording(model, True)) before the forward.")
        terms.append(m.config.aux_loss_coef * losses["load_balance"] + m.config.z_loss_coef * losses["z_loss"])
    if not terms:
        raise ValueError("the model has no MoE layers: convert it with upcycle.convert(model, MoEUpcycleConfig()).")
    return torch.stack(terms).mean()
