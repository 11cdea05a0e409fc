"""The N:M recipe's flags: `upcycle convert --recipe nm` and `upcycle train`."""

from __future__ import annotations

import argparse
import logging

from torch import nn

from upcycle.recipes.nm.config import METHODS, NEEDS_CALIBRATION, NMSparseConfig
from upcycle.recipes.nm.training import NMSparseTraining

log = logging.getLogger("upcycle")


def parse_pattern(text: str) -> tuple[int, int]:
    """'2:4' -> (2, 4)."""
    try:
        n, m = (int(v) for v in text.split(":"))
    except ValueError:
        raise ValueError(f"--nm {text!r}: expected N:M, e.g. 2:4 (N kept of every M consecutive inputs).") from None
    return n, m


def _add_once(g: argparse._ArgumentGroup, flag: str, **kw) -> None:
    """Add `flag` unless another recipe's group already did (`upcycle convert` has one parser for all recipes:
    --data and --layers mean the same for every recipe)."""
    if flag not in g._option_string_actions:
        g.add_argument(flag, **kw)


def add_convert_arguments(g: argparse._ArgumentGroup) -> None:
    d = NMSparseConfig()
    g.add_argument("--nm", default=d.pattern, metavar="N:M", help="keep N of every M consecutive input weights of "
                   "each row (%(default)s)")
    g.add_argument("--method", choices=METHODS, default=d.method,
                   help="one-shot: magnitude | wanda | sparsegpt (wanda/sparsegpt calibrate on --data FILE_OR_DIR; "
                   "--data and --layers are shared by every recipe's group); sparsity-aware training: cast | srste "
                   "(the checkpoint stays dense until `upcycle train` hard-prunes it) (%(default)s)")
    g.add_argument("--targets", default=",".join(d.targets), help="comma-separated: ffn (gate/up/down_proj), "
                   "attention (q/k/v/o_proj) or linear names (%(default)s)")
    g.add_argument("--calib-sequences", type=int, default=d.calib_sequences,
                   help="calibration windows taken from --data (%(default)s)")
    g.add_argument("--calib-seq-len", type=int, default=d.calib_seq_len,
                   help="tokens per calibration window (%(default)s)")
    g.add_argument("--sparsegpt-blocksize", type=int, default=d.sparsegpt_blocksize,
                   help="SparseGPT column block (%(default)s)")
    g.add_argument("--sparsegpt-damp", type=float, default=d.sparsegpt_damp,
                   help="SparseGPT dampening, a fraction of mean(diag H) (%(default)s)")
    _add_once(g, "--data", nargs="+", default=None, help="calibration text files/dirs (wanda, sparsegpt)")
    _add_once(g, "--layers", default=None, help="comma-separated layer indices to convert (default all)")


def config_from_args(args: argparse.Namespace) -> NMSparseConfig:
    n, m = parse_pattern(args.nm)
    try:
        layers = [int(i) for i in args.layers.split(",")] if args.layers else None
    except ValueError:
        raise ValueError(f"--layers {args.layers!r}: expected comma-separated layer indices, e.g. 0,1,5.") from None
    config = NMSparseConfig(n=n, m=m, targets=args.targets, method=args.method, calib_sequences=args.calib_sequences,
                            calib_seq_len=args.calib_seq_len, layers=layers,
                            sparsegpt_blocksize=args.sparsegpt_blocksize, sparsegpt_damp=args.sparsegpt_damp)
    if config.method in NEEDS_CALIBRATION and not args.data:
        raise ValueError(f"--method {config.method} needs calibration text: pass --data FILE_OR_DIR (or use --method "
                         "magnitude).")
    return config


def convert_from_args(args: argparse.Namespace, config: NMSparseConfig, model: nn.Module, tokenizer) -> None:
    """Convert `model` in place as the flags say; print the exactness and, with --data, each linear type's
    reconstruction error on the calibration text."""
    from upcycle.data import read_texts, token_windows
    from upcycle.recipes.nm.convert import convert, exactness

    calib = None
    if args.data and config.method in ("magnitude", "wanda", "sparsegpt"):
        calib = token_windows(tokenizer, read_texts(args.data), config.calib_seq_len, config.calib_sequences)
        log.info("calibration: %d x %d tokens", len(calib), config.calib_seq_len)
    errors: dict = {}
    convert(model, config, calibration_ids=calib, errors=errors if calib is not None else None)
    ex = exactness(model, config)
    if ex["exact"]:
        print(f"N:M {config.pattern} ({config.method}) on {ex['linears']} linears: every one exactly {config.pattern} "
              f"(weight density {ex['weight_density']:.3f})")
    else:
        print(f"N:M {config.method}: {ex['linears']} linears marked for sparsity-aware training (dense until "
              f"`upcycle train` hard-prunes them to {config.pattern})")
    if errors:
        by_kind: dict[str, list[float]] = {}
        for name, e in errors.items():
            by_kind.setdefault(name.rsplit(".", 1)[-1], []).append(e)
        print("relative reconstruction error ||X(W - W_nm)^T||^2 / ||XW^T||^2 on the calibration text, mean per "
              "linear: " + "  ".join(f"{k} {sum(v) / len(v):.4f}" for k, v in by_kind.items()))


def _option_flag(name: str) -> dict:
    f = NMSparseTraining.__dataclass_fields__[name]
    if f.type in ("bool", bool):
        return {"type": str, "choices": ("true", "false"), "help": f"{f.metadata['help']} ({str(f.default).lower()})"}
    tp = {"cast_ramp_steps": int, "mask_refresh_every": int}.get(name, float)
    return {"type": tp, "help": f.metadata["help"] + ("" if f.default is None else f" ({f.default})")}


# `upcycle train`: `--method`/`--targets` convert a dense --model on the fly (magnitude, cast, srste);
# the options tune CAST / SR-STE.
CONVERT_FLAGS: dict[str, dict] = {
    "method": {"type": str, "choices": METHODS, "help": "convert a dense --model with this N:M method (2:4; cast or "
               "srste train sparsity-aware, magnitude fine-tunes with a fixed mask)"},
    "targets": {"type": str, "help": "when converting: ffn, attention or linear names, comma-separated (ffn)"},
}
TRAIN_FLAGS = {**CONVERT_FLAGS, **{n: _option_flag(n) for n in NMSparseTraining.__dataclass_fields__}}
