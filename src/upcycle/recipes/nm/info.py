"""What `upcycle info` and `upcycle eval` say about an N:M model: pattern, targets, exactness, bytes."""

from __future__ import annotations

import math
import re
from pathlib import Path

from torch import nn

from upcycle import hf
from upcycle.recipes.nm.config import NMSparseConfig

# bytes per kept value's position in the compressed 2:4 form (2 bits)
INDEX_BYTES_PER_KEPT = 0.25


def describe(model: nn.Module) -> dict:
    """The layout of a loaded N:M model. `kind` stays "dense": N:M sparsifies weights, every FFN channel is
    computed (FFN activation density 1.0); the weight sparsity is under `weights`."""
    from upcycle.recipes.nm.convert import exactness, saved_config

    config = saved_config(model)
    ffns = hf.glu_modules(model)
    return {
        "kind": "dense", "ffn_layers": len(ffns), "sparse_layers": 0, "bank_size": None, "keep": {},
        "baseline": getattr(model, "upcycle_baseline", None),
        "weights": {"pattern": config.pattern, "targets": config.targets, "method": config.method,
                    **exactness(model, config)},
    }


class NMStats:
    """`upcycle eval`'s statistics for an N:M model: the FFN statistics (upcycle.eval.stats.FFNStats) plus the
    weight sparsity of the targeted linears (exact N:M or not, nonzero fraction)."""

    def __init__(self, model: nn.Module):
        from upcycle.eval.stats import FFNStats

        self.model = model
        self.ffn = FFNStats(model)

    def __enter__(self) -> NMStats:
        self.ffn.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.ffn.__exit__(*exc)

    def summary(self) -> dict:
        from upcycle.recipes.nm.convert import exactness

        return {**self.ffn.summary(), "weights": exactness(self.model)}


def eval_stats(model: nn.Module) -> NMStats:
    return NMStats(model)


_LINEAR = re.compile(r"\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.weight$")


def summarize(path: Path, config: NMSparseConfig, shapes: dict) -> dict:
    """Per layer: the targeted linears' parameters, dense bytes, and the bytes of the compressed 2:4 form the
    decode kernel reads (kept values + 2-bit positions), from the safetensors headers only."""
    names = set(config.linear_names())
    layers: dict[int, dict] = {}
    for name, (shape, nbytes) in shapes.items():
        m = _LINEAR.search(name)
        if not m or len(shape) != 2:
            continue
        idx, lin = int(m.group(1)), m.group(2)
        if config.layers is not None and idx not in config.layers:
            continue
        if lin not in names:
            continue
        if shape[1] % config.m:
            raise ValueError(f"{path}/config.json: {name} has in_features={shape[1]}, not divisible by m={config.m}: "
                             "the config was edited; convert the dense model again.")
        e = layers.setdefault(idx, {"layer": idx, "linears": [], "params": 0, "dense_bytes": 0, "nm_bytes": 0.0})
        params = math.prod(shape)
        e["linears"].append(lin)
        e["params"] += params
        e["dense_bytes"] += params * nbytes
        kept = params * config.n / config.m
        e["nm_bytes"] += kept * nbytes + (kept * INDEX_BYTES_PER_KEPT if config.pattern == "2:4" else
                                          params / config.m * math.log2(math.comb(config.m, config.n)) / 8)
    rows = [layers[i] for i in sorted(layers)]
    dense = sum(r["dense_bytes"] for r in rows)
    nm = sum(r["nm_bytes"] for r in rows)
    return {"pattern": config.pattern, "method": config.method, "targets": config.targets,
            "target_params": sum(r["params"] for r in rows), "target_dense_bytes": dense,
            "target_nm_bytes": nm, "target_bytes_ratio": nm / dense if dense else 1.0, "layers": rows}


def format_summary(s: dict) -> list[str]:
    c = s.get("config") or {}
    pruned = c.get("pruned")
    state = ("every targeted weight exactly " + s["pattern"] if pruned else
             f"not pruned yet (method {s['method']}: `upcycle train` hard-prunes at its end)")
    lines = [f"N:M {s['pattern']} weights ({s['method']}) on {', '.join(s['targets'])}: {state}",
             f"mask: {c.get('mask', 'exact zeros in the dense weights')}; loads in plain transformers",
             f"targeted: {s['target_params'] / 1e6:.2f}M params in {len(s['layers'])} layers; "
             f"{s['target_dense_bytes'] / 1e6:.2f} MB dense, {s['target_nm_bytes'] / 1e6:.2f} MB in the compressed "
             f"form the decode kernel reads ({100 * s['target_bytes_ratio']:.1f}%)",
             f"{'layer':>5} {'linears':<48} {'params':>11} {'dense MB':>9} {'N:M MB':>8}"]
    for r in s["layers"]:
        lines.append(f"{r['layer']:>5} {','.join(r['linears']):<48} {r['params']:>11,} {r['dense_bytes'] / 1e6:>9.3f} "
                     f"{r['nm_bytes'] / 1e6:>8.3f}")
    return lines
