"""`upcycle demo --out DIR [--quick]`: the whole recipe on an embedded default, offline."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="pretrain a small model on the Python stdlib, sparsify it three ways, compare")
    p.add_argument("--out", default="demo", help="output directory")
    p.add_argument("--quick", action="store_true", help="a ~2-minute version")
    p.add_argument("--no-control", dest="control", action="store_false",
                   help="skip the matched-token control (dense model continued on the same tokens)")
    p.add_argument("--pretrain-steps", type=int, default=None)
    p.add_argument("--train-steps", type=int, default=None)
    p.add_argument("--keep", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from upcycle.recipes.bank_sparse.demo import DemoConfig, format_table, run_demo

    cfg = DemoConfig.quick(args.out) if args.quick else DemoConfig(out=args.out)
    overrides = {k: getattr(args, k) for k in ("pretrain_steps", "train_steps", "keep", "threads")
                 if getattr(args, k) is not None}
    cfg = dataclasses.replace(cfg, seed=args.seed, control=args.control, **overrides)
    report = run_demo(cfg)
    print()
    print(format_table(report))
    print(f"\nsample from the sparse model ({report['sample']['prompt']!r}):\n{report['sample']['text']}\n")
    print(f"report: {args.out}/report.json, plot: {args.out}/report.png, "
          f"checkpoints: {json.dumps(report['checkpoints'])}  ({report['seconds']:.0f} s)")
    return 0
