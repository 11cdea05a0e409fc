"""`upcycle train`: continual training from a converted (or dense) checkpoint. Flags mirror TrainConfig
one to one; `--config FILE.yaml` supplies any of them and explicit flags win."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from upcycle.train.config import add_config_arguments

    p = sub.add_parser(
        "train",
        help="continual training of a converted (or dense) model (single process, or many under torchrun)",
        description="Continual training: LM loss + distillation from the dense parent, sparsity and LR "
        "schedules, checkpoints every --save-every steps and on Ctrl-C (continue with --resume). "
        "Many GPUs: torchrun --nproc-per-node N -m upcycle train ...",
    )
    p.add_argument("--config", metavar="FILE.yaml", default=None, help="YAML file of TrainConfig keys")
    p.add_argument("--print-config", action="store_true", help="print the merged config as YAML and exit")
    g = p.add_argument_group("memory plan", "--plan prints the estimated peak memory per device of a step of this run "
                             "(weights, gradients, optimizer state, activations, logits, teacher) and whether it "
                             "fits, without training; it reads only --model's config.json")
    g.add_argument("--plan", action="store_true", help="print the memory plan and exit (needs only --model)")
    g.add_argument("--plan-world-size", type=int, default=None, metavar="N",
                   help="plan for N FSDP2 processes (default: WORLD_SIZE, else 1)")
    g.add_argument("--plan-device", choices=("cpu", "cuda"), default=None,
                   help="plan for this device type (default: the one the trainer would use)")
    g.add_argument("--plan-memory-gb", type=float, default=None, metavar="GB",
                   help="memory per device to check against (default: the GPU's total memory, or available RAM)")
    g.add_argument("--plan-json", action="store_true", help="print the plan as JSON")
    add_config_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from upcycle.train import train
    from upcycle.train.config import config_from_args

    cfg = config_from_args(args, args.config)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    if args.plan:
        import json

        from upcycle.train.plan import format_plan, plan_config

        if args.plan_world_size is not None and args.plan_world_size < 1:
            raise ValueError(f"--plan-world-size must be >= 1, got {args.plan_world_size}.")
        if args.plan_memory_gb is not None and not args.plan_memory_gb > 0:
            raise ValueError(f"--plan-memory-gb must be > 0, got {args.plan_memory_gb}.")
        cfg.validate_plan()
        p = plan_config(cfg, args.plan_world_size, args.plan_device, args.plan_memory_gb)
        print(json.dumps(p.to_dict(), indent=1) if args.plan_json else format_plan(p))
        return 0
    result = train(cfg)
    return 130 if result.interrupted else 0
