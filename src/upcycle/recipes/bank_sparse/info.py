"""What `upcycle info` and `upcycle eval` say about a bank-sparse model: per-layer keep, parameters, bytes."""

from __future__ import annotations

import math
from pathlib import Path

from torch import nn

from upcycle import hf
from upcycle.recipes.bank_sparse.config import BankSparseConfig
from upcycle.recipes.bank_sparse.modules import BankSparseSwiGLU
from upcycle.recipes.bank_sparse.predictors import SHADOW_GROUP_OVERHEAD_BITS


def describe(model: nn.Module) -> dict:
    """The sparsity layout of a loaded model: FFN layers, converted ones, bank size and keep per layer."""
    ffns = hf.glu_modules(model)
    sparse = [(i, m) for _, i, m in ffns if isinstance(m, BankSparseSwiGLU)]
    return {
        "kind": "bank-sparse" if sparse else "dense",
        "ffn_layers": len(ffns),
        "sparse_layers": len(sparse),
        "bank_size": sparse[0][1].bank_size if sparse else None,
        "keep": {str(i): m.keep for i, m in sparse},
        "baseline": getattr(model, "upcycle_baseline", None),
    }


def shadow_bits_per_weight(config: BankSparseConfig) -> float:
    return config.shadow_bits + SHADOW_GROUP_OVERHEAD_BITS / config.shadow_group_size


def summarize(path: Path, config: BankSparseConfig | None, shapes: dict) -> dict:
    """Per-layer keep, FFN / predictor parameters and bytes read per token at decode, from headers only.

    `config` None: a dense checkpoint (every layer at density 1)."""
    layers = {}
    for idx, children in hf.mlp_tensors(shapes).items():
        ffn = [(s, b) for n in hf.GLU_LINEARS for s, b in children.get(n, [])]
        if not ffn:
            continue
        layers[idx] = {"ffn_params": sum(math.prod(s) for s, _ in ffn), "bytes_per_param": ffn[0][1],
                       "predictor_params": sum(math.prod(s) for s, _ in children.get("predictor", [])),
                       "d_ff": children["gate_proj"][0][0][0] if "gate_proj" in children else None}
    converted = set(config.layers or []) if config is not None else set()
    missing = sorted(converted - set(layers))
    if missing:
        raise ValueError(f"{path}/config.json: layers {missing} are converted but the weights have no FFN there.")
    for idx in sorted(converted):
        d_ff = layers[idx]["d_ff"]
        if d_ff is not None and d_ff % config.bank_size:
            raise ValueError(f"{path}/config.json: bank_size={config.bank_size} does not divide layer {idx}'s "
                             f"intermediate size {d_ff}: the config was edited; convert the dense model again.")
    rows = []
    for idx in sorted(layers):
        e = layers[idx]
        keep = bank = None
        if idx in converted:
            bank, keep = config.bank_size, config.keep_for(idx)
        density = 1.0 if keep is None else keep / bank
        dense_bytes = e["ffn_params"] * e["bytes_per_param"]
        pred_bytes = e["predictor_params"] * e["bytes_per_param"]
        if config is not None and config.predictor == "shadow" and keep is not None:
            # gate + up (2/3 of the FFN's weights) at `bits` each plus a 16-bit scale and zero per group, and
            # the learned per-channel bias if there is one (its tensors are the predictor's parameters)
            pred_bytes += e["ffn_params"] * 2 / 3 * shadow_bits_per_weight(config) / 8
        rows.append({
            "layer": idx,
            "keep": keep,
            "bank_size": bank,
            "ffn_density": density,
            "ffn_params": e["ffn_params"],
            "predictor_params": e["predictor_params"],
            "predictor_pct_of_ffn_params": 100 * e["predictor_params"] / e["ffn_params"],
            # Bytes read per token at decode: kept rows of gate/up/down plus the whole predictor.
            "ffn_bytes_per_token": density * dense_bytes + pred_bytes,
            "predictor_bytes_per_token": pred_bytes,
            "dense_ffn_bytes_per_token": dense_bytes,
            "predictor_pct_of_bytes_read": 100 * pred_bytes / (density * dense_bytes + pred_bytes),
        })
    read = sum(r["ffn_bytes_per_token"] for r in rows)
    ffn_params = max(1, sum(r["ffn_params"] for r in rows))
    dense = sum(r["dense_ffn_bytes_per_token"] for r in rows)
    return {
        "ffn_params": sum(r["ffn_params"] for r in rows),
        "predictor_params": sum(r["predictor_params"] for r in rows),
        "ffn_density": sum(r["ffn_density"] * r["ffn_params"] for r in rows) / ffn_params,
        "ffn_bytes_per_token": read,
        "dense_ffn_bytes_per_token": dense,
        "ffn_bytes_ratio": read / dense if dense else 1.0,
        "predictor_bytes_per_token": sum(r["predictor_bytes_per_token"] for r in rows),
        "layers": rows,
    }


def format_summary(s: dict) -> list[str]:
    """The human-readable lines of `summarize` (after the header line `upcycle info` prints)."""
    c = s["config"]
    lines = []
    if c:
        if c.get("predictor") == "shadow":
            pred = f"shadow {c['shadow_bits']}-bit, groups of {c['shadow_group_size']}"
            learns = ("predictor.bias (a per-channel bias on the shadow's log-score; the shadow itself is "
                      "re-quantised from gate/up as they train)" if c.get("shadow_bias") else
                      "none (a pure shadow: re-quantised from gate/up as they train)")
        else:
            pred = f"low-rank, rank {c['predictor_rank']}"
            learns = "predictor.in_proj, predictor.out_proj" + (", gate_scale" if c["gate_mode"] == "sigmoid" else "")
        lines.append(f"bank_size={c['bank_size']} keep={c['keep']} predictor: {pred} gate_mode={c['gate_mode']}")
        lines.append(f"routing parameters trained by the LM loss: {learns}")
    lines.append(f"predictor: {s['predictor_params'] / 1e6:.3f}M params = "
                 f"{100 * s['predictor_params'] / max(1, s['ffn_params']):.1f}% of FFN params; reads "
                 f"{s['predictor_bytes_per_token'] / 1e6:.3f} MB per token")
    lines.append(f"FFN bytes read per token: {s['ffn_bytes_per_token'] / 1e6:.3f} MB of "
                 f"{s['dense_ffn_bytes_per_token'] / 1e6:.3f} MB dense ({100 * s['ffn_bytes_ratio']:.1f}%)")
    lines.append(f"{'layer':>5} {'keep':>6} {'density':>8} {'ffn params':>11} {'pred params':>11} "
                 f"{'pred %params':>12} {'pred %bytes':>11}")
    for r in s["layers"]:
        keep = "dense" if r["keep"] is None else f"{r['keep']}/{r['bank_size']}"
        lines.append(f"{r['layer']:>5} {keep:>6} {r['ffn_density']:>8.3f} {r['ffn_params']:>11,} "
                     f"{r['predictor_params']:>11,} {r['predictor_pct_of_ffn_params']:>11.1f}% "
                     f"{r['predictor_pct_of_bytes_read']:>10.1f}%")
    return lines
