"""The 4-bit kernels (csrc/bank_sparse_decode.c): a linear layer and the bank-sparse FFN on `Q4Rows`.

Rows are 4-bit codes with a bf16 scale and minimum per group (`packing.pack_q4`); the dots reuse the shadow's
unpacking (two rows per call against one x, x in int16 per group on the integer paths), so they pick their path
by this CPU as the shadow's do: `use_kernels(int4_dots=...)` or UPCYCLE_INT4_DOTS (auto: the best integer path;
float; or a path by name, for A/B tests). References: `x @ unpack_q4(rows).t()` and
`reference.sparse_swiglu_reference` on the unpacked weights.
"""

from __future__ import annotations

import ctypes
import time

import torch
from torch import Tensor

from upcycle.kernels import switches
from upcycle.kernels.cpu import (
    _DOT_NAMES,
    FUSED_MAX_TOKENS,
    LINEAR_PARALLEL_MACS,
    DecodeArgs,
    Q4LinearArgs,
    _adaptive,
    _chooser,
    _library,
    _ptr,
    _set_shadow,
    _threads,
    features,
    fused_library,
)
from upcycle.kernels.packing import Q4Rows, ShadowPack

INT4_DOTS = ("auto", *features.DOT_PATHS)
_paths: dict[str, str] = {}


def int4_dots() -> str:
    return switches.option("int4_dots", "UPCYCLE_INT4_DOTS", INT4_DOTS, "auto")


def _lib() -> ctypes.CDLL:
    lib = fused_library()
    if lib is None:
        raise RuntimeError(f"fused CPU kernel unavailable: {_library.error}")
    return lib


def int4_path() -> str:
    """The dots 4-bit rows run under the active switch (cached); ValueError when this CPU lacks it."""
    requested = int4_dots()
    path = _paths.get(requested)
    if path is None:
        rid = _lib().upc_q4_dot_path(features.DOT_PATH_IDS[requested])
        if rid < 0:
            need = ", ".join(features.missing(requested)) or "a compiler that supports it"
            raise ValueError(f"int4 dot path {requested!r} is not available here (needs {need})")
        path = _paths[requested] = _DOT_NAMES[rid]
    return path


