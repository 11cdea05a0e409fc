"""CPU decode kernels for the bank-sparse SwiGLU FFN.

Two paths, chosen by measurement (bench/decode.py):

* `fused`: one small C kernel (GCC/clang vector extensions, its own pthread helpers), built on first
  use with the system C compiler into a per-user cache (~/.cache/upcycle/kernels, or $UPCYCLE_CACHE)
  and loaded with ctypes, so it needs no PyTorch headers (the build takes about a second, not the
  ~minute a torch C++ extension takes). Per bank it computes the
  predictor logits, picks the bank's top `keep`, then streams each kept channel's gate row, up row
  and down column (a row of the transposed down copy) once for every token that kept it: the
  weight bytes read are those of the union of the tokens' kept channels, the FLOPs those of
  per-token gathers. Weights may be float32, bfloat16 or float16; the arithmetic is float32. A
  shadow predictor is scored from its packed codes (`kernels.packing`) with int16 dot products on
  AVX2 CPUs (float elsewhere). The output does not depend on the thread count (fixed bank chunks).
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
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from upcycle.kernels.packing import ShadowPack, shadow_decode_op
from upcycle.kernels.reference import bank_topk_indices, predictor_logits

log = logging.getLogger(__name__)

# Tokens per call the fused kernel accepts (it keeps one bit per token and channel in a uint64).
FUSED_MAX_TOKENS = 64

_C_PRELUDE = r"""
#define _GNU_SOURCE
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <unistd.h>

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

typedef uint8_t u8x8 __attribute__((vector_size(8), aligned(1)));
static inline float bf16f(uint16_t h) { uint32_t w = (uint32_t)h << 16; float f; memcpy(&f, &w, 4); return f; }

static inline float hsum(v8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }
static inline v8 splat(float h) { v8 v = {h, h, h, h, h, h, h, h}; return v; }
static inline float silu(float g) { return g / (1.f + expf(-g)); }
static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

typedef struct {
    const float *x, *a;
    int T, d, dff, r, bank, keep, use_sigmoid, nb;
    long ldg, ldu, ldd, K;
    float alpha;
    const char *win, *wout, *bout, *wg, *wu, *wdt;
    int32_t *idx_out;
    /* shadow predictor (qg != NULL): packed codes of gate/up, bf16 scale and minimum per group;
       a holds, per token, the sums of x over each group instead of the low-rank activations */
    const uint8_t *qg, *qu;
    const uint16_t *sg, *lg, *su, *lu;
    int cb, G;
    int16_t *xq;  /* x quantised per group to int16 for the integer shadow dots, or NULL (float dots) */
} args_t;

/* One row of a shadow: x . (codes * scale + lo) over d inputs. Codes are packed per group of G
   inputs into G / (8 / CB) bytes; byte k of a group holds inputs k + p * G / (8 / CB), p = 0..,
   at bit offset CB * p (so every plane is a contiguous run of x). xs: x summed per group. One copy
   per container width: constant shifts and widening to int32 first let the compiler vectorise
   (a generic loop over uint8 lanes measured 4-6x slower). */
