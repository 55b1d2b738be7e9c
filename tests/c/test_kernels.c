/* Kernel-level checks: the dot, outer and integer dot kernels of every
 * usable tier against the ref tier, over shapes with tails on every side
 * (m, n, K not multiples of the vector or tile widths, K across the amx
 * tier's 128-column chunks, more rows than a group of its C tiles, more
 * columns than a chunk of them), every weight format
 * and several group sizes, sub-matrices with a column origin inside a
 * group, index arrays with duplicates, accumulation, strided D.  The
 * integer dot form keeps K a multiple of the group size, as the layers
 * require (the avx2 form relies on it for groups of 128 columns).
 *
 * Tolerance: |tier - ref| <= 1e-5 * sum_k |A_k W_k| per element (integer
 * dot: the same with the scaled terms).  Two fp32 summation orders differ
 * by far less; bf16 products without the amx tier's three-part split of
 * the activations would miss it by an order of magnitude.  Built against the kernel objects directly (the
 * kernel tables are internal). */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint32_t rnd(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 16);
}
static float frand(void) { return (float)(rnd() % 2000001) / 1000000.0f - 1.0f; }

static int failures = 0, checks = 0;

/* A [rows][cols] weight matrix of format fmt, groups of gs columns. */
typedef struct wstore {
    kt_wmat w;
    void *data, *aux;
    float *scale;
} wstore;

static void wstore_make(wstore *s, int fmt, int64_t gs, int64_t rows, int64_t cols) {
    int64_t ng = gs >= cols ? 1 : (cols + gs - 1) / gs, rb = kt_row_bytes(fmt, cols);
    float *x = malloc((size_t)cols * sizeof(float));
    s->data = calloc((size_t)(rows * rb + 64), 1);
    s->scale = calloc((size_t)(rows * ng + 1), sizeof(float));
    s->aux = calloc((size_t)(rows * ng + 1), sizeof(float));
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t c = 0; c < cols; c++) x[c] = frand() * (1.0f + (float)(r % 3));
        uint8_t *q = (uint8_t *)s->data + r * rb;
        if (fmt == KT_W_F32) memcpy(q, x, (size_t)cols * 4);
        else if (kt_quant_row(fmt, gs, x, cols, q, s->scale + r * ng,
                              fmt == KT_W_I4Z ? (void *)((uint8_t *)s->aux + r * ng)
                                              : (void *)((float *)s->aux + r * ng)) != KTMOE_OK)
            failures++;
    }
    kt_wmat w = {fmt, s->data, fmt == KT_W_F32 || fmt == KT_W_BF16 ? cols : rb, s->scale,
                 fmt == KT_W_I4Z || fmt == KT_W_I4M ? s->aux : NULL, ng, gs, 0};
    if (fmt == KT_W_F32 || fmt == KT_W_BF16) w = kt_plain(fmt, s->data, cols);
    s->w = w;
    free(x);
}

static void wstore_free(wstore *s) {
    free(s->data);
    free(s->scale);
    free(s->aux);
}

static void compare(const char *what, const char *tier, const float *c, const float *cref,
                    const float *bound, int64_t m, int64_t n, int64_t ldc, const char *shape) {
    checks++;
    for (int64_t i = 0; i < m; i++)
        for (int64_t j = 0; j < n; j++) {
            float e = fabsf(c[i * ldc + j] - cref[i * ldc + j]);
            if (!(e <= 1e-5f * bound[i * ldc + j] + 1e-30f)) {
                printf("FAIL %s %s %s at (%lld, %lld): %g vs ref %g (bound %g)\n", what, tier, shape,
                       (long long)i, (long long)j, c[i * ldc + j], cref[i * ldc + j], bound[i * ldc + j]);
                failures++;
                return;
            }
        }
}

/* Whether row i of a batch (row), computed again in a call of its own
 * (one), is the same bit for bit (batch invariance); a failure if not. */
static int same_alone(const char *what, const char *tier, int64_t i, const float *one, const float *row,
                      int64_t n, const char *shape) {
    if (memcmp(one, row, (size_t)n * sizeof(float)) == 0) return 1;
    fprintf(stderr, "FAIL %s %s: row %lld alone differs from the batch (%s)\n", what, tier, (long long)i, shape);
    failures++;
    return 0;
}

