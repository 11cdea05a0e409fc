"""`upcycle info DIR`: a checkpoint's recipe, per-layer sparsity, parameter counts and bytes read per token,
from config.json and the safetensors headers only (no weights are loaded)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show a checkpoint's recipe, sparsity, parameter counts and predictor overhead")
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


def summarize(path: str | Path) -> dict:
    from upcycle import format as fmt
    from upcycle.io import CheckpointError, _read_config
    from upcycle.recipes import registry

    path = Path(path)
    cfg = _read_config(path)
    where = path / "config.json"
    try:
        meta = fmt.parse(cfg.get(fmt.KEY), where)
        recipe = None if meta is None else registry.get(meta.recipe)
        config = None if recipe is None else recipe.config_from_section(meta.section, str(where))
    except ValueError as e:
        raise CheckpointError(str(e) if str(where) in str(e) else f"{where}: {e}") from e
    shapes = tensor_shapes(path)
    head = {
        "path": str(path),
        "architecture": (cfg.get("architectures") or ["?"])[0],
        "recipe": recipe.name if recipe else "dense",
        "config": None if meta is None else meta.section,
        "total_params": sum(math.prod(s) for s, _ in shapes.values()),
    }
    if recipe is not None and recipe.summarize is not None:
        return {**head, **recipe.summarize(path, config, shapes)}
    return {**head, **dense_summary(shapes)}


def dense_summary(shapes: dict) -> dict:
    """Per-layer FFN parameters and bytes of a dense checkpoint (density 1 everywhere)."""
    from upcycle import hf

    rows = []
    for idx, children in sorted(hf.mlp_tensors(shapes).items()):
        ffn = [(s, b) for n in hf.GLU_LINEARS for s, b in children.get(n, [])]
        if ffn:
            params = sum(math.prod(s) for s, _ in ffn)
            rows.append({"layer": idx, "keep": None, "bank_size": None, "ffn_density": 1.0, "ffn_params": params,
                         "predictor_params": 0, "predictor_pct_of_ffn_params": 0.0,
                         "ffn_bytes_per_token": params * ffn[0][1], "predictor_bytes_per_token": 0,
                         "dense_ffn_bytes_per_token": params * ffn[0][1], "predictor_pct_of_bytes_read": 0.0})
    dense = sum(r["dense_ffn_bytes_per_token"] for r in rows)
    return {"ffn_params": sum(r["ffn_params"] for r in rows), "predictor_params": 0, "ffn_density": 1.0,
            "ffn_bytes_per_token": dense, "dense_ffn_bytes_per_token": dense, "ffn_bytes_ratio": 1.0,
            "predictor_bytes_per_token": 0, "layers": rows}


def run(args: argparse.Namespace) -> int:
    from upcycle.recipes import registry

    s = summarize(args.model)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print(f"{s['path']}: {s['architecture']}, {s['recipe']}, {s['total_params'] / 1e6:.2f}M parameters")
    recipe = registry.get(s["recipe"]) if s["recipe"] != "dense" else None
    if recipe is not None and recipe.format_summary is not None:
        print("\n".join(recipe.format_summary(s)))
    else:
        print(f"dense: {len(s['layers'])} FFN layers, {s['ffn_params'] / 1e6:.2f}M FFN parameters, "
              f"{s['dense_ffn_bytes_per_token'] / 1e6:.3f} MB of FFN weights read per token")
    return 0
