"""The MoE recipe's flags: `upcycle convert --recipe moe` and `upcycle train`."""

from __future__ import annotations

import argparse
import logging

from torch import nn

from upcycle.recipes.moe.config import CHOICES, MoEUpcycleConfig
from upcycle.recipes.moe.training import CONVERT_FLAGS, MoETraining

log = logging.getLogger("upcycle")

# Calibration flags every recipe reads under the same name: added by the first recipe that declares them.
SHARED_FLAGS = {
    "--data": {"nargs": "+", "default": None, "help": "text files/dirs for calibration (--split-by cluster, "
               "--router-init calibrate)"},
    "--calib-tokens": {"type": int, "default": 32768, "help": "tokens of --data to use (%(default)s)"},
    "--seq-len": {"type": int, "default": 256, "help": "calibration window length (%(default)s)"},
}


def parse_layers(text: str | None) -> None | int | list[int]:
    """'all' -> None, 'every:2' -> 2, '0,3,5' -> [0, 3, 5]."""
    if text is None or text.strip() in ("", "all"):
        return None
    try:
        if text.startswith("every:"):
            return int(text.split(":", 1)[1])
        return [int(i) for i in text.split(",")]
    except ValueError:
        raise ValueError(f"--moe-layers {text!r}: expected all, every:K or comma-separated layer indices (0,2,4)."
                         ) from None


def add_convert_arguments(g: argparse._ArgumentGroup) -> None:
    d = MoEUpcycleConfig()
    g.add_argument("--num-experts", type=int, default=d.num_experts, help="routed experts per MoE layer (%(default)s)")
    g.add_argument("--top-k", type=int, default=d.top_k, help="routed experts per token (%(default)s)")
    g.add_argument("--moe-init", choices=CHOICES["init"], default=d.init,
                   help="copy: every expert is the whole FFN; split: the FFN cut into num_experts + shared_experts "
                   "slices; granular: num_experts / (granularity - shared) copies, each cut into granularity slices "
                   "(Megatron-Core) (%(default)s)")
    g.add_argument("--split-by", choices=CHOICES["split_by"], default=d.split_by,
                   help="split / granular: contiguous channel blocks, or cluster (balanced k-means of the channels' "
                   "activations on --data) (%(default)s)")
    g.add_argument("--granularity", type=int, default=d.granularity, help="granular: slices per dense copy "
                   "(%(default)s)")
    g.add_argument("--shared-experts", type=int, default=d.shared_experts,
                   help="always-on experts of the expert size, carved from the FFN (split / granular) (%(default)s)")
    g.add_argument("--router", choices=CHOICES["router"], default=d.router,
                   help="softmax over all experts then top-k, or top-k logits then softmax (%(default)s)")
    g.add_argument("--norm-topk-prob", action=argparse.BooleanOptionalAction, default=d.norm_topk_prob,
                   help="renormalise the top-k weights to sum to 1 (softmax_topk) (%(default)s)")
    g.add_argument("--weight-scaling", choices=CHOICES["weight_scaling"], default=d.weight_scaling,
                   help="restore the dense output scale: exact (the factor on down_proj), cube_root (on gate, up, "
                   "down: Megatron-Core, not exact) or none (%(default)s)")
    g.add_argument("--expert-scale", type=float, default=d.expert_scale,
                   help="override the scale factor s put on the experts (default: exact for copies; split: the number "
                   "of experts per copy); e.g. top_k for split: the selected slices summed at weight ~1 (%(default)s)")
    g.add_argument("--drop-upcycle", type=float, default=d.drop_upcycle,
                   help="Drop-Upcycling: fraction of each expert's channels re-initialised (0.5 in the paper) "
                   "(%(default)s)")
    g.add_argument("--moe-layers", default="all",
                   help="which layers become MoE: all, every:K (layer i with (i+1) %% K == 0) or 0,2,4 (%(default)s)")
    g.add_argument("--router-init", choices=CHOICES["router_init"], default=d.router_init,
                   help="random (N(0, std)), virtual_group (top-k picks whole dense copies at step 0) or calibrate "
                   "(fit to the experts' output norms on --data) (%(default)s)")
    g.add_argument("--router-init-std", type=float, default=d.router_init_std, help="std of random router rows "
                   "(%(default)s)")
    g.add_argument("--router-jitter", type=float, default=d.router_jitter,
                   help="multiplicative noise on the router input in training (%(default)s)")
    g.add_argument("--aux-loss-coef", type=float, default=d.aux_loss_coef,
                   help="load-balancing loss weight in training (1.0 at balance) (%(default)s)")
    g.add_argument("--z-loss-coef", type=float, default=d.z_loss_coef, help="router z-loss weight in training "
                   "(%(default)s)")
    shared = [f for f in SHARED_FLAGS if f not in g._option_string_actions]
    for flag in shared:
        g.add_argument(flag, **SHARED_FLAGS[flag])
    if len(shared) < len(SHARED_FLAGS):
        g.description = (g.description or "") + (". Calibration text: --data, --calib-tokens, --seq-len (the flags "
                                                 "listed above, shared by the recipes); seed: --seed")


def config_from_args(args: argparse.Namespace) -> MoEUpcycleConfig:
    config = MoEUpcycleConfig(
        num_experts=args.num_experts, top_k=args.top_k, init=args.moe_init, split_by=args.split_by,
        granularity=args.granularity, shared_experts=args.shared_experts, router=args.router,
        norm_topk_prob=args.norm_topk_prob, weight_scaling=args.weight_scaling, expert_scale=args.expert_scale,
        drop_upcycle=args.drop_upcycle,
        layers=parse_layers(args.moe_layers), router_init=args.router_init, router_init_std=args.router_init_std,
        router_jitter=args.router_jitter, aux_loss_coef=args.aux_loss_coef, z_loss_coef=args.z_loss_coef,
        seed=getattr(args, "seed", 0) or 0,
    )
    if config.needs_calibration and not args.data:
        what = "--split-by cluster" if config.split_by == "cluster" else "--router-init calibrate"
        raise ValueError(f"{what} needs --data TEXT_FILE (calibration text); or use --split-by contiguous and "
                         "--router-init random.")
    return config


def convert_from_args(args: argparse.Namespace, config: MoEUpcycleConfig, model: nn.Module, tokenizer) -> None:
    """Convert `model` in place as the flags say (calibrating on --data when the config needs it)."""
    from upcycle.recipes.moe.convert import convert
    from upcycle.recipes.moe.info import describe

    calib = None
    if config.needs_calibration:
        from upcycle.data import read_texts, token_windows

        calib = token_windows(tokenizer, read_texts(args.data), args.seq_len, max(1, args.calib_tokens // args.seq_len))
        log.info("calibration: %d x %d tokens", len(calib), args.seq_len)
    elif args.data:
        log.info("--data is not used: this MoE config needs no calibration")
    convert(model, config, calibration_ids=calib)
    print(describe(model)["label"])


def _train_flag(name: str) -> dict:
    f = MoETraining.__dataclass_fields__[name]
    tp = int if name == "dead_expert_steps" else float
    default = "the checkpoint's" if f.default is None else f.default
    return {"type": tp, "help": f"{f.metadata['help']} ({default})"}


TRAIN_FLAGS = {**CONVERT_FLAGS, **{n: _train_flag(n) for n in MoETraining.__dataclass_fields__}}
