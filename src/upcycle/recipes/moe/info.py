"""What `upcycle info` and `upcycle eval` say about an MoE model: experts, active and total FFN parameters per
token, and (eval) the measured per-layer expert load.

Parameter counts per layer: total = router (E*d) + routed experts (E*3*d*f) + shared experts (3*d*S*f);
active per token = router + top_k routed experts + the shared experts (dropless routing: exactly top_k per
token). The dense parent's FFN (3*d*d_ff) is the unit of the "x dense" figures; "of total" divides by the
layer's own total.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from upcycle import hf
from upcycle.recipes.moe.config import MoEUpcycleConfig
from upcycle.recipes.moe.modules import MoESwiGLU, SharedExpert, moe_ffns
from upcycle.recipes.moe.routing import route


def _dense_glu(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(layer, module) of the FFNs left dense (a shared expert inside an MoE layer is not one)."""
    return [(i, m) for _, i, m in hf.glu_modules(model) if not isinstance(m, SharedExpert)]


def describe(model: nn.Module) -> dict:
    """The MoE layout of a loaded model (the `sparsity` entry of `upcycle eval`)."""
    moe = [m for _, m in moe_ffns(model)]
    dense = _dense_glu(model)
    out = {"kind": "moe" if moe else "dense", "ffn_layers": len(moe) + len(dense), "sparse_layers": len(moe),
           "bank_size": None, "keep": {}, "baseline": getattr(model, "upcycle_baseline", None)}
    if not moe:
        return out
    c = moe[0].config
    d_ff = getattr(model.config, "intermediate_size", None) or moe[0].expert_size * c.slices_per_copy
    active = sum(m.active_params_per_token() for m in moe)
    total = sum(m.total_params() for m in moe)
    dense_params = sum(3 * m.hidden_size * d_ff for m in moe)
    out.update({
        "moe_layers": [m.layer_idx for m in moe], "num_experts": c.num_experts, "top_k": c.top_k, "init": c.init,
        "shared_experts": c.shared_experts, "expert_size": moe[0].expert_size, "router": c.router,
        "norm_topk_prob": c.normalised, "active_ffn_params_per_token": active, "total_ffn_params": total,
        "dense_ffn_params": dense_params, "active_vs_dense": active / dense_params,
        "label": (f"MoE ({len(moe)}/{len(moe) + len(dense)} FFN layers: {c.num_experts} experts of {moe[0].expert_size}"
                  f" top-{c.top_k}" + (f" + {c.shared_experts} shared" if c.shared_experts else "")
                  + f"; {active / 1e6:.2f}M of {total / 1e6:.2f}M MoE-FFN params active per token = "
                  f"{active / dense_params:.3f}x the dense FFN)"),
    })
    return out


