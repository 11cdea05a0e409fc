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
   dot_path: how a shadow is scored (UPC_DOTS_*: 0 = the best integer path this CPU has, 1 = float dots);
   lin_path: the same for int8 rows' gate/up dots (upc_decode_i8, one token, d % 64 == 0).
   ws: float32 [d_ff] per-channel weights of a shadow's scores (a learned log-score bias, exp'd), or NULL.
   scg / scu / scd: float32 [d_ff] per-row scales of int8 weights (upc_decode_i8: row c of wg / wu / wdt is
   q * scale[c]); NULL for float weights.
   q4g / q4u / q4d: 4-bit rows instead (upc_decode_q4): gate, up and W_down^T as [d_ff, d / 2] codes packed like a
   4-bit shadow's, with bf16 scale and minimum [d_ff, d / G4] each (q4sg/q4lg, q4su/q4lu, q4sd/q4ld). */
typedef struct {
    const float *x;
    float *y;
    int32_t *idx_out;
    const char *win, *wout, *bout;
    const char *wg, *wu, *wdt;
    const uint8_t *qg, *qu;
    const uint16_t *sg, *lg, *su, *lu;
    const float *ws;
    const float *scg, *scu, *scd;
    long ldg, ldu, ldd;
    int T, d, dff, r, bank, keep, use_sigmoid, nthreads, cb, G, dot_path, lin_path;
    float alpha;
    const uint8_t *q4g, *q4u, *q4d;
    const uint16_t *q4sg, *q4lg, *q4su, *q4lu, *q4sd, *q4ld;
    int G4, q4_path;
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

typedef int8_t i8x8 __attribute__((vector_size(8), aligned(1)));
#if defined(__AVX2__)
#include <immintrin.h>
/* sign-extend 8 bytes to int32 lanes, then convert: GCC compiles the generic conversion below to scalar
   byte loads and inserts (measured 2.5x slower) */
static inline v8 ld_i8(const void *p) {
    __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
    v8 v; memcpy(&v, &f, sizeof v); return v;
}
#else
static inline v8 ld_i8(const void *p) { return __builtin_convertvector(*(const i8x8 *)p, v8); }
#endif
static inline float ld1_i8(const void *p, long i) { return (float)((const int8_t *)p)[i]; }

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
    const float *ws;  /* per-channel weights of the shadow's scores, or NULL */
    const void *qd;   /* the integer dot function of the chosen path (a qdot16_fn), with xq */
    const float *scg, *scu, *scd;  /* per-row scales of int8 weights, or NULL */
    /* the int8 linear (upc_linear_i8): rows q (stride ldq), scales, bias, output [T, ln] */
    const int8_t *lq;
    const float *ls, *lb;
    float *ly;
    long ldq;
    int ln;
    /* int8 rows' integer dots (lin4, with x in int16 per group of LIN_G): the function, x codes, x scales */
    const void *l4;
    const int16_t *lxq;
    const float *lsx;
    /* (set after the positional initialiser in upc_decode: keep new fields last) */
    long xstride;     /* int16 units per token in xq (d; d + 32 for the split-int8 bytes) */
    int xsplit;       /* xq holds split-int8 x (hi, lo bytes) instead of int16 */
    /* 4-bit rows (upc_decode_q4, upc_linear_q4): codes and bf16 scale / minimum per group of G4 inputs; x4a holds
       per token the sums of x over each group, then x's scales; x4q x's codes, int8 (x4int8) or int16, or NULL
       (float dots); q4fn the dot function of the chosen path (a q4dot8_fn or a qdot16_fn) */
    const uint8_t *q4g, *q4u, *q4d;
    const uint16_t *q4sg, *q4lg, *q4su, *q4lu, *q4sd, *q4ld;
    int G4, x4int8;
    float *x4a;
    void *x4q;
    const void *q4fn;
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
QDOT(1)
QDOT(2)
QDOT(4)
QDOT(8)
static inline float qdot(const uint8_t *P, const float *restrict x, const float *xs, const uint16_t *sc,
                         const uint16_t *lo, int d, int G, int cb) {
    return cb == 1 ? qdot1(P, x, xs, sc, lo, d, G) : cb == 2 ? qdot2(P, x, xs, sc, lo, d, G)
         : cb == 4 ? qdot4(P, x, xs, sc, lo, d, G) : qdot8(P, x, xs, sc, lo, d, G);
}
/* The same dots in integers, gate and up rows of one channel in one pass sharing the x loads: x
   quantised per group to int16 (scale sx = max|x| / 32767: rounding errors ~1e-5 of the group's
   largest |x|), codes widened from bytes to int16 lanes and multiplied-and-added 16 or 32 at a time
   into exact int32 sums, with no int-to-float conversion per weight. On SmolLM2 int16 x keeps 99.99%
   of the float scores' channels and its held-out ppl lies at the edge of the spread that rounding-level
   noise alone gives (1.011x vs 0.995-1.008x); int8 x (maddubs, twice the rate again) keeps 98.6% and
   costs 1.024x on WikiText-2, so it was rejected (bench/results/shadow_xquant.md).
   Exact int32 sums for groups of up to 2048 inputs (8-bit codes: 2 * 255 * 32767 per lane and step).
   One copy per instruction set, each compiled for its own target and chosen per call (dot_path):
     avx2        _mm256_madd_epi16 + _mm256_add_epi32 (16 multiply-adds per 2 instructions)
     avxvnni     _mm256_dpwssd_avx_epi32 (AVX-VNNI: multiply, add and accumulate in one instruction)
     avx512vnni  _mm512_dpwssd_epi32 on 32 codes at a time, then the 256/128-bit EVEX forms
   The integer sums are exact in every path; only the float combination of the groups differs. */
#if defined(__x86_64__) && (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 11))
#include <immintrin.h>
#define SHADOW_INT16 1
#if defined(__clang__) && __clang_major__ < 12
#define UPC_NO_AVXVNNI 1 /* clang before 12 has no avxvnni target */
#endif
typedef int16_t i16x16 __attribute__((vector_size(32)));
typedef int16_t i16x8 __attribute__((vector_size(16)));
typedef void (*qdot16_fn)(const uint8_t *, const uint8_t *, const int16_t *, const float *, const float *,
                          const uint16_t *, const uint16_t *, const uint16_t *, const uint16_t *, int, int,
                          float *, float *);
#define ACC256_AVX2(acc, a, b) acc = _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
#define ACC128_AVX2(acc, a, b) acc = _mm_add_epi32(acc, _mm_madd_epi16(a, b))
#define ACC256_AVXVNNI(acc, a, b) acc = _mm256_dpwssd_avx_epi32(acc, a, b)
#define ACC128_AVXVNNI(acc, a, b) acc = _mm_dpwssd_avx_epi32(acc, a, b)
#define ACC256_AVX512VNNI(acc, a, b) acc = _mm256_dpwssd_epi32(acc, a, b)
#define ACC128_AVX512VNNI(acc, a, b) acc = _mm_dpwssd_epi32(acc, a, b)
#define WIDE_NONE(CB)
/* 32 code bytes at a time in 512-bit lanes, folded into the 256-bit sums at the end of the group */
#define WIDE_512(CB)                                                                                     \
    {                                                                                                    \
        __m512i ag8[PPB], au8[PPB];                                                                      \
        for (int p = 0; p < PPB; p++) ag8[p] = au8[p] = _mm512_setzero_si512();                          \
        const __m512i m8 = _mm512_set1_epi16(M);                                                         \
        for (; k + 32 <= gb; k += 32) {                                                                  \
            __m512i bg = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(pg + k)));            \
            __m512i bu = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(pu + k)));            \
            for (int p = 0; p < PPB; p++) {                                                              \
                __m512i xv = _mm512_loadu_si512((const void *)(xg + p * gb + k));                        \
                ag8[p] = _mm512_dpwssd_epi32(ag8[p], _mm512_and_si512(_mm512_srli_epi16(bg, CB * p), m8), xv); \
                au8[p] = _mm512_dpwssd_epi32(au8[p], _mm512_and_si512(_mm512_srli_epi16(bu, CB * p), m8), xv); \
            }                                                                                            \
        }                                                                                                \
        for (int p = 1; p < PPB; p++) { ag8[0] = _mm512_add_epi32(ag8[0], ag8[p]); au8[0] = _mm512_add_epi32(au8[0], au8[p]); } \
        ag[0] = _mm256_add_epi32(_mm512_castsi512_si256(ag8[0]), _mm512_extracti64x4_epi64(ag8[0], 1));  \
        au[0] = _mm256_add_epi32(_mm512_castsi512_si256(au8[0]), _mm512_extracti64x4_epi64(au8[0], 1));  \
    }
