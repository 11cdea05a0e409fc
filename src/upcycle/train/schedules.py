"""The learning-rate schedule, a pure function of the step (so a resumed run recomputes exactly the same values).
Recipes keep their own schedules (e.g. the bank-sparse keep warm-up) in their train hooks."""

from __future__ import annotations

import math


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warm-up to 1 over `warmup_steps`, then cosine decay to `min_ratio` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    p = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