typedef int32_t i32x8 __attribute__((vector_size(32)));
#define QDOT(CB)                                                                                         \
static float qdot##CB(const uint8_t *P, const float *restrict x, const float *xs, const uint16_t *sc,     \
                      const uint16_t *lo, int d, int G) {                                                \
    enum { PPB = 8 / CB };                                                                               \
    const int gb = G / PPB, ng = d / G;                                                                  \
    float total = 0.f;                                                                                   \
    for (int g = 0; g < ng; g++) {                                                                       \
        const uint8_t *pg = P + (size_t)g * gb;                                                          \
        const float *xg = x + (size_t)g * G;                                                             \
        v8 acc[PPB];                                                                                     \
        for (int p = 0; p < PPB; p++) acc[p] = splat(0.f);                                               \
        int k = 0;                                                                                       \
        for (; k + 8 <= gb; k += 8) {                                                                    \
            u8x8 b8; memcpy(&b8, pg + k, 8);                                                             \
            i32x8 b = __builtin_convertvector(b8, i32x8);                                                \
            for (int p = 0; p < PPB; p++)                                                                \
                acc[p] += __builtin_convertvector((b >> (CB * p)) & ((1 << CB) - 1), v8) * ld_f32(xg + p * gb + k); \
        }                                                                                                \
        v8 a = acc[0];                                                                                   \
        for (int p = 1; p < PPB; p++) a += acc[p];                                                       \
        float s = hsum(a);                                                                               \
        for (; k < gb; k++)                                                                              \
            for (int p = 0; p < PPB; p++) s += (float)((pg[k] >> (CB * p)) & ((1 << CB) - 1)) * xg[p * gb + k]; \
        total += bf16f(sc[g]) * s + bf16f(lo[g]) * xs[g];                                                \
    }                                                                                                    \
    return total;                                                                                        \
}
QDOT(2)
QDOT(4)
QDOT(8)
static inline float qdot(const uint8_t *P, const float *restrict x, const float *xs, const uint16_t *sc,
                         const uint16_t *lo, int d, int G, int cb) {
    return cb == 2 ? qdot2(P, x, xs, sc, lo, d, G) : cb == 4 ? qdot4(P, x, xs, sc, lo, d, G)
                                                             : qdot8(P, x, xs, sc, lo, d, G);
}
#if defined(__AVX2__)
#include <immintrin.h>
#define SHADOW_INT16 1
/* The same dots in integers, gate and up rows of one channel in one pass sharing the x loads: x
   quantised per group to int16 (scale sx = max|x| / 32767: rounding errors ~1e-5 of the group's
   largest |x|), codes widened from bytes to int16 lanes, _mm256_madd_epi16 doing 16 multiply-adds
   per instruction with no int-to-float conversion per weight: 1.4-1.5x faster FFN decode than the
   float dots (bench/decode.py --shadow-float-dots). On SmolLM2 int16 x keeps 99.99% of the float
   scores' channels and its held-out ppl lies at the edge of the spread that rounding-level noise
   alone gives (1.011x vs 0.995-1.008x); int8 x (maddubs, twice the rate again) keeps 98.6% and costs
   1.024x on WikiText-2, so it was rejected (bench/results/shadow_xquant.md).
   Exact int32 sums for groups of up to 2048 inputs (8-bit codes: 2 * 255 * 32767 per lane and step). */
typedef int16_t i16x16 __attribute__((vector_size(32)));
typedef int16_t i16x8 __attribute__((vector_size(16)));
#define QDOT16(CB)                                                                                       \
static void qdot16_##CB(const uint8_t *Pg, const uint8_t *Pu, const int16_t *xq, const float *sx,        \
                        const float *xs, const uint16_t *sg, const uint16_t *lg, const uint16_t *su,      \
                        const uint16_t *lu, int d, int G, float *out_g, float *out_u) {                  \
    enum { PPB = 8 / CB, M = (1 << CB) - 1 };                                                             \
    const int gb = G / PPB, ng = d / G;                                                                  \
    v8 fg = splat(0.f), fu = splat(0.f);                                                                 \
    float rg = 0.f, ru = 0.f;                                                                            \
    for (int g = 0; g < ng; g++) {                                                                       \
        const uint8_t *pg = Pg + (size_t)g * gb, *pu = Pu + (size_t)g * gb;                              \
        const int16_t *xg = xq + (size_t)g * G;                                                          \
        __m256i ag = _mm256_setzero_si256(), au = _mm256_setzero_si256();                                \
        __m128i ag4 = _mm_setzero_si128(), au4 = _mm_setzero_si128();                                    \
        int k = 0;                                                                                       \
        for (; k + 16 <= gb; k += 16) {                                                                  \
            i16x16 bg = (i16x16)_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(pg + k)));       \
            i16x16 bu = (i16x16)_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(pu + k)));       \
            for (int p = 0; p < PPB; p++) {                                                              \
                __m256i xv = _mm256_loadu_si256((const __m256i *)(xg + p * gb + k));                     \
                ag = _mm256_add_epi32(ag, _mm256_madd_epi16((__m256i)((bg >> (CB * p)) & M), xv));      \
                au = _mm256_add_epi32(au, _mm256_madd_epi16((__m256i)((bu >> (CB * p)) & M), xv));      \
            }                                                                                            \
        }                                                                                                \
        for (; k + 8 <= gb; k += 8) {                                                                    \
            i16x8 bg = (i16x8)_mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)(pg + k)));            \
            i16x8 bu = (i16x8)_mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)(pu + k)));            \
            for (int p = 0; p < PPB; p++) {                                                              \
                __m128i xv = _mm_loadu_si128((const __m128i *)(xg + p * gb + k));                        \
                ag4 = _mm_add_epi32(ag4, _mm_madd_epi16((__m128i)((bg >> (CB * p)) & M), xv));          \
                au4 = _mm_add_epi32(au4, _mm_madd_epi16((__m128i)((bu >> (CB * p)) & M), xv));          \
            }                                                                                            \
        }                                                                                                \
        /* 1-7 bytes left: zero-padded codes times the next 8 x (xq has 8 spare at its end). Kept apart from \
           the 8-byte loop: folding the two together measured 1.2-1.4x slower at 4 bits, groups of 56. */  \
        if (k < gb) {                                                                                    \
            uint64_t tg = 0, tu = 0;                                                                     \
            memcpy(&tg, pg + k, (size_t)(gb - k)); memcpy(&tu, pu + k, (size_t)(gb - k));               \
            i16x8 bg = (i16x8)_mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)tg));                       \
            i16x8 bu = (i16x8)_mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)tu));                       \
            for (int p = 0; p < PPB; p++) {                                                              \
                __m128i xv = _mm_loadu_si128((const __m128i *)(xg + p * gb + k));                        \
                ag4 = _mm_add_epi32(ag4, _mm_madd_epi16((__m128i)((bg >> (CB * p)) & M), xv));          \
                au4 = _mm_add_epi32(au4, _mm_madd_epi16((__m128i)((bu >> (CB * p)) & M), xv));          \
            }                                                                                            \
        }                                                                                                \
        ag = _mm256_add_epi32(ag, _mm256_inserti128_si256(_mm256_setzero_si256(), ag4, 0));              \
        au = _mm256_add_epi32(au, _mm256_inserti128_si256(_mm256_setzero_si256(), au4, 0));              \
        float wg = bf16f(sg[g]) * sx[g], wu = bf16f(su[g]) * sx[g];                                      \
        v8 cg, cu; __m256 t0 = _mm256_cvtepi32_ps(ag), t1 = _mm256_cvtepi32_ps(au);                      \
        memcpy(&cg, &t0, sizeof cg); memcpy(&cu, &t1, sizeof cu);                                        \
        fg += cg * splat(wg);                                                                            \
        fu += cu * splat(wu);                                                                            \
        rg += bf16f(lg[g]) * xs[g];                                                                      \
        ru += bf16f(lu[g]) * xs[g];                                                                      \
    }                                                                                                    \
    *out_g = hsum(fg) + rg;                                                                              \
    *out_u = hsum(fu) + ru;                                                                              \
}
QDOT16(2)
QDOT16(4)
QDOT16(8)
#endif

