"""CPU decode kernels for the bank-sparse SwiGLU FFN.

Two paths, chosen by measurement (bench/decode.py):

* `fused`: one small C kernel (OpenMP, GCC vector extensions), built on first use with the system C
  compiler into a per-user cache and loaded with ctypes, so it needs no PyTorch headers (the build
  takes about a second, not the ~minute a torch C++ extension takes). Per bank it computes the
  predictor logits, picks the bank's top `keep`, then streams each kept channel's gate row, up row
  and down column (a row of the transposed down copy) once for every token that kept it: the
  weight bytes read are those of the union of the tokens' kept channels, the FLOPs those of
  per-token gathers. Weights may be float32, bfloat16 or float16; the arithmetic is float32.
* `torch`: predictor + top-k + index_select GEMVs + embedding_bag for the down projection, in plain
  torch ops (any device and dtype). The fallback when no C compiler is found.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from upcycle.kernels.reference import bank_topk_indices, predictor_logits

log = logging.getLogger(__name__)

# Tokens per call the fused kernel accepts (it keeps one bit per token and channel in a uint64).
FUSED_MAX_TOKENS = 64

_C_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <omp.h>

typedef float v8 __attribute__((vector_size(32), aligned(4)));
typedef uint16_t u16x8 __attribute__((vector_size(16), aligned(2)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));

static inline v8 ld_f32(const void *p) { return *(const v8 *)p; }
static inline float ld1_f32(const void *p, long i) { return ((const float *)p)[i]; }
static inline v8 ld_bf16(const void *p) {
    u32x8 w = __builtin_convertvector(*(const u16x8 *)p, u32x8) << 16;
    v8 f; memcpy(&f, &w, sizeof f); return f;
}
static inline float ld1_bf16(const void *p, long i) {
    uint32_t w = (uint32_t)((const uint16_t *)p)[i] << 16; float f; memcpy(&f, &w, 4); return f;
}
#if defined(__FLT16_MAX__)
typedef _Float16 h16x8 __attribute__((vector_size(16), aligned(2)));
static inline v8 ld_f16(const void *p) { return __builtin_convertvector(*(const h16x8 *)p, v8); }
static inline float ld1_f16(const void *p, long i) { return (float)((const _Float16 *)p)[i]; }
#endif

static inline float hsum(v8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

static inline void prefetch_row(const char *p, long bytes) {
    for (long i = 0; i < bytes; i += 64) __builtin_prefetch(p + i, 0, 0);
}

/* One body per weight type: W(NAME) names the function, LD/LD1 load 8 / 1 weights as float, ES is
   the element size. Four independent accumulators keep the FMA pipes busy while streaming. */
#define DEFINE_KERNEL(SUF, LD, LD1, ES)                                                              \
static inline float dot_##SUF(const char *w, const float *restrict x, int n) {                      \
    v8 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};                                                     \
    int i = 0;                                                                                       \
    for (; i + 32 <= n; i += 32) {                                                                   \
        s0 += LD(w + (long)i * ES) * *(const v8 *)(x + i);                                           \
        s1 += LD(w + (long)(i + 8) * ES) * *(const v8 *)(x + i + 8);                                 \
        s2 += LD(w + (long)(i + 16) * ES) * *(const v8 *)(x + i + 16);                               \
        s3 += LD(w + (long)(i + 24) * ES) * *(const v8 *)(x + i + 24);                               \
    }                                                                                                \
    for (; i + 8 <= n; i += 8) s0 += LD(w + (long)i * ES) * *(const v8 *)(x + i);                   \
    float s = hsum((s0 + s1) + (s2 + s3));                                                           \
    for (; i < n; i++) s += LD1(w, i) * x[i];                                                        \
    return s;                                                                                        \
}                                                                                                    \
static inline void axpy_##SUF(float *restrict y, float h, const char *w, int n) {                   \
    v8 hv = {h, h, h, h, h, h, h, h};                                                                \
    int i = 0;                                                                                       \
    for (; i + 16 <= n; i += 16) {                                                                   \
        *(v8 *)(y + i) += hv * LD(w + (long)i * ES);                                                 \
        *(v8 *)(y + i + 8) += hv * LD(w + (long)(i + 8) * ES);                                       \
    }                                                                                                \
    for (; i < n; i++) y[i] += h * LD1(w, i);                                                        \
}                                                                                                    \
int upc_decode_##SUF(const float *x, int T, int d, int dff, int r, const char *win, const char *wout,\
                     const char *bout, const char *wg, const char *wu, long ldgu, const char *wdt,  \
                     int bank, int keep, int use_sigmoid, float alpha, float *y, int32_t *idx_out,  \
                     int nthreads) {                                                                 \
    if (T < 1 || T > 64 || bank < 1 || dff % bank || keep > bank || keep < 1 || nthreads < 1) return 1; \
    int nb = dff / bank;                                                                             \
    long K = (long)nb * keep;                                                                        \
    size_t scratch = (size_t)bank * (1 + T) + 2 * (size_t)keep + 16;                                 \
    float *a = malloc(sizeof(float) * (size_t)T * r);                                                \
    float *part = calloc((size_t)nthreads * T * d, sizeof(float));                                   \
    float *scr = malloc(sizeof(float) * scratch * nthreads);                                         \
    uint64_t *mbs = malloc(sizeof(uint64_t) * (size_t)bank * nthreads);                              \
    if (!a || !part || !scr || !mbs) { free(a); free(part); free(scr); free(mbs); return 2; }        \
    _Pragma("omp parallel num_threads(nthreads)")                                                    \
    {                                                                                                \
        int tid = omp_get_thread_num();                                                              \
        float *yp = part + (size_t)tid * T * d;                                                      \
        float *z = scr + scratch * tid, *gate = z + bank, *kv = gate + (size_t)T * bank;             \
        int *ki = (int *)(kv + keep);                                                                \
        uint64_t *mb = mbs + (size_t)bank * tid;                                                     \
        _Pragma("omp for schedule(dynamic, 8)")                                                      \
        for (int j = 0; j < r; j++)                                                                  \
            for (int t = 0; t < T; t++)                                                              \
                a[(size_t)t * r + j] = dot_##SUF(win + (long)j * d * ES, x + (size_t)t * d, d);      \
        /* A thread owns whole banks: routing and gathers of a bank need no further barrier. Dynamic   \
           chunks: on a shared machine a descheduled thread's banks are taken over, not waited for. */ \
        _Pragma("omp for schedule(dynamic, 2) nowait")                                               \
        for (int b = 0; b < nb; b++) {                                                               \
            int c0 = b * bank;                                                                       \
            memset(mb, 0, sizeof(uint64_t) * bank);                                                  \
            for (int t = 0; t < T; t++) {                                                            \
                for (int i = 0; i < bank; i++)                                                       \
                    z[i] = dot_##SUF(wout + (long)(c0 + i) * r * ES, a + (size_t)t * r, r)           \
                           + (bout ? LD1(bout, c0 + i) : 0.f);                                       \
                /* top-keep: a running set of the best seen, replacing its minimum (ties: lower index) */ \
                for (int i = 0; i < keep; i++) { kv[i] = z[i]; ki[i] = i; }                          \
                int mp = 0;                                                                          \
                for (int i = 1; i < keep; i++) if (kv[i] < kv[mp]) mp = i;                           \
                for (int i = keep; i < bank; i++) {                                                  \
                    if (z[i] > kv[mp]) {                                                             \
                        kv[mp] = z[i]; ki[mp] = i; mp = 0;                                           \
                        for (int q = 1; q < keep; q++) if (kv[q] < kv[mp]) mp = q;                   \
                    }                                                                                \
                }                                                                                    \
                float *gt = gate + (size_t)t * bank;                                                 \
                for (int q = 0; q < keep; q++) {                                                     \
                    int i = ki[q];                                                                   \
                    mb[i] |= 1ull << t;                                                              \
                    gt[i] = use_sigmoid ? 2.f / (1.f + expf(-alpha * z[i])) : 1.f;                   \
                }                                                                                    \
                if (idx_out) {                                                                       \
                    int32_t *o = idx_out + (size_t)t * K + (size_t)b * keep;                         \
                    for (int i = 0, n = 0; i < bank; i++) if (mb[i] >> t & 1ull) o[n++] = c0 + i;    \
                }                                                                                    \
            }                                                                                        \
            for (int i = 0; i < bank; i++) {                                                         \
                uint64_t m = mb[i];                                                                  \
                if (!m) continue;                                                                    \
                long c = c0 + i;                                                                     \
                const char *g_row = wg + c * ldgu * ES, *u_row = wu + c * ldgu * ES, *d_row = wdt + c * d * ES; \
                for (int n = i + 1; n < bank; n++) if (mb[n]) {                                      \
                    long cn = c0 + n;                                                                \
                    prefetch_row(wg + cn * ldgu * ES, (long)d * ES);                                 \
                    prefetch_row(wu + cn * ldgu * ES, (long)d * ES);                                 \
                    prefetch_row(wdt + cn * d * ES, (long)d * ES);                                   \
                    break;                                                                           \
                }                                                                                    \
                for (int t = 0; t < T; t++) {                                                        \
                    if (!(m >> t & 1ull)) continue;                                                  \
                    const float *xt = x + (size_t)t * d;                                             \
                    float g = dot_##SUF(g_row, xt, d), u = dot_##SUF(u_row, xt, d);                  \
                    float h = g / (1.f + expf(-g)) * u * gate[(size_t)t * bank + i];                 \
                    axpy_##SUF(yp + (size_t)t * d, h, d_row, d);                                     \
                }                                                                                    \
            }                                                                                        \
        }                                                                                            \
    }                                                                                                \
    for (long i = 0; i < (long)T * d; i++) {                                                         \
        float s = 0;                                                                                 \
        for (int p = 0; p < nthreads; p++) s += part[(size_t)p * T * d + i];                         \
        y[i] = s;                                                                                    \
    }                                                                                                \
    free(a); free(part); free(scr); free(mbs);                                                       \
    return 0;                                                                                        \
}

DEFINE_KERNEL(f32, ld_f32, ld1_f32, 4)
DEFINE_KERNEL(bf16, ld_bf16, ld1_bf16, 2)
#if defined(__FLT16_MAX__)
DEFINE_KERNEL(f16, ld_f16, ld1_f16, 2)
#endif

int upc_abi_version(void) { return 1; }
"""

_CFLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-fno-math-errno", "-std=gnu11"]
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_lib_error: str | None = None
_supported: frozenset = frozenset()  # dtypes the built library has kernels for


def _cache_dir() -> Path:
    root = os.environ.get("UPCYCLE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "upcycle"
    )
    return Path(root) / "kernels"


def _arch_flags() -> list[str]:
    # -march=native tunes to this CPU; the cache key includes the CPU so a shared home stays safe.
    return ["-march=native"] if platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64") else []


def _cpu_id() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc and shutil.which(cc):
        return cc
    for name in ("gcc", "cc", "clang"):
        if shutil.which(name):
            return name
    return None


def _build() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (gcc, cc or clang) on PATH")
    flags = _CFLAGS + _arch_flags()
    key = hashlib.sha256("\0".join([_C_SOURCE, cc, *flags, _cpu_id(), platform.machine()]).encode()).hexdigest()[:16]
    out_dir = _cache_dir()
    so = out_dir / f"bank_sparse_decode_{key}.so"
    if not so.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            src = Path(tmp) / "kernel.c"
            src.write_text(_C_SOURCE)
            tmp_so = Path(tmp) / "kernel.so"
            proc = subprocess.run([cc, *flags, str(src), "-o", str(tmp_so)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-2000:]}")
            os.replace(tmp_so, so)  # atomic: concurrent builders never see a partial file
    # Import torch's OpenMP runtime first (done: torch is imported), so the kernel shares its pool.
    lib = ctypes.CDLL(str(so))
    P, I = ctypes.c_void_p, ctypes.c_int
    for suf in _SUFFIX.values():
        fn = getattr(lib, f"upc_decode_{suf}", None)
        if fn is None:  # float16 needs a compiler with _Float16
            continue
        fn.argtypes = [P, I, I, I, I, P, P, P, P, P, ctypes.c_long, P, I, I, I, ctypes.c_float, P, P, I]
        fn.restype = I
    return lib