#define QDOT16(NAME, TGT, CB, ACC256, ACC128, WIDE)                                                      \
__attribute__((target(TGT)))                                                                             \
static void NAME##_##CB(const uint8_t *Pg, const uint8_t *Pu, const int16_t *xq, const float *sx,       \
                        const float *xs, const uint16_t *sg, const uint16_t *lg, const uint16_t *su,      \
                        const uint16_t *lu, int d, int G, float *out_g, float *out_u) {                  \
    enum { PPB = 8 / CB, M = (1 << CB) - 1 };                                                             \
    const int gb = G / PPB, ng = d / G;                                                                  \
    __m256 fg = _mm256_setzero_ps(), fu = _mm256_setzero_ps();                                           \
    float rg = 0.f, ru = 0.f;                                                                            \
    for (int g = 0; g < ng; g++) {                                                                       \
        const uint8_t *pg = Pg + (size_t)g * gb, *pu = Pu + (size_t)g * gb;                              \
        const int16_t *xg = xq + (size_t)g * G;                                                          \
        /* one accumulator per plane: independent chains (a multiply-accumulate has a latency of ~5) */   \
        __m256i ag[PPB], au[PPB];                                                                        \
        __m128i ag4[PPB], au4[PPB];                                                                      \
        for (int p = 0; p < PPB; p++) {                                                                  \
            ag[p] = au[p] = _mm256_setzero_si256();                                                      \
            ag4[p] = au4[p] = _mm_setzero_si128();                                                       \
        }                                                                                                \
        int k = 0;                                                                                       \
        WIDE(CB)                                                                                         \
        for (; k + 16 <= gb; k += 16) {                                                                  \
            i16x16 bg = (i16x16)_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(pg + k)));       \
            i16x16 bu = (i16x16)_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(pu + k)));       \
            for (int p = 0; p < PPB; p++) {                                                              \
                __m256i xv = _mm256_loadu_si256((const __m256i *)(xg + p * gb + k));                     \
                ACC256(ag[p], (__m256i)((bg >> (CB * p)) & M), xv);                                      \
                ACC256(au[p], (__m256i)((bu >> (CB * p)) & M), xv);                                      \
            }                                                                                            \
        }                                                                                                \
        for (; k + 8 <= gb; k += 8) {                                                                    \
            i16x8 bg = (i16x8)_mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)(pg + k)));            \
            i16x8 bu = (i16x8)_mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)(pu + k)));            \
            for (int p = 0; p < PPB; p++) {                                                              \
                __m128i xv = _mm_loadu_si128((const __m128i *)(xg + p * gb + k));                        \
                ACC128(ag4[p], (__m128i)((bg >> (CB * p)) & M), xv);                                     \
                ACC128(au4[p], (__m128i)((bu >> (CB * p)) & M), xv);                                     \
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
                ACC128(ag4[p], (__m128i)((bg >> (CB * p)) & M), xv);                                     \
                ACC128(au4[p], (__m128i)((bu >> (CB * p)) & M), xv);                                     \
            }                                                                                            \
        }                                                                                                \
        for (int p = 1; p < PPB; p++) {                                                                  \
            ag[0] = _mm256_add_epi32(ag[0], ag[p]); au[0] = _mm256_add_epi32(au[0], au[p]);              \
            ag4[0] = _mm_add_epi32(ag4[0], ag4[p]); au4[0] = _mm_add_epi32(au4[0], au4[p]);              \
        }                                                                                                \
        __m256i sg8 = _mm256_add_epi32(ag[0], _mm256_inserti128_si256(_mm256_setzero_si256(), ag4[0], 0)); \
        __m256i su8 = _mm256_add_epi32(au[0], _mm256_inserti128_si256(_mm256_setzero_si256(), au4[0], 0)); \
        float wg = bf16f(sg[g]) * sx[g], wu = bf16f(su[g]) * sx[g];                                      \
        fg = _mm256_add_ps(fg, _mm256_mul_ps(_mm256_cvtepi32_ps(sg8), _mm256_set1_ps(wg)));              \
        fu = _mm256_add_ps(fu, _mm256_mul_ps(_mm256_cvtepi32_ps(su8), _mm256_set1_ps(wu)));              \
        rg += bf16f(lg[g]) * xs[g];                                                                      \
        ru += bf16f(lu[g]) * xs[g];                                                                      \
    }                                                                                                    \
    v8 vg, vu;                                                                                           \
    memcpy(&vg, &fg, sizeof vg); memcpy(&vu, &fu, sizeof vu);                                            \
    *out_g = hsum(vg) + rg;                                                                              \
    *out_u = hsum(vu) + ru;                                                                              \
}
#define QDOT16_ALL(NAME, TGT, ACC256, ACC128, WIDE)                                                      \
    QDOT16(NAME, TGT, 1, ACC256, ACC128, WIDE)                                                           \
    QDOT16(NAME, TGT, 2, ACC256, ACC128, WIDE)                                                           \
    QDOT16(NAME, TGT, 4, ACC256, ACC128, WIDE)                                                           \
    QDOT16(NAME, TGT, 8, ACC256, ACC128, WIDE)
QDOT16_ALL(qdot16_avx2, "avx2", ACC256_AVX2, ACC128_AVX2, WIDE_NONE)
#ifndef UPC_NO_AVXVNNI
QDOT16_ALL(qdot16_avxvnni, "avx2,avxvnni", ACC256_AVXVNNI, ACC128_AVXVNNI, WIDE_NONE)
#endif
QDOT16_ALL(qdot16_avx512vnni, "avx2,avx512f,avx512bw,avx512vl,avx512vnni", ACC256_AVX512VNNI, ACC128_AVX512VNNI,
           WIDE_512)

