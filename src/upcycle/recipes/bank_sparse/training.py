"""The bank-sparse recipe's training hooks: keep warm-up, the predictor's LR group, the oracle-BCE aux loss."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from upcycle.recipes import stacking
from upcycle.recipes.bank_sparse.config import BankSparseConfig
from upcycle.recipes.bank_sparse.modules import sparse_ffns
from upcycle.recipes.registry import TrainHooks

KEEP_SCHEDULES = ("linear", "cosine")


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class BankSparseTraining:
    """Training options of the bank-sparse recipe (TrainConfig's `recipe:` section; flags of the same name)."""

    keep_warmup_steps: int = _f(0, "keep goes from bank_size to the target over this many steps (0: target at step 0)")
    keep_schedule: Literal["linear", "cosine"] = _f("linear", "shape of the keep warm-up")
    predictor_lr_mult: float = _f(10.0, "LR multiplier of predictor parameters (fresh, unlike the pretrained rest)")
    aux_weight: float = _f(0.0, "weight of the BCE pulling the predictor toward the oracle top-k of |h|")
    aux_steps: int = _f(0, "the aux weight decays linearly to 0 over this many steps (0: constant)")

    def __post_init__(self) -> None:
        for name in ("keep_warmup_steps", "aux_steps", "aux_weight", "predictor_lr_mult"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v} (--{name.replace('_', '-')}).")
        if self.keep_schedule not in KEEP_SCHEDULES:
            raise ValueError(f"keep_schedule={self.keep_schedule!r} is not one of {KEEP_SCHEDULES}.")


# Flags of `upcycle train` that convert a dense --model on the fly (a dense --model without them trains densely).
CONVERT_FLAGS: dict[str, dict] = {
    "bank_size": {"type": int, "help": "convert a dense --model with this bank size (needs --keep)"},
    "keep": {"type": int, "help": "channels kept per bank when converting a dense --model"},
    "predictor_budget": {"type": float, "help": "predictor bytes per token / dense FFN bytes, when converting "
                         "(see convert) (0.1)"},
    "predictor_rank": {"type": int, "help": "pin a low-rank predictor of this rank when converting"},
    "gate_mode": {"type": str, "choices": ("ste", "sigmoid"), "help": "gate when converting: ste (hard 0/1) or "
                  "sigmoid (ste)"},
}


def convert_config(fields: dict) -> BankSparseConfig:
    """The conversion of a dense --model from TrainConfig's recipe section (--bank-size and --keep together)."""
    if ("bank_size" in fields) != ("keep" in fields):
        raise ValueError("--bank-size and --keep go together (they convert a dense --model on the fly).")
    return BankSparseConfig(**{"predictor_init": "svd", **fields})


def warmup_fraction(step: int, warmup_steps: int, shape: str = "linear") -> float:
    """1 at step 0 falling to 0 at `warmup_steps` (0 steps: already 0)."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return 0.0
    p = step / warmup_steps
    if shape == "linear":
        return 1.0 - p
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    raise ValueError(f"keep_schedule={shape!r} is not one of {KEEP_SCHEDULES}.")


def keep_at(step: int, bank_size: int, target: int, warmup_steps: int, shape: str = "linear") -> int:
    """Integer keep for `step`: `bank_size` (dense) at step 0 down to `target` at `warmup_steps`."""
    return target + round((bank_size - target) * warmup_fraction(step, warmup_steps, shape))


def apply_keep(model: nn.Module, step: int, warmup_steps: int, shape: str = "linear") -> float | None:
    """Set every sparse FFN's `keep` for `step`; returns the mean keep (None for a dense model)."""
    keeps = []
    for _, m in sparse_ffns(model):
        m.keep = keep_at(step, m.bank_size, m.target_keep, warmup_steps, shape)
        keeps.append(m.keep)
    return sum(keeps) / len(keeps) if keeps else None


def aux_weight_at(step: int, weight: float, steps: int) -> float:
    """The oracle-BCE weight: constant when `steps` is 0, else linear decay to 0 over `steps`."""
    if weight == 0 or steps <= 0:
        return weight
    return weight * max(0.0, 1.0 - step / steps)


def record_aux(model: nn.Module, on: bool) -> None:
    """Switch the oracle-BCE recording of every sparse FFN; off also drops the stored losses."""
    for _, m in sparse_ffns(model):
        m.record_aux = on
        if not on:
            m.aux_loss = None


def is_predictor_param(name: str) -> bool:
    return ".predictor." in name or name.endswith("gate_scale")


class BankSparseHooks(TrainHooks):
    def __init__(self, model: nn.Module, options: BankSparseTraining):
        self.model, self.options = model, options
        self.param_groups = {"predictor": {"lr_mult": options.predictor_lr_mult, "weight_decay": 0.0}}

    def param_group(self, name: str) -> str | None:
        return "predictor" if is_predictor_param(name) else None

    def before_step(self, step: int) -> dict[str, float]:
        o = self.options
        return {"keep": apply_keep(self.model, step, o.keep_warmup_steps, o.keep_schedule)}

    def aux_weights(self, step: int) -> dict[str, float]:
        w = aux_weight_at(step, self.options.aux_weight, self.options.aux_steps)
        return {"aux": w} if w > 0 else {}

    def begin_aux(self, names: set[str]) -> None:
        record_aux(self.model, "aux" in names)

    def end_aux(self) -> None:
        record_aux(self.model, False)


def train_hooks(model: nn.Module, options: BankSparseTraining | None) -> TrainHooks:
    # with the hooks of recipes this one was stacked on (an N:M model's keep its zeros)
    return stacking.compose(model, BankSparseHooks(model, options or BankSparseTraining()))