/* Channel c's shadow gate and up rows dotted with token t's x (one pass: the int16 path shares x). */
static inline void shadow_dots(const args_t *A, long c, int t, float *g, float *u) {
    const int ng = A->d / A->G;
    const long rb = A->d / (8 / A->cb);
    const uint8_t *qg = A->qg + c * rb, *qu = A->qu + c * rb;
    const uint16_t *sg = A->sg + c * ng, *lg = A->lg + c * ng, *su = A->su + c * ng, *lu = A->lu + c * ng;
    const float *xs = A->a + (size_t)t * ng;
#ifdef SHADOW_INT16
    if (A->xq) {
        const int16_t *xq = A->xq + (size_t)t * A->d;
        const float *sx = A->a + (size_t)(A->T + t) * ng;
        (A->cb == 2 ? qdot16_2 : A->cb == 4 ? qdot16_4 : qdot16_8)(qg, qu, xq, sx, xs, sg, lg, su, lu, A->d, A->G,
                                                                   g, u);
        return;
    }
#endif
    const float *x = A->x + (size_t)t * A->d;
    *g = qdot(qg, x, xs, sg, lg, A->d, A->G, A->cb);
    *u = qdot(qu, x, xs, su, lu, A->d, A->G, A->cb);
}
typedef void (*bank_fn)(const args_t *A, int b, float *yp, float *scr);

/* Opportunistic helpers instead of an OpenMP team. The caller never waits for a helper to wake
   up: banks are claimed from an atomic counter, so on a busy machine the caller simply does more
   of them, and at the end it only waits for banks a helper has already claimed (one bank is tens
   of microseconds). An OpenMP region (tried, in torch's own libgomp team) instead waits at its
   barriers for every thread to be scheduled: up to ~10 ms per call on a shared 2-core machine, and
   end-to-end decode came out slower than with these helpers in side-by-side runs.
   Determinism: the banks are cut into N_CHUNKS fixed chunks, each summed into its own partial, and
   the partials are added in chunk order, so y does not depend on which thread ran what, nor on
   how many threads there were (the thread count changes from call to call, see _ThreadChooser). */