/* Split-int8 dots (vpdpbusd: 4 unsigned bytes x 4 signed bytes into each int32 lane): x quantised per group to
   15 bits, x = sx * (128 * hi + lo) with hi in [-128, 127] and lo in [0, 127], both int8, so the codes never
   need widening: a plane is masked in place (its codes scaled by 2^(CB p), at most 128 / 192 / 240 / 255, still
   unsigned bytes), multiplied-and-added with hi and with lo, 32 codes per instruction, and the scale 2^-(CB p)
   taken off the exact int32 sums (they are multiples of it) at the end of the group. Half the instructions
   of the int16 paths per code. `xq` points at the token's hi bytes, d + 32 of them, then its lo bytes. */
#define DPBUSD_AVXVNNI(acc, a, b) acc = _mm256_dpbusd_avx_epi32(acc, a, b)
#define DPBUSD_AVX512VNNI(acc, a, b) acc = _mm256_dpbusd_epi32(acc, a, b)
#define QDOT8S(NAME, TGT, CB, DPB)                                                                       \
__attribute__((target(TGT)))                                                                             \
static void NAME##_##CB(const uint8_t *Pg, const uint8_t *Pu, const int16_t *xq16, const float *sx,     \
                        const float *xs, const uint16_t *sg, const uint16_t *lg, const uint16_t *su,      \
                        const uint16_t *lu, int d, int G, float *out_g, float *out_u) {                  \
    enum { PPB = 8 / CB, M = (1 << CB) - 1 };                                                             \
    const int gb = G / PPB, ng = d / G;                                                                  \
    const int8_t *xh = (const int8_t *)xq16, *xl = xh + d + 32;                                          \
    __m256 fg = _mm256_setzero_ps(), fu = _mm256_setzero_ps();                                           \
    float rg = 0.f, ru = 0.f;                                                                            \
    for (int g = 0; g < ng; g++) {                                                                       \
        const uint8_t *pg = Pg + (size_t)g * gb, *pu = Pu + (size_t)g * gb;                              \
        const int8_t *hg = xh + (size_t)g * G, *lo_ = xl + (size_t)g * G;                                \
        __m256i agh[PPB], agl[PPB], auh[PPB], aul[PPB];                                                  \
        for (int p = 0; p < PPB; p++) agh[p] = agl[p] = auh[p] = aul[p] = _mm256_setzero_si256();        \
        for (int k = 0; k < gb; k += 32) {                                                               \
            __m256i bg, bu;                                                                              \
            if (k + 32 <= gb) {                                                                          \
                bg = _mm256_loadu_si256((const __m256i *)(pg + k));                                      \
                bu = _mm256_loadu_si256((const __m256i *)(pu + k));                                      \
            } else { /* the group's last < 32 codes, zero-padded: the x bytes past them count 0 times */ \
                uint8_t tg[32] = {0}, tu[32] = {0};                                                      \
                memcpy(tg, pg + k, (size_t)(gb - k)); memcpy(tu, pu + k, (size_t)(gb - k));              \
                bg = _mm256_loadu_si256((const __m256i *)tg);                                            \
                bu = _mm256_loadu_si256((const __m256i *)tu);                                            \
            }                                                                                            \
            for (int p = 0; p < PPB; p++) {                                                              \
                const __m256i m = _mm256_set1_epi8((char)(M << (CB * p)));                               \
                __m256i vh = _mm256_loadu_si256((const __m256i *)(hg + p * gb + k));                     \
                __m256i vl = _mm256_loadu_si256((const __m256i *)(lo_ + p * gb + k));                    \
                __m256i cg = _mm256_and_si256(bg, m), cu = _mm256_and_si256(bu, m);                      \
                DPB(agh[p], cg, vh); DPB(agl[p], cg, vl);                                                \
                DPB(auh[p], cu, vh); DPB(aul[p], cu, vl);                                                \
            }                                                                                            \
        }                                                                                                \
        __m256i tg8 = _mm256_setzero_si256(), tu8 = _mm256_setzero_si256();                              \
        for (int p = 0; p < PPB; p++) {                                                                  \
            __m256i sgp = _mm256_add_epi32(_mm256_slli_epi32(agh[p], 7), agl[p]);                         \
            __m256i sup = _mm256_add_epi32(_mm256_slli_epi32(auh[p], 7), aul[p]);                         \
            tg8 = _mm256_add_epi32(tg8, _mm256_srai_epi32(sgp, CB * p));                                 \
            tu8 = _mm256_add_epi32(tu8, _mm256_srai_epi32(sup, CB * p));                                 \
        }                                                                                                \
        float wg = bf16f(sg[g]) * sx[g], wu = bf16f(su[g]) * sx[g];                                      \
        fg = _mm256_add_ps(fg, _mm256_mul_ps(_mm256_cvtepi32_ps(tg8), _mm256_set1_ps(wg)));              \
        fu = _mm256_add_ps(fu, _mm256_mul_ps(_mm256_cvtepi32_ps(tu8), _mm256_set1_ps(wu)));              \
        rg += bf16f(lg[g]) * xs[g];                                                                      \
        ru += bf16f(lu[g]) * xs[g];                                                                      \
    }                                                                                                    \
    v8 vg, vu;                                                                                           \
    memcpy(&vg, &fg, sizeof vg); memcpy(&vu, &fu, sizeof vu);                                            \
    *out_g = hsum(vg) + rg;                                                                              \
    *out_u = hsum(vu) + ru;                                                                              \
}
#define QDOT8S_ALL(NAME, TGT, DPB)                                                                       \
    QDOT8S(NAME, TGT, 1, DPB) QDOT8S(NAME, TGT, 2, DPB) QDOT8S(NAME, TGT, 4, DPB) QDOT8S(NAME, TGT, 8, DPB)
#ifndef UPC_NO_AVXVNNI
QDOT8S_ALL(qdot8s_avxvnni, "avx2,avxvnni", DPBUSD_AVXVNNI)
#endif
QDOT8S_ALL(qdot8s_avx512vnni, "avx2,avx512f,avx512bw,avx512vl,avx512vnni", DPBUSD_AVX512VNNI)
#endif

/* Shadow dot paths (upc_decode_args.dot_path): 0 = the best this CPU supports. */
enum { UPC_DOTS_AUTO = 0, UPC_DOTS_FLOAT = 1, UPC_DOTS_AVX2 = 2, UPC_DOTS_AVXVNNI = 3, UPC_DOTS_AVX512VNNI = 4,
       UPC_DOTS_AVXVNNI8 = 5, UPC_DOTS_AVX512VNNI8 = 6 };  /* ...8: the split-int8 forms (shadow only) */