static const struct { int fmt; int64_t gs; } formats[] = {
    {KT_W_F32, INT64_MAX}, {KT_W_BF16, INT64_MAX}, {KT_W_I8, 32}, {KT_W_I8, 1 << 30},
    {KT_W_I4S, 64}, {KT_W_I4Z, 32}, {KT_W_I4M, 128}, {KT_W_FP8, 128}, {KT_W_MXFP4, 32},
    {KT_W_I4S, 8}, {KT_W_I4S, 1 << 30}, {KT_W_I4Z, 128}, {KT_W_I8, 128}, {KT_W_I4S, 256}, {KT_W_I4M, 1 << 30},
};
#define NFMT (sizeof formats / sizeof formats[0])

/* dot form: C = A W^T, W [n][K] taken at column origin c0 of a wider matrix */
static void check_dot(const kt_kernels *kt, int64_t m, int64_t n, int64_t K, int fi, int accum) {
    int fmt = formats[fi].fmt;
    int64_t gs = formats[fi].gs, c0 = gs > (int64_t)1 << 29 || K % 64 == 0 ? 0 : 8;
    if (fmt == KT_W_F32 || fmt == KT_W_BF16) c0 = 3;
    int64_t lda = K + 5, rowsA = m + 3, ldc = n + 2;
    wstore ws;
    wstore_make(&ws, fmt, gs, n + 1, c0 + K + 8);
    kt_wmat w = kt_wsub(&ws.w, 1, c0);
    float *a = malloc((size_t)(rowsA * lda + 1) * sizeof(float));
    int32_t *aidx = malloc((size_t)(m + 1) * sizeof(int32_t));
    float *c = malloc((size_t)(m * ldc + 1) * sizeof(float)), *cref = malloc((size_t)(m * ldc + 1) * sizeof(float));
    float *bound = calloc((size_t)(m * ldc + 1), sizeof(float));
    for (int64_t i = 0; i < rowsA * lda; i++) a[i] = frand();
    for (int64_t i = 0; i < m; i++) aidx[i] = (int32_t)(rnd() % rowsA);
    float *c_in = malloc((size_t)(m * ldc + 1) * sizeof(float));
    for (int64_t i = 0; i < m * ldc; i++) c[i] = cref[i] = c_in[i] = frand();
    for (int64_t i = 0; i < m; i++)
        for (int64_t j = 0; j < n; j++) {
            float s = accum ? fabsf(c[i * ldc + j]) : 0.0f;
            for (int64_t k = 0; k < K; k++) s += fabsf(a[aidx[i] * lda + k] * kt_w_at(&w, j, k));
            bound[i * ldc + j] = s;
        }
    kt_kernels_ref.dot(m, n, K, a, lda, aidx, &w, cref, ldc, accum);
    kt->dot(m, n, K, a, lda, aidx, &w, c, ldc, accum);
    char shape[96];
    snprintf(shape, sizeof shape, "fmt %d gs %lld m %lld n %lld K %lld accum %d", fmt, (long long)gs,
             (long long)m, (long long)n, (long long)K, accum);
    compare("dot", ktmoe_isa_name(kt->isa), c, cref, bound, m, n, ldc, shape);
    /* dot: each row as in a call of its own, bit for bit (batch invariance) */
    float *one = malloc((size_t)(ldc + 1) * sizeof(float));
    for (int64_t i = 0; i < m; i++) {
        for (int64_t j = 0; j < n; j++) one[j] = c_in[i * ldc + j];
        kt->dot(1, n, K, a, lda, aidx + i, &w, one, ldc, accum);
        if (!same_alone("dot", ktmoe_isa_name(kt->isa), i, one, c + i * ldc, n, shape)) break;
    }
    free(one);
    if (kt->dot_many) {
        for (int64_t i = 0; i < m * ldc; i++) c[i] = c_in[i];
        kt->dot_many(m, n, K, a, lda, aidx, &w, c, ldc, accum);
        compare("dot_many", ktmoe_isa_name(kt->isa), c, cref, bound, m, n, ldc, shape);
    }
    free(c_in);
    free(a), free(aidx), free(c), free(cref), free(bound);
    wstore_free(&ws);
}

/* outer form: C = D W, W [K][n] (rows through widx, or rows 0..K when
 * plain_rows: the panels packed by their first row block), D strided;
 * unit_scales: every scale 1 (ldg 0), as the SFT backward passes int8 and
 * I4S weights whose scales it has folded into D */
