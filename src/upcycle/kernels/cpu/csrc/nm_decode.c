/*
 * nm_decode.c -- y[T, out] = x[T, in] @ W^T (+ bias) for a 2:4 sparse W in compressed form (N:M decode).
 *
 * Format (upcycle.kernels.nm_packing): per row o, the kept values vals[o, in/2] (fp32 or bf16) in column
 * order, and a 2-bit in-group position per kept value, four per byte, little-endian bit order:
 * kept value k of row o sits at column 4*(k/2) + ((idx[o*idx_stride + k/4] >> 2*(k%4)) & 3).
 *
 * Decode at batch 1 is memory-bound, so the kernel's job is to stream vals+idx once at full bandwidth:
 * x stays in L1, every row is read once for all tokens, accumulation is fp32.
 *
 * Paths, picked at run time from the CPU (upc_nm24_paths uses __builtin_cpu_supports, which also checks
 * that the OS saves the register state): AVX-512F, AVX2+FMA, and portable C. The SIMD bodies carry
 * target attributes, so they exist whatever -march the file is built with; UPC_NM_NO_SIMD builds the
 * portable C only, as on a non-x86 machine (tested). A forced path the CPU lacks is an error, never a
 * silent fallback.
 *
 * Threads: rows are cut into fixed chunks claimed from an atomic counter by the caller and up to
 * nthreads-1 opportunistic helpers (the pattern of bank_sparse_decode.c: on a busy machine the caller
 * does more chunks itself instead of waiting for a helper to be scheduled). Each output row is computed
 * by exactly one thread with the same code, so y does not depend on the thread count.
 */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#if (defined(__x86_64__) || defined(__i386__)) && !defined(UPC_NM_NO_SIMD)
#include <immintrin.h>
#define NM_X86 1
#else
#define NM_X86 0
#endif

/* Software prefetch distance (bytes ahead in the values stream; 0 disables). Cold-cache decode on a
 * Xeon ran 1.2-1.7x faster with it (2048-8192 all similar): the hardware prefetcher alone did not keep
 * enough misses in flight for one core. Prefetches never fault, so running past the end is harmless. */
#ifndef NM_PF_BYTES
#define NM_PF_BYTES 4096
#endif
#define NM_PF_HINT _MM_HINT_T1 /* into L2: leaves L1 to x */

enum { NM_FP32 = 0, NM_BF16 = 1 };
enum { PATH_AUTO = 0, PATH_SCALAR = 1, PATH_AVX2 = 2, PATH_AVX512 = 3 };
enum { OK = 0, ERR_ARGS = -1, ERR_PATH = -2, ERR_MEM = -3 };

/* The one argument block; must match NMArgs in upcycle/kernels/cpu/nm.py field for field. */
typedef struct {
    const float *x;      /* [T, in] fp32, contiguous */
    const void *vals;    /* [out, in/2] fp32 or bf16 bits (uint16), contiguous */
    const uint8_t *idx;  /* [out, idx_stride] packed 2-bit positions */
    const float *bias;   /* [out] or NULL */
    float *y;            /* [T, out] fp32, contiguous */
    int64_t T, in, out, idx_stride;
    int32_t dtype, path, nthreads;
} upc_nm_args;

int upc_nm_abi_version(void) { return 1; }
int upc_nm_args_size(void) { return (int)sizeof(upc_nm_args); }

/* The per-call context the row workers read: the arguments plus x rearranged for the AVX2 path. */
typedef struct {
    const upc_nm_args *a;
    const float *xs;
} nm_ctx;

static inline float bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float load_val(const void *vals, int32_t dtype, int64_t i) {
    return dtype == NM_FP32 ? ((const float *)vals)[i] : bf16_to_f32(((const uint16_t *)vals)[i]);
}

static inline int kept_col(const uint8_t *idx_row, int64_t k) {
    return (int)(4 * (k / 2) + ((idx_row[k / 4] >> (2 * (k % 4))) & 3));
}

/* Adds kept values [k0, K) of row o to acc[t] for tokens t0..t0+nt: the portable path and the SIMD tails. */
static inline void tail_scalar(const upc_nm_args *a, int64_t o, int64_t k0, int64_t t0, int nt, float *acc) {
    const int64_t K = a->in / 2;
    const uint8_t *ir = a->idx + o * a->idx_stride;
    for (int64_t k = k0; k < K; k++) {
        const float w = load_val(a->vals, a->dtype, o * K + k);
        const int c = kept_col(ir, k);
        for (int t = 0; t < nt; t++) acc[t] += w * a->x[(t0 + t) * a->in + c];
    }
}

