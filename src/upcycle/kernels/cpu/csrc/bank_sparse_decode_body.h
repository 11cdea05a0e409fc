/* One weight type of the bank-sparse decode kernel, included once per type by bank_sparse_decode.c with
   SUF (the type's suffix: f32, bf16, f16, i8), LD / LD1 (load 8 / 1 weights as float32) and ESZ (element
   size in bytes) defined, and the predictor's type: PDOT (its dot), PLD1, PESZ (the weight type's own for
   float weights; float32 for int8 ones). FN(name) is name_SUF. Int8 rows carry per-row scales
   (A->scg / scu / scd), applied to each kept channel's dots and down row; float rows have none (NULL). */

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

static inline void FN(down4)(float *restrict y, int n, const char *const dn[4], const float h[4]);

/* Four channels at once (one token): 8 gate/up rows stream side by side, sharing each x load,
   then one pass over y adds all four down rows (4x fewer y loads/stores than four axpys).
   pf_down: prefetch the down rows during the gate/up pass (split layout: they live elsewhere; about
   7% faster there, measured, and nothing to gain for bundled rows, which the hardware prefetches). */
static inline void FN(quad)(float *restrict y, const float *restrict x, int n, const char *const g[4],
                            const char *const u[4], const char *const dn[4], const float gsc[4], const float gate[4],
                            int pf_down) {
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
        h[j] = silu(gs * gsc[j]) * us * gate[j];  /* gsc: the gate row's scale; gate: up and down scales too */
    }
    FN(down4)(y, n, dn, h);
}

