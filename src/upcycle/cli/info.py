"""`upcycle info DIR`: per-layer sparsity, parameter counts and predictor overhead, from headers only."""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show a checkpoint's sparsity, parameter counts and predictor overhead")
    p.add_argument("model", help="checkpoint directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def tensor_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], int]]:
    """name -> (shape, bytes per element), read from safetensors headers without loading weights."""
    from safetensors import safe_open

    from upcycle.io import CheckpointError, _weight_files

    shapes = {}
    for f in _weight_files(path):
        try:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    sl = fh.get_slice(k)
                    shapes[k] = (tuple(sl.get_shape()), _dtype_bytes(sl.get_dtype()))
        except Exception as e:
            raise CheckpointError(f"{f} is corrupt or truncated ({e}): re-save the checkpoint.") from e
    return shapes


def _dtype_bytes(name: str) -> int:
    return {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}.get(name, 4)


def shadow_bits_per_weight(meta: dict) -> float:
    from upcycle.modules.predictors import SHADOW_GROUP_OVERHEAD_BITS

    return meta["shadow_bits"] + SHADOW_GROUP_OVERHEAD_BITS / meta["shadow_group_size"]


def summarize(path: str | Path) -> dict:
    from upcycle.io import _read_config

    path = Path(path)
    cfg = _read_config(path)
    shapes = tensor_shapes(path)
    meta = (cfg.get("upcycle") or {}).get("bank_sparse")
    layers: dict[int, dict] = {}
    for name, (shape, nbytes) in shapes.items():
        m = re.search(r"\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj|predictor)\.", name)
        if not m:
            continue
        entry = layers.setdefault(int(m.group(1)), {"ffn_params": 0, "predictor_params": 0, "bytes_per_param": nbytes})
        key = "predictor_params" if m.group(2) == "predictor" else "ffn_params"
        entry[key] += math.prod(shape)
    total = sum(math.prod(s) for s, _ in shapes.values())
    rows = []
    for idx in sorted(layers):
        e = layers[idx]
        keep = bank = None
        if meta and idx in meta["layers"]:
            bank = meta["bank_size"]
            keep = int(meta["keep_per_layer"].get(str(idx), meta["keep"]))
        density = 1.0 if keep is None else keep / bank
        dense_bytes = e["ffn_params"] * e["bytes_per_param"]
        pred_bytes = e["predictor_params"] * e["bytes_per_param"]
        if meta and meta.get("predictor") == "shadow" and keep is not None:
            # gate + up (2/3 of the FFN's weights) at `bits` each plus a 16-bit scale and zero per group
            pred_bytes = e["ffn_params"] * 2 / 3 * shadow_bits_per_weight(meta) / 8
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
        "path": str(path),
        "architecture": (cfg.get("architectures") or ["?"])[0],
        "recipe": "bank_sparse" if meta else "dense",
        "config": meta,
        "total_params": total,
        "ffn_params": sum(r["ffn_params"] for r in rows),
        "predictor_params": sum(r["predictor_params"] for r in rows),
        "ffn_density": sum(r["ffn_density"] * r["ffn_params"] for r in rows) / ffn_params,
        "ffn_bytes_per_token": read,
        "dense_ffn_bytes_per_token": dense,
        "ffn_bytes_ratio": read / dense if dense else 1.0,
        "predictor_bytes_per_token": sum(r["predictor_bytes_per_token"] for r in rows),
        "layers": rows,
    }


def run(args: argparse.Namespace) -> int:
    s = summarize(args.model)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    c = s["config"]
    print(f"{s['path']}: {s['architecture']}, {s['recipe']}, {s['total_params'] / 1e6:.2f}M parameters")
    if c:
        pred = (f"shadow {c['shadow_bits']}-bit, groups of {c['shadow_group_size']}" if c.get("predictor") == "shadow"
                else f"low-rank, rank {c['predictor_rank']}")
        print(f"bank_size={c['bank_size']} keep={c['keep']} predictor: {pred} gate_mode={c['gate_mode']}")
    print(f"predictor: {s['predictor_params'] / 1e6:.3f}M params = "
          f"{100 * s['predictor_params'] / max(1, s['ffn_params']):.1f}% of FFN params; reads "
          f"{s['predictor_bytes_per_token'] / 1e6:.3f} MB per token")
    print(f"FFN bytes read per token: {s['ffn_bytes_per_token'] / 1e6:.3f} MB of "
          f"{s['dense_ffn_bytes_per_token'] / 1e6:.3f} MB dense ({100 * s['ffn_bytes_ratio']:.1f}%)")
    print(f"{'layer':>5} {'keep':>6} {'density':>8} {'ffn params':>11} {'pred params':>11} "
          f"{'pred %params':>12} {'pred %bytes':>11}")
    for r in s["layers"]:
        keep = "dense" if r["keep"] is None else f"{r['keep']}/{r['bank_size']}"
        print(f"{r['layer']:>5} {keep:>6} {r['ffn_density']:>8.3f} {r['ffn_params']:>11,} {r['predictor_params']:>11,} "
              f"{r['predictor_pct_of_ffn_params']:>11.1f}% {r['predictor_pct_of_bytes_read']:>10.1f}%")
    return 0
