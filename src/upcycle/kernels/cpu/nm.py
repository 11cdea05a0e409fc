"""CPU decode kernel for 2:4 sparse linears: y = x W^T + b from the compressed form (`kernels.nm_packing`).

Tensor in, tensor out. `csrc/nm_decode.c` is built on first use by `build.py` and called through ctypes with
one `NMArgs` structure. It has three paths, chosen at run time from the CPU's features (not from how it was
compiled): `avx512` (AVX-512F), `avx2` (AVX2 + FMA) and `scalar` (portable C). `path="auto"` takes AVX2 when
the CPU has it (measured faster than the AVX-512 path at decode shapes on an AVX-512 Xeon), else AVX-512, else
scalar; forcing a path the CPU lacks raises (never a silent fallback). Weights fp32 or bf16, any x
dtype (computed in fp32, returned in x's dtype), any number of tokens (the speed-up is at decode shapes:
the caller decides when to use it, see `recipes/nm/runtime.py`). Rows are split over up to
`torch.get_num_threads()` threads; each row is computed by one thread with the same code, so the output does
not depend on the thread count.
"""

from __future__ import annotations

import ctypes
import logging
import time

import torch
from torch import Tensor

from upcycle.kernels.cpu import _adaptive, _threads, build
from upcycle.kernels.cpu import _ThreadChooser as ThreadChooser

log = logging.getLogger(__name__)

ABI_VERSION = 1
PATHS = {"auto": 0, "scalar": 1, "avx2": 2, "avx512": 3}
CPU_FEATURES = {"scalar": "none", "avx2": "avx2 + fma", "avx512": "avx512f"}  # what each path needs
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_ERRORS = {-1: "invalid arguments", -2: "path not supported by this CPU", -3: "out of memory"}

_P, _I64, _I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32


class NMArgs(ctypes.Structure):
    """Mirror of `upc_nm_args` in csrc/nm_decode.c (field order and types must match)."""

    _fields_ = [("x", _P), ("vals", _P), ("idx", _P), ("bias", _P), ("y", _P), ("T", _I64), ("in_features", _I64),
                ("out_features", _I64), ("idx_stride", _I64), ("dtype", _I32), ("path", _I32), ("nthreads", _I32)]


_chooser = ThreadChooser()


def _build(main: str = "nm_decode.c", name: str = "nm_decode") -> ctypes.CDLL:
    lib = build.build(main, name)
    if lib.upc_nm_abi_version() != ABI_VERSION or lib.upc_nm_args_size() != ctypes.sizeof(NMArgs):
        raise RuntimeError("the compiled N:M kernel does not match upcycle.kernels.cpu.nm.NMArgs (stale cache?)")
    lib.upc_nm24_linear.argtypes = [ctypes.POINTER(NMArgs)]
    lib.upc_nm24_linear.restype = ctypes.c_int
    lib.upc_nm_paths.argtypes = []
    lib.upc_nm_paths.restype = ctypes.c_int
    return lib


_library = build.LazyLibrary(_build, "N:M CPU decode kernel", "N:M linears run densely")


def library() -> ctypes.CDLL | None:
    """The compiled kernel, built on first call; None (and one logged reason) when it cannot be built."""
    return _library.get()


def available() -> bool:
    return library() is not None


def error() -> str | None:
    """Why the kernel could not be built (None when it was, or was not tried yet)."""
    return _library.error


def available_paths(lib: ctypes.CDLL | None = None) -> list[str]:
    """The paths this CPU runs, e.g. ['scalar', 'avx2', 'avx512'] ([] without a kernel)."""
    lib = lib or library()
    if lib is None:
        return []
    bits = lib.upc_nm_paths()
    return [name for name, code in PATHS.items() if code and bits & (1 << code)]


def nm24_linear(x: Tensor, values: Tensor, indices: Tensor, bias: Tensor | None = None, path: str = "auto",
                num_threads: int | None = None, lib: ctypes.CDLL | None = None) -> Tensor:
    """y [..., out] = x [..., in] W^T + bias, W the 2:4 weight given by `values` [out, in/2] (fp32 or bf16) and
    `indices` [out, ceil(in/8)] (uint8), as `nm_packing.pack_nm24` makes them; fp32 accumulation.

    `num_threads` None: up to torch.get_num_threads() (or UPCYCLE_CPU_THREADS) for large weights, 1 or all chosen
    per call shape by measured time. `lib`: a specific build of the kernel (tests).
    """
    lib = lib or library()
    if lib is None:
        raise RuntimeError(f"N:M CPU kernel unavailable: {_library.error}")
    if path not in PATHS:
        raise ValueError(f"path must be one of {list(PATHS)}, got {path!r}")
    if values.dim() != 2 or indices.dim() != 2 or values.dtype not in _DTYPES or indices.dtype != torch.uint8:
        raise ValueError("nm24_linear: values must be a 2-D float32/bfloat16 tensor and indices a 2-D uint8 tensor")
    out, k = values.shape
    inp = 2 * k
    if x.shape[-1] != inp:
        raise ValueError(f"nm24_linear: x has {x.shape[-1]} features, the weight expects {inp}")
    if indices.shape != (out, (k + 3) // 4):
        raise ValueError(f"nm24_linear: indices shape {tuple(indices.shape)} does not match values "
                         f"{tuple(values.shape)}")
    if any(t.device.type != "cpu" for t in (x, values, indices)) or (bias is not None and bias.shape != (out,)):
        raise ValueError("nm24_linear: CPU tensors only, bias of shape [out]")
    lead = x.shape[:-1]
    xf = x.detach().reshape(-1, inp).to(torch.float32).contiguous()
    t = xf.shape[0]
    y = torch.empty(t, out, dtype=torch.float32)
    if t == 0:
        return y.reshape(*lead, out).to(x.dtype)
    vals, idx = values.detach().contiguous(), indices.detach().contiguous()
    b = None if bias is None else bias.detach().to(torch.float32).contiguous()
    adaptive = _adaptive(num_threads)
    n_max = num_threads or _threads(t * inp * out // 2)
    key = (t, inp, out, vals.dtype)
    n = _chooser.pick(key, n_max) if adaptive and n_max > 1 else n_max
    args = NMArgs(x=xf.data_ptr(), vals=vals.data_ptr(), idx=idx.data_ptr(), bias=None if b is None else b.data_ptr(),
                  y=y.data_ptr(), T=t, in_features=inp, out_features=out, idx_stride=idx.shape[1],
                  dtype=_DTYPES[vals.dtype], path=PATHS[path], nthreads=n)
    t0 = time.perf_counter()
    rc = lib.upc_nm24_linear(ctypes.byref(args))
    if adaptive and n_max > 1:
        _chooser.record(key, n, time.perf_counter() - t0)
    if rc != 0:
        raise RuntimeError(f"upc_nm24_linear failed ({_ERRORS.get(rc, rc)}; path={path!r})")
    return y.reshape(*lead, out).to(x.dtype)
