"""Dropless expert compute over 3-D expert weights.

Weights use transformers' in-memory layout so export is a rename:
``gate_up_proj`` [E, 2f, d] (rows 0..f-1 = gate, f..2f-1 = up) and ``down_proj`` [E, d, f].

Tokens are sorted by expert once; the two GEMMs then run either as one grouped GEMM
(``torch.nn.functional.grouped_mm``, when it works for this device/dtype/shape) or as a loop over
contiguous per-expert slices. `dense_reference` runs every expert on every token and is the oracle
the tests compare both paths against.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _contiguous(grad: torch.Tensor) -> torch.Tensor:
    return grad.contiguous()


def _gmm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """grouped_mm whose incoming gradient is made contiguous.

    The CPU backward of torch 2.13 rejects zero-stride (expanded) gradients, e.g. from ``.sum()``
    ("Invalid strides/sizes"); a tensor hook fixes the layout before grouped_mm's backward sees it.
    """
    y = _grouped_mm(a, b, offs=offs)
    if y.requires_grad:
        y.register_hook(_contiguous)
    return y


@lru_cache(maxsize=64)
def grouped_mm_supported(device_type: str, dtype: torch.dtype, hidden: int, expert_size: int) -> bool:
    """Probe once whether grouped_mm runs forward and backward here.

    Support varies by torch version, device, dtype (CUDA kernels want bf16 on SM80+) and stride
    alignment (CUDA wants 16-byte aligned rows, i.e. d and f multiples of 8 in bf16); probing with
    the real d and f on 2 tiny experts is cheaper to maintain than a version table.
    """
    if _grouped_mm is None:
        return False
    try:
        # the first MoE forward of a process may run under no_grad / inference_mode (an eval): probe with grad
        with torch.inference_mode(False), torch.enable_grad():
            dev = torch.device(device_type)
            x = torch.zeros(3, hidden, device=dev, dtype=dtype, requires_grad=True)
            w = torch.zeros(2, 2 * expert_size, hidden, device=dev, dtype=dtype, requires_grad=True)
            offs = torch.tensor([1, 3], device=dev, dtype=torch.int32)
            _gmm(x, w.transpose(1, 2), offs).sum().backward()
        return True
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return False


def sort_by_expert(idx: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Order the T*k (token, slot) assignments by expert.

    Returns order [T*k] (assignment ids sorted by expert, stable), token [T*k] (token of each sorted
    row) and counts [E] (rows per expert).
    """
    flat = idx.reshape(-1)  # [T*k]
    order = flat.argsort(stable=True)
    token = order // idx.shape[-1]
    counts = torch.bincount(flat, minlength=num_experts)
    return order, token, counts


class GroupedExperts(nn.Module):
    """E SwiGLU experts of intermediate size f, computed on the tokens routed to them only."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        expert_size: int,
        act_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if backend not in ("auto", "grouped_mm", "loop"):
            raise ValueError(f"backend={backend!r} must be 'auto', 'grouped_mm' or 'loop'")
        self.num_experts, self.hidden_size, self.expert_size = num_experts, hidden_size, expert_size
        self.act_fn = act_fn if act_fn is not None else nn.SiLU()
        self.backend = backend
        kw = {"device": device, "dtype": dtype}
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * expert_size, hidden_size, **kw))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, expert_size, **kw))

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.gate_up_proj, std=std)
        nn.init.normal_(self.down_proj, std=std)

    def use_grouped_mm(self) -> bool:
        if self.backend == "loop":
            return False
        ok = grouped_mm_supported(self.down_proj.device.type, self.down_proj.dtype, self.hidden_size, self.expert_size)
        if self.backend == "grouped_mm" and not ok:
            raise RuntimeError(
                f"grouped_mm is not available for {self.down_proj.device.type}/{self.down_proj.dtype} "
                f"d={self.hidden_size} f={self.expert_size}; use backend='auto' or 'loop'"
            )
        return ok

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, d], idx [T, k], weights [T, k] -> [T, d] = sum_k weights * expert_idx(x)."""
        num_tokens, top_k = idx.shape
        if num_tokens == 0:
            return x.new_zeros(x.shape)
        order, token, counts = sort_by_expert(idx, self.num_experts)
        xs = x[token].to(self.down_proj.dtype)  # [T*k, d], grouped by expert
        if self.use_grouped_mm():
            ys = self._grouped(xs, counts)
        else:
            ys = self._loop(xs, counts)  # [T*k, d]
        ys = ys * weights.reshape(-1)[order, None].to(ys.dtype)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        # un-sort and sum the k slots of each token (deterministic, no scatter-add races)
        return ys[inverse].view(num_tokens, top_k, -1).sum(dim=1).to(x.dtype)

    def _swiglu(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = h.chunk(2, dim=-1)  # [N, f] each
        return self.act_fn(gate) * up

    def _grouped(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        offs = counts.cumsum(0).to(torch.int32)  # [E] end offset of each expert's rows
        h = _gmm(xs, self.gate_up_proj.transpose(1, 2), offs)  # [N, 2f]
        return _gmm(self._swiglu(h), self.down_proj.transpose(1, 2), offs)  # [N, d]

    def _loop(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        outs, start = [], 0
        for e, n in enumerate(counts.tolist()):
            if n == 0:
                continue
            h = F.linear(xs[start : start + n], self.gate_up_proj[e])  # [n, 2f]
            outs.append(F.linear(self._swiglu(h), self.down_proj[e]))  # [n, d]
            start += n
        return torch.cat(outs, dim=0)


def dense_reference(
    x: torch.Tensor,
    idx: torch.Tensor,
    weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    act_fn: Callable[[torch.Tensor], torch.Tensor] = F.silu,
) -> torch.Tensor:
    """Oracle: every expert on every token, combined with a dense [T, E] routing matrix.

    x [T, d], idx/weights [T, k], gate_up_proj [E, 2f, d], down_proj [E, d, f] -> [T, d].
    O(T * E) compute; for tests only.
    """
    num_experts = gate_up_proj.shape[0]
    h = torch.einsum("td,efd->etf", x, gate_up_proj)  # [E, T, 2f]
    gate, up = h.chunk(2, dim=-1)
    y = torch.einsum("etf,edf->etd", act_fn(gate) * up, down_proj)  # [E, T, d]
    combine = torch.zeros(x.shape[0], num_experts, dtype=weights.dtype, device=x.device)
    combine = combine.scatter_add(1, idx, weights)  # [T, E]
    return torch.einsum("te,etd->td", combine.to(y.dtype), y)