/* Bit p set: path p is compiled in and this CPU runs it. */
int upc_dot_paths(void) {
    int m = 1 << UPC_DOTS_FLOAT;
#ifdef SHADOW_INT16
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2")) m |= 1 << UPC_DOTS_AVX2;
#ifndef UPC_NO_AVXVNNI
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("avxvnni"))
        m |= 1 << UPC_DOTS_AVXVNNI | 1 << UPC_DOTS_AVXVNNI8;
#endif
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
        m |= 1 << UPC_DOTS_AVX512VNNI | 1 << UPC_DOTS_AVX512VNNI8;
#endif
    return m;
}

/* Preference orders of `auto`, measured (thread CPU time, one token, Intel Xeon with AVX-512 and AVX-VNNI):
   the shadow's dots are bound by unpacking the codes, where 512-bit lanes cost more than they save
   (avxvnni 0.37 ms ~ avx2 0.38 < avx512vnni 0.39-0.45 ms per Qwen2.5-0.5B-wide FFN of 1536 channels); the
   int8 linear's rows are plain bytes, where they pay (LM head 49152 x 576: 3.6 / 4.1 / 4.4 ms). */
static const int SHADOW_ORDER[] = {UPC_DOTS_AVXVNNI, UPC_DOTS_AVX2, UPC_DOTS_AVX512VNNI, 0};
static const int LINEAR_ORDER[] = {UPC_DOTS_AVX512VNNI, UPC_DOTS_AVXVNNI, UPC_DOTS_AVX2, 0};

static int resolve(int requested, const int *order) {
    int m = upc_dot_paths();
    if (requested == UPC_DOTS_AUTO) {
        for (int i = 0; order[i]; i++) if (m >> order[i] & 1) return order[i];
        return UPC_DOTS_FLOAT;
    }
    return requested > 0 && requested < 31 && (m >> requested & 1) ? requested : -1;
}

/* The shadow dot path a call asking for `requested` runs: auto -> the preferred available one; an
   unavailable one -> -1. */
int upc_resolve_dot_path(int requested) { return resolve(requested, SHADOW_ORDER); }

/* The dots 4-bit rows run for `requested`: the shadow's preference (the codes are unpacked the same way) in its
   int16 form (the split-int8 forms need x laid out for them alone), float, or -1 if unavailable. */
int upc_q4_dot_path(int requested) {
    int path = resolve(requested, SHADOW_ORDER);
    if (path == UPC_DOTS_AVXVNNI8) path = UPC_DOTS_AVXVNNI;
    if (path == UPC_DOTS_AVX512VNNI8) path = UPC_DOTS_AVX512VNNI;
    return path;
}

#ifdef SHADOW_INT16
#define PICK_CB(NAME) (cb == 1 ? NAME##_1 : cb == 2 ? NAME##_2 : cb == 4 ? NAME##_4 : NAME##_8)
static qdot16_fn pick_qdot16(int path, int cb) {
    switch (path) {
    case UPC_DOTS_AVX2: return PICK_CB(qdot16_avx2);
#ifndef UPC_NO_AVXVNNI
    case UPC_DOTS_AVXVNNI: return PICK_CB(qdot16_avxvnni);
#endif
    case UPC_DOTS_AVX512VNNI:
        return PICK_CB(qdot16_avx512vnni);
#ifndef UPC_NO_AVXVNNI
    case UPC_DOTS_AVXVNNI8: return PICK_CB(qdot8s_avxvnni);
#endif
    case UPC_DOTS_AVX512VNNI8:
        return PICK_CB(qdot8s_avx512vnni);
    default: return NULL;
    }
}
#undef PICK_CB
#endif

/* Dots of int8 weight rows with x quantised per group of LIN_G inputs to int16 (x ~= xq * sx[g], as for the
   shadow: rounding errors ~1e-5 of the group's largest |x|, far below the int8 weights' own), four rows at a
   time sharing the x loads: the bytes are widened to int16 and multiplied-and-added into exact int32 sums per
   group, then scaled in float. Versus converting every weight to float (2 uops more per 8 weights) this takes
   the int8 linear from compute-bound to memory-bound. Rows need K % LIN_G == 0; others use the float dots. */
#define LIN_G 64
typedef void (*lin4_fn)(const int8_t *const rw[4], const int16_t *xq, const float *sx, int K, float out[4]);
#ifdef SHADOW_INT16
__attribute__((target("avx2,avx512f,avx512bw,avx512vl,avx512vnni")))
static void lin4_avx512vnni(const int8_t *const rw[4], const int16_t *xq, const float *sx, int K, float out[4]) {
    __m512 f[4];
    for (int j = 0; j < 4; j++) f[j] = _mm512_setzero_ps();
    for (int g = 0; g < K / LIN_G; g++) {
        const int16_t *xg = xq + (size_t)g * LIN_G;
        __m512i x0 = _mm512_loadu_si512((const void *)xg), x1 = _mm512_loadu_si512((const void *)(xg + 32));
        __m512 s = _mm512_set1_ps(sx[g]);
        for (int j = 0; j < 4; j++) {
            const int8_t *w = rw[j] + (size_t)g * LIN_G;
            __m512i a = _mm512_dpwssd_epi32(_mm512_setzero_si512(),
                                            _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)w)), x0);
            __m512i b = _mm512_dpwssd_epi32(_mm512_setzero_si512(),
                                            _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w + 32))), x1);
            f[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(a, b)), s, f[j]);
        }
    }
    for (int j = 0; j < 4; j++) out[j] = _mm512_reduce_add_ps(f[j]);
}
#define LIN4_256(NAME, TGT, ACC)                                                                         \
__attribute__((target(TGT)))                                                                             \
static void NAME(const int8_t *const rw[4], const int16_t *xq, const float *sx, int K, float out[4]) {  \
    __m256 f[4];                                                                                         \
    for (int j = 0; j < 4; j++) f[j] = _mm256_setzero_ps();                                              \
    for (int g = 0; g < K / LIN_G; g++) {                                                                \
        const int16_t *xg = xq + (size_t)g * LIN_G;                                                      \
        __m256i xv[4];                                                                                   \
        for (int c = 0; c < 4; c++) xv[c] = _mm256_loadu_si256((const __m256i *)(xg + 16 * c));         \
        __m256 s = _mm256_set1_ps(sx[g]);                                                                \
        for (int j = 0; j < 4; j++) {                                                                    \
            const int8_t *w = rw[j] + (size_t)g * LIN_G;                                                 \
            __m256i a[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};                             \
            for (int c = 0; c < 4; c++)                                                                  \
                ACC(a[c & 1], _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + 16 * c))), xv[c]); \
            f[j] = _mm256_add_ps(f[j], _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(a[0], a[1])), s)); \
        }                                                                                                \
    }                                                                                                    \
    for (int j = 0; j < 4; j++) { v8 v; memcpy(&v, &f[j], sizeof v); out[j] = hsum(v); }                 \
}
LIN4_256(lin4_avx2, "avx2", ACC256_AVX2)
#ifndef UPC_NO_AVXVNNI
LIN4_256(lin4_avxvnni, "avx2,avxvnni", ACC256_AVXVNNI)
#endif
#endif