#define MAX_SLOTS 64
#define N_CHUNKS 8
#define UPC_SPIN 200 /* pauses a helper spins before sleeping: sleepers get the CPU back fastest */
static struct {
    pthread_mutex_t call_lock, mu;
    pthread_cond_t cv;
    pid_t pid;
    int n_helpers;
    atomic_long seq;
    atomic_int next, active, closed, ready, sleepers;
    int n_items, n_chunks;
    atomic_int max_slot;
    bank_fn fn;
    const args_t *args;
    float *part[N_CHUNKS], *scr[MAX_SLOTS];
    size_t part_cap[N_CHUNKS], scr_cap[MAX_SLOTS], part_len;
} P = {.call_lock = PTHREAD_MUTEX_INITIALIZER, .mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};

static void run_chunks(int slot) {
    int c;
    while ((c = atomic_fetch_add(&P.next, 1)) < P.n_chunks) {
        memset(P.part[c], 0, P.part_len * sizeof(float));
        int b1 = (int)((long)(c + 1) * P.n_items / P.n_chunks);
        for (int b = (int)((long)c * P.n_items / P.n_chunks); b < b1; b++) P.fn(P.args, b, P.part[c], P.scr[slot]);
    }
}

static void *helper_main(void *arg) {
    int slot = (int)(intptr_t)arg;
    long seen = atomic_load(&P.seq);
    for (;;) {
        long s = atomic_load(&P.seq);
        for (int i = 0; s == seen && i < UPC_SPIN; i++) { cpu_relax(); s = atomic_load(&P.seq); }
        if (s == seen) {
            pthread_mutex_lock(&P.mu);
            atomic_fetch_add(&P.sleepers, 1);
            while ((s = atomic_load(&P.seq)) == seen) pthread_cond_wait(&P.cv, &P.mu);
            atomic_fetch_sub(&P.sleepers, 1);
            pthread_mutex_unlock(&P.mu);
        }
        seen = s;
        atomic_fetch_add(&P.active, 1);  /* from here the caller waits for us: keep it short */
        if (!atomic_load(&P.closed) && slot < atomic_load(&P.max_slot)) {
            while (!atomic_load(&P.ready) && !atomic_load(&P.closed)) cpu_relax();
            if (!atomic_load(&P.closed)) run_chunks(slot);
        }
        atomic_fetch_sub(&P.active, 1);
    }
    return NULL;
}

static int grow(float **buf, size_t *cap, size_t n) {
    if (*cap >= n) return 0;
    float *p = realloc(*buf, n * sizeof(float));
    if (!p) return 1;
    *buf = p; *cap = n;
    return 0;
}

static void wait_idle(void) {
    for (int i = 0; atomic_load(&P.active) > 0; i++) { if (i < 4096) cpu_relax(); else sched_yield(); }
}

/* Runs fn over the nb banks on the caller plus up to nthreads-1 helpers; prologue(A) (the
   predictor's in-projection) runs on the caller while helpers wake up. y = sum of partials. */
static int run_job(bank_fn fn, void (*prologue)(args_t *), args_t *A, size_t scratch, float *y, int nthreads) {
    pthread_mutex_lock(&P.call_lock);
    if (P.pid != getpid()) {  /* first call, or a forked child: its helpers did not survive the fork */
        pthread_mutex_init(&P.mu, NULL); pthread_cond_init(&P.cv, NULL);
        P.pid = getpid(); P.n_helpers = 0;
        atomic_store(&P.active, 0); atomic_store(&P.sleepers, 0); atomic_store(&P.closed, 1);
    }
    if (nthreads > MAX_SLOTS) nthreads = MAX_SLOTS;
    while (P.n_helpers < nthreads - 1) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&th, &attr, helper_main, (void *)(intptr_t)(P.n_helpers + 1));
        pthread_attr_destroy(&attr);
        if (rc) break;
        P.n_helpers++;
    }
    if (nthreads > P.n_helpers + 1) nthreads = P.n_helpers + 1;
    wait_idle();  /* a late helper of the previous call may still be leaving */
    size_t part_len = (size_t)A->T * A->d;
    int n_chunks = A->nb < N_CHUNKS ? A->nb : N_CHUNKS;
    for (int s = 0; s < nthreads || s < n_chunks; s++) {
        if ((s < n_chunks && grow(&P.part[s], &P.part_cap[s], part_len))
            || (s < nthreads && grow(&P.scr[s], &P.scr_cap[s], scratch))) {
            pthread_mutex_unlock(&P.call_lock);
            return 2;
        }
    }
    P.part_len = part_len; P.n_items = A->nb; P.n_chunks = n_chunks; P.fn = fn; P.args = A;
    atomic_store(&P.max_slot, nthreads);
    atomic_store(&P.next, 0); atomic_store(&P.ready, 0); atomic_store(&P.closed, 0);
    if (nthreads > 1) {
        atomic_fetch_add(&P.seq, 1);
        if (atomic_load(&P.sleepers) > 0) {
            pthread_mutex_lock(&P.mu); pthread_cond_broadcast(&P.cv); pthread_mutex_unlock(&P.mu);
        }
    }
    prologue(A);
    atomic_store(&P.ready, 1);
    run_chunks(0);
    atomic_store(&P.closed, 1);
    wait_idle();
    for (size_t i = 0; i < part_len; i++) {
        float s = 0.f;
        for (int c = 0; c < n_chunks; c++) s += P.part[c][i];
        y[i] = s;
    }
    pthread_mutex_unlock(&P.call_lock);
    return 0;
}
"""

# One copy per weight type: SUF names it, LD / LD1 load 8 / 1 weights as float32, ESZ is the element size.
_C_BODY = r"""
static inline float dot_SUF(const char *w, const float *restrict x, int n) {
    v8 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};  /* independent chains keep the FMA pipes busy */
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 += LD(w + (long)i * ESZ) * *(const v8 *)(x + i);
        s1 += LD(w + (long)(i + 8) * ESZ) * *(const v8 *)(x + i + 8);
        s2 += LD(w + (long)(i + 16) * ESZ) * *(const v8 *)(x + i + 16);
        s3 += LD(w + (long)(i + 24) * ESZ) * *(const v8 *)(x + i + 24);
    }
    for (; i + 8 <= n; i += 8) s0 += LD(w + (long)i * ESZ) * *(const v8 *)(x + i);
    float s = hsum((s0 + s1) + (s2 + s3));
    for (; i < n; i++) s += LD1(w, i) * x[i];
    return s;
}

