"""`upcycle convert`: dense HF checkpoint -> bank-sparse checkpoint (with the tokenizer carried along)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from upcycle.config import BankSparseConfig

log = logging.getLogger("upcycle")


def parse_keep_per_layer(text: str | None) -> dict[int, int]:
    """'3=64,5=32' -> {3: 64, 5: 32}."""
    if not text:
        return {}
    try:
        return {int(k): int(v) for k, v in (item.split("=") for item in text.split(","))}
    except ValueError as e:
        raise ValueError(f"--keep-per-layer {text!r}: expected LAYER=KEEP pairs, e.g. 0=64,27=32.") from e


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a dense SwiGLU checkpoint into a bank-sparse one")
    p.add_argument("--model", required=True, help="local checkpoint directory saved by transformers, or a .gguf file")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--bank-size", type=int, default=64)
    p.add_argument("--keep", type=int, default=16, help="channels kept per bank")
    p.add_argument("--predictor-budget", type=float, default=0.10,
                   help="bytes the predictor may read per token, as a fraction of the dense FFN's 16-bit bytes "
                   "(default 0.10): upcycle picks the best predictor that fits")
    p.add_argument("--predictor", choices=["auto", "lowrank", "shadow"], default="auto",
                   help="auto: a low-bit shadow of gate/up when 2 bits fit the budget, else low-rank")
    p.add_argument("--rank", type=int, default=None, help="pin the low-rank predictor's rank (implies lowrank)")
    p.add_argument("--shadow-bits", type=int, default=None, help="pin the shadow's bits (2-8)")
    p.add_argument("--init", choices=["svd", "calibrate", "random"], default=None,
                   help="low-rank predictor init (default: calibrate with --data, else svd)")
    p.add_argument("--gate-mode", choices=["ste", "sigmoid"], default="ste")
    p.add_argument("--layers", default=None, help="comma-separated layer indices to convert (default all)")
    p.add_argument("--keep-per-layer", default=None, help="overrides, e.g. 0=64,27=32 (64 = dense layer)")
    p.add_argument("--data", nargs="+", default=None, help="text files/dirs for calibration and the recall report")
    p.add_argument("--calib-tokens", type=int, default=32768, help="tokens of --data to use")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--calib-steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    import upcycle
    from upcycle.convert import measure_recall, predictor_bytes_fraction
    from upcycle.io import load_pretrained
    from upcycle.modules import sparse_ffns
    from upcycle.text import read_texts, token_windows

    torch.manual_seed(args.seed)
    init = args.init or ("calibrate" if args.data else "svd")
    config = BankSparseConfig(
        bank_size=args.bank_size,
        keep=args.keep,
        predictor=args.predictor,
        predictor_budget=args.predictor_budget,
        predictor_rank=args.rank,
        shadow_bits=args.shadow_bits,
        gate_mode=args.gate_mode,
        predictor_init=init,
        layers=[int(i) for i in args.layers.split(",")] if args.layers else None,
        keep_per_layer=parse_keep_per_layer(args.keep_per_layer),
        calibrate_steps=args.calib_steps,
    )
    if init == "calibrate" and not args.data:
        raise ValueError("--init calibrate needs --data TEXT_FILE (calibration text); or use --init svd.")
    model, tokenizer = load_pretrained(args.model)
    if tokenizer is None:
        log.warning("no tokenizer in %s: the output will have none (train/eval need one)", args.model)
    calib = held_out = None
    if args.data:
        windows = token_windows(tokenizer, read_texts(args.data), args.seq_len, args.calib_tokens // args.seq_len)
        n_held = max(1, len(windows) // 10) if len(windows) > 1 else 0
        calib, held_out = windows[: len(windows) - n_held], windows[len(windows) - n_held :]
        log.info("calibration: %d x %d tokens, recall measured on %d held-out windows",
                 len(calib), args.seq_len, len(held_out))
    upcycle.convert(model, config, calibration_ids=calib)
    pred = next(m for _, m in sparse_ffns(model)).predictor
    print(f"predictor: {pred.kind} ({pred.extra_repr() or f'rank={pred.rank}'}), "
          f"{predictor_bytes_fraction(model):.3f} of the dense FFN's 16-bit bytes per token "
          f"(budget {config.predictor_budget})")
    model.config.upcycle["source"] = str(Path(args.model).resolve())
    if held_out is not None and len(held_out):
        recall = measure_recall(model, held_out)
        print(f"predictor recall of the oracle top-{args.keep}-of-{args.bank_size} (held-out text):")
        print("  " + "  ".join(f"L{k}:{v:.3f}" for k, v in recall.items()))
        print(f"  mean {sum(recall.values()) / len(recall):.3f}  (random: {args.keep / args.bank_size:.3f})")
    out = upcycle.save(model, args.out, tokenizer=tokenizer)
    print(f"saved {out}")
    return 0