static void check_outer(const kt_kernels *kt, int64_t m, int64_t n, int64_t K, int fi, int accum,
                        int transposed, int plain_rows, int unit_scales) {
    static const float one = 1.0f;
    int fmt = formats[fi].fmt;
    /* an origin inside a group: 8, or 16 (the amx tier's 16-column tiles
     * inside a K group) */
    int64_t gs = formats[fi].gs, c0 = gs > (int64_t)1 << 29 ? 0 : accum ? 8 : 16;
    if (fmt == KT_W_F32 || fmt == KT_W_BF16) c0 = 3;
    int64_t ldc = n + 1, wrows = K + 4;
    wstore ws;
    wstore_make(&ws, fmt, gs, wrows, c0 + n + 8);
    kt_wmat w = kt_wsub(&ws.w, 0, c0);
    if (unit_scales) w.scale = &one, w.ldg = 0;
    int64_t rowsD = m + 2;
    int64_t dsi = transposed ? 1 : K + 3, dsk = transposed ? rowsD : 1;
    float *d = malloc((size_t)(rowsD * (K + 3) + 1) * sizeof(float));
    int32_t *didx = malloc((size_t)(m + 1) * sizeof(int32_t)), *widx = malloc((size_t)(K + 1) * sizeof(int32_t));
    float *c = malloc((size_t)(m * ldc + 1) * sizeof(float)), *cref = malloc((size_t)(m * ldc + 1) * sizeof(float));
    float *bound = calloc((size_t)(m * ldc + 1), sizeof(float));
    for (int64_t i = 0; i < rowsD * (K + 3); i++) d[i] = frand();
    for (int64_t i = 0; i < m; i++) didx[i] = (int32_t)(rnd() % rowsD);
    for (int64_t k = 0; k < K; k++) widx[k] = plain_rows ? (int32_t)k : (int32_t)(rnd() % wrows);
    float *c_in = malloc((size_t)(m * ldc + 1) * sizeof(float));
    for (int64_t i = 0; i < m * ldc; i++) c[i] = cref[i] = c_in[i] = frand();
    for (int64_t i = 0; i < m; i++)
        for (int64_t j = 0; j < n; j++) {
            float s = accum ? fabsf(c[i * ldc + j]) : 0.0f;
            for (int64_t k = 0; k < K; k++)
                s += fabsf(d[didx[i] * dsi + k * dsk] * kt_w_at(&w, widx[k], j));
            bound[i * ldc + j] = s;
        }
    const int32_t *wi = plain_rows ? NULL : widx;
    kt_kernels_ref.outer(m, n, K, d, dsi, dsk, didx, &w, wi, cref, ldc, accum);
    kt->outer(m, n, K, d, dsi, dsk, didx, &w, wi, c, ldc, accum);
    char shape[128];
    snprintf(shape, sizeof shape, "fmt %d gs %lld m %lld n %lld K %lld accum %d transposed %d plain %d unit %d",
             fmt, (long long)gs, (long long)m, (long long)n, (long long)K, accum, transposed, plain_rows,
             unit_scales);
    compare("outer", ktmoe_isa_name(kt->isa), c, cref, bound, m, n, ldc, shape);
    if (kt->outer_many) {
        float *cm = malloc((size_t)(m * ldc + 1) * sizeof(float));
        for (int64_t i = 0; i < m * ldc; i++) cm[i] = c_in[i];
        kt->outer_many(m, n, K, d, dsi, dsk, didx, &w, wi, cm, ldc, accum);
        compare("outer_many", ktmoe_isa_name(kt->isa), cm, cref, bound, m, n, ldc, shape);
        free(cm);
    }
    /* each row as in a call of its own, bit for bit: 1-3 rows of D take
     * paths of their own (no panel), with the same sums in the same order */
    float *alone = malloc((size_t)(ldc + 1) * sizeof(float));
    for (int64_t i = 0; i < m; i++) {
        for (int64_t j = 0; j < n; j++) alone[j] = c_in[i * ldc + j];
        kt->outer(1, n, K, d, dsi, dsk, didx + i, &w, wi, alone, ldc, accum);
        if (!same_alone("outer", ktmoe_isa_name(kt->isa), i, alone, c + i * ldc, n, shape)) break;
    }
    free(alone), free(c_in);
    free(d), free(didx), free(widx), free(c), free(cref), free(bound);
    wstore_free(&ws);
}