/* y += sum_j h[j] * down row j, in one pass over y */
static inline void FN(down4)(float *restrict y, int n, const char *const dn[4], const float h[4]) {
    int i;
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
    if (A->q4g) q4_quantize_x(A);  /* 4-bit rows' dots: x's sums (and codes) per group of G4 */
    if (A->lxq) quantize_x_groups(A->x, A->T, A->d, (int16_t *)A->lxq, (float *)A->lsx);  /* int8 rows' dots */
    if (A->qg) {  /* per token and group: the sum of x; with int16 dots also the scale and codes of x */
        const int ng = A->d / A->G;
        for (int t = 0; t < A->T; t++)
            for (int g = 0; g < ng; g++) {
                const float *xg = A->x + (size_t)t * A->d + (size_t)g * A->G;
                float s = 0.f, amax = 0.f;
                for (int i = 0; i < A->G; i++) { s += xg[i]; amax = fmaxf(amax, fabsf(xg[i])); }
                a[(size_t)t * ng + g] = s;
                if (A->xq && A->xsplit) {  /* 15 bits as int8 hi * 128 + lo, lo in [0, 127] */
                    float inv = amax > 0.f ? 16383.f / amax : 0.f;
                    int8_t *h = (int8_t *)(A->xq + (size_t)t * A->xstride) + (size_t)g * A->G;
                    int8_t *l = h + A->d + 32;
                    for (int i = 0; i < A->G; i++) {
                        int v = (int)lrintf(xg[i] * inv);
                        h[i] = (int8_t)(v >> 7);
                        l[i] = (int8_t)(v & 127);
                    }
                    a[(size_t)(A->T + t) * ng + g] = amax / 16383.f;
                } else if (A->xq) {
                    float inv = amax > 0.f ? 32767.f / amax : 0.f;
                    int16_t *q = A->xq + (size_t)t * A->xstride + (size_t)g * A->G;
                    for (int i = 0; i < A->G; i++) q[i] = (int16_t)lrintf(xg[i] * inv);
                    a[(size_t)(A->T + t) * ng + g] = amax / 32767.f;
                }
            }
        return;
    }
    for (int t = 0; t < A->T; t++)
        for (int j = 0; j < A->r; j++)
            a[(size_t)t * A->r + j] = PDOT(A->win + (long)j * A->d * PESZ, A->x + (size_t)t * A->d, A->d);
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
                z[i] = fabsf(silu(g) * u) * (A->ws ? A->ws[c0 + i] : 1.f);
            }
        } else {
            for (int i = 0; i < bank; i++)
                z[i] = PDOT(A->wout + (long)(c0 + i) * r * PESZ, A->a + (size_t)t * r, r)
                       + (A->bout ? PLD1(A->bout, c0 + i) : 0.f);
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
    if (A->q4g) { q4_kept(A, c0, list, nk, mb, gate, yp); return; }
    int q = 0;
    if (T == 1) {
        /* split layout: a channel's down row is not right after its up row, so prefetch it */
        int pf_down = !(A->wdt == A->wu + (long)d * ESZ && A->ldd == A->ldu);
        for (; q + 4 <= nk; q += 4) {
            const char *g4[4], *u4[4], *d4[4];
            float gv[4], gs[4];
            for (int j = 0; j < 4; j++) {
                long c = c0 + list[q + j];
                g4[j] = A->wg + c * A->ldg * ESZ; u4[j] = A->wu + c * A->ldu * ESZ; d4[j] = A->wdt + c * A->ldd * ESZ;
                gv[j] = gate[list[q + j]];
                gs[j] = 1.f;
                if (A->scg) { gs[j] = A->scg[c]; gv[j] *= A->scu[c] * A->scd[c]; }
            }
#if ESZ == 1
            if (A->l4) {  /* int8 rows: integer dots of gate and up (x in int16), then the four down rows */
                float gd[4], ud[4], h[4];
                if (pf_down)
                    for (int j = 0; j < 4; j++)
                        for (int o = 0; o < d; o += 64) __builtin_prefetch(d4[j] + o, 0, 3);
                ((lin4_fn)A->l4)((const int8_t *const *)g4, A->lxq, A->lsx, d, gd);
                ((lin4_fn)A->l4)((const int8_t *const *)u4, A->lxq, A->lsx, d, ud);
                for (int j = 0; j < 4; j++) h[j] = silu(gd[j] * gs[j]) * ud[j] * gv[j];
                FN(down4)(yp, d, d4, h);
                continue;
            }
#endif
            FN(quad)(yp, A->x, d, g4, u4, d4, gs, gv, pf_down);
        }
    }
    /* Several tokens: each kept row is read once, for every token that kept it. */
    for (; q < nk; q++) {
        int i = list[q];
        uint64_t m = mb[i];
        long c = c0 + i;
        const char *g_row = A->wg + c * A->ldg * ESZ, *u_row = A->wu + c * A->ldu * ESZ;
        const char *d_row = A->wdt + c * A->ldd * ESZ;
        const float gs = A->scg ? A->scg[c] : 1.f, us = A->scg ? A->scu[c] * A->scd[c] : 1.f;
        for (int t = 0; t < T; t++) {
            if (!(m >> t & 1ull)) continue;
            const float *xt = A->x + (size_t)t * d;
            float h = silu(FN(dot)(g_row, xt, d) * gs) * FN(dot)(u_row, xt, d) * us * gate[(size_t)t * bank + i];
            FN(axpy)(yp + (size_t)t * d, h, d_row, d);
        }
    }
}

/* The entry point of one weight type: every argument in one struct (see upc_decode_args). Returns 0, or
   nonzero on bad arguments (1) / out of memory (2). */
