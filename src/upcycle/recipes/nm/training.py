"""The N:M recipe's training hooks: CAST (AdamS + mask refresh + weight scaling + final hard prune), SR-STE,
and fine-tuning with a fixed mask (a one-shot model, or an N:M model under a stacked recipe).

What `upcycle train` does with an N:M model depends on the method it was converted with:

- `cast` (Continuous Adaptive Sparse Trainer, as its authors describe it): the forward stays dense. The
  `optimizer` hook returns AdamS (optim.py), whose adaptive L1 decay pulls the weights the current N:M mask
  would prune toward zero, ramped in as a_t = t / `cast_ramp_steps`; `before_step` refreshes the mask by
  magnitude within each group of m every `mask_refresh_every` steps. Weight scaling: a learnable scale per
  (row, block of columns), 2 blocks per row (`nm_scale` [out, 2] on each targeted linear, its own optimizer
  group "nm_scale": LR x `scale_lr_mult`, no weight decay). `finalize` folds the scales into the weights and
  hard-prunes to exact N:M. Self-distillation from the dense parent is TrainConfig's objective: CAST's
  1/3 KL(teacher || student) + 2/3 CE at temperature 1 is `--distill-weight 0.5 --distill-temperature 1`
  (CE + 0.5 KL = 3/2 of it; Adam's update is invariant to that factor up to eps, only `cast_decay` is
  relative to the gradient scale). The teacher is the dense parent recorded as `source` by `upcycle convert`
  (or `--teacher DIR`): an N:M model has no dense form of its own.
- `srste`: sparse forward W * mask(|W|) with the mask recomputed every forward and a straight-through
  gradient; the optimizer adds SR-STE's refined decay lambda * (1 - mask) * W once per step; `finalize`
  hard-prunes.
- one-shot methods (`magnitude`, `wanda`, `sparsegpt`) and stacked models: the zeros are kept, the rest
  trains: the mask is read from the zeros at the first step (per shard under FSDP2) and re-applied after
  every optimizer step (AdamW, or the other recipe's optimizer).

Training-time modules are instance attributes on the same nn.Linear objects (a `forward`, the `nm_scale`
parameter), so names, sharding units and checkpoints stay as they are; `finalize` removes them. A model
rebuilt to receive a trained state dict (the FSDP2 final save) folds `*.nm_scale` entries into the weights as
they load (`register_fold_on_load`).
"""

from __future__ import annotations

import logging
import math
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from upcycle.recipes import registry
from upcycle.recipes.nm import runtime
from upcycle.recipes.nm.config import NMSparseConfig
from upcycle.recipes.nm.convert import NAME
from upcycle.recipes.nm.linears import SCALE, SCALE_BLOCKS, scale_matrix, targets
from upcycle.recipes.nm.masks import hard_prune_, magnitude_mask
from upcycle.recipes.nm.optim import AdamS, local
from upcycle.recipes.registry import TrainHooks

log = logging.getLogger(__name__)

SCALE_GROUP = "nm_scale"
_TRAIN = "_upcycle_nm_train"  # the training mode installed on a linear


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class NMSparseTraining:
    """Training options of the N:M recipe (TrainConfig's `recipe:` section; flags of the same name)."""

    cast_decay: float = _f(1e-4, "CAST: lambda of AdamS's L1 pull on to-be-pruned weights (of the order of the "
                           "gradients' scale)")
    # default half the run: the second half trains at the full pull, so the final hard prune removes weights the
    # decay has already taken to ~0 (a ramp longer than the run leaves them partly decayed)
    cast_ramp_steps: int | None = _f(None, "CAST: the pull's weight a_t = t / this rises to 1 over this many steps "
                                     "(default: half of --steps)")
    cast_pull_lr_mult: float = _f(1.0, "CAST: LR multiplier of the to-be-pruned weights' steps (1: CAST as "
                                  "described; short runs need more for the pull to reach ~0 before the final prune)")
    mask_refresh_every: int = _f(10, "CAST: recompute the N:M mask by magnitude every this many steps")
    weight_scaling: bool = _f(True, "CAST: learn a scale per (row, half of the columns), folded in at the end")
    scale_lr_mult: float = _f(1.0, "CAST: LR multiplier of the weight scales")
    srste_lambda: float = _f(2e-4, "SR-STE: refined decay lambda * (1 - mask) * W added to the gradient")

    def __post_init__(self) -> None:
        for name in ("cast_decay", "scale_lr_mult", "srste_lambda", "cast_pull_lr_mult"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v} (--{name.replace('_', '-')}).")
        for name in ("cast_ramp_steps", "mask_refresh_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)} (--{name.replace('_', '-')}).")