/* a tier's activation quantization: kt_quant_act's codes, scales and sums, bit for bit */
static void check_quant_act(const kt_kernels *kt, int64_t K, int deint) {
    int64_t nb = K / KT_QBLK;
    float *x = malloc((size_t)K * sizeof(float)), *d = malloc((size_t)(2 * nb) * sizeof(float)), *s = d + nb;
    float *dr = malloc((size_t)(2 * nb) * sizeof(float)), *sr = dr + nb;
    int8_t *q = malloc((size_t)K), *qr = malloc((size_t)K);
    for (int64_t k = 0; k < K; k++) /* block 1 all zero; scales from 1e-3 to 1e3 */
        x[k] = k / KT_QBLK == 1 ? 0.0f : frand() * powf(10.0f, (float)((k / KT_QBLK) % 7) - 3.0f);
    kt_quant_act(x, K, deint, qr, dr, sr);
    kt->quant_act(x, K, deint, q, d, s);
    checks++;
    if (memcmp(q, qr, (size_t)K) || memcmp(d, dr, (size_t)nb * sizeof(float)) ||
        memcmp(s, sr, (size_t)nb * sizeof(float))) {
        failures++;
        printf("FAIL quant_act %s K %lld deint %d differs from kt_quant_act\n", ktmoe_isa_name(kt->isa),
               (long long)K, deint);
    }
    free(x), free(d), free(dr), free(q), free(qr);
}

/* integer dot form, activations in layout deint */
static void check_qdot(const kt_kernels *kt, int64_t m, int64_t n, int64_t K, int fmt, int64_t gs,
                       int deint) {
    int64_t c0 = gs < K ? gs / 2 : 0; /* an origin inside a group (a multiple of 32) */
    if (deint == 2 || c0 % KT_QBLK) c0 = 0;
    int64_t rowsX = m + 2, nb = K / KT_QBLK, ldc = n + 3;
    wstore ws;
    wstore_make(&ws, fmt, gs, n, c0 + K);
    kt_wmat w = kt_wsub(&ws.w, 0, c0);
    int8_t *q = malloc((size_t)(rowsX * K));
    float *xd = malloc((size_t)(rowsX * nb) * sizeof(float)), *xs = malloc((size_t)(rowsX * nb) * sizeof(float));
    float *x = malloc((size_t)K * sizeof(float));
    for (int64_t r = 0; r < rowsX; r++) {
        for (int64_t k = 0; k < K; k++) x[k] = frand() * (k % 7 == 0 ? 4.0f : 1.0f);
        kt_quant_act(x, K, deint, q + r * K, xd + r * nb, xs + r * nb);
    }
    kt_qact xa = {q, xd, xs, K, nb, deint};
    int32_t *aidx = malloc((size_t)(m + 1) * sizeof(int32_t));
    for (int64_t i = 0; i < m; i++) aidx[i] = (int32_t)(rnd() % rowsX);
    float *c = calloc((size_t)(m * ldc + 1), sizeof(float)), *cref = calloc((size_t)(m * ldc + 1), sizeof(float));
    float *bound = calloc((size_t)(m * ldc + 1), sizeof(float));
    for (int64_t i = 0; i < m; i++)
        for (int64_t j = 0; j < n; j++) {
            float s = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                int64_t g = (w.g0 + b * KT_QBLK) / w.gs;
                float is = 0.0f;
                for (int k = 0; k < KT_QBLK; k++)
                    is += fabsf((float)q[aidx[i] * K + kt_act_pos(deint, b * KT_QBLK + k)] *
                                (float)kt_w_code(&w, j, b * KT_QBLK + k));
                s += fabsf(xd[aidx[i] * nb + b] * w.scale[j * w.ldg + g]) * is +
                     fabsf(kt_w_offset(&w, j, g) * xs[aidx[i] * nb + b]);
            }
            bound[i * ldc + j] = s;
        }
    kt_kernels_ref.qdot(m, n, K, &xa, aidx, &w, cref, ldc);
    kt->qdot(m, n, K, &xa, aidx, &w, c, ldc);
    char shape[96];
    snprintf(shape, sizeof shape, "fmt %d gs %lld m %lld n %lld K %lld deint %d", fmt, (long long)gs,
             (long long)m, (long long)n, (long long)K, deint);
    compare("qdot", ktmoe_isa_name(kt->isa), c, cref, bound, m, n, ldc, shape);
    if (kt->qdot_many) { /* may choose its path by m: only against ref */
        float *cm = calloc((size_t)(m * ldc + 1), sizeof(float));
        kt->qdot_many(m, n, K, &xa, aidx, &w, cm, ldc);
        compare("qdot_many", ktmoe_isa_name(kt->isa), cm, cref, bound, m, n, ldc, shape);
        free(cm);
    }
    /* each row as in a call of its own (decode takes its own path), bit
     * for bit: a token's result does not depend on the tokens beside it */
    float *one = calloc((size_t)n + 1, sizeof(float));
    for (int64_t i = 0; i < m; i++) {
        kt->qdot(1, n, K, &xa, aidx + i, &w, one, n);
        if (!same_alone("qdot", ktmoe_isa_name(kt->isa), i, one, c + i * ldc, n, shape)) break;
    }
    free(one);
    free(q), free(xd), free(xs), free(x), free(aidx), free(c), free(cref), free(bound);
    wstore_free(&ws);
}