def fused_library() -> ctypes.CDLL | None:
    """The compiled fused kernel, built on first call; None (and a logged reason) when it cannot be built."""
    global _lib, _lib_error
    if _lib is not None or _lib_error is not None:
        return _lib
    with _lock:
        if _lib is None and _lib_error is None:
            try:
                _lib = _build()
                _set_supported(_lib)
            except Exception as e:  # a missing or broken compiler must only cost speed
                _lib_error = f"{type(e).__name__}: {e}"
                log.warning("upcycle: fused CPU decode kernel unavailable (%s); using the torch-ops path.", _lib_error)
    return _lib


def fused_available() -> bool:
    return fused_library() is not None


def fused_supports(dtype: torch.dtype) -> bool:
    if not torch.compiler.is_compiling():  # compiled graphs use the library `prepare` built
        fused_library()
    return dtype in _supported


def _set_supported(lib: ctypes.CDLL) -> None:
    global _supported
    _supported = frozenset(dt for dt, suf in _SUFFIX.items() if hasattr(lib, f"upc_decode_{suf}"))


def _threads(work: int) -> int:
    # Tiny FFNs (tests, toy models) are faster on one thread than paying a fork/join.
    return torch.get_num_threads() if work >= 1 << 18 else 1


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def fused_sparse_decode(
    x: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down_t: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    b_out: Tensor | None,
    bank_size: int,
    keep: int,
    gate_scale: float | None = None,
    out: Tensor | None = None,
    idx_out: Tensor | None = None,
    num_threads: int | None = None,
) -> Tensor:
    """Fused CPU decode: x [T, d] -> y [T, d] (x's dtype). Weights contiguous, one dtype, on the CPU.

    w_down_t is the transposed down projection [d_ff, d]. `gate_scale` None is the `ste` gate (1 on
    kept channels), a float alpha the `sigmoid` gate 2 * sigmoid(alpha * logit). `out` (float32,
    [T, d]) and `idx_out` (int32, [T, n_banks * keep], ascending per bank) are optional outputs.
    """
    lib = fused_library()
    if lib is None:
        raise RuntimeError(f"fused CPU kernel unavailable: {_lib_error}")
    T, d = x.shape
    d_ff, r = w_out.shape
    dtype = w_gate.dtype
    ws = (w_gate, w_up, w_down_t, w_in, w_out) + (() if b_out is None else (b_out,))
    if any(w.dtype != dtype or not w.is_contiguous() or w.device.type != "cpu" for w in ws):
        raise ValueError("fused_sparse_decode: weights must be contiguous CPU tensors of one dtype")
    if w_gate.shape != (d_ff, d) or w_up.shape != (d_ff, d) or w_down_t.shape != (d_ff, d) or w_in.shape != (r, d):
        raise ValueError("fused_sparse_decode: weight shapes do not match x and the predictor")
    if not 1 <= T <= FUSED_MAX_TOKENS:
        raise ValueError(f"fused_sparse_decode takes 1..{FUSED_MAX_TOKENS} tokens, got {T}")
    xf = x.detach().to(torch.float32).contiguous()
    y = out if out is not None else torch.empty(T, d, dtype=torch.float32)
    if y.dtype != torch.float32 or y.shape != (T, d) or not y.is_contiguous():
        raise ValueError("out must be a contiguous float32 [T, d] tensor")
    if idx_out is not None and (idx_out.dtype != torch.int32 or idx_out.shape != (T, d_ff // bank_size * keep)):
        raise ValueError("idx_out must be int32 [T, n_banks * keep]")
    fn = getattr(lib, f"upc_decode_{_SUFFIX[dtype]}")
    rc = fn(
        xf.data_ptr(),
        T,
        d,
        d_ff,
        r,
        w_in.data_ptr(),
        w_out.data_ptr(),
        _ptr(b_out),
        w_gate.data_ptr(),
        w_up.data_ptr(),
        d,
        w_down_t.data_ptr(),
        bank_size,
        keep,
        int(gate_scale is not None),
        0.0 if gate_scale is None else float(gate_scale),
        y.data_ptr(),
        _ptr(idx_out),
        num_threads or _threads(T * d * d_ff),
    )
    if rc != 0:
        raise RuntimeError(f"upc_decode_{_SUFFIX[dtype]} returned {rc} (bad arguments or out of memory)")
    return y if x.dtype == torch.float32 else y.to(x.dtype)


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