static inline void store_row(const upc_nm_args *a, int64_t o, int64_t t0, int nt, const float *acc) {
    const float b = a->bias ? a->bias[o] : 0.0f;
    for (int t = 0; t < nt; t++) a->y[(t0 + t) * a->out + o] = acc[t] + b;
}

/* ---------------------------------------------------------------- portable C */
static void rows_scalar(const nm_ctx *c, int64_t o0, int64_t o1) {
    enum { TB = 16 };
    const upc_nm_args *a = c->a;
    for (int64_t o = o0; o < o1; o++) {
        for (int64_t t0 = 0; t0 < a->T; t0 += TB) {
            const int nt = (int)(a->T - t0 < TB ? a->T - t0 : TB);
            float acc[TB] = {0};
            tail_scalar(a, o, 0, t0, nt, acc);
            store_row(a, o, t0, nt, acc);
        }
    }
}

#if NM_X86
/* ---------------------------------------------------------------- AVX-512 (16 kept values per step) */
#define AVX512_ATTR __attribute__((target("avx512f,fma")))
#define AVX512_INLINE static inline __attribute__((always_inline, target("avx512f,fma")))

AVX512_INLINE __m512 vals16(const void *vals, int32_t dtype, int64_t i) {
    if (dtype == NM_FP32) return _mm512_loadu_ps((const float *)vals + i);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)vals + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* 16 two-bit positions (4 bytes) -> lane k selects column 4*(k/2) + pos_k of a 32-wide x window. */
AVX512_INLINE __m512i cols16(const uint8_t *p) {
    int32_t bits;
    memcpy(&bits, p, 4);
    const __m512i sh = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
    __m512i pos = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(bits), sh), _mm512_set1_epi32(3));
    return _mm512_or_si512(pos, base); /* base has its two low bits clear: and+or fuse to vpternlogd */
}

/* RB rows x NT tokens, all accumulators in registers; RB and NT are compile-time constants. */
AVX512_INLINE void block_avx512(const upc_nm_args *a, int64_t o, int64_t t0, const int RB, const int NT) {
    const int64_t K = a->in / 2, nch = K / 16;
    __m512 acc[2][8];
#pragma GCC unroll 2
    for (int r = 0; r < RB; r++)
#pragma GCC unroll 8
        for (int t = 0; t < NT; t++) acc[r][t] = _mm512_setzero_ps();
    for (int64_t c = 0; c < nch; c++) {
        __m512 w[2];
        __m512i col[2];
#pragma GCC unroll 2
        for (int r = 0; r < RB; r++) {
            if (NM_PF_BYTES) {
                _mm_prefetch((const char *)a->vals + ((o + r) * K + 16 * c) * (a->dtype ? 2 : 4) + NM_PF_BYTES,
                             NM_PF_HINT);
                if ((c & 3) == 0) /* the index stream: 1/8 (bf16) or 1/16 (fp32) of the values' bytes */
                    _mm_prefetch((const char *)a->idx + (o + r) * a->idx_stride + 4 * c
                                 + NM_PF_BYTES / (a->dtype ? 8 : 16), NM_PF_HINT);
            }
            w[r] = vals16(a->vals, a->dtype, (o + r) * K + 16 * c);
            col[r] = cols16(a->idx + (o + r) * a->idx_stride + 4 * c);
        }
#pragma GCC unroll 8
        for (int t = 0; t < NT; t++) {
            const float *xt = a->x + (t0 + t) * a->in + 32 * c;
            const __m512 lo = _mm512_loadu_ps(xt), hi = _mm512_loadu_ps(xt + 16);
#pragma GCC unroll 2
            for (int r = 0; r < RB; r++)
                acc[r][t] = _mm512_fmadd_ps(w[r], _mm512_permutex2var_ps(lo, col[r], hi), acc[r][t]);
        }
    }
    for (int r = 0; r < RB; r++) {
        float s[8];
        for (int t = 0; t < NT; t++) s[t] = _mm512_reduce_add_ps(acc[r][t]);
        tail_scalar(a, o + r, 16 * nch, t0, NT, s);
        store_row(a, o + r, t0, NT, s);
    }
}

#define NT_CASES(F, RB)                                                                            \
    switch (nt) {                                                                                  \
    case 1: F(a, o, t0, RB, 1); break;                                                             \
    case 2: F(a, o, t0, RB, 2); break;                                                             \
    case 3: F(a, o, t0, RB, 3); break;                                                             \
    case 4: F(a, o, t0, RB, 4); break;                                                             \
    case 5: F(a, o, t0, RB, 5); break;                                                             \
    case 6: F(a, o, t0, RB, 6); break;                                                             \
    case 7: F(a, o, t0, RB, 7); break;                                                             \
    default: F(a, o, t0, RB, 8); break;                                                            \
    }

