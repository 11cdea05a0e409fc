"""The bank-sparse recipe's flags: `upcycle convert --recipe bank_sparse` (the default) and `upcycle train`."""

from __future__ import annotations

import argparse
import logging

from torch import nn

from upcycle.recipes.bank_sparse.config import CALIBRATE_STEPS_MAX, CALIBRATE_STEPS_MIN, BankSparseConfig
from upcycle.recipes.bank_sparse.training import CONVERT_FLAGS, BankSparseTraining

log = logging.getLogger("upcycle")


def parse_keep_per_layer(text: str | None) -> dict[int, int]:
    """'3=64,5=32' -> {3: 64, 5: 32}."""
    if not text:
        return {}
    try:
        return {int(k): int(v) for k, v in (item.split("=") for item in text.split(","))}
    except ValueError as e:
        raise ValueError(f"--keep-per-layer {text!r}: expected LAYER=KEEP pairs, e.g. 0=64,27=32.") from e


def add_convert_arguments(g: argparse._ArgumentGroup) -> None:
    d = BankSparseConfig()
    g.add_argument("--bank-size", type=int, default=d.bank_size, help="consecutive FFN channels per bank (%(default)s)")
    g.add_argument("--keep", type=int, default=d.keep, help="channels kept per bank (%(default)s)")
    g.add_argument("--predictor-budget", type=float, default=d.predictor_budget,
                   help="bytes the predictor may read per token, as a fraction of the dense FFN's 16-bit bytes "
                   "(%(default)s): upcycle picks the best predictor that fits")
    g.add_argument("--predictor", choices=["auto", "lowrank", "shadow"], default=d.predictor,
                   help="auto: a low-bit shadow of gate/up when 2 bits fit the budget, else low-rank (%(default)s)")
    g.add_argument("--rank", type=int, default=None, help="pin the low-rank predictor's rank (implies lowrank)")
    g.add_argument("--shadow-bits", type=int, default=None, help="pin the shadow's bits (1-8)")
    g.add_argument("--shadow-bias", action=argparse.BooleanOptionalAction, default=d.shadow_bias,
                   help="a shadow's learned per-channel bias on its log-score, trained by the LM loss "
                   "(--no-shadow-bias: the pure shadow, no routing parameter) (%(default)s)")
    g.add_argument("--init", choices=["svd", "calibrate", "random"], default=None,
                   help="low-rank predictor init (default: calibrate with --data, else svd)")
    g.add_argument("--gate-mode", choices=["ste", "sigmoid"], default=d.gate_mode,
                   help="ste: a hard 0/1 gate on the kept channels (sigmoid surrogate in the backward); sigmoid: a "
                   "soft gate 2 * sigmoid(alpha * logits), near dense at the start (%(default)s)")
    g.add_argument("--layers", default=None, help="comma-separated layer indices to convert (default all)")
    g.add_argument("--keep-per-layer", default=None, help="overrides, e.g. 0=64,27=32 (64 = dense layer)")
    g.add_argument("--keep-allocation", choices=["uniform", "mass"], default=d.keep_allocation,
                   help="mass: keep per layer from --data, the same total, more where |h| is spread over many "
                   "channels (%(default)s)")
    g.add_argument("--data", nargs="+", default=None, help="text files/dirs for calibration and the recall report")
    g.add_argument("--calib-tokens", type=int, default=32768, help="tokens of --data to use (%(default)s)")
    g.add_argument("--seq-len", type=int, default=256, help="calibration window length (%(default)s)")
    g.add_argument("--calib-steps", type=int, default=d.calibrate_steps, metavar="N",
                   help="optimisation steps per layer of the calibrated predictor fit (default: from the layer "
                   f"size, intermediate_size // 4 within [{CALIBRATE_STEPS_MIN}, {CALIBRATE_STEPS_MAX}]: "
                   f"{CALIBRATE_STEPS_MAX} for real LLMs, fewer for tiny models)")


def config_from_args(args: argparse.Namespace) -> BankSparseConfig:
    init = args.init or ("calibrate" if args.data else "svd")
    if args.keep_allocation == "mass" and not args.data:
        raise ValueError("--keep-allocation mass needs --data TEXT_FILE (calibration text).")
    if init == "calibrate" and not args.data:
        raise ValueError("--init calibrate needs --data TEXT_FILE (calibration text); or use --init svd.")
    try:
        layers = [int(i) for i in args.layers.split(",")] if args.layers else None
    except ValueError:
        raise ValueError(f"--layers {args.layers!r}: expected comma-separated layer indices, e.g. 0,1,5.") from None
    return BankSparseConfig(
        bank_size=args.bank_size, keep=args.keep, predictor=args.predictor, predictor_budget=args.predictor_budget,
        predictor_rank=args.rank, shadow_bits=args.shadow_bits, shadow_bias=args.shadow_bias,
        gate_mode=args.gate_mode, predictor_init=init,
        layers=layers, keep_per_layer=parse_keep_per_layer(args.keep_per_layer), calibrate_steps=args.calib_steps,
        keep_allocation=args.keep_allocation,
    )


def convert_from_args(args: argparse.Namespace, config: BankSparseConfig, model: nn.Module, tokenizer) -> None:
    """Convert `model` in place as the flags say; calibrate on --data and print the held-out recall."""
    from upcycle.data import read_texts, token_windows
    from upcycle.recipes.bank_sparse.convert import convert, measure_recall, predictor_bytes_fraction
    from upcycle.recipes.bank_sparse.modules import sparse_ffns

    calib = held_out = None
    if args.data:
        windows = token_windows(tokenizer, read_texts(args.data), args.seq_len, args.calib_tokens // args.seq_len)
        n_held = max(1, len(windows) // 10) if len(windows) > 1 else 0
        calib, held_out = windows[: len(windows) - n_held], windows[len(windows) - n_held :]
        log.info("calibration: %d x %d tokens, recall measured on %d held-out windows",
                 len(calib), args.seq_len, len(held_out))
    convert(model, config, calibration_ids=calib)
    pred = next(m for _, m in sparse_ffns(model)).predictor
    print(f"predictor: {pred.kind} ({pred.extra_repr() or f'rank={pred.rank}'}), "
          f"{predictor_bytes_fraction(model):.3f} of the dense FFN's 16-bit bytes per token "
          f"(budget {config.predictor_budget})")
    if held_out is not None and len(held_out):
        recall = measure_recall(model, held_out)
        print(f"predictor recall of the oracle top-{args.keep}-of-{args.bank_size} (held-out text):")
        print("  " + "  ".join(f"L{k}:{v:.3f}" for k, v in recall.items()))
        print(f"  mean {sum(recall.values()) / len(recall):.3f}  (random: {args.keep / args.bank_size:.3f})")


def _train_flag(name: str) -> dict:
    f = BankSparseTraining.__dataclass_fields__[name]
    tp = {"keep_warmup_steps": int, "aux_steps": int}.get(name, float)
    kw: dict = {"type": tp, "help": f"{f.metadata['help']} ({f.default})"}
    if name == "keep_schedule":
        kw = {"type": str, "choices": ("linear", "cosine"), "help": f"{f.metadata['help']} ({f.default})"}
    return kw


TRAIN_FLAGS = {**CONVERT_FLAGS, **{n: _train_flag(n) for n in BankSparseTraining.__dataclass_fields__}}
