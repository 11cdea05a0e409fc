/* One weight type of the bank-sparse decode kernel, included once per type by bank_sparse_decode.c with
   SUF (the type's suffix: f32, bf16, f16), LD / LD1 (load 8 / 1 weights as float32) and ESZ (element
   size in bytes) defined. FN(name) is name_SUF. */

static inline float FN(dot)(const char *w, const float *restrict x, int n) {
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

static inline void FN(axpy)(float *restrict y, float h, const char *w, int n) {
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
static inline void FN(quad)(float *restrict y, const float *restrict x, int n, const char *const g[4],
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

static void FN(prologue)(args_t *A) {
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
            a[(size_t)t * A->r + j] = FN(dot)(A->win + (long)j * A->d * ESZ, A->x + (size_t)t * A->d, A->d);
}

/* One bank: its logits for every token, the top-keep per token, then the kept rows' work. */
static void FN(bank)(const args_t *A, int b, float *yp, float *scr) {
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
                z[i] = FN(dot)(A->wout + (long)(c0 + i) * r * ESZ, A->a + (size_t)t * r, r)
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
            FN(quad)(yp, A->x, d, g4, u4, d4, gv, pf_down);
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
            float h = silu(FN(dot)(g_row, xt, d)) * FN(dot)(u_row, xt, d) * gate[(size_t)t * bank + i];
            FN(axpy)(yp + (size_t)t * d, h, d_row, d);
        }
    }
}

/* The entry point of one weight type: every argument in one struct (see upc_decode_args). Returns 0, or
   nonzero on bad arguments (1) / out of memory (2). */
int FN(upc_decode)(const upc_decode_args *p) {
    const int T = p->T, d = p->d, dff = p->dff, bank = p->bank, keep = p->keep, cb = p->cb, G = p->G;
    if (T < 1 || T > 64 || d < 1 || bank < 1 || dff % bank || keep > bank || keep < 1 || p->nthreads < 1) return 1;
    if (p->qg && (!p->qu || !p->sg || !p->lg || !p->su || !p->lu || (cb != 2 && cb != 4 && cb != 8) || G < 1
                  || d % G || G % (8 / cb) || p->use_sigmoid)) return 1;
    if (!p->qg && (!p->win || !p->wout || p->r < 1)) return 1;
    size_t per_token = p->qg ? 2 * (size_t)(d / G) : (size_t)p->r;
    float *a = malloc(sizeof(float) * ((size_t)T * per_token + 1));
    int16_t *xq = NULL;
#ifdef SHADOW_INT16
    if (p->qg && G <= 2048 && p->int_dots) xq = calloc((size_t)T * d + 8, sizeof(int16_t));
#endif
    if (!a) { free(xq); return 2; }  /* xq NULL: float dots */
    args_t A = {p->x, a, T, d, dff, p->r, bank, keep, p->use_sigmoid, dff / bank, p->ldg, p->ldu, p->ldd,
                (long)(dff / bank) * keep, p->alpha, p->win, p->wout, p->bout, p->wg, p->wu, p->wdt, p->idx_out,
                p->qg, p->qu, p->sg, p->lg, p->su, p->lu, cb, G, xq};
    /* per-slot scratch, in floats: z, gate [T*bank], kv, ki, list, mask bits (uint64 per channel) */
    size_t scratch = (size_t)bank * (T + 5) + 2 * (size_t)keep + 2;
    int rc = run_job(FN(bank), FN(prologue), &A, scratch, p->y, p->nthreads);
    free(a);
    free(xq);
    return rc;
}