int FN(upc_decode)(const upc_decode_args *p) {
    const int T = p->T, d = p->d, dff = p->dff, bank = p->bank, keep = p->keep, cb = p->cb, G = p->G;
    if (T < 1 || T > 64 || d < 1 || bank < 1 || dff % bank || keep > bank || keep < 1 || p->nthreads < 1) return 1;
    if (p->qg && (!p->qu || !p->sg || !p->lg || !p->su || !p->lu || (cb != 1 && cb != 2 && cb != 4 && cb != 8) || G < 1
                  || d % G || G % (8 / cb) || p->use_sigmoid)) return 1;
    if (!p->qg && (!p->win || !p->wout || p->r < 1)) return 1;
    if ((p->scg || p->scu || p->scd) && !(p->scg && p->scu && p->scd)) return 1;  /* int8: all three */
    size_t per_token = p->qg ? 2 * (size_t)(d / G) : (size_t)p->r;
    float *a = malloc(sizeof(float) * ((size_t)T * per_token + 1));
    int path = upc_resolve_dot_path(p->dot_path);
    if (path < 0) { free(a); return 3; }  /* a path this CPU (or this build) does not have */
    int16_t *xq = NULL, *lxq = NULL;
    float *lsx = NULL;
    const void *qd = NULL, *l4 = NULL;
#ifdef SHADOW_INT16
    const int xsplit = path == UPC_DOTS_AVXVNNI8 || path == UPC_DOTS_AVX512VNNI8;
    const long xstride = xsplit ? d + 32 : d;  /* split: d + 32 hi bytes then d + 32 lo bytes per token */
    if (p->qg && G <= 2048 && path != UPC_DOTS_FLOAT) {
        qd = (const void *)pick_qdot16(path, cb);
        if (qd) xq = calloc((size_t)T * xstride + 8, sizeof(int16_t));
    }
#endif
#if ESZ == 1
    /* 4-bit rows (upc_decode_q4): checked here, their buffers set up once A exists */
    int q4path = UPC_DOTS_FLOAT;
    if (p->q4g) {
        const int G4 = p->G4;
        if (!p->q4u || !p->q4d || !p->q4sg || !p->q4lg || !p->q4su || !p->q4lu || !p->q4sd || !p->q4ld || G4 < 2
            || G4 % 2 || G4 > 2048 || d % G4) { free(a); free(xq); return 1; }
        q4path = upc_q4_dot_path(p->q4_path);
        if (q4path < 0) { free(a); free(xq); return 3; }
    }
    /* int8 rows, one token: gate/up by integer dots (the int8 linear's), if the path and d allow */
    int lpath = upc_linear_dot_path(p->lin_path, d);
    if (lpath < 0) { free(a); free(xq); return 3; }
    if (T == 1 && lpath != UPC_DOTS_FLOAT && !p->q4g) {
        l4 = (const void *)pick_lin4(lpath);
        lxq = malloc(sizeof(int16_t) * (size_t)T * d);
        lsx = malloc(sizeof(float) * (size_t)T * (d / LIN_G));
        if (!lxq || !lsx) { free(a); free(xq); free(lxq); free(lsx); return 2; }
    }
#endif
    if (!a) { free(xq); free(lxq); free(lsx); return 2; }  /* xq NULL: float dots */
    args_t A = {p->x, a, T, d, dff, p->r, bank, keep, p->use_sigmoid, dff / bank, p->ldg, p->ldu, p->ldd,
                (long)(dff / bank) * keep, p->alpha, p->win, p->wout, p->bout, p->wg, p->wu, p->wdt, p->idx_out,
                p->qg, p->qu, p->sg, p->lg, p->su, p->lu, cb, G, xq, p->ws, qd, p->scg, p->scu, p->scd};
    A.l4 = l4; A.lxq = lxq; A.lsx = lsx;
#if ESZ == 1
    if (p->q4g) {
        A.q4g = p->q4g; A.q4u = p->q4u; A.q4d = p->q4d; A.q4sg = p->q4sg; A.q4lg = p->q4lg; A.q4su = p->q4su;
        A.q4lu = p->q4lu; A.q4sd = p->q4sd; A.q4ld = p->q4ld; A.G4 = p->G4;
        if (q4_setup(&A, q4path, T, d)) { q4_free(&A); free(a); free(xq); free(lxq); free(lsx); return 2; }
    }
#endif
#ifdef SHADOW_INT16
    A.xstride = xstride; A.xsplit = xsplit;
#else
    A.xstride = d;
#endif
    /* per-slot scratch, in floats: z, gate [T*bank], kv, ki, list, mask bits (uint64 per channel) */
    size_t scratch = (size_t)bank * (T + 5) + 2 * (size_t)keep + 2;
    int rc = run_job(FN(bank), FN(prologue), &A, scratch, p->y, p->nthreads, 0);
    free(a);
    free(xq);
    free(lxq);
    free(lsx);
#if ESZ == 1
    q4_free(&A);
#endif
    return rc;
}