static lin4_fn pick_lin4(int path) {
#ifdef SHADOW_INT16
    switch (path) {
    case UPC_DOTS_AVX2: return lin4_avx2;
#ifndef UPC_NO_AVXVNNI
    case UPC_DOTS_AVXVNNI: return lin4_avxvnni;
#endif
    case UPC_DOTS_AVX512VNNI: return lin4_avx512vnni;
    default: return NULL;
    }
#else
    (void)path;
    return NULL;
#endif
}

/* x [T, K] -> int16 codes xq [T, K] and per-group scales sx [T, K / LIN_G] (K % LIN_G == 0) */
static void quantize_x_groups(const float *x, int T, int K, int16_t *xq, float *sx) {
    for (int t = 0; t < T; t++)
        for (int g = 0; g < K / LIN_G; g++) {
            const float *xg = x + (size_t)t * K + (size_t)g * LIN_G;
            float amax = 0.f;
            for (int i = 0; i < LIN_G; i++) amax = fmaxf(amax, fabsf(xg[i]));
            float inv = amax > 0.f ? 32767.f / amax : 0.f;
            int16_t *q = xq + (size_t)t * K + (size_t)g * LIN_G;
            for (int i = 0; i < LIN_G; i++) q[i] = (int16_t)lrintf(xg[i] * inv);
            sx[(size_t)t * (K / LIN_G) + g] = amax / 32767.f;
        }
}

/* Channel c's shadow gate and up rows dotted with token t's x (one pass: the int16 paths share x). */
static inline void shadow_dots(const args_t *A, long c, int t, float *g, float *u) {
    const int ng = A->d / A->G;
    const long rb = A->d / (8 / A->cb);
    const uint8_t *qg = A->qg + c * rb, *qu = A->qu + c * rb;
    const uint16_t *sg = A->sg + c * ng, *lg = A->lg + c * ng, *su = A->su + c * ng, *lu = A->lu + c * ng;
    const float *xs = A->a + (size_t)t * ng;
#ifdef SHADOW_INT16
    if (A->xq) {
        const int16_t *xq = A->xq + (size_t)t * A->xstride;
        const float *sx = A->a + (size_t)(A->T + t) * ng;
        ((qdot16_fn)A->qd)(qg, qu, xq, sx, xs, sg, lg, su, lu, A->d, A->G, g, u);
        return;
    }
#endif
    const float *x = A->x + (size_t)t * A->d;
    *g = qdot(qg, x, xs, sg, lg, A->d, A->G, A->cb);
    *u = qdot(qu, x, xs, su, lu, A->d, A->G, A->cb);
}

/* 4-bit weight rows (upcycle.quantize(model, "int4")): w = code * scale + lo per group of G4 inputs, packed as a
   4-bit shadow is (packing.py: byte k of a group holds inputs k and k + G4 / 2), two rows per dot call sharing the
   x loads. With groups of 32 (the default) x is quantised per group to int8, as llama.cpp's Q8_0 activations
   (error ~0.4% of the group's largest |x|, far below the 4-bit weights' own ~6%): a group's 16 code bytes, split
   into nibbles, are its 32 codes in input order, so one unsigned-by-signed byte multiply-add (vpmaddubsw, or
   vpdpbusd with VNNI) covers it. Other group sizes use the shadow's int16 dots (qdot16, 4-bit). */
typedef void (*q4dot8_fn)(const uint8_t *, const uint8_t *, const int8_t *, const float *, const float *,
                          const uint16_t *, const uint16_t *, const uint16_t *, const uint16_t *, int, float *, float *);
#ifdef SHADOW_INT16
#define DP8_AVX2(c, x) _mm256_madd_epi16(_mm256_maddubs_epi16(c, x), _mm256_set1_epi16(1))
#define DP8_AVXVNNI(c, x) _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), c, x)
#define DP8_AVX512VNNI(c, x) _mm256_dpbusd_epi32(_mm256_setzero_si256(), c, x)
#define Q4DOT8(NAME, TGT, DP)                                                                            \
__attribute__((target(TGT)))                                                                             \
static void NAME(const uint8_t *P0, const uint8_t *P1, const int8_t *xq, const float *sx, const float *xs,    \
                 const uint16_t *s0, const uint16_t *l0, const uint16_t *s1, const uint16_t *l1, int d,       \
                 float *o0, float *o1) {                                                                 \
    const __m128i m4 = _mm_set1_epi8(15);                                                                \
    __m256 f0 = _mm256_setzero_ps(), f1 = _mm256_setzero_ps();                                           \
    float r0 = 0.f, r1 = 0.f;                                                                            \
    for (int g = 0; g < d / 32; g++) {                                                                   \
        __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + 32 * (size_t)g));                         \
        __m128i b0 = _mm_loadu_si128((const __m128i *)(P0 + 16 * (size_t)g));                            \
        __m128i b1 = _mm_loadu_si128((const __m128i *)(P1 + 16 * (size_t)g));                            \
        __m256i c0 = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b0, 4), m4), _mm_and_si128(b0, m4));  \
        __m256i c1 = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b1, 4), m4), _mm_and_si128(b1, m4));  \
        f0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DP(c0, xv)), _mm256_set1_ps(bf16f(s0[g]) * sx[g]), f0);   \
        f1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DP(c1, xv)), _mm256_set1_ps(bf16f(s1[g]) * sx[g]), f1);   \
        r0 += bf16f(l0[g]) * xs[g];                                                                      \
        r1 += bf16f(l1[g]) * xs[g];                                                                      \
    }                                                                                                    \
    v8 v0, v1;                                                                                           \
    memcpy(&v0, &f0, sizeof v0); memcpy(&v1, &f1, sizeof v1);                                            \
    *o0 = hsum(v0) + r0;                                                                                 \
    *o1 = hsum(v1) + r1;                                                                                 \
}
Q4DOT8(q4dot8_avx2, "avx2,fma", DP8_AVX2)
#ifndef UPC_NO_AVXVNNI
Q4DOT8(q4dot8_avxvnni, "avx2,fma,avxvnni", DP8_AVXVNNI)
#endif
Q4DOT8(q4dot8_avx512vnni, "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni", DP8_AVX512VNNI)
#endif

static q4dot8_fn pick_q4dot8(int path) {
#ifdef SHADOW_INT16
    switch (path) {
    case UPC_DOTS_AVX2: return q4dot8_avx2;
#ifndef UPC_NO_AVXVNNI
    case UPC_DOTS_AVXVNNI: return q4dot8_avxvnni;
#endif
    case UPC_DOTS_AVX512VNNI: return q4dot8_avx512vnni;
    default: return NULL;
    }
#else
    (void)path;
    return NULL;
#endif
}

/* Per token and group of G inputs of x [T, d]: the sum (sums [T, d / G]) and, with codes, x quantised to int8
   (bits 8) or int16 codes [T, d] and their scale (scales [T, d / G]): what the dots of 4-bit rows read. */
