"""`upcycle train`: continual training from a converted (or dense) checkpoint. Flags mirror TrainConfig
one to one; `--config FILE.yaml` supplies any of them and explicit flags win."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from upcycle.train.config import add_config_arguments

    p = sub.add_parser(
        "train",
        help="continual training of a bank-sparse model (single process, or many under torchrun)",
        description="Continual training: LM loss + distillation from the dense parent, sparsity and LR "
        "schedules, checkpoints every --save-every steps and on Ctrl-C (continue with --resume). "
        "Many GPUs: torchrun --nproc-per-node N -m upcycle train ...",
    )
    p.add_argument("--config", metavar="FILE.yaml", default=None, help="YAML file of TrainConfig keys")
    p.add_argument("--print-config", action="store_true", help="print the merged config as YAML and exit")
    add_config_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from upcycle.train import train
    from upcycle.train.config import config_from_args

    cfg = config_from_args(args, args.config)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    result = train(cfg)
    return 130 if result.interrupted else 0
