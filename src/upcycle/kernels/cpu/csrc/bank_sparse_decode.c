/* Fused CPU decode kernel of the bank-sparse SwiGLU FFN (see upcycle/kernels/cpu/__init__.py).

   Built on first use with the system C compiler (-O3 -march=native) and loaded with ctypes. Per bank:
   the predictor's logits (low-rank, or a low-bit shadow of gate/up), the bank's top `keep`, then the
   kept channels' gate row, up row and down column streamed once for every token that kept them. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <unistd.h>

/* Everything one call needs, passed as one struct (mirrored by upcycle.kernels.cpu.DecodeArgs).
   x [T, d] f32 and y [T, d] f32; idx_out [T, n_banks * keep] int32 or NULL. Predictor: low-rank
   win [r, d], wout [d_ff, r], bout [d_ff] or NULL in the weight type; or a shadow (qg != NULL):
   qg/qu [d_ff, d * cb / 8] packed codes, sg/lg/su/lu [d_ff, d / G] bf16 scale and minimum.
   wg / wu / wdt: d_ff rows of d weights with row strides ldg / ldu / ldd (wdt = W_down^T).
   int_dots: score a shadow with int16 dot products where the CPU has them (else float dots). */
typedef struct {
    const float *x;
    float *y;
    int32_t *idx_out;
    const char *win, *wout, *bout;
    const char *wg, *wu, *wdt;
    const uint8_t *qg, *qu;
    const uint16_t *sg, *lg, *su, *lu;
    long ldg, ldu, ldd;
    int T, d, dff, r, bank, keep, use_sigmoid, nthreads, cb, G, int_dots;
    float alpha;
} upc_decode_args;

int upc_args_size(void) { return (int)sizeof(upc_decode_args); }

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

#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define FN(name) CAT(name, SUF)

#define SUF f32
#define LD ld_f32
#define LD1 ld1_f32
#define ESZ 4
#include "bank_sparse_decode_body.h"
#undef SUF
#undef LD
#undef LD1
#undef ESZ

#define SUF bf16
#define LD ld_bf16
#define LD1 ld1_bf16
#define ESZ 2
#include "bank_sparse_decode_body.h"
#undef SUF
#undef LD
#undef LD1
#undef ESZ

#if defined(__FLT16_MAX__) /* float16 weights need a compiler with _Float16 */
#define SUF f16
#define LD ld_f16
#define LD1 ld1_f16
#define ESZ 2
#include "bank_sparse_decode_body.h"
#undef SUF
#undef LD
#undef LD1
#undef ESZ
#endif

int upc_abi_version(void) { return 6; }