static inline void axpy_SUF(float *restrict y, float h, const char *w, int n) {
    v8 hv = splat(h);
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        *(v8 *)(y + i) += hv * LD(w + (long)i * ESZ);
        *(v8 *)(y + i + 8) += hv * LD(w + (long)(i + 8) * ESZ);
    }
    for (; i < n; i++) y[i] += h * LD1(w, i);
}

/* Four channels at once (one token): 8 gate/up rows stream side by side, sharing each x load,
   then one pass over y adds all four down rows (4x fewer y loads/stores than four axpys).
   pf_down: prefetch the down rows during the gate/up pass (split layout: they live elsewhere; about
   7% faster there, measured, and nothing to gain for bundled rows, which the hardware prefetches). */
static inline void quad_SUF(float *restrict y, const float *restrict x, int n, const char *const g[4],
                            const char *const u[4], const char *const dn[4], const float gate[4], int pf_down) {
    v8 ag[4] = {{0}}, au[4] = {{0}};
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        v8 xv = *(const v8 *)(x + i);
        long o = (long)i * ESZ;
        if (pf_down && (o & 63) == 0)
            for (int j = 0; j < 4; j++) __builtin_prefetch(dn[j] + o, 0, 3);
        for (int j = 0; j < 4; j++) {
            ag[j] += LD(g[j] + o) * xv;
            au[j] += LD(u[j] + o) * xv;
        }
    }
    float h[4];
    for (int j = 0; j < 4; j++) {
        float gs = hsum(ag[j]), us = hsum(au[j]);
        for (int k = i; k < n; k++) { gs += LD1(g[j], k) * x[k]; us += LD1(u[j], k) * x[k]; }
        h[j] = silu(gs) * us * gate[j];
    }
    v8 h0 = splat(h[0]), h1 = splat(h[1]), h2 = splat(h[2]), h3 = splat(h[3]);
    for (i = 0; i + 8 <= n; i += 8) {
        long o = (long)i * ESZ;
        *(v8 *)(y + i) += (h0 * LD(dn[0] + o) + h1 * LD(dn[1] + o)) + (h2 * LD(dn[2] + o) + h3 * LD(dn[3] + o));
    }
    for (; i < n; i++)
        y[i] += h[0] * LD1(dn[0], i) + h[1] * LD1(dn[1], i) + h[2] * LD1(dn[2], i) + h[3] * LD1(dn[3], i);
}