static void x_groups(const float *x, int T, int d, int G, float *sums, float *scales, void *codes, int bits) {
    const int ng = d / G;
    const float top = bits == 8 ? 127.f : 32767.f;
    for (int t = 0; t < T; t++)
        for (int g = 0; g < ng; g++) {
            const float *xg = x + (size_t)t * d + (size_t)g * G;
            float s = 0.f, amax = 0.f;
            for (int i = 0; i < G; i++) { s += xg[i]; amax = fmaxf(amax, fabsf(xg[i])); }
            sums[(size_t)t * ng + g] = s;
            if (!codes) continue;
            float inv = amax > 0.f ? top / amax : 0.f;
            size_t o = (size_t)t * d + (size_t)g * G;
            for (int i = 0; i < G; i++) {
                long v = lrintf(xg[i] * inv);
                if (bits == 8) ((int8_t *)codes)[o + i] = (int8_t)v;
                else ((int16_t *)codes)[o + i] = (int16_t)v;
            }
            scales[(size_t)t * ng + g] = amax / top;
        }
}

/* The 4-bit dots' buffers and function for T tokens of d inputs on `path` (a resolved upc_q4_dot_path): 0, or 2
   when out of memory (q4_free releases them either way). */
static int q4_setup(args_t *A, int path, int T, int d) {
    const int G = A->G4;
    A->x4a = malloc(sizeof(float) * 2 * (size_t)T * (d / G));
    if (path != UPC_DOTS_FLOAT && G == 32 && pick_q4dot8(path)) {
        A->q4fn = (const void *)pick_q4dot8(path);
        A->x4int8 = 1;
        A->x4q = malloc((size_t)T * d + 32);
    }
#ifdef SHADOW_INT16
    else if (path != UPC_DOTS_FLOAT) {
        A->q4fn = (const void *)pick_qdot16(path, 4);
        A->x4q = malloc(sizeof(int16_t) * ((size_t)T * d + 8));
    }
#endif
    return A->x4a && (!A->q4fn || A->x4q) ? 0 : 2;
}
static void q4_quantize_x(const args_t *A) {
    const size_t n = (size_t)A->T * (A->d / A->G4);
    x_groups(A->x, A->T, A->d, A->G4, A->x4a, A->x4a + n, A->x4q, A->x4int8 ? 8 : 16);
}
static void q4_free(args_t *A) { free(A->x4a); free(A->x4q); A->x4a = NULL; A->x4q = NULL; }

static inline void q4_dots(const args_t *A, const uint8_t *p0, const uint8_t *p1, const uint16_t *s0,
                           const uint16_t *l0, const uint16_t *s1, const uint16_t *l1, int t, float *o0, float *o1) {
    const int ng = A->d / A->G4;
    const float *xs = A->x4a + (size_t)t * ng, *sx = A->x4a + (size_t)(A->T + t) * ng;
    if (A->x4int8) {
        ((q4dot8_fn)A->q4fn)(p0, p1, (const int8_t *)A->x4q + (size_t)t * A->d, sx, xs, s0, l0, s1, l1, A->d, o0, o1);
        return;
    }
#ifdef SHADOW_INT16
    if (A->x4q) {
        ((qdot16_fn)A->q4fn)(p0, p1, (const int16_t *)A->x4q + (size_t)t * A->d, sx, xs, s0, l0, s1, l1, A->d,
                             A->G4, o0, o1);
        return;
    }
#endif
    const float *x = A->x + (size_t)t * A->d;
    *o0 = qdot4(p0, x, xs, s0, l0, A->d, A->G4);
    *o1 = qdot4(p1, x, xs, s1, l1, A->d, A->G4);
}

/* y [d] += h * one 4-bit row (a kept channel's column of W_down) */
static inline void axpy_q4(float *restrict y, float h, const uint8_t *P, const uint16_t *sc, const uint16_t *lo,
                           int d, int G) {
    const int gb = G / 2;
    for (int g = 0; g < d / G; g++) {
        const uint8_t *pg = P + (size_t)g * gb;
        float *y0 = y + (size_t)g * G, *y1 = y0 + gb;
        const float hs = h * bf16f(sc[g]), hl = h * bf16f(lo[g]);
        const v8 vs = splat(hs), vl = splat(hl);
        int k = 0;
        for (; k + 8 <= gb; k += 8) {
            u8x8 b8; memcpy(&b8, pg + k, 8);
            i32x8 b = __builtin_convertvector(b8, i32x8);
            *(v8 *)(y0 + k) += vs * __builtin_convertvector(b & 15, v8) + vl;
            *(v8 *)(y1 + k) += vs * __builtin_convertvector(b >> 4, v8) + vl;
        }
        for (; k < gb; k++) { y0[k] += hs * (float)(pg[k] & 15) + hl; y1[k] += hs * (float)(pg[k] >> 4) + hl; }
    }
}

/* y [d] += sum_j h[j] * 4-bit row j, four rows in one pass over y (their minimum terms summed per group) */
static inline void axpy4_q4(float *restrict y, const float h[4], const uint8_t *const P[4],
                            const uint16_t *const sc[4], const uint16_t *const lo[4], int d, int G) {
    const int gb = G / 2;
    for (int g = 0; g < d / G; g++) {
        float *y0 = y + (size_t)g * G, *y1 = y0 + gb;
        float hs[4], hl = 0.f;
        v8 vs[4];
        for (int j = 0; j < 4; j++) {
            hs[j] = h[j] * bf16f(sc[j][g]);
            vs[j] = splat(hs[j]);
            hl += h[j] * bf16f(lo[j][g]);
        }
        const v8 vl = splat(hl);
        int k = 0;
        for (; k + 8 <= gb; k += 8) {
            v8 a0 = vl, a1 = vl;
            for (int j = 0; j < 4; j++) {
                u8x8 b8; memcpy(&b8, P[j] + (size_t)g * gb + k, 8);
                i32x8 b = __builtin_convertvector(b8, i32x8);
                a0 += vs[j] * __builtin_convertvector(b & 15, v8);
                a1 += vs[j] * __builtin_convertvector(b >> 4, v8);
            }
            *(v8 *)(y0 + k) += a0;
            *(v8 *)(y1 + k) += a1;
        }
        for (; k < gb; k++)
            for (int j = 0; j < 4; j++) {
                const uint8_t b = P[j][(size_t)g * gb + k];
                y0[k] += hs[j] * (float)(b & 15) + (j ? 0.f : hl);
                y1[k] += hs[j] * (float)(b >> 4) + (j ? 0.f : hl);
            }
    }
}