/* An infinity and a NaN among the activations (bf16 W, dot and outer
 * forms): every output finite or not as in the ref tier, the rows without
 * them within the usual bound.  The amx tier splits such blocks apart. */
static void check_nonfinite(const kt_kernels *kt) {
    int fi = 0;
    while (formats[fi].fmt != KT_W_BF16) fi++;
    const int64_t m = 21, n = 40, K = 100;
    wstore ws;
    wstore_make(&ws, KT_W_BF16, formats[fi].gs, K > n ? K : n, K);
    float *a = malloc((size_t)(m * K) * sizeof(float)), *c = malloc((size_t)(m * K) * sizeof(float));
    float *cref = malloc((size_t)(m * K) * sizeof(float)), *bound = malloc((size_t)(m * K) * sizeof(float));
    for (int64_t i = 0; i < m * K; i++) a[i] = frand();
    a[3 * K + 7] = INFINITY;
    a[5 * K + 50] = NAN;
    a[17 * K + 99] = -INFINITY;
    for (int form = 0; form < 2; form++) {
        /* dot: C [m][n] = A W[0..n)^T; outer: C [m][n] = A W[0..K)[0..n) */
        for (int64_t i = 0; i < m; i++)
            for (int64_t j = 0; j < n; j++) {
                float s = 0.0f;
                for (int64_t k = 0; k < K; k++)
                    s += fabsf(a[i * K + k] * kt_w_at(&ws.w, form ? k : j, form ? j : k));
                bound[i * n + j] = s;
            }
        if (form) {
            kt_kernels_ref.outer(m, n, K, a, K, 1, NULL, &ws.w, NULL, cref, n, 0);
            kt->outer(m, n, K, a, K, 1, NULL, &ws.w, NULL, c, n, 0);
        } else {
            kt_kernels_ref.dot(m, n, K, a, K, NULL, &ws.w, cref, n, 0);
            kt->dot(m, n, K, a, K, NULL, &ws.w, c, n, 0);
        }
        for (int64_t i = 0; i < m * n; i++) {
            checks++;
            int bad = isfinite(c[i]) != isfinite(cref[i]) || isnan(c[i]) != isnan(cref[i]) ||
                      (isfinite(bound[i]) && fabsf(c[i] - cref[i]) > 1e-5f * bound[i]);
            if (bad && failures++ < 20)
                printf("FAIL nonfinite %s %s [%lld]: %g vs ref %g\n", form ? "outer" : "dot",
                       ktmoe_isa_name(kt->isa), (long long)i, c[i], cref[i]);
        }
    }
    free(a), free(c), free(cref), free(bound);
    wstore_free(&ws);
}

