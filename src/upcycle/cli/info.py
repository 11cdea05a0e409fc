"""`upcycle info DIR`: a checkpoint's recipe, per-layer sparsity, parameter counts and bytes read per token,
from config.json and the safetensors headers only (no weights are loaded). `upcycle info --kernels`: this CPU,
the features the kernels choose by, and the path each CPU kernel takes here (probed with a small call)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show a checkpoint's recipe, sparsity, parameter counts and predictor overhead")
    p.add_argument("model", nargs="?", help="checkpoint directory")
    p.add_argument("--kernels", action="store_true",
                   help="print the CPU model, its features and the path each decode kernel chooses here")
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
        "stacked": None if meta is None else meta.extra.get("stacked"),  # recipes applied before this one
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


def kernels_report() -> dict:
    """The CPU, its features, the kernel library and the path each kernel ran in a small probe call."""
    import torch

    from upcycle.kernels import cpu
    from upcycle.kernels.cpu import build, features
    from upcycle.kernels.packing import pack_shadow

    feats = features.cpu_features()
    lib = cpu.fused_library()
    report = {"cpu": feats["model_name"], "machine": feats["machine"],
              "features": [f for f in features.X86_FLAGS + features.ARM_FLAGS if feats.get(f) is True],
              "compiler": build.compiler(), "arch_flags": build.arch_flags(),
              "library": None if lib is None else lib._name, "library_error": cpu.library_error(),
              "torch_threads": torch.get_num_threads(), "kernels": {}}
    k = report["kernels"]
    if lib is None:
        k["bank_sparse"] = "torch ops (no fused kernel: " + str(cpu.library_error()) + ")"
        return report
    features.DISPATCH.clear()
    d, d_ff = 256, 512
    g, u, dt = (torch.randn(d_ff, d) / 16 for _ in range(3))
    x = torch.randn(1, d)
    cpu.fused_sparse_decode(x, g, u, dt, torch.randn(16, d), torch.randn(d_ff, 16), None, 64, 16, num_threads=1)
    cpu.fused_sparse_decode(x, g, u, dt, None, None, None, 64, 16, shadow=pack_shadow(g, u, 2, 128), num_threads=1)
    q = torch.zeros(d_ff, d, dtype=torch.int8)  # d: a multiple of 64, as in every real model
    cpu.int8_linear(x, q, torch.ones(d_ff), num_threads=1)
    from upcycle.kernels.cpu.int4 import int4_dots, int4_linear
    from upcycle.kernels.packing import pack_q4

    int4_linear(x, pack_q4(g), num_threads=1)
    k["bank_sparse"] = {"weights": sorted(cpu._SUFFIX[t] for t in cpu._supported),
                        "shadow_dots": features.DISPATCH.get("bank_sparse.shadow_dots"),
                        "shadow_dots_available": cpu.available_dot_paths(),
                        "shadow_dots_switch": cpu.shadow_dots()}
    k["int8_linear"] = {"dots": features.DISPATCH.get("int8_linear"), "switch": cpu.int8_dots(),
                        "env": "UPCYCLE_INT8_DOTS"}
    k["int4_linear"] = {"dots": features.DISPATCH.get("int4_linear"), "switch": int4_dots(),
                        "env": "UPCYCLE_INT4_DOTS"}
    try:
        from upcycle.kernels import triton as triton_kernels

        k["bank_sparse_cuda"] = "triton" if triton_kernels.available() else "unavailable (no triton or no CUDA)"
    except Exception as e:  # an optional GPU path must not break the CPU report
        k["bank_sparse_cuda"] = f"unavailable ({type(e).__name__})"
    return report


def print_kernels(r: dict) -> None:
    print(f"CPU: {r['cpu']} ({r['machine']}), torch threads {r['torch_threads']}")
    print(f"features: {' '.join(r['features']) or 'none the kernels use'}")
    if r["library"] is None:
        print(f"fused CPU kernels: unavailable ({r['library_error']}); the torch-ops / reference paths run")
    else:
        print(f"fused CPU kernels: {r['library']} ({r['compiler']} {' '.join(r['arch_flags'])})")
    for name, path in r["kernels"].items():
        if isinstance(path, dict) and "weights" in path:
            print(f"  {name}: weights {', '.join(path['weights'])}; shadow dots -> {path['shadow_dots']} "
                  f"(this CPU: {', '.join(path['shadow_dots_available'])}; switch {path['shadow_dots_switch']}, "
                  "UPCYCLE_SHADOW_DOTS)")
        elif isinstance(path, dict):
            print(f"  {name}: dots -> {path['dots']} (switch {path['switch']}, {path['env']})")
        else:
            print(f"  {name}: {path}")


def run(args: argparse.Namespace) -> int:
    from upcycle.recipes import registry

    if args.kernels:
        r = kernels_report()
        if args.json:
            print(json.dumps(r, indent=2))
        else:
            print_kernels(r)
        if not args.model:
            return 0
    if not args.model:
        raise ValueError("pass a checkpoint directory (upcycle info DIR) or --kernels")
    s = summarize(args.model)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print(f"{s['path']}: {s['architecture']}, {s['recipe']}, {s['total_params'] / 1e6:.2f}M parameters")
    recipe = registry.get(s["recipe"]) if s["recipe"] != "dense" else None
    for name, section in (s.get("stacked") or {}).items():
        short = {k: v for k, v in section.items() if not isinstance(v, dict) and len(str(v)) <= 24}
        print(f"stacked on: {name} ({', '.join(f'{k}={v}' for k, v in short.items())})")
    if recipe is not None and recipe.format_summary is not None:
        print("\n".join(recipe.format_summary(s)))
    else:
        print(f"dense: {len(s['layers'])} FFN layers, {s['ffn_params'] / 1e6:.2f}M FFN parameters, "
              f"{s['dense_ffn_bytes_per_token'] / 1e6:.3f} MB of FFN weights read per token")
    return 0