/* Two rows at a time share the x loads; token blocks of <= 8 keep 2x8 accumulators + temps inside the
 * 32 zmm registers. A row pair stays in L1 across token blocks. */
AVX512_ATTR static void rows_avx512(const nm_ctx *c, int64_t o0, int64_t o1) {
    const upc_nm_args *a = c->a;
    int64_t o = o0;
    for (; o + 2 <= o1; o += 2)
        for (int64_t t0 = 0; t0 < a->T; t0 += 8) {
            const int nt = (int)(a->T - t0 < 8 ? a->T - t0 : 8);
            NT_CASES(block_avx512, 2)
        }
    for (; o < o1; o++)
        for (int64_t t0 = 0; t0 < a->T; t0 += 8) {
            const int nt = (int)(a->T - t0 < 8 ? a->T - t0 : 8);
            NT_CASES(block_avx512, 1)
        }
}

/* ---------------------------------------------------------------- AVX2 (8 kept values per step) */
#define AVX2_ATTR __attribute__((target("avx2,fma")))
#define AVX2_INLINE static inline __attribute__((always_inline, target("avx2,fma")))

/* Why in-lane shuffles: vpermilps picks within a 128-bit lane (cheap on every x86, 1 cycle on AMD Zen)
 * and one lane holds exactly one group of 4 columns. x is rearranged once per call (shared by all rows
 * and threads) so that per 16 columns A = [group 0 | group 2] and B = [group 1 | group 3]; then 8 kept
 * values = blend(vpermilps(A, pos), vpermilps(B, pos)) with the 2-bit positions as the selectors. */
AVX2_ATTR static void arrange_x_avx2(const upc_nm_args *a, float *xs, int64_t nsub) {
    for (int64_t t = 0; t < a->T; t++)
        for (int64_t s = 0; s < nsub; s++) {
            const float *src = a->x + t * a->in + 16 * s;
            float *dst = xs + (t * nsub + s) * 16;
            const __m256 lo = _mm256_loadu_ps(src), hi = _mm256_loadu_ps(src + 8);
            _mm256_storeu_ps(dst, _mm256_permute2f128_ps(lo, hi, 0x20));     /* cols 0-3, 8-11 */
            _mm256_storeu_ps(dst + 8, _mm256_permute2f128_ps(lo, hi, 0x31)); /* cols 4-7, 12-15 */
        }
}

AVX2_INLINE __m256 vals8(const void *vals, int32_t dtype, int64_t i) {
    if (dtype == NM_FP32) return _mm256_loadu_ps((const float *)vals + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)vals + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

AVX2_INLINE float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* One step of 8 kept values (16 columns, sub-chunk S) for RB rows x NT tokens. */
#define AVX2_STEP(SEL, S)                                                                          \
    do {                                                                                           \
        __m256 w[2];                                                                               \
        for (int r = 0; r < RB; r++) w[r] = vals8(a->vals, a->dtype, (o + r) * K + 8 * (S));       \
        for (int t = 0; t < NT; t++) {                                                             \
            const float *xt = xs + ((t0 + t) * nsub + (S)) * 16;                                   \
            const __m256 A = _mm256_loadu_ps(xt), B = _mm256_loadu_ps(xt + 8);                     \
            for (int r = 0; r < RB; r++) {                                                         \
                const __m256 g = _mm256_blend_ps(_mm256_permutevar_ps(A, SEL[r]),                  \
                                                 _mm256_permutevar_ps(B, SEL[r]), 0xCC);           \
                acc[r][t] = _mm256_fmadd_ps(w[r], g, acc[r][t]);                                   \
            }                                                                                      \
        }                                                                                          \
    } while (0)

AVX2_INLINE void block_avx2(const upc_nm_args *a, const float *xs, int64_t o, int64_t t0, const int RB,
                            const int NT) {
    const int64_t K = a->in / 2, nsub = K / 8;
    const __m256i sh_lo = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    const __m256i sh_hi = _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30);
    __m256 acc[2][4];
    for (int r = 0; r < RB; r++)
        for (int t = 0; t < NT; t++) acc[r][t] = _mm256_setzero_ps();
    int64_t s = 0;
    for (; s + 2 <= nsub; s += 2) { /* 16 kept values: their 32 position bits in one broadcast */
        __m256i sel0[2], sel1[2];
        for (int r = 0; r < RB; r++) {
            if (NM_PF_BYTES) {
                _mm_prefetch((const char *)a->vals + ((o + r) * K + 8 * s) * (a->dtype ? 2 : 4) + NM_PF_BYTES,
                             NM_PF_HINT);
                if ((s & 7) == 0)
                    _mm_prefetch((const char *)a->idx + (o + r) * a->idx_stride + 2 * s
                                 + NM_PF_BYTES / (a->dtype ? 8 : 16), NM_PF_HINT);
            }
            int32_t bits;
            memcpy(&bits, a->idx + (o + r) * a->idx_stride + 2 * s, 4);
            const __m256i b = _mm256_set1_epi32(bits);
            sel0[r] = _mm256_srlv_epi32(b, sh_lo);
            sel1[r] = _mm256_srlv_epi32(b, sh_hi);
        }
        AVX2_STEP(sel0, s);
        AVX2_STEP(sel1, s + 1);
    }
    if (s < nsub) { /* odd last 8: only 2 bytes of positions are in bounds */
        __m256i sel0[2];
        for (int r = 0; r < RB; r++) {
            uint16_t bits;
            memcpy(&bits, a->idx + (o + r) * a->idx_stride + 2 * s, 2);
            sel0[r] = _mm256_srlv_epi32(_mm256_set1_epi32(bits), sh_lo);
        }
        AVX2_STEP(sel0, s);
    }
    for (int r = 0; r < RB; r++) {
        float sum[4];
        for (int t = 0; t < NT; t++) sum[t] = hsum8(acc[r][t]);
        tail_scalar(a, o + r, 8 * nsub, t0, NT, sum);
        store_row(a, o + r, t0, NT, sum);
    }
}