static void prologue_SUF(args_t *A) {
    float *a = (float *)A->a;
    if (A->qg) {  /* per token and group: the sum of x; with int16 dots also the scale and codes of x */
        const int ng = A->d / A->G;
        for (int t = 0; t < A->T; t++)
            for (int g = 0; g < ng; g++) {
                const float *xg = A->x + (size_t)t * A->d + (size_t)g * A->G;
                float s = 0.f, amax = 0.f;
                for (int i = 0; i < A->G; i++) { s += xg[i]; amax = fmaxf(amax, fabsf(xg[i])); }
                a[(size_t)t * ng + g] = s;
                if (A->xq) {
                    float inv = amax > 0.f ? 32767.f / amax : 0.f;
                    int16_t *q = A->xq + (size_t)t * A->d + (size_t)g * A->G;
                    for (int i = 0; i < A->G; i++) q[i] = (int16_t)lrintf(xg[i] * inv);
                    a[(size_t)(A->T + t) * ng + g] = amax / 32767.f;
                }
            }
        return;
    }
    for (int t = 0; t < A->T; t++)
        for (int j = 0; j < A->r; j++)
            a[(size_t)t * A->r + j] = dot_SUF(A->win + (long)j * A->d * ESZ, A->x + (size_t)t * A->d, A->d);
}

/* One bank: its logits for every token, the top-keep per token, then the kept rows' work. */
static void bank_SUF(const args_t *A, int b, float *yp, float *scr) {
    const int T = A->T, d = A->d, r = A->r, bank = A->bank, keep = A->keep;
    float *z = scr, *gate = z + bank, *kv = gate + (size_t)T * bank;
    int *ki = (int *)(kv + keep), *list = ki + keep;
    size_t off = (size_t)bank * (2 + T) + 2 * (size_t)keep + bank;
    uint64_t *mb = (uint64_t *)(scr + off + (off & 1));  /* 8-byte aligned */
    int c0 = b * bank;
    memset(mb, 0, sizeof(uint64_t) * bank);
    for (int t = 0; t < T; t++) {
        if (A->qg) {
            for (int i = 0; i < bank; i++) {
                float g, u;
                shadow_dots(A, c0 + i, t, &g, &u);
                z[i] = fabsf(silu(g) * u);
            }
        } else {
            for (int i = 0; i < bank; i++)
                z[i] = dot_SUF(A->wout + (long)(c0 + i) * r * ESZ, A->a + (size_t)t * r, r)
                       + (A->bout ? LD1(A->bout, c0 + i) : 0.f);
        }
        /* top-keep: a running set of the best seen, replacing its minimum (ties: lower index) */
        for (int i = 0; i < keep; i++) { kv[i] = z[i]; ki[i] = i; }
        int mp = 0;
        for (int i = 1; i < keep; i++) if (kv[i] < kv[mp]) mp = i;
        for (int i = keep; i < bank; i++) {
            if (z[i] > kv[mp]) {
                kv[mp] = z[i]; ki[mp] = i; mp = 0;
                for (int q = 1; q < keep; q++) if (kv[q] < kv[mp]) mp = q;
            }
        }
        float *gt = gate + (size_t)t * bank;
        for (int q = 0; q < keep; q++) {
            int i = ki[q];
            mb[i] |= 1ull << t;
            gt[i] = A->use_sigmoid ? 2.f / (1.f + expf(-A->alpha * z[i])) : 1.f;
        }
        if (A->idx_out) {
            int32_t *o = A->idx_out + (size_t)t * A->K + (size_t)b * keep;
            for (int i = 0, n = 0; i < bank; i++) if (mb[i] >> t & 1ull) o[n++] = c0 + i;
        }
    }
    int nk = 0;
    for (int i = 0; i < bank; i++) if (mb[i]) list[nk++] = i;
    int q = 0;
    if (T == 1) {
        /* split layout: a channel's down row is not right after its up row, so prefetch it */
        int pf_down = !(A->wdt == A->wu + (long)d * ESZ && A->ldd == A->ldu);
        for (; q + 4 <= nk; q += 4) {
            const char *g4[4], *u4[4], *d4[4];
            float gv[4];
            for (int j = 0; j < 4; j++) {
                long c = c0 + list[q + j];
                g4[j] = A->wg + c * A->ldg * ESZ; u4[j] = A->wu + c * A->ldu * ESZ; d4[j] = A->wdt + c * A->ldd * ESZ;
                gv[j] = gate[list[q + j]];
            }
            quad_SUF(yp, A->x, d, g4, u4, d4, gv, pf_down);
        }
    }
    /* Several tokens: each kept row is read once, for every token that kept it. */
    for (; q < nk; q++) {
        int i = list[q];
        uint64_t m = mb[i];
        long c = c0 + i;
        const char *g_row = A->wg + c * A->ldg * ESZ, *u_row = A->wu + c * A->ldu * ESZ;
        const char *d_row = A->wdt + c * A->ldd * ESZ;
        for (int t = 0; t < T; t++) {
            if (!(m >> t & 1ull)) continue;
            const float *xt = A->x + (size_t)t * d;
            float h = silu(dot_SUF(g_row, xt, d)) * dot_SUF(u_row, xt, d) * gate[(size_t)t * bank + i];
            axpy_SUF(yp + (size_t)t * d, h, d_row, d);
        }
    }
}