/* One bank's kept channels (list, nk; mb: which tokens kept each; gate [T, bank]) on 4-bit rows */
static void q4_kept(const args_t *A, int c0, const int *list, int nk, const uint64_t *mb, const float *gate,
                    float *yp) {
    const int d = A->d, ng = d / A->G4;
    const long rb = d / 2;
    int q0 = 0;
    if (A->T == 1)  /* one token: four channels' down rows in one pass over y */
        for (; q0 + 4 <= nk; q0 += 4) {
            const uint8_t *pd[4];
            const uint16_t *sd[4], *ld[4];
            float h[4];
            for (int j = 0; j < 4; j++) {
                const int i = list[q0 + j];
                const long c = c0 + i, o = c * ng;
                float g, u;
                q4_dots(A, A->q4g + c * rb, A->q4u + c * rb, A->q4sg + o, A->q4lg + o, A->q4su + o, A->q4lu + o, 0,
                        &g, &u);
                h[j] = silu(g) * u * gate[i];
                pd[j] = A->q4d + c * rb; sd[j] = A->q4sd + o; ld[j] = A->q4ld + o;
            }
            axpy4_q4(yp, h, pd, sd, ld, d, A->G4);
        }
    for (int q = q0; q < nk; q++) {
        const int i = list[q];
        const long c = c0 + i, o = c * ng;
        const uint8_t *pg = A->q4g + c * rb, *pu = A->q4u + c * rb, *pd = A->q4d + c * rb;
        if (q + 1 < nk) __builtin_prefetch(A->q4d + (c0 + list[q + 1]) * rb, 0, 3);
        for (int t = 0; t < A->T; t++) {
            if (!(mb[i] >> t & 1ull)) continue;
            float g, u;
            q4_dots(A, pg, pu, A->q4sg + o, A->q4lg + o, A->q4su + o, A->q4lu + o, t, &g, &u);
            axpy_q4(yp + (size_t)t * d, silu(g) * u * gate[(size_t)t * A->bank + i], pd, A->q4sd + o, A->q4ld + o,
                    d, A->G4);
        }
    }
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
    atomic_int gen;  /* bumped with seq: the 32-bit word sleeping helpers wait on (futex) */
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
        if (P.part_len) memset(P.part[c], 0, P.part_len * sizeof(float));  /* 0: direct (rows of y) */
        int b1 = (int)((long)(c + 1) * P.n_items / P.n_chunks);
        for (int b = (int)((long)c * P.n_items / P.n_chunks); b < b1; b++) P.fn(P.args, b, P.part[c], P.scr[slot]);
    }
}

/* Sleeping and waking helpers. On Linux a futex on P.gen: no mutex, so a caller never blocks behind a helper
   that was descheduled while holding one (with a mutex and condition variable, measured on a loaded 2-core
   machine, calls that woke helpers took milliseconds). Ordering (all seq_cst): a helper counts itself in
   `sleepers`, then reads gen, then re-checks seq before it waits on gen; a caller bumps seq and gen, then reads
   `sleepers`: either the caller sees the sleeper and wakes it, or the helper sees the new seq (or gen) and
   does not sleep. Elsewhere the mutex and condition variable. */
#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <limits.h>
static void helper_sleep(long seen) {
    atomic_fetch_add(&P.sleepers, 1);
    for (;;) {
        int g = atomic_load(&P.gen);
        if (atomic_load(&P.seq) != seen) break;
        syscall(SYS_futex, (int *)&P.gen, FUTEX_WAIT_PRIVATE, g, NULL, NULL, 0);
    }
    atomic_fetch_sub(&P.sleepers, 1);
}
static void wake_helpers(void) { syscall(SYS_futex, (int *)&P.gen, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0); }
#else
static void helper_sleep(long seen) {
    pthread_mutex_lock(&P.mu);
    atomic_fetch_add(&P.sleepers, 1);
    while (atomic_load(&P.seq) == seen) pthread_cond_wait(&P.cv, &P.mu);
    atomic_fetch_sub(&P.sleepers, 1);
    pthread_mutex_unlock(&P.mu);
}
static void wake_helpers(void) { pthread_mutex_lock(&P.mu); pthread_cond_broadcast(&P.cv); pthread_mutex_unlock(&P.mu); }
#endif