class MoEStats:
    """`upcycle eval`'s statistics of an MoE model: while open, every MoE layer's routing is measured (the
    router is re-run on each layer's input: eval-mode routing has no randomness) and dense FFN layers count
    at density 1. `summary()` per layer: expert load, max violation, dead experts, router entropy, active
    and total FFN parameters per token; `density` = active / total FFN parameters of the layer."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.moe = [m for _, m in moe_ffns(model)]
        self.dense = _dense_glu(model)
        if not self.moe and not self.dense:
            raise ValueError(f"{type(model).__name__} has no FFN to measure.")
        self._hooks: list = []
        self.reset()

    def reset(self) -> None:
        self.counts = {m.layer_idx: torch.zeros(m.num_experts, dtype=torch.float64) for m in self.moe}
        self.entropy = dict.fromkeys(self.counts, 0.0)
        self.tokens = dict.fromkeys([m.layer_idx for m in self.moe] + [i for i, _ in self.dense], 0)

    def __enter__(self) -> MoEStats:
        for m in self.moe:
            self._hooks.append(m.register_forward_pre_hook(lambda mod, args: self._route(mod, args[0])))
        for i, m in self.dense:
            self._hooks.append(m.register_forward_pre_hook(lambda mod, args, i=i: self._count(i, args[0])))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _count(self, i: int, x: Tensor) -> None:
        self.tokens[i] += x.reshape(-1, x.shape[-1]).shape[0]

    @torch.no_grad()
    def _route(self, m: MoESwiGLU, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        c = m.config
        _, idx, probs = route(m.gate(x), c.top_k, c.router, c.norm_topk_prob)
        i = m.layer_idx
        self.counts[i] += torch.bincount(idx.reshape(-1), minlength=m.num_experts).double().cpu()
        self.entropy[i] += float(-(probs * probs.clamp_min(1e-30).log()).sum())
        self.tokens[i] += x.shape[0]

    def summary(self) -> dict:
        layers = []
        active_sum = total_sum = 0.0
        for m in self.moe:
            i, e = m.layer_idx, m.num_experts
            counts = self.counts[i]
            load = (counts / counts.sum().clamp_min(1.0)).tolist()
            n = self.tokens[i]
            active, total = m.active_params_per_token(), m.total_params()
            active_sum, total_sum = active_sum + active * n, total_sum + total * n
            layers.append({
                "layer": i, "sparse": True, "tokens": n, "density": active / total,
                "expert_load": load, "max_violation": max(load) * e - 1.0 if n else None,
                "dead_experts": int((counts == 0).sum()) if n else None,
                "router_entropy": self.entropy[i] / n / math.log(e) if n and e > 1 else None,
                "active_ffn_params_per_token": active, "total_ffn_params": total,
                "bank_utilisation": None, "dead_channels": None, "bank_load_max": None, "recall": None,
                "mass_kept": None,
            })
        for i, m in self.dense:
            n = self.tokens[i]
            p = sum(getattr(m, k).weight.numel() for k in hf.GLU_LINEARS)
            active_sum, total_sum = active_sum + p * n, total_sum + p * n
            layers.append({"layer": i, "sparse": False, "tokens": n, "density": 1.0, "expert_load": None,
                           "max_violation": None, "dead_experts": None, "router_entropy": None,
                           "active_ffn_params_per_token": p, "total_ffn_params": p, "bank_utilisation": None,
                           "dead_channels": None, "bank_load_max": None, "recall": None, "mass_kept": None})
        layers.sort(key=lambda r: r["layer"])
        tokens = max(self.tokens.values()) if self.tokens else 0
        moe_rows = [r for r in layers if r["sparse"] and r["tokens"]]
        return {
            "ffn_density": active_sum / total_sum if total_sum else None,
            "active_ffn_params_per_token": sum(r["active_ffn_params_per_token"] for r in layers),
            "total_ffn_params": sum(r["total_ffn_params"] for r in layers),
            "max_violation": max((r["max_violation"] for r in moe_rows), default=None),
            "dead_experts": sum(r["dead_experts"] for r in moe_rows) if moe_rows else None,
            "router_entropy": (sum(r["router_entropy"] or 0.0 for r in moe_rows) / len(moe_rows)) if moe_rows
            else None,
            "recall": None, "mass_kept": None, "bank_utilisation": None, "bank_load_max": None,
            "tokens": tokens, "layers": layers,
            "lines": format_load(layers),
        }


def format_load(layers: list[dict]) -> list[str]:
    """Human lines of the measured routing (printed after `upcycle eval`'s layer table)."""
    rows = [r for r in layers if r["sparse"]]
    if not rows:
        return []
    out = ["", "MoE routing: load = share of token->expert assignments x E (1 = balanced); entropy / log E",
           f"{'layer':>5} {'max_viol':>8} {'dead':>4} {'entropy':>7} {'active/tok':>11}  load per expert"]
    for r in rows:
        load = " ".join(f"{v * len(r['expert_load']):.2f}" for v in r["expert_load"])
        out.append(f"{r['layer']:>5} {_g(r['max_violation'], '.3f'):>8} {_g(r['dead_experts'], 'd'):>4} "
                   f"{_g(r['router_entropy'], '.3f'):>7} {r['active_ffn_params_per_token']:>11,}  {load}")
    return out


def _g(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def eval_stats(model: nn.Module) -> MoEStats:
    return MoEStats(model)


# ---------------------------------------------------------------------------------------------- upcycle info
def summarize(path: Path, config: MoEUpcycleConfig | None, shapes: dict) -> dict:
    """Per-layer experts, expert size, active and total FFN parameters per token, from the safetensors headers
    and config.json only."""
    import json

    raw = json.loads((Path(path) / "config.json").read_text())
    d_ff = raw.get("intermediate_size")
    rows = []
    for idx, children in sorted(hf.mlp_tensors(shapes).items()):
        if "experts" in children:
            d = raw["hidden_size"]
            e = children["experts"][0][0][0]
            nbytes = children["experts"][0][1]
            routed = sum(math.prod(s) for s, _ in children["experts"])
            f = routed // (3 * e * d)
            shared = sum(math.prod(s) for s, _ in children.get("shared_expert", []))
            router = sum(math.prod(s) for s, _ in children.get("gate", []))
            k = config.top_k if config is not None else 0
            total = router + routed + shared
            active = router + k * 3 * d * f + shared
            dense = 3 * d * (d_ff or f)
            rows.append({"layer": idx, "moe": True, "num_experts": e, "top_k": k, "expert_size": f,
                         "shared_size": shared // (3 * d) if d else 0, "total_ffn_params": total,
                         "active_ffn_params_per_token": active, "dense_ffn_params": dense,
                         "active_vs_dense": active / dense, "active_of_total": active / total,
                         "bytes_per_param": nbytes})
        else:
            ffn = [(s, b) for n in hf.GLU_LINEARS for s, b in children.get(n, [])]
            if not ffn:
                continue
            p = sum(math.prod(s) for s, _ in ffn)
            rows.append({"layer": idx, "moe": False, "num_experts": None, "top_k": None, "expert_size": None,
                         "shared_size": None, "total_ffn_params": p, "active_ffn_params_per_token": p,
                         "dense_ffn_params": p, "active_vs_dense": 1.0, "active_of_total": 1.0,
                         "bytes_per_param": ffn[0][1]})
    if config is not None:
        built = {r["layer"] for r in rows if r["moe"]}
        want = set(config.moe_layer_indices(raw.get("num_hidden_layers", len(rows))))
        if built != want:
            raise ValueError(f"{path}/config.json: MoE layers {sorted(want)} but the weights have experts in "
                             f"{sorted(built)}: the config was edited; convert the dense model again.")
    total = sum(r["total_ffn_params"] for r in rows)
    active = sum(r["active_ffn_params_per_token"] for r in rows)
    dense = sum(r["dense_ffn_params"] for r in rows)
    per_param = rows[0]["bytes_per_param"] if rows else 4
    return {
        "total_ffn_params": total, "active_ffn_params_per_token": active, "dense_ffn_params": dense,
        "active_vs_dense": active / dense if dense else None, "active_of_total": active / total if total else None,
        # the fields `upcycle info` shares with the other recipes
        "ffn_params": total, "predictor_params": 0,
        "ffn_density": active / total if total else 1.0, "ffn_bytes_per_token": active * per_param,
        "dense_ffn_bytes_per_token": dense * per_param, "ffn_bytes_ratio": active / dense if dense else 1.0,
        "layers": rows,
    }


def format_summary(s: dict) -> list[str]:
    c = s["config"] or {}
    lines = []
    if c:
        shared = f" + {c['shared_experts']} shared" if c.get("shared_experts") else ""
        router = c["router"] + ("" if c["router"] == "topk_softmax" or c["norm_topk_prob"] else " (unnormalised)")
        lines.append(f"experts={c['num_experts']} top_k={c['top_k']}{shared} init={c['init']} router={router} "
                     f"aux_loss_coef={c['aux_loss_coef']} z_loss_coef={c['z_loss_coef']}")
    lines.append(f"FFN parameters: {s['total_ffn_params'] / 1e6:.2f}M total, "
                 f"{s['active_ffn_params_per_token'] / 1e6:.2f}M active per token "
                 f"({100 * s['active_of_total']:.1f}% of total, {s['active_vs_dense']:.3f}x the "
                 f"dense parent's {s['dense_ffn_params'] / 1e6:.2f}M)")
    lines.append(f"{'layer':>5} {'experts':>7} {'top_k':>5} {'expert f':>8} {'shared f':>8} {'total params':>13} "
                 f"{'active/token':>13} {'x dense':>7}")
    for r in s["layers"]:
        if r["moe"]:
            lines.append(f"{r['layer']:>5} {r['num_experts']:>7} {r['top_k']:>5} {r['expert_size']:>8} "
                         f"{r['shared_size']:>8} {r['total_ffn_params']:>13,} {r['active_ffn_params_per_token']:>13,} "
                         f"{r['active_vs_dense']:>7.3f}")
        else:
            lines.append(f"{r['layer']:>5} {'dense':>7} {'-':>5} {'-':>8} {'-':>8} {r['total_ffn_params']:>13,} "
                         f"{r['active_ffn_params_per_token']:>13,} {1.0:>7.3f}")
    return lines