/* x [T,d] f32; predictor win [r,d], wout [d_ff,r], bout [d_ff] or NULL; wg/wu/wdt: d_ff rows of d
   weights with row strides ldg/ldu/ldd (wdt = W_down^T). y [T,d] f32; idx_out [T, n_banks*keep]
   int32 or NULL. Shadow predictor instead of win/wout (qg != NULL): qg/qu [d_ff, d*cb/8] packed
   codes, sg/lg/su/lu [d_ff, d/G] bf16 scale and minimum. Returns 0, or nonzero on bad arguments /
   out of memory. */
int upc_decode_SUF(const float *x, int T, int d, int dff, int r, const char *win, const char *wout,
                   const char *bout, const char *wg, long ldg, const char *wu, long ldu,
                   const char *wdt, long ldd, int bank, int keep, int use_sigmoid, float alpha,
                   float *y, int32_t *idx_out, int nthreads, const uint8_t *qg, const uint8_t *qu,
                   const uint16_t *sg, const uint16_t *lg, const uint16_t *su, const uint16_t *lu, int cb, int G) {
    if (T < 1 || T > 64 || bank < 1 || dff % bank || keep > bank || keep < 1 || nthreads < 1) return 1;
    if (qg && (!qu || !sg || !lg || !su || !lu || (cb != 2 && cb != 4 && cb != 8) || G < 1 || d % G
               || G % (8 / cb) || use_sigmoid)) return 1;
    size_t per_token = qg ? 2 * (size_t)(d / G) : (size_t)r;
    float *a = malloc(sizeof(float) * ((size_t)T * per_token + 1));
    int16_t *xq = NULL;
#ifdef SHADOW_INT16
    if (qg && G <= 2048 && !getenv("UPCYCLE_SHADOW_FLOAT_DOTS")) xq = calloc((size_t)T * d + 8, sizeof(int16_t));
#endif
    if (!a) { free(xq); return 2; }  /* xq NULL: float dots */
    args_t A = {x, a, T, d, dff, r, bank, keep, use_sigmoid, dff / bank, ldg, ldu, ldd,
                (long)(dff / bank) * keep, alpha, win, wout, bout, wg, wu, wdt, idx_out,
                qg, qu, sg, lg, su, lu, cb, G, xq};
    /* per-slot scratch, in floats: z, gate [T*bank], kv, ki, list, mask bits (uint64 per channel) */
    size_t scratch = (size_t)bank * (T + 5) + 2 * (size_t)keep + 2;
    int rc = run_job(bank_SUF, prologue_SUF, &A, scratch, y, nthreads);
    free(a);
    free(xq);
    return rc;
}
"""


def _c_source() -> str:
    def body(suf: str, es: int) -> str:
        return (
            _C_BODY.replace("dot_SUF", f"dot_{suf}")
            .replace("axpy_SUF", f"axpy_{suf}")
            .replace("quad_SUF", f"quad_{suf}")
            .replace("prologue_SUF", f"prologue_{suf}")
            .replace("bank_SUF", f"bank_{suf}")
            .replace("upc_decode_SUF", f"upc_decode_{suf}")
            .replace("LD1(", f"ld1_{suf}(")
            .replace("LD(", f"ld_{suf}(")
            .replace("ESZ", str(es))
        )

    f16 = "#if defined(__FLT16_MAX__)\n" + body("f16", 2) + "#endif\n"  # needs a compiler with _Float16
    return _C_PRELUDE + body("f32", 4) + body("bf16", 2) + f16 + "int upc_abi_version(void) { return 5; }\n"


_C_SOURCE = _c_source()

_CFLAGS = ["-O3", "-shared", "-fPIC", "-pthread", "-fno-math-errno", "-std=gnu11"]
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


def _compile(cc: str, flags: list[str], so: Path) -> None:
    so.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=so.parent) as tmp:
        src = Path(tmp) / "kernel.c"
        src.write_text(_C_SOURCE)
        tmp_so = Path(tmp) / "kernel.so"
        proc = subprocess.run([cc, *flags, str(src), "-o", str(tmp_so)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp_so, so)  # atomic: concurrent builders never see a partial file


def _build() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (gcc, cc or clang) on PATH")
    flags = _CFLAGS + _arch_flags()
    key = hashlib.sha256("\0".join([_C_SOURCE, cc, *flags, _cpu_id(), platform.machine()]).encode()).hexdigest()
    so = _cache_dir() / f"bank_sparse_decode_{key[:16]}.so"
    if not so.exists():
        _compile(cc, flags, so)
    lib = ctypes.CDLL(str(so))
    P, I, L = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
    for suf in _SUFFIX.values():
        fn = getattr(lib, f"upc_decode_{suf}", None)
        if fn is None:  # float16 needs a compiler with _Float16
            continue
        fn.argtypes = [P, I, I, I, I, P, P, P, P, L, P, L, P, L, I, I, I, ctypes.c_float, P, P, I,
                       P, P, P, P, P, P, I, I]
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

    EXPLORE = 16  # every 16th call of a shape runs the other choice
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


def _threads(work: int) -> int:
    """Upper bound on threads: UPCYCLE_CPU_THREADS, else torch's; tiny FFNs (tests, toys) use one."""
    env = os.environ.get("UPCYCLE_CPU_THREADS")
    if env:
        return max(1, int(env))
    return torch.get_num_threads() if work >= 1 << 18 else 1


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
) -> Tensor:
    """Fused CPU decode: x [T, d] -> y [T, d] (x's dtype). CPU weights of one dtype.

    w_gate, w_up [d_ff, d] and w_down_t (the transposed down projection) [d_ff, d] need unit stride
    within a row but may have any row stride (e.g. views of one [d_ff, 3d] bundle); the predictor
    weights must be contiguous. `gate_scale` None is the `ste` gate (1 on kept channels), a float
    alpha the `sigmoid` gate 2 * sigmoid(alpha * logit). `out` (float32, [T, d]) and `idx_out`
    (int32, [T, n_banks * keep], ascending per bank) are optional outputs. `num_threads` None: up to
    torch.get_num_threads() (or UPCYCLE_CPU_THREADS), 1 or all chosen per call shape by measured time.
    `shadow` (a `pack_shadow` result) replaces the low-rank predictor (w_in, w_out, b_out are then None).
    """
    lib = fused_library()
    if lib is None:
        raise RuntimeError(f"fused CPU kernel unavailable: {_lib_error}")
    T, d = x.shape
    d_ff, r = (w_gate.shape[0], 0) if shadow is not None else w_out.shape
    dtype = w_gate.dtype
    pred = () if shadow is not None else (w_in, w_out) + (() if b_out is None else (b_out,))
    ws = (w_gate, w_up, w_down_t) + pred
    if any(w.dtype != dtype or w.device.type != "cpu" for w in ws) or dtype not in _supported:
        raise ValueError(f"fused_sparse_decode: weights must be CPU tensors of one supported dtype ({dtype})")
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
    adaptive = num_threads is None and not os.environ.get("UPCYCLE_CPU_THREADS")
    n_max = num_threads or _threads(T * d * d_ff)
    key = (T, d, d_ff, keep, dtype, w_down_t.stride(0), None if shadow is None else shadow.container_bits)
    n = _chooser.pick(key, n_max) if adaptive and n_max > 1 else n_max
    t0 = time.perf_counter()
    sh = shadow
    shadow_args = ((None,) * 6 + (0, 0)) if sh is None else (
        sh.gate_codes.data_ptr(), sh.up_codes.data_ptr(), sh.gate_scale.data_ptr(), sh.gate_lo.data_ptr(),
        sh.up_scale.data_ptr(), sh.up_lo.data_ptr(), sh.container_bits, sh.group_size)
    rc = fn(
        xf.data_ptr(), T, d, d_ff, r, _ptr(w_in), _ptr(w_out), _ptr(b_out),
        w_gate.data_ptr(), w_gate.stride(0), w_up.data_ptr(), w_up.stride(0), w_down_t.data_ptr(), w_down_t.stride(0),
        bank_size, keep, int(gate_scale is not None), 0.0 if gate_scale is None else float(gate_scale),
        y.data_ptr(), _ptr(idx_out), n, *shadow_args,
    )  # fmt: skip
    if adaptive and n_max > 1:
        _chooser.record(key, n, time.perf_counter() - t0)
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


shadow_sparse_decode_op = shadow_decode_op(
    "bank_sparse_shadow_decode_cpu",
    lambda x, w_gate, w_up, w_down_t, pack, bank_size, keep: fused_sparse_decode(
        x, w_gate, w_up, w_down_t, None, None, None, bank_size, keep, shadow=pack),
)
