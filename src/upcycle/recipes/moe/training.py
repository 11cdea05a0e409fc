"""The MoE recipe's training hooks: the router's LR group, the load-balancing and z losses by name, per-layer
routing metrics, a dead-expert warning and the expert-load heatmap at the end.

Losses (computed from the router logits of each forward, never by transformers' aux-loss code):
  load_balance = E * sum_e f_e * P_e   (Switch Transformer; f_e = share of the T*k token->expert assignments
                                         that go to e, no gradient; P_e = mean full-softmax probability of e):
                                         1.0 at perfect balance, E when every token goes to one expert
  z_loss       = mean_t logsumexp(logits_t)^2   (ST-MoE)
Both are averaged over the MoE layers and weighted by the checkpoint's aux_loss_coef / z_loss_coef (or the
--load-balance-weight / --z-loss-weight overrides). Routing is dropless: no capacity, no dropped tokens.

Metrics per step (metrics.jsonl, under "moe": one entry per MoE layer, in "layers" order):
  load           fraction of the step's token->expert assignments per expert (sums to 1; ideal 1/E)
  max_violation  max load / ideal - 1 (0: balanced)
  dead_experts   experts that received no token this step
  entropy        mean per-token router entropy / log E (1: uniform router, 0: one-hot)
and scalars moe_max_violation (max over layers), moe_dead_experts (sum), moe_router_entropy (mean).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from upcycle.recipes.moe.config import MoEUpcycleConfig
from upcycle.recipes.moe.modules import moe_ffns, set_router_recording
from upcycle.recipes.registry import TrainHooks

log = logging.getLogger("upcycle.train")

HEATMAP = "expert_load.png"


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class MoETraining:
    """Training options of the MoE recipe (TrainConfig's `recipe:` section; flags of the same name)."""

    router_lr_mult: float = _f(1.0, "LR multiplier of the router weights (no weight decay)")
    load_balance_weight: float | None = _f(None, "weight of the load-balancing loss (default: the checkpoint's "
                                           "aux_loss_coef, 0.01 unless converted otherwise)")
    z_loss_weight: float | None = _f(None, "weight of the router z-loss (default: the checkpoint's z_loss_coef, "
                                     "0.001 unless converted otherwise)")
    dead_expert_steps: int = _f(20, "warn when an expert receives no token for this many consecutive steps "
                                "(0: never)")

    def __post_init__(self) -> None:
        for name in ("router_lr_mult", "load_balance_weight", "z_loss_weight", "dead_expert_steps"):
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v} (--{name.replace('_', '-')}).")
        if self.router_lr_mult <= 0:
            raise ValueError(f"router_lr_mult must be > 0, got {self.router_lr_mult} (--router-lr-mult).")


# Flags of `upcycle train` that convert a dense --model on the fly (other fields: the YAML `recipe:` section).
CONVERT_FLAGS: dict[str, dict] = {
    "num_experts": {"type": int, "help": "convert a dense --model into MoE with this many routed experts per layer "
                    "(the other MoEUpcycleConfig fields: YAML recipe section) (8)"},
    "top_k": {"type": int, "help": "experts per token when converting a dense --model (2)"},
}


def convert_config(fields: dict) -> MoEUpcycleConfig:
    """The conversion of a dense --model from TrainConfig's recipe section."""
    return MoEUpcycleConfig(**fields)


def layer_metrics(stats: dict, num_experts: int) -> dict:
    """One layer's step metrics from `MoESwiGLU.take_stats()` totals."""
    counts = stats["counts"]
    total = float(counts.sum())
    load = [round(v, 6) for v in (counts / max(total, 1.0)).tolist()]
    entropy = stats["entropy_sum"] / max(stats["tokens"], 1)
    return {"load": load, "max_violation": round(max(load) * num_experts - 1.0, 6),
            "dead_experts": int((counts == 0).sum()),
            "entropy": round(entropy / math.log(num_experts), 6) if num_experts > 1 else 0.0}


