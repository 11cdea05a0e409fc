"""One entry point from the module to the fast decode kernels.

`decode_forward(module, x)` returns None whenever no fast path applies (autograd on, a custom
`mask_fn`, keep == bank_size, biases on the FFN linears, more tokens than the measured crossover,
an unsupported device or dtype, FFN linears that are not plain hook-free nn.Linear, or the fast
path switched off); the module then runs the reference
(dense-masked) path. Training and prefill therefore never reach a kernel.

Which kernel:
  * CPU: the fused C kernel (`upcycle.kernels.cpu`, float32/bfloat16/float16), else torch ops.
  * CUDA: the Triton kernels (`upcycle.kernels.triton`) when triton is installed, else torch ops.

Switch with the environment variable UPCYCLE_KERNELS (read on every call) or `use_kernels(...)`:
  auto (default) | reference (never a fast path) | torch (torch-ops gather path) | fused (C or Triton).
UPCYCLE_DECODE_MAX_TOKENS overrides the token crossover (tokens = prod of x's leading dims).

The transposed down projection [d_ff, d] both fast paths read is built on first use and cached on
the module as a plain attribute (never in `state_dict`). It costs one extra copy of `down_proj`,
i.e. +1/3 of the FFN weight memory; gate and up rows are read in place from the original weights.
The cache is keyed on the down weight's storage, version counter, dtype and device, so in-place
training updates, `load_state_dict`, `.to()` all rebuild it; `release(model)` frees it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

MODES = ("auto", "reference", "torch", "fused")

# Largest token count (batch at decode) that takes the sparse path, per device type. Measured with
# bench/decode.py (see bench/results/decode_cpu.md): on 2 CPU cores the fused kernel beat dense
# MKL at every batch up to 16 for all three shapes, so the CPU limit is the kernel's own limit.
# CUDA is unmeasured: 4 is the bytes estimate (per-token gathers read 25% of the rows each).
MAX_TOKENS = {"cpu": 16, "cuda": 4}

_CACHE_ATTR = "_upcycle_decode_cache"
_mode_override: str | None = None


def kernel_mode() -> str:
    """The active mode: `use_kernels`/`set_kernel_mode` if set, else UPCYCLE_KERNELS, else 'auto'."""
    if _mode_override is not None:
        return _mode_override
    mode = os.environ.get("UPCYCLE_KERNELS", "auto").strip().lower() or "auto"
    return mode if mode in MODES else "auto"


def set_kernel_mode(mode: str | None) -> None:
    """Force a mode for this process (None: back to the environment variable)."""
    global _mode_override
    if mode is not None and mode not in MODES:
        raise ValueError(f"kernel mode {mode!r} is not one of {MODES}")
    _mode_override = mode


@contextlib.contextmanager
def use_kernels(mode: str) -> Iterator[None]:
    """`with use_kernels('reference'):` runs the block on the given path (A/B tests, benchmarks)."""
    global _mode_override
    previous = _mode_override
    set_kernel_mode(mode)
    try:
        yield
    finally:
        _mode_override = previous


def max_tokens(device_type: str) -> int:
    env = os.environ.get("UPCYCLE_DECODE_MAX_TOKENS")
    if env:
        return int(env)
    return MAX_TOKENS.get(device_type, 0)


@dataclass
class _DecodeCache:
    key: tuple
    w_down_t: Tensor  # [d_ff, d], contiguous: row c is channel c's down column


def _key(w: Tensor) -> tuple:
    try:
        version = w._version
    except RuntimeError:  # inference tensors carry no version counter
        version = -1
    return (w.data_ptr(), version, w.dtype, w.device, tuple(w.shape))


def _cache(module: nn.Module) -> _DecodeCache:
    w = module.down_proj.weight
    key = _key(w)
    cache = module.__dict__.get(_CACHE_ATTR)
    if cache is None or cache.key != key:
        module.__dict__.pop(_CACHE_ATTR, None)  # free the stale copy before building the new one
        with torch.no_grad():
            cache = _DecodeCache(key, w.detach().t().contiguous())
        module.__dict__[_CACHE_ATTR] = cache
    return cache


def prepare(model: nn.Module) -> int:
    """Build every sparse FFN's decode cache now (e.g. before CUDA-graph capture or torch.compile).

    Returns the bytes the caches hold.
    """
    total = 0
    for m in _sparse_modules(model):
        total += _cache(m).w_down_t.nbytes
        if m.down_proj.weight.device.type == "cpu":
            from upcycle.kernels import cpu

            cpu.fused_library()  # build now: a compiled graph cannot run the compiler
    return total


def release(model: nn.Module) -> None:
    """Drop the decode caches (they are rebuilt on the next decode call)."""
    for m in _sparse_modules(model):
        m.__dict__.pop(_CACHE_ATTR, None)


def _sparse_modules(model: nn.Module) -> list[nn.Module]:
    from upcycle.modules.bank_sparse import BankSparseSwiGLU

    return [m for m in model.modules() if isinstance(m, BankSparseSwiGLU)]


def _triton_ready() -> bool:
    from upcycle.kernels import triton as triton_kernels

    return triton_kernels.available()


def decode_forward(module, x: Tensor) -> Tensor | None:
    """The FFN output through a fast sparse decode kernel, or None to run the reference path."""
    if torch.is_grad_enabled() or module.mask_fn is not None:
        return None
    mode = kernel_mode()
    if mode == "reference" or module.keep >= module.bank_size:
        return None
    gate, up, down = module.gate_proj, module.up_proj, module.down_proj
    pred_in, pred_out = module.predictor.in_proj, module.predictor.out_proj
    # Kernels read .weight directly: plain nn.Linear only (no LoRA/quantised wrappers), no hooks to skip.
    for lin in (gate, up, down, pred_in, pred_out):
        if type(lin) is not nn.Linear or lin._forward_hooks or lin._forward_pre_hooks:
            return None
    if gate.bias is not None or up.bias is not None or down.bias is not None:
        return None
    d = module.hidden_size
    if x.dim() == 0 or x.shape[-1] != d or module.intermediate_size % module.bank_size:
        return None
    T = x.numel() // d
    device = x.device.type
    if T == 0 or T > max_tokens(device):
        return None
    dtype = gate.weight.dtype
    ws = (gate.weight, up.weight, down.weight, pred_in.weight, pred_out.weight)
    if x.dtype != dtype or any(w.dtype != dtype or w.device != x.device or not w.is_contiguous() for w in ws):
        return None
    if device == "cpu":
        from upcycle.kernels import cpu

        use_fused = mode in ("auto", "fused") and T <= cpu.FUSED_MAX_TOKENS and cpu.fused_supports(dtype)
        if not use_fused and mode == "fused":
            return None
        impl = "fused" if use_fused else "torch"
    elif device == "cuda":
        use_triton = mode in ("auto", "fused") and _triton_ready()
        if not use_triton and mode == "fused":
            return None
        impl = "triton" if use_triton else "torch"
    else:
        return None
    return _run(impl, module, x.reshape(T, d), x.shape)


def _run(impl: str, module, x2: Tensor, shape: torch.Size) -> Tensor | None:
    compiling = torch.compiler.is_compiling()
    if compiling:
        # Under torch.compile the cache key (data_ptr, version) cannot be traced: call `prepare(model)`
        # before compiling; without a cache the compiled graph keeps the reference path.
        cache = module.__dict__.get(_CACHE_ATTR)
        if cache is None:
            return None
    else:
        cache = _cache(module)
    pred = module.predictor
    b_out = pred.out_proj.bias
    args = (
        module.gate_proj.weight,
        module.up_proj.weight,
        cache.w_down_t,
        pred.in_proj.weight,
        pred.out_proj.weight,
        b_out if b_out is None or b_out.is_contiguous() else b_out.contiguous(),
        module.bank_size,
        module.keep,
    )
    if impl == "fused":
        from upcycle.kernels import cpu

        if compiling:
            y = cpu.fused_sparse_decode_op(x2, *args, module.gate_scale)
        else:
            alpha = None if module.gate_scale is None else float(module.gate_scale)
            y = cpu.fused_sparse_decode(x2, *args, gate_scale=alpha)
    elif impl == "triton":
        from upcycle.kernels import triton as triton_kernels

        # gate_scale stays a device tensor: no host sync, CUDA-graph safe.
        if compiling:
            y = triton_kernels.sparse_decode_op(x2, *args, module.gate_scale)
        else:
            y = triton_kernels.sparse_decode(x2, *args, gate_scale=module.gate_scale)
    else:
        from upcycle.kernels import cpu

        y = cpu.torch_sparse_decode(x2, *args, gate_scale=module.gate_scale)
    return y.reshape(shape)
