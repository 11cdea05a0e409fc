"""The bank-sparse FFN's decode runtime: which fast kernel a BankSparseSwiGLU forward runs.

`decode_forward(module, x)` returns None whenever no fast path applies: autograd on, a custom
`mask_fn`, keep == bank_size, biases on the FFN linears, FFN linears that are not plain hook-free
nn.Linear, more tokens than the measured crossover, an unsupported device or dtype, or the fast
path switched off. The module then runs the reference (dense-masked) path, so training and
prefill never reach a kernel.

Which kernel:
  * CPU: the fused C kernel (`upcycle.kernels.cpu`; float32, bfloat16, float16), else torch ops.
  * CUDA: the Triton kernels (`upcycle.kernels.triton`) when triton is installed, else torch ops.
  * A shadow predictor (`kernels.packing`) has no torch-ops path: the fused C or Triton kernel, else
    the reference path.
  * int8 FFN weights (`upcycle.quantize`: gate/up with per-row scales, down with per-channel scales):
    the fused C kernel's int8 rows (CPU only), else the reference path.

Switches (`upcycle.kernels.use_kernels(mode, layout=..., shadow_dots=...)`, else the environment variables,
read on every call):
  mode          UPCYCLE_KERNELS: auto (default) | reference (no fast path) | torch (torch-ops gather) |
                fused (C or Triton only; None where unavailable)
  layout        UPCYCLE_DECODE_LAYOUT: split | bundle, the weight layout the fast path reads (below)
  shadow_dots   UPCYCLE_SHADOW_DOTS: int16 (default) | float, how the C kernel scores a shadow (A/B only)
  UPCYCLE_DECODE_MAX_TOKENS     the token crossover (tokens = prod of x's leading dims)

Layouts, built on first use and cached on the module as a plain attribute (never in state_dict):
  split   W_down^T [d_ff, d] only (+1/3 of the FFN weight memory); gate and up rows are read in
          place from the original weights. The default.
  bundle  one [d_ff, 3d] tensor whose row c is channel c's gate row, up row and down column, so a
          kept channel is one contiguous read (+1x the FFN weight memory: a full copy).
The torch-ops path always uses `split`. A cache is keyed on the storage, version counter, dtype and
device of the weights it copies, so in-place training updates, `load_state_dict` and `.to()` all
rebuild it on the next decode; `release(model)` frees it, `prepare(model)` builds it ahead (needed
before torch.compile or CUDA-graph capture).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from upcycle.kernels import switches
from upcycle.kernels.switches import kernel_mode, use_kernels  # noqa: F401  (re-exported for callers)

LAYOUTS = ("split", "bundle")

# Largest token count (batch at decode) that takes the sparse path, per device type.
# CPU, measured with bench/decode.py on 2 cores (bench/results/decode_cpu*.md): the fused kernel beat
# the best dense provider at every count tried, up to its own limit of 64 (2.3-2.9x at 64); 32 keeps
# a margin for BLAS builds that are faster at small M than this machine's. CUDA is unmeasured: 4 is
# the bytes estimate (per-token gathers read 25% of the rows each).
MAX_TOKENS = {"cpu": 32, "cuda": 4}
# A shadow scores every channel for every token, so its cost grows with the tokens where the low-rank
# predictor's barely does: on CPU (bench/results/decode_cpu_shadow*.md, 2-bit, Qwen2.5-0.5B shape) it
# beat dense 2.3-2.8x at 1 token, 1.2-1.35x at 16, 1.05-1.1x at 24-32 (runs on a shared machine).
MAX_TOKENS_SHADOW = {"cpu": 16, "cuda": 4}
DEFAULT_LAYOUT = {"cpu": "split", "cuda": "split"}

_CACHE_ATTR = "_upcycle_decode_cache"


def decode_layout(device_type: str) -> str:
    return switches.option("layout", "UPCYCLE_DECODE_LAYOUT", LAYOUTS, DEFAULT_LAYOUT.get(device_type, "split"))


def max_tokens(device_type: str, shadow: bool = False) -> int:
    env = os.environ.get("UPCYCLE_DECODE_MAX_TOKENS")
    if env:
        return int(env)
    return (MAX_TOKENS_SHADOW if shadow else MAX_TOKENS).get(device_type, 0)


@dataclass
class _DecodeCache:
    key: tuple
    w_gate: Tensor | None  # None: read module.gate_proj.weight (split layout)
    w_up: Tensor | None
    w_down_t: Tensor  # [d_ff, d], unit stride within rows: row c is channel c's down column
    nbytes: int  # memory this cache holds beyond the module's own weights


def _key(w: Tensor) -> tuple:
    try:
        version = w._version
    except RuntimeError:  # inference tensors carry no version counter
        version = -1
    return (w.data_ptr(), version, w.dtype, w.device, tuple(w.shape))


def _empty(shape: tuple[int, int], like: Tensor) -> Tensor:
    if like.device.type == "cpu":
        from upcycle.kernels import cpu

        return cpu.empty_hugepage(shape, like.dtype)  # fewer TLB misses in the row gathers
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def _is_int8(lin: nn.Module) -> bool:
    """An `upcycle.quantization.Int8Linear` (duck-typed: that module imports nothing from the recipes)."""
    return getattr(lin, "axis", None) in ("out", "in") and getattr(lin, "qweight", None) is not None


def _is_int4(lin: nn.Module) -> bool:
    """An `upcycle.quantization.Int4Linear` (duck-typed likewise)."""
    return getattr(lin, "axis", None) in ("out", "in") and getattr(lin, "codes", None) is not None


def _w(lin: nn.Module) -> Tensor:
    """The tensor a kernel reads: the codes of an Int8Linear / Int4Linear, else the weight."""
    return lin.qweight if _is_int8(lin) else lin.codes if _is_int4(lin) else lin.weight


def _cache(module: nn.Module, layout: str) -> _DecodeCache:
    g, u, dn = _w(module.gate_proj), _w(module.up_proj), _w(module.down_proj)
    key = (_key(dn),) if layout == "split" else (_key(g), _key(u), _key(dn))
    caches = module.__dict__.setdefault(_CACHE_ATTR, {})
    cache = caches.get(layout)
    if cache is not None and cache.key == key:
        return cache
    caches.pop(layout, None)  # free the stale copy before building the new one
    d_ff, d = g.shape
    with torch.no_grad():
        if layout == "split":
            w_down_t = _empty((d_ff, d), dn)
            w_down_t.copy_(dn.t())
            cache = _DecodeCache(key, None, None, w_down_t, w_down_t.nbytes)
        else:
            bundle = _empty((d_ff, 3 * d), g)
            bundle[:, :d].copy_(g)
            bundle[:, d : 2 * d].copy_(u)
            bundle[:, 2 * d :].copy_(dn.t())
            cache = _DecodeCache(key, bundle[:, :d], bundle[:, d : 2 * d], bundle[:, 2 * d :], bundle.nbytes)
    caches[layout] = cache
    return cache


_SHADOW_ATTR = "_upcycle_shadow_pack"


def _shadow_pack(module: nn.Module):
    """The shadow predictor packed for the fused kernels, rebuilt when gate/up (or its learned bias) change."""
    from upcycle.kernels.packing import pack_shadow

    gl, ul, pred = module.gate_proj, module.up_proj, module.predictor
    g, u = _w(gl), _w(ul)
    bias = getattr(pred, "bias", None)
    key = (_key(g), _key(u), pred.bits, pred.group_size, None if bias is None else _key(bias))
    cached = module.__dict__.get(_SHADOW_ATTR)
    if cached is None or cached[0] != key:
        module.__dict__.pop(_SHADOW_ATTR, None)
        if _is_int8(gl) or _is_int4(gl):  # the shadow of the dequantised weights (what the FFN computes with)
            g, u = gl.dequantize(), ul.dequantize()
        cs = pred.channel_scale() if hasattr(pred, "channel_scale") else None
        cached = (key, pack_shadow(g, u, pred.bits, pred.group_size, cs))
        module.__dict__[_SHADOW_ATTR] = cached
    return cached[1]


def prepare(model: nn.Module, layout: str | None = None) -> int:
    """Build every sparse FFN's decode cache now (before CUDA-graph capture or torch.compile).

    Returns the bytes the caches hold.
    """
    total = 0
    for m in _sparse_modules(model):
        device = _w(m.down_proj).device.type
        if not _is_int4(m.down_proj):  # 4-bit rows are read where they are (stored as W_down^T already)
            total += _cache(m, layout or decode_layout(device)).nbytes
        if m.predictor.kind == "shadow":
            total += _shadow_pack(m).nbytes
        if device == "cpu":
            from upcycle.kernels import cpu

            cpu.fused_library()  # build now: a compiled graph cannot run the compiler
    return total


def release(model: nn.Module) -> None:
    """Drop the decode caches (they are rebuilt on the next decode call)."""
    for m in _sparse_modules(model):
        m.__dict__.pop(_CACHE_ATTR, None)
        m.__dict__.pop(_SHADOW_ATTR, None)
        m.__dict__.pop(_PRED_F32_ATTR, None)


def _sparse_modules(model: nn.Module) -> list[nn.Module]:
    # Duck-typed (the module class imports this file): every module that routes its decode through here.
    return [m for m in model.modules() if getattr(m, "sparse_decode", False)]


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
    shadow = module.predictor.kind == "shadow"
    if shadow and mode == "torch":
        return None  # the shadow's low-bit scoring exists in the fused C and Triton kernels only
    gate, up, down = module.gate_proj, module.up_proj, module.down_proj
    pred = () if shadow else (module.predictor.in_proj, module.predictor.out_proj)
    # int8 rows: gate/up scaled per row, down per channel (upcycle.quantize), CPU only
    axes = (getattr(gate, "axis", None), getattr(up, "axis", None), getattr(down, "axis", None))
    int8 = axes == ("out", "out", "in") and all(_is_int8(lin) for lin in (gate, up, down))
    int4 = axes == ("out", "out", "in") and all(_is_int4(lin) for lin in (gate, up, down))
    # Kernels read .weight directly: plain nn.Linear only (no LoRA/quantised wrappers), no hooks to skip.
    for lin in (gate, up, down) + pred:
        if (type(lin) is not nn.Linear and not ((int8 or int4) and lin in (gate, up, down))) or lin._forward_hooks \
                or lin._forward_pre_hooks:
            return None
    if gate.bias is not None or up.bias is not None or down.bias is not None:
        return None
    d = module.hidden_size
    if x.dim() == 0 or x.shape[-1] != d or module.intermediate_size % module.bank_size:
        return None
    T = x.numel() // d
    device = x.device.type
    if T == 0 or T > max_tokens(device, shadow):
        return None
    if int8 or int4:
        ws = (gate.qweight, up.qweight, down.qweight) if int8 else (gate.codes, up.codes, down.codes)
        if device != "cpu" or not x.dtype.is_floating_point or any(w.device != x.device for w in ws) or any(
                lin.weight.dtype != x.dtype or lin.weight.device != x.device for lin in pred):
            return None
        from upcycle.kernels import cpu

        if mode not in ("auto", "fused") or T > cpu.FUSED_MAX_TOKENS or not cpu.fused_supports(torch.int8):
            return None
        if int4:
            return _run_int4(module, x.reshape(T, d), x.shape)
        return _run("fused", module, x.reshape(T, d), x.shape)
    dtype = gate.weight.dtype
    ws = (gate.weight, up.weight, down.weight) + tuple(lin.weight for lin in pred)
    if x.dtype != dtype or any(w.dtype != dtype or w.device != x.device or not w.is_contiguous() for w in ws):
        return None
    if device == "cpu":
        from upcycle.kernels import cpu

        use_fused = mode in ("auto", "fused") and T <= cpu.FUSED_MAX_TOKENS and cpu.fused_supports(dtype)
        if not use_fused and (mode == "fused" or shadow):
            return None
        impl = "fused" if use_fused else "torch"
    elif device == "cuda":
        use_triton = mode in ("auto", "fused") and _triton_ready()
        if not use_triton and (mode == "fused" or shadow):
            return None
        impl = "triton" if use_triton else "torch"
    else:
        return None
    return _run(impl, module, x.reshape(T, d), x.shape)


def _run(impl: str, module, x2: Tensor, shape: torch.Size) -> Tensor | None:
    layout = "split" if impl == "torch" else decode_layout(x2.device.type)
    if not torch.compiler.is_compiling():
        from upcycle.kernels.cpu import features

        features.record("bank_sparse.decode", f"{impl}, {layout} layout")
    compiling = torch.compiler.is_compiling()
    if compiling:
        # Under torch.compile the cache key (data_ptr, version) cannot be traced: call `prepare(model)`
        # before compiling; without a cache the compiled graph keeps the reference path.
        cache = module.__dict__.get(_CACHE_ATTR, {}).get(layout)
        if cache is None:
            return None
    else:
        cache = _cache(module, layout)
    pred = module.predictor
    w_gate = _w(module.gate_proj) if cache.w_gate is None else cache.w_gate
    w_up = _w(module.up_proj) if cache.w_up is None else cache.w_up
    if w_gate.dtype == torch.int8:
        return _run_int8(module, x2, w_gate, w_up, cache.w_down_t, compiling, shape)
    if pred.kind == "shadow":
        y = _run_shadow(impl, module, x2, w_gate, w_up, cache.w_down_t, compiling)
        return None if y is None else y.reshape(shape)
    b_out = pred.out_proj.bias
    args = (
        w_gate,
        w_up,
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


def _run_shadow(impl: str, module, x2: Tensor, w_gate: Tensor, w_up: Tensor, w_down_t: Tensor,
                compiling: bool) -> Tensor | None:
    if compiling:
        pack = module.__dict__.get(_SHADOW_ATTR, (None, None))[1]  # `prepare(model)` built it
        if pack is None:
            return None
    else:
        pack = _shadow_pack(module)
    if impl == "fused":
        from upcycle.kernels import cpu as backend
    else:
        from upcycle.kernels import triton as backend
    if compiling:
        return backend.shadow_sparse_decode_op(x2, w_gate, w_up, w_down_t, *pack.tensors(), pack.container_bits,
                                               pack.group_size, module.bank_size, module.keep)
    if impl == "fused":
        return backend.fused_sparse_decode(x2, w_gate, w_up, w_down_t, None, None, None, module.bank_size,
                                           module.keep, shadow=pack)
    return backend.shadow_sparse_decode(x2, w_gate, w_up, w_down_t, pack, module.bank_size, module.keep)


_PRED_F32_ATTR = "_upcycle_predictor_f32"


def _run_int8(module, x2: Tensor, w_gate: Tensor, w_up: Tensor, w_down_t: Tensor, compiling: bool,
              shape: torch.Size) -> Tensor | None:
    """int8 rows through the fused C kernel (eager only: under torch.compile the reference path runs)."""
    if compiling:
        return None
    from upcycle.kernels import cpu

    scales = (module.gate_proj.scale, module.up_proj.scale, module.down_proj.scale)
    pred = module.predictor
    if pred.kind == "shadow":
        y = cpu.fused_sparse_decode(x2, w_gate, w_up, w_down_t, None, None, None, module.bank_size, module.keep,
                                    shadow=_shadow_pack(module), row_scales=scales)
        return y.reshape(shape)
    w_in, w_out, b_out = _f32_predictor(module)
    alpha = None if module.gate_scale is None else float(module.gate_scale)
    y = cpu.fused_sparse_decode(x2, w_gate, w_up, w_down_t, w_in, w_out, b_out, module.bank_size, module.keep,
                                gate_scale=alpha, row_scales=scales)
    return y.reshape(shape)


def _run_int4(module, x2: Tensor, shape: torch.Size) -> Tensor | None:
    """4-bit rows through the fused C kernel (eager only), read where they are: no decode cache."""
    if torch.compiler.is_compiling():
        return None
    from upcycle.kernels.cpu import features
    from upcycle.kernels.cpu.int4 import fused_sparse_decode_int4

    features.record("bank_sparse.decode", "fused, int4 rows")
    rows = (module.gate_proj.rows, module.up_proj.rows, module.down_proj.rows)
    if module.predictor.kind == "shadow":
        y = fused_sparse_decode_int4(x2, *rows, None, None, None, module.bank_size, module.keep,
                                     shadow=_shadow_pack(module))
    else:
        alpha = None if module.gate_scale is None else float(module.gate_scale)
        y = fused_sparse_decode_int4(x2, *rows, *_f32_predictor(module), module.bank_size, module.keep, alpha)
    return y.reshape(shape)


def _f32_predictor(module) -> tuple[Tensor, Tensor, Tensor | None]:
    """The low-rank predictor in float32 (what the int8 / int4 kernels read): a copy of a bf16/fp16 one, cached on
    its weights."""
    pred = module.predictor
    w_in, w_out, b_out = pred.in_proj.weight, pred.out_proj.weight, pred.out_proj.bias
    if w_in.dtype != torch.float32:
        key = (_key(w_in), _key(w_out), None if b_out is None else _key(b_out))
        cached = module.__dict__.get(_PRED_F32_ATTR)
        if cached is None or cached[0] != key:
            cached = (key, w_in.float().contiguous(), w_out.float().contiguous(),
                      None if b_out is None else b_out.float().contiguous())
            module.__dict__[_PRED_F32_ATTR] = cached
        w_in, w_out, b_out = cached[1:]
    elif b_out is not None and not b_out.is_contiguous():
        b_out = b_out.contiguous()
    return w_in, w_out, b_out