def _check_rows(rows: Q4Rows, n: int | None, k: int, what: str) -> None:
    g = rows.group_size
    n = rows.codes.shape[0] if n is None else n
    ok = (rows.codes.dtype == torch.uint8 and tuple(rows.codes.shape) == (n, k // 2) and rows.codes.is_contiguous()
          and g >= 2 and g % 2 == 0 and k % g == 0
          and all(t.dtype == torch.bfloat16 and tuple(t.shape) == (n, k // g) and t.is_contiguous()
                  for t in (rows.scale, rows.lo)))
    if not ok:
        raise ValueError(f"{what}: 4-bit rows must be contiguous uint8 codes [{n}, {k // 2}] with bf16 scale and lo "
                         f"[{n}, {k}/group_size] (packing.pack_q4), group_size even and dividing {k}")


def int4_linear(x: Tensor, rows: Q4Rows, bias: Tensor | None = None, num_threads: int | None = None) -> Tensor:
    """y [T, N] float32 = x [T, K] @ W^T + bias for W's 4-bit rows [N, K] (T <= 64), on the helper pool."""
    lib = _lib()
    T, K = x.shape
    N = rows.codes.shape[0]
    if not 1 <= T <= FUSED_MAX_TOKENS:
        raise ValueError(f"int4_linear takes 1..{FUSED_MAX_TOKENS} rows of x, got {T}")
    _check_rows(rows, None, K, "int4_linear")
    if bias is not None and (bias.dtype != torch.float32 or tuple(bias.shape) != (N,) or not bias.is_contiguous()):
        raise ValueError("int4_linear: bias must be contiguous float32 [N]")
    xf = x.detach().to(torch.float32).contiguous()
    y = torch.empty(T, N, dtype=torch.float32)
    adaptive = _adaptive(num_threads)
    n_max = num_threads or (_threads(T * K * N) if T * K * N >= LINEAR_PARALLEL_MACS else 1)
    key = ("int4_linear", T, N, K)
    n = _chooser.pick(key, n_max) if adaptive and n_max > 1 else n_max
    path = int4_path()
    t0 = time.perf_counter()
    args = Q4LinearArgs(x=xf.data_ptr(), y=y.data_ptr(), q=rows.codes.data_ptr(), s=rows.scale.data_ptr(),
                        lo=rows.lo.data_ptr(), b=_ptr(bias), T=T, N=N, K=K, G=rows.group_size, nthreads=n,
                        dot_path=features.DOT_PATH_IDS[path])
    rc = lib.upc_linear_q4(ctypes.byref(args))
    if adaptive and n_max > 1:
        _chooser.record(key, n, time.perf_counter() - t0)
    if rc != 0:
        raise RuntimeError(f"upc_linear_q4 returned {rc} (bad arguments or out of memory)")
    features.record("int4_linear", path)
    return y


def fused_sparse_decode_int4(
    x: Tensor,
    gate: Q4Rows,
    up: Q4Rows,
    down_t: Q4Rows,
    w_in: Tensor | None,
    w_out: Tensor | None,
    b_out: Tensor | None,
    bank_size: int,
    keep: int,
    gate_scale: float | None = None,
    shadow: ShadowPack | None = None,
    idx_out: Tensor | None = None,
    num_threads: int | None = None,
) -> Tensor:
    """The bank-sparse FFN on 4-bit rows: x [T, d] -> y [T, d] (x's dtype). gate / up [d_ff, d] and down_t (the
    rows of W_down^T) [d_ff, d] as `Q4Rows` of one group size; the predictor a float32 low-rank one (w_in [r, d],
    w_out [d_ff, r], b_out) or a `shadow`; `gate_scale` and `idx_out` as in `cpu.fused_sparse_decode`."""
    lib = _lib()
    T, d = x.shape
    d_ff = gate.codes.shape[0]
    for name, rows in (("gate", gate), ("up", up), ("down_t", down_t)):
        _check_rows(rows, d_ff, d, f"fused_sparse_decode_int4 ({name})")
    if len({gate.group_size, up.group_size, down_t.group_size}) != 1:
        raise ValueError("fused_sparse_decode_int4: gate, up and down_t need one group size")
    if not 1 <= T <= FUSED_MAX_TOKENS:
        raise ValueError(f"fused_sparse_decode_int4 takes 1..{FUSED_MAX_TOKENS} tokens, got {T}")
    if d_ff % bank_size or not 1 <= keep <= bank_size:
        raise ValueError(f"fused_sparse_decode_int4: d_ff={d_ff} must be a multiple of bank_size={bank_size}, "
                         f"1 <= keep <= bank_size")
    args = DecodeArgs(T=T, d=d, dff=d_ff, bank=bank_size, keep=keep, use_sigmoid=int(gate_scale is not None),
                      alpha=0.0 if gate_scale is None else float(gate_scale))
    if shadow is not None:
        if gate_scale is not None:
            raise ValueError("fused_sparse_decode_int4: a shadow predictor has no sigmoid gate")
        if d % shadow.group_size or shadow.gate_codes.shape != (d_ff, d * shadow.container_bits // 8):
            raise ValueError("fused_sparse_decode_int4: the shadow's shapes do not match x and the rows")
        _set_shadow(args, shadow, d_ff, "fused_sparse_decode_int4")
    else:
        pred = (w_in, w_out) + (() if b_out is None else (b_out,))
        if w_in is None or w_out is None or any(t.dtype != torch.float32 or not t.is_contiguous() for t in pred) \
                or tuple(w_in.shape) != (w_in.shape[0], d) or tuple(w_out.shape) != (d_ff, w_in.shape[0]):
            raise ValueError("fused_sparse_decode_int4: needs a shadow or a contiguous float32 low-rank predictor "
                             "w_in [r, d], w_out [d_ff, r]")
        args.win, args.wout, args.bout, args.r = w_in.data_ptr(), w_out.data_ptr(), _ptr(b_out), w_in.shape[0]
    if idx_out is not None and (idx_out.dtype != torch.int32 or idx_out.shape != (T, d_ff // bank_size * keep)):
        raise ValueError("idx_out must be int32 [T, n_banks * keep]")
    xf = x.detach().to(torch.float32).contiguous()
    y = torch.empty(T, d, dtype=torch.float32)
    q4 = int4_path()
    args.x, args.y, args.idx_out = xf.data_ptr(), y.data_ptr(), _ptr(idx_out)
    args.q4g, args.q4u, args.q4d = gate.codes.data_ptr(), up.codes.data_ptr(), down_t.codes.data_ptr()
    args.q4sg, args.q4lg, args.q4su, args.q4lu = (t.data_ptr() for t in (gate.scale, gate.lo, up.scale, up.lo))
    args.q4sd, args.q4ld = down_t.scale.data_ptr(), down_t.lo.data_ptr()
    args.G4, args.q4_path = gate.group_size, features.DOT_PATH_IDS[q4]
    adaptive = _adaptive(num_threads)
    n_max = num_threads or _threads(T * d * d_ff)
    key = ("int4", T, d, d_ff, keep, None if shadow is None else shadow.container_bits)
    n = _chooser.pick(key, n_max) if adaptive and n_max > 1 else n_max
    args.nthreads = n
    t0 = time.perf_counter()
    rc = lib.upc_decode_q4(ctypes.byref(args))
    if adaptive and n_max > 1:
        _chooser.record(key, n, time.perf_counter() - t0)
    if rc != 0:
        raise RuntimeError(f"upc_decode_q4 returned {rc} (bad arguments, out of memory, or a dot path this CPU "
                           "lacks)")
    features.record("bank_sparse.weights", "int4")
    features.record("bank_sparse.int4_dots", q4)
    return y if x.dtype == torch.float32 else y.to(x.dtype)