int main(void) {
    static const int64_t ms[] = {1, 3, 17, 33}, ns[] = {1, 7, 16, 37}, nouter[] = {1, 7, 37, 72};
    static const int64_t Kdot[] = {0, 37, 40, 264, 520}, Kout[] = {0, 1, 31, 33, 300};
    int tiers = 0;
    for (int isa = KTMOE_ISA_AVX2; isa <= KTMOE_ISA_AMX; isa++) {
        if (!ktmoe_isa_usable((ktmoe_isa)isa)) continue;
        const kt_kernels *kt = kt_kernels_get((ktmoe_isa)isa);
        int before = failures;
        tiers++;
        for (int fi = 0; fi < (int)NFMT; fi++)
            for (int a = 0; a < 4; a++)
                for (int b = 0; b < 4; b++)
                    for (int kk = 0; kk < 5; kk++) {
                        int accum = (a + b + kk) & 1;
                        check_dot(kt, ms[a], ns[b], Kdot[kk], fi, accum);
                        int64_t K = Kout[kk];
                        check_outer(kt, ms[a], ns[b], K, fi, accum, (a + kk) & 1, 0, 0);
                        check_outer(kt, ms[a], nouter[b], K, fi, accum, (b + kk) & 1, 1, 0);
                    }
        /* whole groups from column 0: dot_many's panels packed 16 bytes of
         * each W row at a time; one scale a row (int8, I4S): the scales
         * folded out of the panels when C is written (K = 416: a short
         * last panel) */
        for (int fi = 0; fi < (int)NFMT; fi++)
            for (int a = 2; a < 4; a++)
                for (int64_t K = 384; K <= 416; K += 32) check_dot(kt, ms[a], 72, K, fi, (a + (K > 384)) & 1);
        /* int8 and I4S with unit scales: the outer panels converted without
         * a multiply */
        for (int fi = 0; fi < (int)NFMT; fi++)
            if ((formats[fi].fmt == KT_W_I8 || formats[fi].fmt == KT_W_I4S) && formats[fi].gs > (int64_t)1 << 29)
                for (int a = 0; a < 4; a++)
                    for (int kk = 2; kk < 5; kk++) check_outer(kt, ms[a], nouter[a | 2], Kout[kk], fi, kk & 1, a & 1, 1, 1);
        /* two rows of D (1 and 3 above): the few-rows paths' other case;
         * the dot form's few-rows path in blocks of 1-3 rows (up to 11) */
        for (int fi = 0; fi < (int)NFMT; fi++)
            for (int kk = 2; kk < 5; kk++) {
                check_dot(kt, 2, 37, Kdot[kk], fi, kk & 1);
                check_dot(kt, 5, 72, Kdot[kk], fi, (kk + 1) & 1);
                check_dot(kt, 11, 16, Kdot[kk], fi, kk & 1);
                check_outer(kt, 2, 72, Kout[kk], fi, kk & 1, kk & 1, 1, 0);
                check_outer(kt, 2, 37, Kout[kk], fi, (kk + 1) & 1, 0, 0, (formats[fi].fmt == KT_W_I8 || formats[fi].fmt == KT_W_I4S) && formats[fi].gs > (int64_t)1 << 29);
            }
        /* more rows than a group of 4 C tiles (64) and more columns than a
         * chunk (256): the amx tier's tile kernels' chunks and tails (bf16
         * W; int8, FP8 and 4-bit codes, with one scale a row or K groups) */
        for (int fi = 0; fi < (int)NFMT; fi++) {
            int fmt = formats[fi].fmt;
            int codes = (fmt == KT_W_I8 || fmt == KT_W_I4S) && formats[fi].gs > (int64_t)1 << 29;
            if (fmt != KT_W_F32 && fmt != KT_W_MXFP4) {
                check_dot(kt, 70, 300, 264, fi, 0);
                check_dot(kt, 81, 263, 40, fi, 1);
                check_outer(kt, 70, 300, 300, fi, 1, 0, 0, 0);
                check_outer(kt, 81, 263, 33, fi, 0, 1, 1, 0);
            }
            if (codes) check_outer(kt, 70, 263, 300, fi, 1, 1, 0, 1);
        }
        check_nonfinite(kt);
        for (int deint = 0; deint < 3; deint++)
            for (int64_t K = 64; K <= 2048; K *= 2) check_quant_act(kt, deint == 2 ? K : K - 32, deint);
        static const struct { int fmt; int64_t gs; } qf[] = {
            {KT_W_I8, 32}, {KT_W_I8, 1 << 30}, {KT_W_I4S, 64}, {KT_W_I4Z, 128},
            {KT_W_I4M, 32}, {KT_W_I4M, 1 << 30}, {KT_W_I4S, 1 << 30}};
        static const int64_t Kq[] = {32, 128, 320, 384}; /* 320: a last group of 64 */
        for (int f = 0; f < (int)(sizeof qf / sizeof qf[0]); f++)
            for (int deint = 0; deint < 3; deint++) {
                if (qf[f].fmt == KT_W_I8 && deint) continue;
                for (int a = 0; a < 4; a++)
                    for (int kk = 0; kk < 4; kk++) {
                        int64_t K = Kq[kk];
                        if (deint == 2 && (K % 64 || (qf[f].gs < K && qf[f].gs % 64))) continue;
                        check_qdot(kt, ms[a], ns[(a + kk) % 4], K, qf[f].fmt, qf[f].gs, deint);
                    }
            }
        printf("tier %s%s: %s\n", ktmoe_isa_name((ktmoe_isa)isa),
               ktmoe_isa_emulated((ktmoe_isa)isa) ? " (emulated)" : "",
               failures == before ? "matches ref" : "FAILED");
    }
    printf("%d checks over %d tiers, %d failures\n", checks, tiers, failures);
    return failures ? 1 : 0;
}
