"""CPU decode kernels for the bank-sparse SwiGLU FFN: tensors in, tensors out.

Two paths, chosen by measurement (bench/decode.py):

* `fused`: one small C kernel (`csrc/bank_sparse_decode.c`: GCC/clang vector extensions, its own pthread
  helpers), built on first use by `build.py` and loaded with ctypes, so it needs no PyTorch headers. Per
  bank it computes the predictor logits, picks the bank's top `keep`, then streams each kept channel's
  gate row, up row and down column (a row of the transposed down copy) once for every token that kept
  it: the weight bytes read are those of the union of the tokens' kept channels, the FLOPs those of
  per-token gathers. Weights may be float32, bfloat16 or float16; the arithmetic is float32. A shadow
  predictor is scored from its packed codes (`kernels.packing`) with int16 dot products, by the best
  integer path this CPU has (AVX-512-VNNI, AVX-VNNI or AVX2, chosen per call: `features.py`; float dots
  elsewhere). The output does not depend on the thread count (fixed bank chunks). `features.DISPATCH`
  records the path each kernel last ran (`upcycle info --kernels`).
* `torch`: predictor + top-k + index_select GEMVs + embedding_bag for the down projection, in plain
  torch ops (any device and dtype). The fallback when no C compiler is found.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from upcycle.kernels import switches
from upcycle.kernels.cpu import build, features
from upcycle.kernels.packing import ShadowPack, shadow_decode_op
from upcycle.kernels.reference import bank_topk_indices, predictor_logits

log = logging.getLogger(__name__)

# Tokens per call the fused kernel accepts (it keeps one bit per token and channel in a uint64).
FUSED_MAX_TOKENS = 64
ABI_VERSION = 9

_P, _I, _L = ctypes.c_void_p, ctypes.c_int, ctypes.c_long


class DecodeArgs(ctypes.Structure):
    """Mirror of `upc_decode_args` in csrc/bank_sparse_decode.c (field order and types must match)."""

    _fields_ = [("x", _P), ("y", _P), ("idx_out", _P), ("win", _P), ("wout", _P), ("bout", _P),
                ("wg", _P), ("wu", _P), ("wdt", _P), ("qg", _P), ("qu", _P),
                ("sg", _P), ("lg", _P), ("su", _P), ("lu", _P), ("ws", _P), ("scg", _P), ("scu", _P), ("scd", _P),
                ("ldg", _L), ("ldu", _L), ("ldd", _L),
                ("T", _I), ("d", _I), ("dff", _I), ("r", _I), ("bank", _I), ("keep", _I), ("use_sigmoid", _I),
                ("nthreads", _I), ("cb", _I), ("G", _I), ("dot_path", _I), ("lin_path", _I),
                ("alpha", ctypes.c_float),
                ("q4g", _P), ("q4u", _P), ("q4d", _P), ("q4sg", _P), ("q4lg", _P), ("q4su", _P), ("q4lu", _P),
                ("q4sd", _P), ("q4ld", _P), ("G4", _I), ("q4_path", _I)]


class LinearArgs(ctypes.Structure):
    """Mirror of `upc_linear_args` in csrc/bank_sparse_decode.c."""

    _fields_ = [("x", _P), ("y", _P), ("q", _P), ("s", _P), ("b", _P), ("ldq", _L),
                ("T", _I), ("N", _I), ("K", _I), ("nthreads", _I), ("dot_path", _I)]


class Q4LinearArgs(ctypes.Structure):
    """Mirror of `upc_linear_q4_args` in csrc/bank_sparse_decode.c."""

    _fields_ = [("x", _P), ("y", _P), ("q", _P), ("s", _P), ("lo", _P), ("b", _P),
                ("T", _I), ("N", _I), ("K", _I), ("G", _I), ("nthreads", _I), ("dot_path", _I)]


# `use_kernels(shadow_dots=...)` (or UPCYCLE_SHADOW_DOTS): how the fused kernel scores a shadow. auto (default)
# and int16: the best integer path this CPU has; float: float dots; or one path by name, for A/B tests (an
# unsupported one raises, naming the missing CPU features).
SHADOW_DOTS = ("auto", "int16", "float", *(p for p in features.DOT_PATHS if p != "float"))


def shadow_dots() -> str:
    return switches.option("shadow_dots", "UPCYCLE_SHADOW_DOTS", SHADOW_DOTS,
                           "float" if os.environ.get("UPCYCLE_SHADOW_FLOAT_DOTS") else "auto")


_DOT_NAMES = {v: k for k, v in features.DOT_PATH_IDS.items()}


def resolve_dot_path(requested: str | None = None) -> str:
    """The shadow dot path a call runs for `requested` (default: the active switch); ValueError when this CPU or
    build lacks it."""
    requested = shadow_dots() if requested is None else requested
    lib = fused_library()
    if lib is None:
        raise RuntimeError(f"fused CPU kernel unavailable: {_library.error}")
    rid = features.DOT_PATH_IDS["auto" if requested == "int16" else requested]
    got = lib.upc_resolve_dot_path(rid)
    if got < 0:
        need = ", ".join(features.missing(requested)) or "a compiler that supports it"
        raise ValueError(f"shadow dot path {requested!r} is not available here (needs {need}); this CPU runs "
                         f"{', '.join(available_dot_paths())}")
    return _DOT_NAMES[got]


def available_dot_paths() -> list[str]:
    """The shadow dot paths the built kernel can run on this CPU, best first."""
    lib = fused_library()
    mask = 1 << features.DOT_PATH_IDS["float"] if lib is None else lib.upc_dot_paths()
    return [p for p in features.DOT_PATHS if mask >> features.DOT_PATH_IDS[p] & 1]


_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.int8: "i8"}
_supported: frozenset = frozenset()  # dtypes the built library has kernels for


def _compiler() -> str | None:
    return build.compiler()


def _build() -> ctypes.CDLL:
    lib = build.build("bank_sparse_decode.c", "bank_sparse_decode")
    if lib.upc_abi_version() != ABI_VERSION or lib.upc_args_size() != ctypes.sizeof(DecodeArgs):
        raise RuntimeError("the compiled kernel does not match upcycle.kernels.cpu.DecodeArgs (stale cache?)")
    lib.upc_dot_paths.restype = _I
    lib.upc_resolve_dot_path.argtypes = [_I]
    lib.upc_resolve_dot_path.restype = _I
    for suf in _SUFFIX.values():
        fn = getattr(lib, f"upc_decode_{suf}", None)
        if fn is None:  # float16 needs a compiler with _Float16
            continue
        fn.argtypes = [ctypes.POINTER(DecodeArgs)]
        fn.restype = _I
    if lib.upc_linear_args_size() != ctypes.sizeof(LinearArgs):
        raise RuntimeError("the compiled kernel does not match upcycle.kernels.cpu.LinearArgs (stale cache?)")
    lib.upc_linear_i8.argtypes = [ctypes.POINTER(LinearArgs)]
    lib.upc_linear_i8.restype = _I
    lib.upc_linear_dot_path.argtypes = [_I, _I]
    lib.upc_linear_dot_path.restype = _I
    if lib.upc_linear_q4_args_size() != ctypes.sizeof(Q4LinearArgs):
        raise RuntimeError("the compiled kernel does not match upcycle.kernels.cpu.Q4LinearArgs (stale cache?)")
    lib.upc_linear_q4.argtypes = [ctypes.POINTER(Q4LinearArgs)]
    lib.upc_linear_q4.restype = _I
    lib.upc_decode_q4.argtypes = [ctypes.POINTER(DecodeArgs)]
    lib.upc_decode_q4.restype = _I
    lib.upc_q4_dot_path.argtypes = [_I]
    lib.upc_q4_dot_path.restype = _I
    return lib


def _build_and_probe() -> ctypes.CDLL:
    lib = _build()
    _set_supported(lib)
    return lib


_library = build.LazyLibrary(_build_and_probe, "fused CPU decode kernel", "using the torch-ops path")


def fused_library() -> ctypes.CDLL | None:
    """The compiled fused kernel, built on first call; None (and a logged reason) when it cannot be built."""
    return _library.get()


def library_error() -> str | None:
    """Why the fused kernel could not be built (None: built, or not tried yet)."""
    return _library.error


def fused_available() -> bool:
    return fused_library() is not None


def fused_supports(dtype: torch.dtype) -> bool:
    if not torch.compiler.is_compiling():  # compiled graphs use the library `prepare` built
        fused_library()
    return dtype in _supported


def _set_supported(lib: ctypes.CDLL) -> None:
    global _supported
    _supported = frozenset(dt for dt, suf in _SUFFIX.items() if hasattr(lib, f"upc_decode_{suf}"))


_MADV_HUGEPAGE = 14  # Linux
_HUGE = 1 << 21


def empty_hugepage(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """torch.empty on the CPU whose pages are advised to be 2 MiB transparent huge pages (Linux).

    The kernel's gathers jump between rows: with 4 KiB pages nearly every row is a TLB miss. On the
    packed copies this is ~8% faster (measured, fp32 0.5B shape). Best effort: a no-op elsewhere, and
    only pages not yet touched are affected, so call it before filling the tensor.
    """
    t = torch.empty(shape, dtype=dtype)
    if t.nbytes < 2 * _HUGE or not hasattr(os, "sched_getaffinity"):  # Linux only, big tensors only
        return t
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        start = (t.data_ptr() + _HUGE - 1) // _HUGE * _HUGE
        end = (t.data_ptr() + t.nbytes) // _HUGE * _HUGE
        if end > start:
            libc.madvise(start, end - start, _MADV_HUGEPAGE)
    except (OSError, AttributeError):
        pass
    return t


class _ThreadChooser:
    """Picks 1 or N threads per call shape from measured call times (EWMA), re-probing the other.

    On a quiet machine N helpers win; on a shared one a helper that gets descheduled mid-bank makes
    the caller wait, and one thread is faster. Which holds changes by the second, so measure it.
    """

    EXPLORE = 64  # every 64th call of a shape runs the other choice (a bad one can cost ms on a loaded machine)
    ALPHA = 0.25

    def __init__(self) -> None:
        self.stats: dict[tuple, list] = {}  # key -> [calls, {n: ewma seconds}]

    def pick(self, key: tuple, n_max: int) -> int:
        calls, ewma = self.stats.setdefault(key, [0, {}])
        for n in (n_max, 1):
            if n not in ewma:
                return n
        best = min(ewma, key=ewma.get)
        if calls % self.EXPLORE == self.EXPLORE - 1:
            return 1 if best != 1 else n_max
        return best

    def record(self, key: tuple, n: int, seconds: float) -> None:
        entry = self.stats[key]
        entry[0] += 1
        old = entry[1].get(n)
        entry[1][n] = seconds if old is None else old + self.ALPHA * (seconds - old)


_chooser = _ThreadChooser()


_pool_threads: int | None = None  # `pool_threads(n)`: the helper pool's count while torch runs with fewer
_fixed_threads: int | None = None  # `kernel_threads(n)`: the in-process form of UPCYCLE_CPU_THREADS


@contextlib.contextmanager
def _thread_setting(name: str, n: int | None) -> Iterator[None]:
    """Set module global `name` to n (at least 1; None: unset) for the block, then restore it."""
    before = globals()[name]
    globals()[name] = n if n is None else max(1, int(n))
    try:
        yield
    finally:
        globals()[name] = before


def pool_threads(n: int | None) -> contextlib.AbstractContextManager[None]:
    """Within the block the C kernels' helper pool may use up to `n` threads whatever torch's own count is
    (UPCYCLE_CPU_THREADS still wins); None: unset within the block. `upcycle.generate` holds torch at one
    thread for the decode steps of a quantised model, whose big linears all run here."""
    return _thread_setting("_pool_threads", n)


def kernel_threads(n: int | None) -> contextlib.AbstractContextManager[None]:
    """Within the block the C kernels use exactly `n` threads on large calls, over UPCYCLE_CPU_THREADS,
    `pool_threads` and torch's count (the in-process form of that variable; benchmarks use this, not the
    environment); None: unset within the block."""
    return _thread_setting("_fixed_threads", n)


def _fixed_count() -> int | None:
    """A fixed kernel thread count: `kernel_threads` (wins, as `use_kernels` wins over the environment), else
    UPCYCLE_CPU_THREADS, else None."""
    if _fixed_threads is not None:
        return _fixed_threads
    env = os.environ.get("UPCYCLE_CPU_THREADS")
    return max(1, int(env)) if env else None


def _adaptive(num_threads: int | None) -> bool:
    """Whether a call picks 1 or N threads by measured time: not when the caller, UPCYCLE_CPU_THREADS,
    `kernel_threads` or `pool_threads` fixed the count (under `pool_threads` torch is held back and the pool
    has the cores)."""
    return num_threads is None and _fixed_count() is None and _pool_threads is None


def _threads(work: int) -> int:
    """Upper bound on threads: UPCYCLE_CPU_THREADS / `kernel_threads`, else `pool_threads`, else torch's; tiny
    FFNs (tests, toys) use one."""
    fixed = _fixed_count()
    if fixed:
        return fixed
    n = _pool_threads or torch.get_num_threads()
    return n if work >= 1 << 18 else 1


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _rows_ok(w: Tensor, shape: tuple[int, int]) -> bool:
    """Row-major rows (unit stride inside a row), any row stride: originals or views of a bundle."""
    return tuple(w.shape) == shape and w.stride(1) == 1 and w.stride(0) >= shape[1]


def fused_sparse_decode(
    x: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down_t: Tensor,
    w_in: Tensor | None,
    w_out: Tensor | None,
    b_out: Tensor | None,
    bank_size: int,
    keep: int,
    gate_scale: float | None = None,
    out: Tensor | None = None,
    idx_out: Tensor | None = None,
    num_threads: int | None = None,
    shadow: ShadowPack | None = None,
    row_scales: tuple[Tensor, Tensor, Tensor] | None = None,
) -> Tensor:
    """Fused CPU decode: x [T, d] -> y [T, d] (x's dtype). CPU weights of one dtype.

    w_gate, w_up [d_ff, d] and w_down_t (the transposed down projection) [d_ff, d] need unit stride
    within a row but may have any row stride (e.g. views of one [d_ff, 3d] bundle); the predictor
    weights must be contiguous. `gate_scale` None is the `ste` gate (1 on kept channels), a float
    alpha the `sigmoid` gate 2 * sigmoid(alpha * logit). `out` (float32, [T, d]) and `idx_out`
    (int32, [T, n_banks * keep], ascending per bank) are optional outputs. `num_threads` None: up to
    torch.get_num_threads() (or UPCYCLE_CPU_THREADS), 1 or all chosen per call shape by measured time.
    `shadow` (a `pack_shadow` result) replaces the low-rank predictor (w_in, w_out, b_out are then None).
    int8 rows (w_gate, w_up, w_down_t of dtype int8) need `row_scales` (float32 [d_ff] each: row c of the
    gate / up / down^T weights is q[c] * scale[c]) and a float32 predictor.
    """
    lib = fused_library()
    if lib is None:
        raise RuntimeError(f"fused CPU kernel unavailable: {_library.error}")
    T, d = x.shape
    d_ff, r = (w_gate.shape[0], 0) if shadow is not None else w_out.shape
    dtype = w_gate.dtype
    pred = () if shadow is not None else (w_in, w_out) + (() if b_out is None else (b_out,))
    pdtype = torch.float32 if dtype == torch.int8 else dtype
    if any(w.dtype != dtype or w.device.type != "cpu" for w in (w_gate, w_up, w_down_t)) or dtype not in _supported \
            or any(w.dtype != pdtype or w.device.type != "cpu" for w in pred):
        raise ValueError(f"fused_sparse_decode: weights must be CPU tensors of one supported dtype ({dtype}; "
                         "int8 rows with a float32 predictor)")
    if (dtype == torch.int8) != (row_scales is not None) or (row_scales is not None and not all(
            t.dtype == torch.float32 and tuple(t.shape) == (d_ff,) and t.is_contiguous() for t in row_scales)):
        raise ValueError("fused_sparse_decode: int8 rows need row_scales (3 contiguous float32 [d_ff]) and only they")
    rows_ok = all(_rows_ok(w, (d_ff, d)) for w in (w_gate, w_up, w_down_t))
    if shadow is not None:
        if gate_scale is not None:
            raise ValueError("fused_sparse_decode: a shadow predictor has no sigmoid gate")
        row = d * shadow.container_bits // 8
        groups = d // shadow.group_size
        ok = all(tuple(t.shape) == (d_ff, row) and t.dtype == torch.uint8 and t.is_contiguous()
                 for t in (shadow.gate_codes, shadow.up_codes))
        ok = ok and all(tuple(t.shape) == (d_ff, groups) and t.dtype == torch.bfloat16 and t.is_contiguous()
                        for t in (shadow.gate_scale, shadow.gate_lo, shadow.up_scale, shadow.up_lo))
        if not rows_ok or not ok or d % shadow.group_size:
            raise ValueError("fused_sparse_decode: weight or shadow shapes do not match x")
    elif not rows_ok or tuple(w_in.shape) != (r, d) or not (w_in.is_contiguous() and w_out.is_contiguous()):
        raise ValueError("fused_sparse_decode: weight shapes or layouts do not match x and the predictor")
    if b_out is not None and not b_out.is_contiguous():
        raise ValueError("fused_sparse_decode: b_out must be contiguous")
    if not 1 <= T <= FUSED_MAX_TOKENS:
        raise ValueError(f"fused_sparse_decode takes 1..{FUSED_MAX_TOKENS} tokens, got {T}")
    xf = x.detach().to(torch.float32).contiguous()
    y = out if out is not None else torch.empty(T, d, dtype=torch.float32)
    if y.dtype != torch.float32 or y.shape != (T, d) or not y.is_contiguous():
        raise ValueError("out must be a contiguous float32 [T, d] tensor")
    if idx_out is not None and (idx_out.dtype != torch.int32 or idx_out.shape != (T, d_ff // bank_size * keep)):
        raise ValueError("idx_out must be int32 [T, n_banks * keep]")
    fn = getattr(lib, f"upc_decode_{_SUFFIX[dtype]}")
    adaptive = _adaptive(num_threads)
    n_max = num_threads or _threads(T * d * d_ff)
    key = (T, d, d_ff, keep, dtype, w_down_t.stride(0), None if shadow is None else shadow.container_bits)
    n = _chooser.pick(key, n_max) if adaptive and n_max > 1 else n_max
    t0 = time.perf_counter()
    args = DecodeArgs(
        x=xf.data_ptr(), y=y.data_ptr(), idx_out=_ptr(idx_out), win=_ptr(w_in), wout=_ptr(w_out), bout=_ptr(b_out),
        wg=w_gate.data_ptr(), wu=w_up.data_ptr(), wdt=w_down_t.data_ptr(),
        ldg=w_gate.stride(0), ldu=w_up.stride(0), ldd=w_down_t.stride(0),
        T=T, d=d, dff=d_ff, r=r, bank=bank_size, keep=keep, use_sigmoid=int(gate_scale is not None),
        nthreads=n, alpha=0.0 if gate_scale is None else float(gate_scale),
    )
    if row_scales is not None:
        args.scg, args.scu, args.scd = (t.data_ptr() for t in row_scales)
        lin = _int8_path(lib, d)
        args.lin_path = features.DOT_PATH_IDS[lin]
        features.record("bank_sparse.int8_dots", lin if T == 1 else "float")
    if shadow is not None:
        _set_shadow(args, shadow, d_ff, "fused_sparse_decode")
    rc = fn(ctypes.byref(args))
    if adaptive and n_max > 1:
        _chooser.record(key, n, time.perf_counter() - t0)
    if rc != 0:
        raise RuntimeError(f"upc_decode_{_SUFFIX[dtype]} returned {rc} (bad arguments, out of memory, or a dot path "
                           "this CPU lacks)")
    features.record("bank_sparse.weights", _SUFFIX[dtype])
    features.record("bank_sparse.threads", str(n))
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def _set_shadow(args: DecodeArgs, shadow: ShadowPack, d_ff: int, who: str) -> None:
    """Point a decode call at a shadow predictor's packed fields, on the active shadow dot path."""
    args.qg, args.qu = shadow.gate_codes.data_ptr(), shadow.up_codes.data_ptr()
    args.sg, args.lg = shadow.gate_scale.data_ptr(), shadow.gate_lo.data_ptr()
    args.su, args.lu = shadow.up_scale.data_ptr(), shadow.up_lo.data_ptr()
    args.cb, args.G = shadow.container_bits, shadow.group_size
    path = _resolved_dots()
    args.dot_path = features.DOT_PATH_IDS[path]
    features.record("bank_sparse.shadow_dots", path)
    cs = shadow.channel_scale
    if cs is not None:
        if cs.dtype != torch.float32 or tuple(cs.shape) != (d_ff,) or not cs.is_contiguous():
            raise ValueError(f"{who}: shadow.channel_scale must be contiguous float32 [d_ff]")
        args.ws = cs.data_ptr()


# `use_kernels(int8_dots=...)` (or UPCYCLE_INT8_DOTS): the int8 weights' dots. auto (default): x in int16 per
# group of 64 inputs and the best integer path this CPU has (rows whose length is not a multiple of 64: float);
# float: every weight converted to float; or one path by name (A/B tests).
INT8_DOTS = ("auto", *features.DOT_PATHS)
_linear_paths: dict[tuple[str, int], str] = {}


def int8_dots() -> str:
    return switches.option("int8_dots", "UPCYCLE_INT8_DOTS", INT8_DOTS, "auto")


def _int8_path(lib: ctypes.CDLL, K: int) -> str:
    """The dots int8 rows of length K run under the active switch (cached); ValueError when unavailable."""
    requested = int8_dots()
    path = _linear_paths.get((requested, K))
    if path is None:
        rid = lib.upc_linear_dot_path(features.DOT_PATH_IDS[requested], K)
        if rid < 0:
            need = ", ".join(features.missing(requested)) or "a compiler that supports it"
            raise ValueError(f"int8 dot path {requested!r} is not available here (needs {need})")
        path = _linear_paths[(requested, K)] = _DOT_NAMES[rid]
    return path


# Multiply-adds from which an int8 linear call uses the helper pool (below: one thread).
LINEAR_PARALLEL_MACS = 1 << 22

# Rows per call the int8 linear kernel takes; more go through a dequantising matmul (`upcycle.quantization`).
LINEAR_MAX_TOKENS = 16


def int8_linear(x: Tensor, q: Tensor, scale: Tensor | None, bias: Tensor | None = None,
                num_threads: int | None = None) -> Tensor:
    """y [T, N] float32 = (x [T, K] @ q^T) * scale + bias for int8 rows q [N, K] (unit stride within a row) and
    float32 scale / bias [N] (either may be None), on the fused kernel's helper pool. T <= LINEAR_MAX_TOKENS."""
    lib = fused_library()
    if lib is None:
        raise RuntimeError(f"fused CPU kernel unavailable: {_library.error}")
    T, K = x.shape
    N = q.shape[0]
    if q.dtype != torch.int8 or q.dim() != 2 or q.shape[1] != K or q.stride(1) != 1 or not 1 <= T <= 64:
        raise ValueError("int8_linear: q must be int8 [N, K] rows with unit stride, x [T <= 64, K]")
    for t in (scale, bias):
        if t is not None and (t.dtype != torch.float32 or tuple(t.shape) != (N,) or not t.is_contiguous()):
            raise ValueError("int8_linear: scale and bias must be contiguous float32 [N]")
    xf = x.detach().to(torch.float32).contiguous()
    y = torch.empty(T, N, dtype=torch.float32)
    adaptive = _adaptive(num_threads)
    # the helper pool pays only on big calls (the LM head): a projection of a few hundred KB takes tens of us on
    # one thread, about what waking a helper costs on a busy machine
    n_max = num_threads or (_threads(T * K * N) if T * K * N >= LINEAR_PARALLEL_MACS else 1)
    key = ("int8_linear", T, N, K)
    n = _chooser.pick(key, n_max) if adaptive and n_max > 1 else n_max
    t0 = time.perf_counter()
    path = _int8_path(lib, K)
    args = LinearArgs(x=xf.data_ptr(), y=y.data_ptr(), q=q.data_ptr(), s=_ptr(scale), b=_ptr(bias), ldq=q.stride(0),
                      T=T, N=N, K=K, nthreads=n, dot_path=features.DOT_PATH_IDS[path])
    rc = lib.upc_linear_i8(ctypes.byref(args))
    if adaptive and n_max > 1:
        _chooser.record(key, n, time.perf_counter() - t0)
    if rc != 0:
        raise RuntimeError(f"upc_linear_i8 returned {rc} (bad arguments or out of memory)")
    features.record("int8_linear", path)
    features.record("int8_linear.threads", str(n))
    return y


_resolved: dict[str, str] = {}


def _resolved_dots() -> str:
    """resolve_dot_path for the active switch, cached per requested value (one ctypes call per new value)."""
    requested = shadow_dots()
    got = _resolved.get(requested)
    if got is None:
        got = _resolved[requested] = resolve_dot_path(requested)
    return got


def torch_sparse_decode(
    x: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down_t: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    b_out: Tensor | None,
    bank_size: int,
    keep: int,
    gate_scale: Tensor | float | None = None,
) -> Tensor:
    """The gather path in plain torch ops (any device, any dtype): x [T, d] -> y [T, d].

    Reads only the kept gate/up rows (index_select) and kept rows of the transposed down copy
    (embedding_bag with per-sample weights, which never materialises the gathered down rows).
    """
    T, d = x.shape
    z = predictor_logits(x, w_in, w_out, b_out)
    idx = bank_topk_indices(z, bank_size, keep)  # [T, k]
    k = idx.shape[1]
    flat = idx.reshape(-1)
    xs = x.unsqueeze(-1)
    g = torch.bmm(w_gate.index_select(0, flat).view(T, k, d), xs).squeeze(-1)
    u = torch.bmm(w_up.index_select(0, flat).view(T, k, d), xs).squeeze(-1)
    h = F.silu(g) * u
    if gate_scale is not None:
        h = h * (2 * torch.sigmoid(gate_scale * z.gather(1, idx))).to(h.dtype)
    return F.embedding_bag(idx, w_down_t, per_sample_weights=h, mode="sum")


# torch.compile sees the fused kernel as one opaque op (dynamo cannot trace a ctypes call).
@torch.library.custom_op("upcycle::bank_sparse_decode_cpu", mutates_args=())
def fused_sparse_decode_op(
    x: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down_t: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    b_out: Tensor | None,
    bank_size: int,
    keep: int,
    gate_scale: Tensor | None,
) -> Tensor:
    alpha = None if gate_scale is None else float(gate_scale)
    return fused_sparse_decode(x, w_gate, w_up, w_down_t, w_in, w_out, b_out, bank_size, keep, alpha)


@fused_sparse_decode_op.register_fake
def _(x, w_gate, w_up, w_down_t, w_in, w_out, b_out, bank_size, keep, gate_scale):
    return x.new_empty(x.shape[0], w_down_t.shape[1])


shadow_sparse_decode_op = shadow_decode_op(
    "bank_sparse_shadow_decode_cpu",
    lambda x, w_gate, w_up, w_down_t, pack, bank_size, keep: fused_sparse_decode(
        x, w_gate, w_up, w_down_t, None, None, None, bank_size, keep, shadow=pack),
)
