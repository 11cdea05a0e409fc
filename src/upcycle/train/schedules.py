"""Schedules as pure functions of the step, so a resumed run recomputes exactly the same values."""

from __future__ import annotations

import math

from torch import nn

from upcycle.modules import sparse_ffns


def warmup_fraction(step: int, warmup_steps: int, shape: str = "linear") -> float:
    """1 at step 0 falling to 0 at `warmup_steps` (0 steps: already 0)."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return 0.0
    p = step / warmup_steps
    if shape == "linear":
        return 1.0 - p
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    raise ValueError(f"keep_schedule={shape!r} is not one of ('linear', 'cosine').")


def keep_at(step: int, bank_size: int, target: int, warmup_steps: int, shape: str = "linear") -> int:
    """Integer keep for `step`: `bank_size` (dense) at step 0 down to `target` at `warmup_steps`."""
    return target + round((bank_size - target) * warmup_fraction(step, warmup_steps, shape))


def apply_keep(model: nn.Module, step: int, warmup_steps: int, shape: str = "linear") -> int | None:
    """Set every sparse FFN's `keep` for `step`; returns the mean keep (None for a dense model)."""
    keeps = []
    for _, m in sparse_ffns(model):
        m.keep = keep_at(step, m.bank_size, m.target_keep, warmup_steps, shape)
        keeps.append(m.keep)
    return sum(keeps) / len(keeps) if keeps else None


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warm-up to 1 over `warmup_steps`, then cosine decay to `min_ratio` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    p = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


def aux_weight_at(step: int, weight: float, steps: int) -> float:
    """The oracle-BCE weight: constant when `steps` is 0, else linear decay to 0 over `steps`."""
    if weight == 0 or steps <= 0:
        return weight
    return weight * max(0.0, 1.0 - step / steps)