#define NT_CASES4(F, RB)                                                                           \
    switch (nt) {                                                                                  \
    case 1: F(a, xs, o, t0, RB, 1); break;                                                         \
    case 2: F(a, xs, o, t0, RB, 2); break;                                                         \
    case 3: F(a, xs, o, t0, RB, 3); break;                                                         \
    default: F(a, xs, o, t0, RB, 4); break;                                                        \
    }

/* 16 ymm registers: 2 rows x 4 tokens of accumulators + weights, selectors and x windows. */
AVX2_ATTR static void rows_avx2(const nm_ctx *c, int64_t o0, int64_t o1) {
    const upc_nm_args *a = c->a;
    const float *xs = c->xs;
    int64_t o = o0;
    for (; o + 2 <= o1; o += 2)
        for (int64_t t0 = 0; t0 < a->T; t0 += 4) {
            const int nt = (int)(a->T - t0 < 4 ? a->T - t0 : 4);
            NT_CASES4(block_avx2, 2)
        }
    for (; o < o1; o++)
        for (int64_t t0 = 0; t0 < a->T; t0 += 4) {
            const int nt = (int)(a->T - t0 < 4 ? a->T - t0 : 4);
            NT_CASES4(block_avx2, 1)
        }
}
#endif /* NM_X86 */

/* ---------------------------------------------------------------- the helper pool */
typedef void (*rows_fn)(const nm_ctx *, int64_t, int64_t);