static void *helper_main(void *arg) {
    int slot = (int)(intptr_t)arg;
    long seen = atomic_load(&P.seq);
    for (;;) {
        long s = atomic_load(&P.seq);
        for (int i = 0; s == seen && i < UPC_SPIN; i++) { cpu_relax(); s = atomic_load(&P.seq); }
        if (s == seen) {
            helper_sleep(seen);
            s = atomic_load(&P.seq);
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
   predictor's in-projection) runs on the caller while helpers wake up. y = sum of partials; `direct`:
   each item writes its own rows of the output itself (no partials, y unused). */
static int run_job(bank_fn fn, void (*prologue)(args_t *), args_t *A, size_t scratch, float *y, int nthreads,
                   int direct) {
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
    size_t part_len = direct ? 0 : (size_t)A->T * A->d;
    int n_chunks = A->nb < N_CHUNKS ? A->nb : N_CHUNKS;
    for (int s = 0; s < nthreads || s < n_chunks; s++) {
        if ((s < n_chunks && !direct && grow(&P.part[s], &P.part_cap[s], part_len))
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
        atomic_fetch_add(&P.gen, 1);
        if (atomic_load(&P.sleepers) > 0) wake_helpers();
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

int upc_linear_dot_path(int requested, int K);  /* below; the int8 body calls it */

#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define FN(name) CAT(name, SUF)

#define SUF f32
#define LD ld_f32
#define LD1 ld1_f32
#define ESZ 4
#define PDOT dot_f32
#define PLD1 ld1_f32
#define PESZ 4
#include "bank_sparse_decode_body.h"
#undef SUF
#undef LD
#undef LD1
#undef ESZ
#undef PDOT
#undef PLD1
#undef PESZ

#define SUF bf16
#define LD ld_bf16
#define LD1 ld1_bf16
#define ESZ 2
#define PDOT dot_bf16
#define PLD1 ld1_bf16
#define PESZ 2
#include "bank_sparse_decode_body.h"
#undef SUF
#undef LD
#undef LD1
#undef ESZ
#undef PDOT
#undef PLD1
#undef PESZ

#if defined(__FLT16_MAX__) /* float16 weights need a compiler with _Float16 */
#define SUF f16
#define LD ld_f16
#define LD1 ld1_f16
#define ESZ 2
#define PDOT dot_f16
#define PLD1 ld1_f16
#define PESZ 2
#include "bank_sparse_decode_body.h"
#undef SUF
#undef LD
#undef LD1
#undef ESZ
#undef PDOT
#undef PLD1
#undef PESZ
#endif

/* int8 rows (per-row scales in scg / scu / scd), float32 predictor: upc_decode_i8 */
#define SUF i8
#define LD ld_i8
#define LD1 ld1_i8
#define ESZ 1
#define PDOT dot_f32
#define PLD1 ld1_f32
#define PESZ 4
#include "bank_sparse_decode_body.h"
#undef SUF
#undef LD
#undef LD1
#undef ESZ
#undef PDOT
#undef PLD1
#undef PESZ

/* An int8 linear layer at decode shapes: y [T, N] = (x [T, K] . q [N, K]^T) * s [N] + b [N] (s, b may be NULL),
   q int8 rows with row stride ldq, float32 arithmetic. Rows in blocks of LIN_ROWS on the same helper pool as
   the FFN kernel (so it never fights a second pool); each row is computed by one thread: the output does not
   depend on the thread count. Used for the attention projections, the LM head and dense FFNs of a model
   quantised by upcycle.quantize. */
typedef struct {
    const float *x;
    float *y;
    const int8_t *q;
    const float *s, *b;
    long ldq;
    int T, N, K, nthreads, dot_path;
} upc_linear_args;

int upc_linear_args_size(void) { return (int)sizeof(upc_linear_args); }

#define LIN_ROWS 32
static void lin_rows(const args_t *A, int blk, float *yp, float *scr) {
    (void)yp; (void)scr;
    const int r0 = blk * LIN_ROWS, r1 = r0 + LIN_ROWS < A->ln ? r0 + LIN_ROWS : A->ln, K = A->d;
    if (A->l4) {
        for (int n = r0; n < r1; n += 4) {
            const int8_t *rw[4];
            for (int j = 0; j < 4; j++) rw[j] = A->lq + (long)(n + j < r1 ? n + j : r1 - 1) * A->ldq;
            for (int t = 0; t < A->T; t++) {
                float o[4];
                ((lin4_fn)A->l4)(rw, A->lxq + (size_t)t * K, A->lsx + (size_t)t * (K / LIN_G), K, o);
                for (int j = 0; j < 4 && n + j < r1; j++)
                    A->ly[(size_t)t * A->ln + n + j] = o[j] * (A->ls ? A->ls[n + j] : 1.f) + (A->lb ? A->lb[n + j] : 0.f);
            }
        }
        return;
    }
    for (int n = r0; n < r1; n++) {
        const char *row = (const char *)A->lq + (long)n * A->ldq;
        const float s = A->ls ? A->ls[n] : 1.f, b = A->lb ? A->lb[n] : 0.f;
        for (int t = 0; t < A->T; t++)
            A->ly[(size_t)t * A->ln + n] = dot_i8(row, A->x + (size_t)t * K, K) * s + b;
    }
}
static void lin_prologue(args_t *A) { (void)A; }

/* Which dots upc_linear_i8 runs for `requested` (UPC_DOTS_*) and K: the path, UPC_DOTS_FLOAT, or -1. */
int upc_linear_dot_path(int requested, int K) {
    int path = resolve(requested, LINEAR_ORDER);
    if (path < 0) return -1;
    if (path == UPC_DOTS_AVXVNNI8) path = UPC_DOTS_AVXVNNI;  /* the split-int8 forms exist for the shadow only */
    if (path == UPC_DOTS_AVX512VNNI8) path = UPC_DOTS_AVX512VNNI;
    return K % LIN_G == 0 && pick_lin4(path) ? path : UPC_DOTS_FLOAT;
}

int upc_linear_i8(const upc_linear_args *p) {
    if (!p->x || !p->y || !p->q || p->T < 1 || p->N < 1 || p->K < 1 || p->ldq < p->K || p->nthreads < 1) return 1;
    const int path = upc_linear_dot_path(p->dot_path, p->K);
    if (path < 0) return 3;
    args_t A;
    memset(&A, 0, sizeof A);
    A.x = p->x; A.T = p->T; A.d = p->K; A.nb = (p->N + LIN_ROWS - 1) / LIN_ROWS;
    A.lq = p->q; A.ls = p->s; A.lb = p->b; A.ly = p->y; A.ldq = p->ldq; A.ln = p->N;
    int16_t *xq = NULL;
    float *sx = NULL;
    if (path != UPC_DOTS_FLOAT) {
        xq = malloc(sizeof(int16_t) * (size_t)p->T * p->K);
        sx = malloc(sizeof(float) * (size_t)p->T * (p->K / LIN_G));
        if (!xq || !sx) { free(xq); free(sx); return 2; }
        quantize_x_groups(p->x, p->T, p->K, xq, sx);
        A.l4 = (const void *)pick_lin4(path); A.lxq = xq; A.lsx = sx;
    }
    int rc = run_job(lin_rows, lin_prologue, &A, 0, NULL, p->nthreads, 1);
    free(xq);
    free(sx);
    return rc;
}

/* The bank-sparse FFN on 4-bit rows (p->q4g ... set; wg / wu / wdt unused): the int8 entry's float32 predictor,
   top-k and threading, with q4_kept doing the kept channels. */
int upc_decode_q4(const upc_decode_args *p) { return p->q4g ? upc_decode_i8(p) : 1; }

/* A 4-bit linear layer at decode shapes: y [T, N] = x [T, K] . W^T + b, W's rows as 4-bit codes [N, K / 2]
   (packing.py's layout) with bf16 scale and minimum [N, K / G]; b may be NULL. Two rows per dot call, rows in
   blocks of LIN_ROWS on the helper pool, each row by one thread (the output does not depend on the count). */
typedef struct {
    const float *x;
    float *y;
    const uint8_t *q;
    const uint16_t *s, *lo;
    const float *b;
    int T, N, K, G, nthreads, dot_path;
} upc_linear_q4_args;

int upc_linear_q4_args_size(void) { return (int)sizeof(upc_linear_q4_args); }

static void lin_rows_q4(const args_t *A, int blk, float *yp, float *scr) {
    (void)yp; (void)scr;
    const int r0 = blk * LIN_ROWS, r1 = r0 + LIN_ROWS < A->ln ? r0 + LIN_ROWS : A->ln, ng = A->d / A->G4;
    const long rb = A->d / 2;
    for (int n = r0; n < r1; n += 2) {
        const int m = n + 1 < r1 ? n + 1 : n;  /* an odd last row pairs with itself */
        for (int t = 0; t < A->T; t++) {
            float o0, o1;
            q4_dots(A, A->q4g + n * rb, A->q4g + m * rb, A->q4sg + (long)n * ng, A->q4lg + (long)n * ng,
                    A->q4sg + (long)m * ng, A->q4lg + (long)m * ng, t, &o0, &o1);
            float *y = A->ly + (size_t)t * A->ln;
            y[n] = o0 + (A->lb ? A->lb[n] : 0.f);
            if (m != n) y[m] = o1 + (A->lb ? A->lb[m] : 0.f);
        }
    }
}

int upc_linear_q4(const upc_linear_q4_args *p) {
    const int T = p->T, K = p->K, G = p->G;
    if (!p->x || !p->y || !p->q || !p->s || !p->lo || T < 1 || p->N < 1 || G < 2 || G % 2 || G > 2048 || K < G
        || K % G || p->nthreads < 1) return 1;
    const int path = upc_q4_dot_path(p->dot_path);
    if (path < 0) return 3;
    args_t A;
    memset(&A, 0, sizeof A);
    A.x = p->x; A.T = T; A.d = K; A.nb = (p->N + LIN_ROWS - 1) / LIN_ROWS;
    A.q4g = p->q; A.q4sg = p->s; A.q4lg = p->lo; A.G4 = G; A.lb = p->b; A.ly = p->y; A.ln = p->N;
    int rc = q4_setup(&A, path, T, K);
    if (!rc) {
        q4_quantize_x(&A);
        rc = run_job(lin_rows_q4, lin_prologue, &A, 0, NULL, p->nthreads, 1);
    }
    q4_free(&A);
    return rc;
}

int upc_abi_version(void) { return 9; }
