"""AdamS, the optimizer of CAST-style N:M training (and Adam with SR-STE's refined decay).

Per parameter group, `nm_mode` says what the group's weights get:

- None: plain Adam (decoupled weight decay as AdamW), fp32 moments.
- "cast": AdamS. For the weights the current N:M mask would prune (state "prune_mask", refreshed by
  `refresh_masks` every T steps from |w| within each group of m), the first moment used in the step is

      mt = (1 - a_t) * mhat_t + a_t * decay * sign(theta),    a_t = min(1, t / ramp_steps)

  (mhat_t the bias-corrected Adam moment) and the second moment is built from it, v_t = b2 v + (1 - b2) mt^2,
  so a fully decayed weight moves by exactly lr * sign(theta) toward zero whatever its gradient's scale, and
  every layer sparsifies at the same pace. Kept weights get plain Adam. Two choices the CAST description
  leaves open: the blend is applied to the bias-corrected moment and is not written back into the gradient
  EMA (so the pull ramps exactly with a_t). `pull_lr_mult` (default 1, CAST as described) scales the step of the
  to-be-pruned weights only: a fully decayed weight moves by lr x pull_lr_mult per step, so that a run of a few
  hundred steps at a fine-tuning LR can take them to ~0 before the final hard prune (at 1 it cannot: 100 steps
  at LR 1e-4 move a weight by < 0.01, about SmolLM2's typical |w|).
- "srste": Adam on g + lambda * (1 - mask) * theta with mask the magnitude mask of the current weights (the
  refined decay of SR-STE, added once per optimizer step, so it does not scale with gradient accumulation or
  the number of processes).

Non-fp32 parameters get an fp32 master copy (state "master"): the decay's steps are below bf16 resolution.
FSDP2: a sharded parameter is a DTensor split by rows (dim 0); every update, and every mask, is computed on
the local shard. N:M groups run along the input dimension inside a row, so the mask of a shard is the mask
of those rows of the full weight, and the state (moments, mask, master) is allocated like the parameter, so
torch.distributed.checkpoint saves and reshards it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from upcycle.recipes.nm.masks import magnitude_mask

MODES = (None, "cast", "srste")


def local(t: Tensor) -> Tensor:
    """The process-local tensor of a DTensor (a view: writes go to the shard), else `t`."""
    return t.to_local() if hasattr(t, "to_local") and hasattr(t, "device_mesh") else t


class AdamS(torch.optim.Optimizer):
    """Adam with CAST's adaptive L1 decay of to-be-pruned weights (groups with nm_mode="cast") and SR-STE's
    refined decay (nm_mode="srste"); see the module docstring. Group keys: lr, betas, eps, weight_decay,
    nm (n, m), nm_mode, decay (CAST lambda), ramp_steps (CAST T), srste_lambda."""

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, decay: float = 1e-4, ramp_steps: int = 1000,
                 srste_lambda: float = 2e-4, nm: tuple[int, int] | None = None, nm_mode: str | None = None,
                 pull_lr_mult: float = 1.0):
        if ramp_steps < 1:
            raise ValueError(f"ramp_steps must be >= 1, got {ramp_steps}")
        for name, v in (("lr", lr), ("eps", eps), ("decay", decay), ("srste_lambda", srste_lambda),
                        ("pull_lr_mult", pull_lr_mult)):
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, decay=decay,
                        ramp_steps=ramp_steps, srste_lambda=srste_lambda, nm=nm, nm_mode=nm_mode,
                        pull_lr_mult=pull_lr_mult)
        super().__init__(params, defaults)
        for g in self.param_groups:
            if g["nm_mode"] not in MODES:
                raise ValueError(f"nm_mode={g['nm_mode']!r} is not one of {MODES}")
            if g["nm_mode"] is not None and g["nm"] is None:
                raise ValueError(f"a group with nm_mode={g['nm_mode']!r} needs nm=(n, m)")

    def _state(self, p: Tensor, group: dict) -> dict:
        st = self.state[p]
        if not st:
            st["step"] = torch.tensor(0.0)
            st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            if p.dtype != torch.float32:
                st["master"] = p.detach().to(torch.float32).clone()
            if group["nm_mode"] == "cast":
                st["prune_mask"] = torch.zeros_like(p, dtype=torch.uint8)
                self._refresh(p, st, group)
        return st

    @staticmethod
    def _refresh(p: Tensor, st: dict, group: dict) -> None:
        theta = local(st.get("master", p))
        n, m = group["nm"]
        local(st["prune_mask"]).copy_(~magnitude_mask(theta, n, m))

    @torch.no_grad()
    def refresh_masks(self) -> None:
        """Recompute the to-be-pruned set of every CAST weight from its current magnitudes (each shard its rows)."""
        for group in self.param_groups:
            if group["nm_mode"] == "cast":
                for p in group["params"]:
                    st = self.state[p]
                    if st:
                        self._refresh(p, st, group)
                    else:
                        self._state(p, group)

    def decay_weight(self, step: int, group: dict | None = None) -> float:
        """a_t for the t-th update."""
        group = group or next((g for g in self.param_groups if g["nm_mode"] == "cast"), self.param_groups[0])
        return min(1.0, step / group["ramp_steps"])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, eps, wd, mode = group["lr"], group["eps"], group["weight_decay"], group["nm_mode"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self._state(p, group)
                theta = local(st.get("master", p))
                g = local(p.grad).to(torch.float32)
                m_, v = local(st["exp_avg"]), local(st["exp_avg_sq"])
                st["step"] += 1
                t = int(st["step"].item())
                bc1, bc2 = 1 - b1**t, 1 - b2**t
                if mode == "srste":
                    n, m = group["nm"]
                    g = g + group["srste_lambda"] * (~magnitude_mask(theta, n, m)) * theta
                m_.mul_(b1).add_(g, alpha=1 - b1)
                mhat = m_ / bc1
                if mode == "cast":
                    pm = local(st["prune_mask"]).bool()
                    a = min(1.0, t / group["ramp_steps"])
                    mhat = torch.where(pm, (1 - a) * mhat + a * group["decay"] * theta.sign(), mhat)
                    u = torch.where(pm, mhat, g)  # what the second moment tracks
                    v.mul_(b2).addcmul_(u, u, value=1 - b2)
                else:
                    v.mul_(b2).addcmul_(g, g, value=1 - b2)
                if wd:
                    theta.mul_(1 - lr * wd)
                if mode == "cast" and group.get("pull_lr_mult", 1.0) != 1:  # (optimizer states saved before it: 1)
                    # the to-be-pruned weights step at lr x pull_lr_mult (short runs: see NMSparseTraining)
                    mhat = torch.where(pm, mhat * group["pull_lr_mult"], mhat)
                theta.addcdiv_(mhat, (v / bc2).sqrt_().add_(eps), value=-lr)
                if "master" in st:
                    local(p).copy_(theta)
        return loss