#define NM_MAX_THREADS 64
#define NM_SPIN 200 /* pauses a helper spins before sleeping */
static struct {
    pthread_mutex_t call_lock, mu;
    pthread_cond_t cv;
    pid_t pid;
    int n_helpers;
    atomic_long seq;
    atomic_int next, active, closed, sleepers, max_slot;
    int n_chunks;
    int64_t rows;
    rows_fn fn;
    const nm_ctx *ctx;
} P = {.call_lock = PTHREAD_MUTEX_INITIALIZER, .mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Chunk boundaries are even, so the 2-row blocks are the same whatever thread runs a chunk. */
static inline int64_t chunk_start(int c) { return ((int64_t)c * P.rows / P.n_chunks) & ~(int64_t)1; }

static void run_chunks(void) {
    int c;
    while ((c = atomic_fetch_add(&P.next, 1)) < P.n_chunks) {
        const int64_t o1 = c + 1 == P.n_chunks ? P.rows : chunk_start(c + 1);
        P.fn(P.ctx, chunk_start(c), o1);
    }
}

static void *helper_main(void *arg) {
    int slot = (int)(intptr_t)arg;
    long seen = atomic_load(&P.seq);
    for (;;) {
        long s = atomic_load(&P.seq);
        for (int i = 0; s == seen && i < NM_SPIN; i++) { cpu_relax(); s = atomic_load(&P.seq); }
        if (s == seen) {
            pthread_mutex_lock(&P.mu);
            atomic_fetch_add(&P.sleepers, 1);
            while ((s = atomic_load(&P.seq)) == seen) pthread_cond_wait(&P.cv, &P.mu);
            atomic_fetch_sub(&P.sleepers, 1);
            pthread_mutex_unlock(&P.mu);
        }
        seen = s;
        atomic_fetch_add(&P.active, 1); /* from here the caller waits for us: keep it short */
        if (!atomic_load(&P.closed) && slot < atomic_load(&P.max_slot)) run_chunks();
        atomic_fetch_sub(&P.active, 1);
    }
    return NULL;
}

static void wait_idle(void) {
    for (int i = 0; atomic_load(&P.active) > 0; i++) { if (i < 4096) cpu_relax(); else sched_yield(); }
}

static void run_rows(rows_fn fn, const nm_ctx *ctx, int nthreads) {
    const upc_nm_args *a = ctx->a;
    if (nthreads <= 1 || a->out < 64) { fn(ctx, 0, a->out); return; }
    pthread_mutex_lock(&P.call_lock);
    if (P.pid != getpid()) { /* first call, or a forked child: its helpers did not survive the fork */
        pthread_mutex_init(&P.mu, NULL);
        pthread_cond_init(&P.cv, NULL);
        P.pid = getpid();
        P.n_helpers = 0;
        atomic_store(&P.active, 0); atomic_store(&P.sleepers, 0); atomic_store(&P.closed, 1);
    }
    if (nthreads > NM_MAX_THREADS) nthreads = NM_MAX_THREADS;
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
    wait_idle(); /* a late helper of the previous call may still be leaving */
    P.rows = a->out;
    P.n_chunks = (int)(a->out / 32 < 8 * nthreads ? a->out / 32 : 8 * nthreads);
    if (P.n_chunks < 1) P.n_chunks = 1;
    P.fn = fn;
    P.ctx = ctx;
    atomic_store(&P.max_slot, nthreads);
    atomic_store(&P.next, 0);
    atomic_store(&P.closed, 0);
    atomic_fetch_add(&P.seq, 1);
    if (atomic_load(&P.sleepers) > 0) {
        pthread_mutex_lock(&P.mu); pthread_cond_broadcast(&P.cv); pthread_mutex_unlock(&P.mu);
    }
    run_chunks();
    atomic_store(&P.closed, 1);
    wait_idle();
    pthread_mutex_unlock(&P.call_lock);
}

/* ---------------------------------------------------------------- entry points */
/* Bit mask of usable paths: bit p set <=> path p runs on this CPU and OS. */
int upc_nm_paths(void) {
    int m = 1 << PATH_SCALAR;
#if NM_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) m |= 1 << PATH_AVX2;
    if (__builtin_cpu_supports("avx512f")) m |= 1 << PATH_AVX512;
#endif
    return m;
}

int upc_nm24_linear(const upc_nm_args *a) {
    if (!a || !a->x || !a->vals || !a->idx || !a->y || a->T < 1 || a->in < 4 || a->in % 4 || a->out < 1 ||
        a->idx_stride < (a->in / 2 + 3) / 4 || (a->dtype != NM_FP32 && a->dtype != NM_BF16))
        return ERR_ARGS;
    const int avail = upc_nm_paths();
    int path = a->path;
    if (path == PATH_AUTO)
        /* AVX2 first: on the AVX-512 Xeon measured (bench/results/nm_decode_cpu.md) the 512-bit path was slower
           at decode shapes (batch 1, fp32 gate/up: 1.23x dense vs 1.57x for AVX2; down 0.99x vs 1.43x; bf16
           1.82x vs 2.70x), its wider gathers costing more than they save; AVX-512 stays selectable. */
        path = (avail & (1 << PATH_AVX2)) ? PATH_AVX2 : (avail & (1 << PATH_AVX512)) ? PATH_AVX512 : PATH_SCALAR;
    if (path < PATH_SCALAR || path > PATH_AVX512 || !(avail & (1 << path))) return ERR_PATH;
    nm_ctx ctx = {a, NULL};
    rows_fn fn = rows_scalar;
#if NM_X86
    float *xs = NULL;
    if (path == PATH_AVX512) fn = rows_avx512;
    if (path == PATH_AVX2) {
        const int64_t nsub = a->in / 16;
        xs = malloc((size_t)(a->T * nsub * 16 + 1) * sizeof(float));
        if (!xs) return ERR_MEM;
        arrange_x_avx2(a, xs, nsub);
        ctx.xs = xs;
        fn = rows_avx2;
    }
#endif
    run_rows(fn, &ctx, a->nthreads);
#if NM_X86
    free(xs);
#endif
    return OK;
}