class MoEHooks(TrainHooks):
    def __init__(self, model: nn.Module, options: MoETraining):
        self.model, self.options = model, options
        self.param_groups = {"router": {"lr_mult": options.router_lr_mult, "weight_decay": 0.0}}
        self.router_params = {f"{name}.gate.weight" for name, _ in moe_ffns(model)}
        config = next((m.config for _, m in moe_ffns(model)), MoEUpcycleConfig())
        lb, z = options.load_balance_weight, options.z_loss_weight
        self.weights = {"load_balance": config.aux_loss_coef if lb is None else lb,
                        "z_loss": config.z_loss_coef if z is None else z}
        self.dead_run: dict[str, list[int]] = {}  # layer -> consecutive steps without a token, per expert
        self.warned: set[str] = set()
        self.checked_frozen = False

    def param_group(self, name: str) -> str | None:
        return "router" if name in self.router_params else None

    def aux_weights(self, step: int) -> dict[str, float]:
        return {k: w for k, w in self.weights.items() if w > 0}

    def begin_aux(self, names: set[str]) -> None:
        if not self.checked_frozen:
            self.checked_frozen = True
            frozen = [n for n, m in moe_ffns(self.model) if not any(p.requires_grad for p in m.parameters())]
            if frozen and any(p.requires_grad for p in self.model.parameters()):
                log.warning("MoE layers %s are frozen while other parameters train (--train-only ffn selects the "
                            "FFNs by their gate/up/down linears, which an MoE layer does not have): train with "
                            "--train-only all to update the experts and routers.", frozen[:3])
        # on for forward and backward (checkpointing replays the forward): the losses and the step's statistics
        set_router_recording(self.model, True)
        for _, m in moe_ffns(self.model):
            m.collect_stats = True
            m.take_stats()

    def end_aux(self) -> None:
        set_router_recording(self.model, None)
        for _, m in moe_ffns(self.model):
            m.collect_stats = False

    def step_metrics(self) -> dict:
        per_layer = []
        for _, m in moe_ffns(self.model):
            s = m.take_stats()
            if s is not None:
                per_layer.append((m.layer_idx, layer_metrics(s, m.num_experts)))
        if not per_layer:
            return {}
        self._watch_dead(per_layer)
        rows = [r for _, r in per_layer]
        return {
            "moe_max_violation": max(r["max_violation"] for r in rows),
            "moe_dead_experts": sum(r["dead_experts"] for r in rows),
            "moe_router_entropy": sum(r["entropy"] for r in rows) / len(rows),
            "moe": {"layers": [i for i, _ in per_layer], **{k: [r[k] for r in rows] for k in rows[0]}},
        }

    def _watch_dead(self, per_layer: list[tuple[int, dict]]) -> None:
        n = self.options.dead_expert_steps
        for idx, r in per_layer:
            run = self.dead_run.setdefault(str(idx), [0] * len(r["load"]))
            for e, load in enumerate(r["load"]):
                run[e] = run[e] + 1 if load == 0 else 0
            if n <= 0:
                continue
            dead = [e for e, c in enumerate(run) if c >= n and f"{idx}.{e}" not in self.warned]
            if dead:
                self.warned |= {f"{idx}.{e}" for e in dead}
                log.warning("MoE layer %d: expert(s) %s received no token for %d consecutive steps (dead experts): "
                            "raise the load-balancing weight (--load-balance-weight, now %g), add router jitter "
                            "(router_jitter at convert) or convert with drop_upcycle > 0.", idx, dead, n,
                            self.weights["load_balance"])

    def on_train_end(self, out: Path, metrics: list[dict]) -> None:
        png = plot_expert_load(metrics, Path(out) / HEATMAP)
        if png is not None:
            log.info("expert load heatmap: %s", png)

    def state_dict(self) -> dict:
        return {"dead_run": self.dead_run, "warned": sorted(self.warned)}

    def load_state_dict(self, state: dict) -> None:
        self.dead_run = {k: list(v) for k, v in state.get("dead_run", {}).items()}
        self.warned = set(state.get("warned", []))


def train_hooks(model: nn.Module, options: MoETraining | None) -> MoEHooks:
    return MoEHooks(model, options or MoETraining())


def mean_load(metrics: list[dict], last_fraction: float = 0.1) -> tuple[list[int], list[list[float]], tuple[int, int]]:
    """(layers, [layer][expert] mean load over the last `last_fraction` of the logged steps, (first, last step))."""
    rows = [r for r in metrics if isinstance(r.get("moe"), dict) and r["moe"].get("load")]
    if not rows:
        return [], [], (0, 0)
    tail = rows[-max(1, math.ceil(len(rows) * last_fraction)):]
    layers = tail[-1]["moe"]["layers"]
    loads = [[sum(r["moe"]["load"][j][e] for r in tail) / len(tail) for e in range(len(tail[-1]["moe"]["load"][j]))]
             for j in range(len(layers))]
    return layers, loads, (tail[0]["step"], tail[-1]["step"])


def plot_expert_load(metrics: list[dict], png: Path, title: str | None = None) -> Path | None:
    """Heatmap of load / ideal (layer x expert) over the last 10% of the logged steps; None without data or
    matplotlib."""
    layers, loads, (first, last) = mean_load(metrics)
    if not layers:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import TwoSlopeNorm
    except ImportError:
        log.info("matplotlib not installed: no expert-load heatmap")
        return None
    n_experts = len(loads[0])
    rel = [[v * n_experts for v in row] for row in loads]  # 1.0 = the balanced share
    top = max(2.0, max(max(r) for r in rel))
    fig, ax = plt.subplots(figsize=(max(6.5, min(14, 3 + 0.5 * n_experts)), max(3.6, min(12, 1.8 + 0.3 * len(layers)))))
    im = ax.imshow(rel, aspect="auto", cmap="RdBu_r", norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=top),
                   interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_xticks(range(n_experts))
    step_y = max(1, len(layers) // 16)
    ax.set_yticks(range(0, len(layers), step_y))
    ax.set_yticklabels([str(layers[i]) for i in range(0, len(layers), step_y)])
    if n_experts <= 16 and len(layers) <= 32:
        for y, row in enumerate(rel):
            for x, v in enumerate(row):
                ax.text(x, y, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if abs(v - 1) > 0.6
                        else "black")
    span = f"step {last}" if first == last else f"steps {first}-{last}"
    ax.set_title(title or f"Expert load per layer ({n_experts} experts), mean over {span}\n"
                 "load / ideal: share of token->expert assignments x E (1 = balanced)", fontsize=10)
    fig.colorbar(im, ax=ax, label="load / ideal")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
