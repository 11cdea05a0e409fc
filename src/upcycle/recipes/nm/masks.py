"""N:M masks: keep `n` of every `m` consecutive input weights in each output row.

Convention everywhere in this recipe: `n` is the number KEPT per group (2:4 keeps 2 of 4); groups run along
the input dimension (the last axis of an nn.Linear weight [out, in]), the layout sparse tensor cores and the
CPU kernel expect. Row-local by construction, so a weight sharded by rows (FSDP2 shards dim 0) has the mask
of its full tensor on every shard.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_nm(n: int, m: int, in_features: int, where: str = "weight") -> None:
    """ValueError unless n:m is a sparsity pattern that tiles `in_features`."""
    if n < 1 or m < 2 or n >= m:
        raise ValueError(f"{n}:{m} is not an N:M pattern: need 1 <= n < m (n kept of every m).")
    if in_features % m:
        raise ValueError(f"{where} has in_features={in_features}, not divisible by m={m}: N:M groups are m "
                         f"consecutive inputs of a row. Choose an m that divides {in_features} or leave this "
                         "linear out of `targets`.")


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Bool mask [out, in], True where `scores` [out, in] is among the n largest of its group of m (ties to
    the lower index): exactly n True per group."""
    out, inp = scores.shape
    check_nm(n, m, inp)
    groups = scores.detach().reshape(out, inp // m, m)
    keep = groups.topk(n, dim=-1, sorted=False).indices
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device)
    return mask.scatter_(-1, keep, True).reshape(out, inp)


def magnitude_mask(weight: Tensor, n: int, m: int) -> Tensor:
    """The mask of the n largest |w| per group. On an exactly N:M weight this is the mask its zeros imply
    (zeros rank last), so it is also how a saved checkpoint's mask is read back."""
    return nm_mask(weight.detach().abs().float(), n, m)


def nonzeros_per_group(weight: Tensor, m: int) -> Tensor:
    out, inp = weight.shape
    return (weight.detach().reshape(out, inp // m, m) != 0).sum(-1)


def is_nm(weight: Tensor, n: int, m: int) -> bool:
    """True if every group of m consecutive inputs of every row holds at most n nonzeros."""
    check_nm(n, m, weight.shape[-1])
    return bool((nonzeros_per_group(weight, m) <= n).all())


@torch.no_grad()
def hard_prune_(weight: Tensor, n: int, m: int) -> Tensor:
    """Zero all but the n largest |w| of every group, in place; returns the keep mask."""
    mask = magnitude_mask(weight, n, m)
    weight.mul_(mask.to(weight.dtype))
    return mask