def convert_config(fields: dict) -> NMSparseConfig:
    """The conversion of a dense --model from TrainConfig's recipe section (`upcycle train --method cast`)."""
    config = NMSparseConfig(**fields)
    if config.method in ("wanda", "sparsegpt"):
        raise ValueError(f"--method {config.method} needs calibration data: run `upcycle convert --recipe nm --method "
                         f"{config.method} --data CALIB` first, then train the converted checkpoint.")
    return config


# ---------------------------------------------------------------------------------------------- forwards
def _scaled_forward(self: nn.Linear, x: Tensor) -> Tensor:
    n, m = self.__dict__[_TRAIN][1]
    w = self.weight
    return F.linear(x, w * scale_matrix(getattr(self, SCALE), self.in_features, w.dtype, m), self.bias)


class _StraightThrough(torch.autograd.Function):
    """Forward w * keep; backward: the gradient of the sparse weight passes to every dense weight."""

    @staticmethod
    def forward(ctx, w: Tensor, keep: Tensor) -> Tensor:
        return w * keep.to(w.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def _srste_forward(self: nn.Linear, x: Tensor) -> Tensor:
    n, m = self.__dict__[_TRAIN][1]
    w = self.weight
    return F.linear(x, _StraightThrough.apply(w, magnitude_mask(w, n, m)), self.bias)


# ---------------------------------------------------------------------------------------------- install / fold
def install_training(linears: dict[str, nn.Linear], mode: str, n: int, m: int, weight_scaling: bool) -> None:
    """Give the linears their training-time forward (idempotent: a linear set up already is left alone)."""
    for lin in linears.values():
        if lin.__dict__.get(_TRAIN) is not None:
            continue
        if mode == "cast" and weight_scaling:
            w = lin.weight
            lin.register_parameter(SCALE, nn.Parameter(torch.ones(lin.out_features, SCALE_BLOCKS, dtype=w.dtype,
                                                                  device=w.device)))
            lin.forward = types.MethodType(_scaled_forward, lin)
        elif mode == "srste":
            lin.forward = types.MethodType(_srste_forward, lin)
        lin.__dict__[_TRAIN] = (mode, (n, m))


@torch.no_grad()
def fold_scales(lin: nn.Linear, m: int = 4) -> None:
    """W <- W * scale (per block), the scale parameter removed; the training forward removed."""
    scale = lin._parameters.pop(SCALE, None)
    if scale is not None:
        lin.weight.mul_(scale_matrix(scale.detach(), lin.in_features, lin.weight.dtype, m))
    lin.__dict__.pop(_TRAIN, None)
    runtime.restore(lin)


def nm_section(model: nn.Module) -> tuple[dict | None, bool]:
    """(the model's N:M section, stacked: True when another recipe was applied on top of it)."""
    meta = registry.metadata_of(model)
    if meta is None:
        return None, False
    if meta.recipe == NAME:
        return meta.section, False
    return (meta.extra.get("stacked") or {}).get(NAME), True


# ---------------------------------------------------------------------------------------------- the hooks
class NMHooks(TrainHooks):
    def __init__(self, model: nn.Module, options: NMSparseTraining, config: NMSparseConfig, mode: str):
        self.model, self.options, self.config, self.mode = model, options, config, mode
        self.n, self.m = config.n, config.m
        self.linears = targets(model, config)
        self.scaled = mode == "cast" and options.weight_scaling
        install_training(self.linears, mode, self.n, self.m, options.weight_scaling)
        group = {"lr_mult": options.scale_lr_mult, "weight_decay": 0.0}
        self.param_groups = {SCALE_GROUP: group} if self.scaled else {}
        self.opt: AdamS | None = None
        self.fixed_masks: dict[str, Tensor] | None = None
        self.step_now = 0

    def param_group(self, name: str) -> str | None:
        return SCALE_GROUP if self.scaled and name.endswith("." + SCALE) else None

    def optimizer(self, groups: list[dict], betas: tuple[float, float]) -> Any:
        if self.mode not in ("cast", "srste"):
            return None  # AdamW; the zeros are re-applied after every step
        weights = {id(lin.weight) for lin in self.linears.values()}
        spec = []
        for g in groups:
            nm_params = [p for p in g["params"] if id(p) in weights]
            rest = [p for p in g["params"] if id(p) not in weights]
            if rest:
                spec.append({**g, "params": rest, "nm_mode": None, "nm": None})
            if nm_params:
                spec.append({**g, "params": nm_params, "name": f"{g.get('name', 'decay')}:nm", "nm_mode": self.mode,
                             "nm": (self.n, self.m)})
        found = sum(len(g["params"]) for g in spec if g["nm_mode"])
        if found != len(weights):
            # e.g. --train-only with the targets frozen: a silent plain Adam would be the failure, so refuse
            raise ValueError(f"N:M {self.mode}: {found} of the {len(weights)} targeted weights are trainable; the "
                             "targeted linears must train (drop --train-only, or target what trains).")
        o = self.options
        self.opt = AdamS(spec, betas=betas, decay=o.cast_decay, ramp_steps=self.ramp_steps,
                         srste_lambda=o.srste_lambda, pull_lr_mult=o.cast_pull_lr_mult)
        return self.opt

    @property
    def ramp_steps(self) -> int:
        """CAST's T in a_t = t / T: the option, else half of the run (1000 when the run length is unknown)."""
        return self.options.cast_ramp_steps or max(1, (self.total_steps or 2000) // 2)

    def before_step(self, step: int) -> dict[str, float]:
        self.step_now = step
        if self.mode == "cast":
            if self.opt is not None and step % self.options.mask_refresh_every == 0:
                self.opt.refresh_masks()
            return {"nm_decay_a": min(1.0, (step + 1) / self.ramp_steps)}
        if self.mode == "fixed" and self.fixed_masks is None:
            # read the mask from the zeros, on whatever this process holds of each weight (its rows under FSDP2)
            with torch.no_grad():
                self.fixed_masks = {name: magnitude_mask(local(lin.weight), self.n, self.m)
                                    for name, lin in self.linears.items()}
        return {}

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        if self.mode == "fixed" and self.fixed_masks is not None:
            for name, lin in self.linears.items():
                local(lin.weight).mul_(self.fixed_masks[name].to(lin.weight.dtype))

    @torch.no_grad()
    def step_metrics(self) -> dict[str, float]:
        """CAST: the share of the targeted weights' squared magnitude that the hard prune would remove (every
        refresh step; summed over processes)."""
        if self.mode != "cast" or self.opt is None or (self.step_now + 1) % self.options.mask_refresh_every:
            return {}
        masked = total = 0.0
        for lin in self.linears.values():
            w = local(lin.weight).float()
            keep = magnitude_mask(w, self.n, self.m)
            sq = w * w
            masked += float(sq[~keep].sum())
            total += float(sq.sum())
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            t = torch.tensor([masked, total], dtype=torch.float64)
            dist.all_reduce(t)
            masked, total = t.tolist()
        return {"nm_pruned_mass": masked / max(total, 1e-30)}

    @torch.no_grad()
    def finalize(self, model: nn.Module) -> None:
        """Fold the weight scales, drop the training forwards, hard-prune every target to exact N:M."""
        for lin in targets(model, self.config).values():
            fold_scales(lin, self.m)
            hard_prune_(lin.weight, self.n, self.m)

    def on_train_end(self, out: Path, metrics: list[dict]) -> None:
        if self.mode == "cast" and metrics and metrics[-1].get("step", 0) < self.ramp_steps:
            log.warning("CAST ended at step %d with the decay ramp at a=%.2f (--cast-ramp-steps %d > --steps): the "
                        "final hard prune removed weights that were only partly decayed; set --cast-ramp-steps to "
                        "--steps.", metrics[-1]["step"], metrics[-1]["step"] / self.ramp_steps, self.ramp_steps)


def train_hooks(model: nn.Module, options: NMSparseTraining | None) -> NMHooks:
    section, stacked = nm_section(model)
    if section is None:
        raise ValueError(f"{type(model).__name__} has no N:M metadata: convert it with the nm recipe first.")
    config = NMSparseConfig.from_dict(section, "model.config")
    mode = "fixed" if stacked or config.method not in ("cast", "srste") else config.method
    return NMHooks(model, options or NMSparseTraining(), config, mode)


@torch.no_grad()
def pruned_copy(model: nn.Module) -> nn.Module:
    """A deep copy of a training N:M model with the scales folded and every target hard-pruned: what the final
    model would be if training stopped now (for evaluation curves)."""
    import copy

    section, _ = nm_section(model)
    config = NMSparseConfig.from_dict(section, "model.config")
    twin = copy.deepcopy(model)
    for lin in targets(twin, config).values():
        fold_scales(lin, config.m)
        hard_prune_(lin.weight, config.n, config.m)
    return twin
