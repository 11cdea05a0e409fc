"""The N:M recipe's decode runtime: which kernel a targeted linear's forward runs.

A converted model keeps plain nn.Linear modules (plain transformers loads the checkpoint). `install` gives each
targeted 2:4 linear an instance-level `forward` (the class, the parameters, the state_dict and any hooks stay
as they are) that calls `decode_forward` and falls back to `F.linear`. `decode_forward` returns None, so the
dense `F.linear` runs, whenever no fast path applies: autograd on, the fast path switched off
(`upcycle.kernels.use_kernels("reference")`, or "torch": N:M has no torch-ops path, or UPCYCLE_KERNELS), not
CPU, a dtype other than float32/bfloat16 (or x of another dtype than the weight), more tokens than the
measured crossover, torch.compile tracing, no C compiler, or a weight that is not exactly 2:4 (e.g. a CAST
model before its hard prune). So training and prefill never reach the kernel.

The compressed copy (values + 2-bit positions: 0.53x the fp32 bytes, 0.56x bf16) is built on the first decode
call and cached on the module as a plain attribute, keyed on the weight's storage, version counter, dtype and
shape, so in-place updates, `load_state_dict` and `.to()` rebuild it; `release(model)` frees it, `prepare(model)`
builds it ahead. The dense weight stays (prefill and training use it): +0.53x memory on the targeted linears.
"""

from __future__ import annotations

import logging
import os
import types

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from upcycle.kernels.switches import kernel_mode

log = logging.getLogger(__name__)

# Largest token count (prod of x's leading dims) that takes the kernel, per weight dtype. Measured with
# bench/nm_decode.py (bench/results/nm_decode_cpu.md) on 2 shared cores at the Qwen2.5-0.5B FFN shapes.
MAX_TOKENS = {torch.float32: 8, torch.bfloat16: 2}
_STATE = "_upcycle_nm"  # (n, m) on a targeted linear
_CACHE = "_upcycle_nm_pack"


def max_tokens(dtype: torch.dtype) -> int:
    env = os.environ.get("UPCYCLE_NM_MAX_TOKENS")
    return int(env) if env else MAX_TOKENS.get(dtype, 0)


def install(model: nn.Module, linears: dict[str, nn.Linear], n: int, m: int) -> None:
    """Route the decode-shaped no-grad forwards of `linears` (2:4 only: the kernel's pattern) to the kernel."""
    for lin in linears.values():
        lin.__dict__[_STATE] = (n, m)
        if (n, m) == (2, 4):
            lin.forward = types.MethodType(nm_linear_forward, lin)


def restore(lin: nn.Linear) -> None:
    """Back to the runtime forward of `install` (after a training-time forward), or to nn.Linear's."""
    lin.__dict__.pop("forward", None)
    if lin.__dict__.get(_STATE) == (2, 4):
        lin.forward = types.MethodType(nm_linear_forward, lin)


def uninstall(model: nn.Module) -> None:
    for lin in _linears(model):
        lin.__dict__.pop("forward", None)
        lin.__dict__.pop(_STATE, None)
        lin.__dict__.pop(_CACHE, None)


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [mod for mod in model.modules() if _STATE in mod.__dict__]


def nm_linear_forward(self: nn.Linear, x: Tensor) -> Tensor:
    y = decode_forward(self, x)
    return F.linear(x, self.weight, self.bias) if y is None else y


def _key(w: Tensor) -> tuple:
    try:
        version = w._version
    except RuntimeError:  # inference tensors carry no version counter
        version = -1
    return (w.data_ptr(), version, w.dtype, w.device, tuple(w.shape))


def _pack(lin: nn.Linear):
    """The cached compressed weight, or None when the weight is not exactly 2:4 (remembered per version)."""
    from upcycle.kernels.nm_packing import pack_nm24

    w = lin.weight
    key = _key(w)
    cached = lin.__dict__.get(_CACHE)
    if cached is not None and cached[0] == key:
        return cached[1]
    lin.__dict__.pop(_CACHE, None)  # free the stale copy first
    try:
        pack = pack_nm24(w.detach())
    except ValueError:
        pack = None
    lin.__dict__[_CACHE] = (key, pack)
    return pack


def decode_forward(lin: nn.Linear, x: Tensor) -> Tensor | None:
    """The linear's output from the N:M CPU kernel, or None to run the dense F.linear."""
    if torch.is_grad_enabled() or kernel_mode() in ("reference", "torch") or torch.compiler.is_compiling():
        return None
    w = lin.weight
    if x.device.type != "cpu" or w.device.type != "cpu" or x.dtype != w.dtype or x.dim() == 0:
        return None
    if x.shape[-1] != lin.in_features:
        return None
    T = x.numel() // lin.in_features
    if T == 0 or T > max_tokens(w.dtype):
        return None
    from upcycle.kernels.cpu import nm

    if not nm.available():
        return None
    pack = _pack(lin)
    if pack is None:
        return None
    return nm.nm24_linear(x, pack.values, pack.indices, lin.bias)


def prepare(model: nn.Module) -> int:
    """Build every targeted linear's compressed copy now; returns the bytes they hold."""
    from upcycle.kernels.cpu import nm

    nm.library()
    total = 0
    for lin in _linears(model):
        pack = _pack(lin) if lin.__dict__[_STATE] == (2, 4) else None
        total += 0 if pack is None else pack.nbytes
    return total


def release(model: nn.Module) -> None:
    for lin in _linears(model):
        lin.__dict__.pop(_CACHE, None)
