/* The avx2 tier: AVX2 + FMA (+F16C) kernels.  Compiled with -mavx2 -mfma
 * -mf16c; chosen only when the CPU and OS support them.  Checked against
 * the ref tier by the test suite.
 *
 * dot form (x W^T, forward): 3 rows of A x 4 rows of W per micro-kernel,
 *   8 k per step; W rows are converted (bf16) or dequantized (int8, int4)
 *   to an fp32 panel; one horizontal sum per output at the end.
 * outer form (dh W, backward): 6 rows of D x 16 columns of W per
 *   micro-kernel, D broadcast from memory; W converted to an fp32 panel of
 *   128 rows x 32 columns (whole 64-byte lines of bf16) that stays in L1
 *   while all rows of D stream past it.  Without a row index (widx), the
 *   first row block converts the panel as its FMAs use it
 *   (outer_micro_pack).  From 4 rows of D, K chunk by K chunk: all the
 *   column panels of 128 rows of W, then the next 128 (outer_chunks),
 *   whose rows are prefetched whole meanwhile.
 * dot_many (SFT layers, 12 rows of A or more): the outer micro-kernel on
 *   W rows transposed into the same kind of panel (k-ordered sums).
 * The panel forms prefetch the next panel's weights (outer_chunks: the next
 *   K chunk's) while computing one.
 * Few rows (1-3 of D in the outer form, 1-11 of A in the row-order dot
 *   form): W dequantized in registers, 32 columns of a row at a time
 *   (w_row32), no panel; the same sums in the same order as the panel path.
 * Quantized W is dequantized to exactly the fp32 values of kt_w_at (the ref
 * tier's definition), so tiers differ only in the order of the fp32 sums;
 * except that int8 and I4S weights with one scale a row may leave the scale
 * out: dot_many and the row-order dot form multiply each output by it once
 * (kt_dot_fold_ok, dot_fold), and an outer-form W whose scales are all 1
 * (the SFT backward's dx, whose dg and du carry the scales) converts its
 * codes without a multiply.  One rounding fewer or moved, within the same
 * bound. */
#include "../../internal.h"

#include "../ymm_common.h"

#include <math.h>

/* ---- loads ---- */

KT_INLINE __m256 ld8_w(const void *w, int bf16, int64_t i) {
    return bf16 ? ld8_bf16((const uint16_t *)w + i) : _mm256_loadu_ps((const float *)w + i);
}

/* ---- dequantization ---- */

/* The raw pseudo-formats (KT_RAW_I8, KT_RAW_I4S, internal.h): the outer
 * form's W with unit scales (kt_outer_fmt), the dot form's with one scale
 * a row (dot_fold). */
KT_INLINE int fmt_raw(int fmt) { return fmt == KT_RAW_I8 || fmt == KT_RAW_I4S; }

/* The dequantization constants of group g of row r. */
typedef struct deq_grp {
    __m256 s, mn;  /* scale; min (I4M)            */
    __m256i z;     /* integer offset (I4S, I4Z)   */
} deq_grp;

KT_INLINE deq_grp deq_group(const kt_wmat *w, int64_t r, int64_t g) {
    deq_grp d;
    int64_t i = r * w->ldg + g;
    d.s = _mm256_set1_ps(w->scale[i]);
    d.mn = _mm256_set1_ps(w->fmt == KT_W_I4M ? ((const float *)w->aux)[i] : 0.0f);
    d.z = _mm256_set1_epi32(w->fmt == KT_W_I4Z ? ((const uint8_t *)w->aux)[i] : 8);
    return d;
}

/* 4-bit codes (int32 lanes) as fp32 values of the group constants d: one
 * group, or one per lane (fmt a constant after inlining). */
KT_INLINE __m256 deq_codes(const int fmt, __m256i u, const deq_grp *d) {
    if (fmt == KT_W_MXFP4) return _mm256_mul_ps(e2m1x8(u), d->s);
    if (fmt == KT_W_I4M) return _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(u), d->s), d->mn);
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(u, d->z)), d->s);
}

/* 8 columns from column c of a quantized row, all in one group. */
KT_INLINE __m256 deq8(int fmt, const uint8_t *row, int64_t c, const deq_grp *d) {
    if (fmt == KT_RAW_I8)
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(row + c))));
    if (fmt == KT_RAW_I4S) return _mm256_cvtepi32_ps(_mm256_sub_epi32(nib8(row + c / 2), _mm256_set1_epi32(8)));
    if (fmt == KT_W_I8) {
        __m128i q = _mm_loadl_epi64((const __m128i *)(row + c));
        return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d->s);
    }
    if (fmt == KT_W_FP8) return _mm256_mul_ps(fp8x8(row + c), d->s);
    return deq_codes(fmt, nib8(row + c / 2), d);
}

/* dst[0..n) = W(r, c .. c+n) in fp32; c, n and the group size multiples of 8. */
static void deq_seg(float *dst, const kt_wmat *w, int64_t r, int64_t c, int64_t n);
/* deq_seg, or with fold (dot_fold) the codes' integer values */
static void deq_seg_fold(float *dst, const kt_wmat *w, int64_t r, int64_t c, int64_t n, int fold);

#include "../prefetch.h"

/* Whether the row-order dot form leaves W's scales out of its sums: int8
 * or I4S with one scale a row over all K columns.  Each output is then
 * (sum_k A(i, k) code(j, k)) * scale(j): one multiply an output instead of
 * one an element of W, in both of its paths (panel and few rows), so that
 * a row's result still does not depend on the path. */
static int dot_fold(const kt_wmat *W, int64_t K) {
    return (W->fmt == KT_W_I8 || W->fmt == KT_W_I4S) && W->g0 + K <= W->gs;
}

/* The end of output (row x, W row r) of the row-order dot form: the 8
 * partial sums, the columns K8 .. K, and with dot_fold the row's scale. */
KT_INLINE float dot_finish(__m256 acc, const float *x, const kt_wmat *W, int64_t r, int64_t K8,
                           int64_t K, int fold) {
    float s = hsum8(acc);
    for (int64_t kk = K8; kk < K; kk++)
        s += x[kk] * (fold ? (float)(kt_w_code(W, r, kk) - (W->fmt == KT_W_I4S ? 8 : 0)) : kt_w_at(W, r, kk));
    return fold ? s * W->scale[r * W->ldg + W->g0 / W->gs] : s;
}

/* ---- dot form ----
 * Rows of W are converted to fp32 once per (row block, K chunk) into a small
 * panel on the stack, then every 3-row block of A streams past it; partial
 * sums stay as vectors across K chunks and are reduced once at the end. */

#define KT_DOT_KC 512  /* K chunk of the fp32 W panel (4 x 512 x 4 B = 8 KB) */
/* panel row stride: one line more than the chunk, so that the four rows
 * fall in different L1 sets (rows 4 KB apart share a set) */
#define KT_DOT_LDP (KT_DOT_KC + 16)
#define KT_DOT_MC 48   /* rows of A per pass over a W panel               */

/* panel == NULL: read the W rows (w + row*ldw + k) directly, converting as
 * they load (few rows of A: a panel would not pay off). */
KT_INLINE void dot_micro(const int MR, const int NR, int64_t kc, const float *const *a,
                         const float *panel, const int bf16, const void *w, int64_t ldw,
                         int64_t wrow, __m256 *acc /* [3][4] */, int first) {
    __m256 c[3][4];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) c[i][j] = first ? _mm256_setzero_ps() : acc[i * 4 + j];
    for (int64_t k = 0; k < kc; k += 8) {
        __m256 av[3];
        for (int i = 0; i < MR; i++) av[i] = _mm256_loadu_ps(a[i] + k);
        for (int j = 0; j < NR; j++) {
            __m256 wv = panel ? _mm256_loadu_ps(panel + j * KT_DOT_LDP + k)
                              : ld8_w(w, bf16, (wrow + j) * ldw + k);
            for (int i = 0; i < MR; i++) c[i][j] = _mm256_fmadd_ps(av[i], wv, c[i][j]);
        }
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) acc[i * 4 + j] = c[i][j];
}

#define DOT_CASE(MR, NR)                                                                   \
    case (MR) * 8 + (NR):                                                                   \
        if (direct) dot_micro(MR, NR, kc, ap, NULL, bf16, wk0, ldw, j, acc, k0 == 0);       \
        else dot_micro(MR, NR, kc, ap, panel, bf16, w, ldw, j, acc, k0 == 0);               \
        break;

KT_INLINE void dot_avx2(const int bf16, int64_t m, int64_t n, int64_t K, const float *a,
                        int64_t lda, const int32_t *aidx, const kt_wmat *W,
                        float *c, int64_t ldc, int accum) {
    float panel[4 * KT_DOT_LDP] __attribute__((aligned(64)));
    __m256 accbuf[(KT_DOT_MC / 3) * 12];
    int64_t K8 = K & ~(int64_t)7;
    const void *w = W->data;
    const int64_t ldw = W->ld;
    /* one row block of a plain W: convert it on the fly */
    const int direct = m <= 3 && (W->fmt == KT_W_F32 || W->fmt == KT_W_BF16);
    const int fold = dot_fold(W, K);
    for (int64_t i0 = 0; i0 < m; i0 += KT_DOT_MC) {
        int64_t mc = KT_MIN(KT_DOT_MC, m - i0);
        for (int64_t j = 0; j < n; j += 4) {
            int nr = (int)KT_MIN(4, n - j);
            for (int64_t k0 = 0; k0 == 0 || k0 < K8; k0 += KT_DOT_KC) { /* K8 == 0: one empty pass */
                int64_t kc = KT_MIN(KT_DOT_KC, K8 - k0);
                const void *wk0 = bf16 ? (const void *)((const uint16_t *)w + k0)
                                       : (const void *)((const float *)w + k0);
                kt_pf pf;
                if (k0 + KT_DOT_KC < K8)
                    pf_init(&pf, W, NULL, j, nr, k0 + KT_DOT_KC, KT_MIN(KT_DOT_KC, K8 - k0 - KT_DOT_KC));
                else
                    pf_init(&pf, W, NULL, j + 4, KT_MIN(4, n - j - 4), 0, KT_MIN(KT_DOT_KC, K8));
                int64_t pf_share = (pf_total(&pf) + (mc + 2) / 3 - 1) / ((mc + 2) / 3);
                if (!direct)
                    for (int t = 0; t < nr; t++) deq_seg_fold(panel + t * KT_DOT_LDP, W, j + t, k0, kc, fold);
                for (int64_t i = 0; i < mc; i += 3) {
                    pf_some(&pf, pf_share);
                    int mr = (int)KT_MIN(3, mc - i);
                    const float *ap[3];
                    for (int t = 0; t < mr; t++) ap[t] = a + (aidx ? aidx[i0 + i + t] : i0 + i + t) * lda + k0;
                    __m256 *acc = accbuf + (i / 3) * 12;
                    switch (mr * 8 + nr) {
                        DOT_CASE(3, 4) DOT_CASE(3, 3) DOT_CASE(3, 2) DOT_CASE(3, 1)
                        DOT_CASE(2, 4) DOT_CASE(2, 3) DOT_CASE(2, 2) DOT_CASE(2, 1)
                        DOT_CASE(1, 4) DOT_CASE(1, 3) DOT_CASE(1, 2) DOT_CASE(1, 1)
                    }
                }
            }
            for (int64_t i = 0; i < mc; i++) {
                const float *ai = a + (aidx ? aidx[i0 + i] : i0 + i) * lda;
                const __m256 *acc = accbuf + (i / 3) * 12 + (i % 3) * 4;
                for (int t = 0; t < nr; t++) {
                    float s = dot_finish(acc[t], ai, W, j + t, K8, K, fold);
                    float *cp = c + (i0 + i) * ldc + j + t;
                    *cp = accum ? *cp + s : s;
                }
            }
        }
    }
}
static int dot_qrows(int64_t m, int64_t n, int64_t K, const float *a, int64_t lda,
                     const int32_t *aidx, const kt_wmat *w, float *c, int64_t ldc, int accum);

void kt_dot_avx2(int64_t m, int64_t n, int64_t K, const float *a, int64_t lda,
                 const int32_t *aidx, const kt_wmat *w, float *c, int64_t ldc, int accum) {
    if (dot_qrows(m, n, K, a, lda, aidx, w, c, ldc, accum)) return;
    if (w->fmt == KT_W_F32)
        dot_avx2(0, m, n, K, a, lda, aidx, w, c, ldc, accum);
    else
        dot_avx2(1, m, n, K, a, lda, aidx, w, c, ldc, accum); /* bf16 or dequantized */
}

/* ---- outer form ---- */

/* The panel: KT_KC = 128 rows of K, KT_PW = 32 columns, a 64-byte line of
 * bf16 weights used whole by one pass (a half line used per pass was
 * fetched twice when W's rows are 4 KB apart). */
#define KT_KC KT_PANEL_K
#define KT_PW KT_PANEL_W

/* C[0..MR)[j0..j0+8*NV) (+)= sum_{k < kc} D(i,k0+k) panel[k][0..8*NV); NV = 1 or 2 */
/* panel == NULL: read W rows k0.. directly (row (widx ? widx[k] : k) of w,
 * converting as they load), for calls with few rows of D.  cs != NULL: the
 * sums are multiplied by the column scales cs[0 .. 8 NV) as they are stored
 * (the dot form's folded weight scales, kt_dot_fold_ok).  One line of pf
 * every fourth k for blocks of 4 rows or more (see panel_pass). */
KT_INLINE void outer_micro(const int MR, const int NV, int64_t kc, const float *const *d,
                           int64_t dsk, const float *panel, const int bf16, const void *w,
                           int64_t ldw, const int32_t *widx, int64_t k0, int64_t j0,
                           float *const *crow, int load_c, const float *cs, kt_pf *pf) {
    __m256 acc[6][2];
    for (int i = 0; i < MR; i++)
        for (int v = 0; v < NV; v++)
            acc[i][v] = load_c ? _mm256_loadu_ps(crow[i] + j0 + 8 * v) : _mm256_setzero_ps();
    for (int64_t k = 0; k < kc; k++) {
        if (MR >= 4 && (k & 3) == 3) pf_some(pf, 1);
        __m256 wv[2];
        if (panel) {
            for (int v = 0; v < NV; v++) wv[v] = _mm256_load_ps(panel + k * KT_PW + 8 * v);
        } else {
            int64_t row = (widx ? widx[k0 + k] : k0 + k) * ldw + j0;
            for (int v = 0; v < NV; v++) wv[v] = ld8_w(w, bf16, row + 8 * v);
        }
        for (int i = 0; i < MR; i++) {
            __m256 dv = _mm256_broadcast_ss(d[i] + k * dsk);
            for (int v = 0; v < NV; v++) acc[i][v] = _mm256_fmadd_ps(dv, wv[v], acc[i][v]);
        }
    }
    if (cs)
        for (int v = 0; v < NV; v++) {
            __m256 sv = _mm256_loadu_ps(cs + 8 * v);
            for (int i = 0; i < MR; i++) acc[i][v] = _mm256_mul_ps(acc[i][v], sv);
        }
    for (int i = 0; i < MR; i++)
        for (int v = 0; v < NV; v++) _mm256_storeu_ps(crow[i] + j0 + 8 * v, acc[i][v]);
}

/* The 32 panel columns [j0, j0 + 32) of one W row as fp32, exactly
 * kt_w_at's values: p points at the row's column j0 (fmt, a constant after
 * inlining); quantized: the columns lie in one group, of constants d.  A
 * row of 4-bit codes is decoded from its 16 bytes at once. */
KT_INLINE void w_row32(const int fmt, const char *p, const deq_grp *d, __m256 w[4]) {
    if (fmt == KT_RAW_I8) {
        for (int v = 0; v < 4; v++)
            w[v] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8 * v))));
        return;
    }
    if (fmt == KT_RAW_I4S) { /* codes u - 8 as signed bytes */
        __m128i v = _mm_loadu_si128((const __m128i *)p), m4 = _mm_set1_epi8(0x0F), e8 = _mm_set1_epi8(8);
        __m128i lo = _mm_and_si128(v, m4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4);
        __m128i b[2] = {_mm_sub_epi8(_mm_unpacklo_epi8(lo, hi), e8), _mm_sub_epi8(_mm_unpackhi_epi8(lo, hi), e8)};
        for (int h = 0; h < 2; h++) {
            w[2 * h] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b[h]));
            w[2 * h + 1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b[h], 8)));
        }
        return;
    }
    if (fmt == KT_W_BF16) {
        for (int v = 0; v < 4; v++) w[v] = ld8_bf16((const uint16_t *)p + 8 * v);
        return;
    }
    if (fmt == KT_W_F32) {
        for (int v = 0; v < 4; v++) w[v] = _mm256_loadu_ps((const float *)p + 8 * v);
        return;
    }
    if (fmt == KT_W_I4S || fmt == KT_W_I4Z) { /* codes u - z as signed bytes, 16 at a time
                                                * (I4S: z = 8, whatever d holds) */
        __m128i v = _mm_loadu_si128((const __m128i *)p), m4 = _mm_set1_epi8(0x0F);
        __m128i z = fmt == KT_W_I4S ? _mm_set1_epi8(8)
                                    : _mm_shuffle_epi8(_mm256_castsi256_si128(d->z), _mm_setzero_si128());
        __m128i lo = _mm_and_si128(v, m4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4);
        __m128i b[2] = {_mm_sub_epi8(_mm_unpacklo_epi8(lo, hi), z), _mm_sub_epi8(_mm_unpackhi_epi8(lo, hi), z)};
        for (int h = 0; h < 2; h++) {
            w[2 * h] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b[h])), d->s);
            w[2 * h + 1] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b[h], 8))), d->s);
        }
        return;
    }
    if (kt_fmt_is_4bit(fmt)) { /* 16 bytes: 32 codes, low nibble first */
        __m128i v = _mm_loadu_si128((const __m128i *)p), m4 = _mm_set1_epi8(0x0F);
        __m128i lo = _mm_and_si128(v, m4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4);
        __m128i b[2] = {_mm_unpacklo_epi8(lo, hi), _mm_unpackhi_epi8(lo, hi)};
        for (int h = 0; h < 2; h++) {
            w[2 * h] = deq_codes(fmt, _mm256_cvtepu8_epi32(b[h]), d);
            w[2 * h + 1] = deq_codes(fmt, _mm256_cvtepu8_epi32(_mm_srli_si128(b[h], 8)), d);
        }
        return;
    }
    for (int v = 0; v < 4; v++) w[v] = deq8(fmt, (const uint8_t *)p, 8 * v, d);
}

/* deq_seg's quantized rows (fmt a constant after inlining): 32 columns at
 * a time through w_row32 where they lie in one group, else 8. */
KT_INLINE void deq_seg_q(const int fmt, float *dst, const kt_wmat *w, int64_t r, int64_t c, int64_t n) {
    const uint8_t *row = (const uint8_t *)w->data + r * w->ld;
    for (int64_t col = c; col < c + n;) {
        int64_t gc = w->g0 + col;
        int64_t end = KT_MIN(c + n, col + (w->gs - gc % w->gs));
        deq_grp d = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_si256()};
        if (!fmt_raw(fmt)) d = deq_group(w, r, gc / w->gs);
        for (; col + 32 <= end; col += 32) {
            __m256 v[4];
            w_row32(fmt, w_addr(w, r, col), &d, v);
            for (int q = 0; q < 4; q++) _mm256_storeu_ps(dst + col - c + 8 * q, v[q]);
        }
        for (; col < end; col += 8) _mm256_storeu_ps(dst + col - c, deq8(fmt, row, col, &d));
    }
}

static void deq_seg(float *dst, const kt_wmat *w, int64_t r, int64_t c, int64_t n) {
    switch (w->fmt) {
    case KT_W_F32: memcpy(dst, (const float *)w->data + r * w->ld + c, (size_t)n * 4); return;
    case KT_W_BF16: {
        const uint16_t *p = (const uint16_t *)w->data + r * w->ld + c;
        for (int64_t i = 0; i < n; i += 8) _mm256_storeu_ps(dst + i, ld8_bf16(p + i));
        return;
    }
    case KT_W_I8: deq_seg_q(KT_W_I8, dst, w, r, c, n); return;
    case KT_W_I4S: deq_seg_q(KT_W_I4S, dst, w, r, c, n); return;
    case KT_W_I4Z: deq_seg_q(KT_W_I4Z, dst, w, r, c, n); return;
    case KT_W_I4M: deq_seg_q(KT_W_I4M, dst, w, r, c, n); return;
    case KT_W_FP8: deq_seg_q(KT_W_FP8, dst, w, r, c, n); return;
    default: deq_seg_q(KT_W_MXFP4, dst, w, r, c, n); return;
    }
}

static void deq_seg_fold(float *dst, const kt_wmat *w, int64_t r, int64_t c, int64_t n, int fold) {
    if (!fold) deq_seg(dst, w, r, c, n);
    else if (w->fmt == KT_W_I8) deq_seg_q(KT_RAW_I8, dst, w, r, c, n);
    else deq_seg_q(KT_RAW_I4S, dst, w, r, c, n);
}

/* The first row block of a panel packs it: W rows k0.. (columns [j0, j0 +
 * 32), in one quantization group g) are converted as the block's first
 * 16 columns use them, and stored to the panel for the other blocks (and
 * this block's other 16 columns).  The conversion's loads then overlap the
 * FMAs, where a separate packing pass waited on them. */
KT_INLINE void outer_micro_pack(const int MR, const int fmt, int64_t kc, const float *const *dr,
                                int64_t dsk, float *restrict panel, const kt_wmat *W, int64_t k0,
                                int64_t j0, int64_t g, float *const *crow, int load_c) {
    /* named accumulators: with an array, the panel stores (an __m256 store
     * may alias anything) kept gcc from holding it in registers */
    __m256 c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
    const float *d0 = dr[0], *d1 = dr[1], *d2 = dr[2], *d3 = dr[3];
    const float *d4 = MR > 4 ? dr[4] : d0, *d5 = MR > 5 ? dr[5] : d0;
#define LD_C(i, v) (load_c ? _mm256_loadu_ps(crow[i] + j0 + 8 * (v)) : _mm256_setzero_ps())
    c00 = LD_C(0, 0), c01 = LD_C(0, 1), c10 = LD_C(1, 0), c11 = LD_C(1, 1);
    c20 = LD_C(2, 0), c21 = LD_C(2, 1), c30 = LD_C(3, 0), c31 = LD_C(3, 1);
    c40 = c41 = c50 = c51 = _mm256_setzero_ps();
    if (MR > 4) c40 = LD_C(4, 0), c41 = LD_C(4, 1);
    if (MR > 5) c50 = LD_C(5, 0), c51 = LD_C(5, 1);
#undef LD_C
    const char *wp = w_addr(W, k0, j0);
    const int64_t wld = w_addr(W, 1, 0) - w_addr(W, 0, 0), ldg = W->ldg;
    const int scaled = fmt != KT_W_BF16 && fmt != KT_W_F32 && !fmt_raw(fmt);
    const float *sp = W->scale ? W->scale + k0 * ldg + g : NULL;
    const float *mp = fmt == KT_W_I4M ? (const float *)W->aux + k0 * ldg + g : NULL;
    const uint8_t *zp = fmt == KT_W_I4Z ? (const uint8_t *)W->aux + k0 * ldg + g : NULL;
    for (int64_t k = 0; k < kc; k++) {
        __m256 w[4];
        deq_grp dq = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_set1_epi32(8)};
        if (scaled) dq.s = _mm256_broadcast_ss(sp);
        if (fmt == KT_W_I4M) dq.mn = _mm256_broadcast_ss(mp);
        if (fmt == KT_W_I4Z) dq.z = _mm256_set1_epi32(*zp);
        w_row32(fmt, wp, &dq, w);
        wp += wld;
        if (scaled) sp += ldg;
        if (fmt == KT_W_I4M) mp += ldg;
        if (fmt == KT_W_I4Z) zp += ldg;
        for (int v = 0; v < 4; v++) _mm256_store_ps(panel + k * KT_PW + 8 * v, w[v]);
        __m256 b;
#define FMA2(i)                                          \
        b = _mm256_broadcast_ss(d##i + k * dsk);         \
        c##i##0 = _mm256_fmadd_ps(b, w[0], c##i##0);     \
        c##i##1 = _mm256_fmadd_ps(b, w[1], c##i##1);
        FMA2(0) FMA2(1) FMA2(2) FMA2(3)
        if (MR > 4) { FMA2(4) }
        if (MR > 5) { FMA2(5) }
#undef FMA2
    }
#define ST_C(i) _mm256_storeu_ps(crow[i] + j0, c##i##0), _mm256_storeu_ps(crow[i] + j0 + 8, c##i##1)
    ST_C(0), ST_C(1), ST_C(2), ST_C(3);
    if (MR > 4) ST_C(4);
    if (MR > 5) ST_C(5);
#undef ST_C
}

#define PACK_CASE(MR, FMT)                                                                    \
    case (MR) * 16 + (FMT):                                                                   \
        if (dsk == 1)                                                                         \
            outer_micro_pack(MR, FMT, kc, dp, 1, panel, W, k0, j0, g, cr, load_c); \
        else                                                                                  \
            outer_micro_pack(MR, FMT, kc, dp, dsk, panel, W, k0, j0, g, cr, load_c); \
        break;

/* outer_micro_pack for a block of mr = 4..6 rows, W's format. */
static void outer_pack_block(int mr, int64_t kc, const float *const *dp, int64_t dsk, float *panel,
                             const kt_wmat *W, int64_t k0, int64_t j0, float *const *cr, int load_c) {
    int64_t g = W->fmt == KT_W_BF16 || W->fmt == KT_W_F32 ? 0 : (W->g0 + j0) / W->gs;
    switch (mr * 16 + kt_outer_fmt(W)) {
        PACK_CASE(6, KT_W_BF16) PACK_CASE(5, KT_W_BF16) PACK_CASE(4, KT_W_BF16)
        PACK_CASE(6, KT_W_F32) PACK_CASE(5, KT_W_F32) PACK_CASE(4, KT_W_F32)
        PACK_CASE(6, KT_W_I8) PACK_CASE(5, KT_W_I8) PACK_CASE(4, KT_W_I8)
        PACK_CASE(6, KT_W_I4S) PACK_CASE(5, KT_W_I4S) PACK_CASE(4, KT_W_I4S)
        PACK_CASE(6, KT_W_I4Z) PACK_CASE(5, KT_W_I4Z) PACK_CASE(4, KT_W_I4Z)
        PACK_CASE(6, KT_W_I4M) PACK_CASE(5, KT_W_I4M) PACK_CASE(4, KT_W_I4M)
        PACK_CASE(6, KT_W_FP8) PACK_CASE(5, KT_W_FP8) PACK_CASE(4, KT_W_FP8)
        PACK_CASE(6, KT_W_MXFP4) PACK_CASE(5, KT_W_MXFP4) PACK_CASE(4, KT_W_MXFP4)
        PACK_CASE(6, KT_RAW_I8) PACK_CASE(5, KT_RAW_I8) PACK_CASE(4, KT_RAW_I8)
        PACK_CASE(6, KT_RAW_I4S) PACK_CASE(5, KT_RAW_I4S) PACK_CASE(4, KT_RAW_I4S)
    }
}

/* ---- outer form, few rows of D, quantized W ----
 * With 1-3 rows of D (the SFT backward of a few tokens: 1-3 pairs an
 * expert) a packed panel costs a store and a load of every W element for
 * 1-3 FMAs.  Here each W row's 32 columns are dequantized in registers
 * (w_row32: exactly the panel's values) and used at once, over all of K;
 * each output is one sum in k order, as in the panel path, so the results
 * are the same bits.  fmt may be KT_RAW_I8 or KT_RAW_I4S (scales all 1). */
KT_INLINE void outer_qrows_cols(const int fmt, const int MR, int64_t K, const float *const *d,
                                int64_t dsk, const kt_wmat *W, const int32_t *widx, int64_t j,
                                float *const *crow, int accum) {
    /* rows ahead to fetch: each W row's 32 columns are a line or part of
     * one, rows 0.7-4 KB apart, so the fetch must run a DRAM latency ahead
     * (8 rows left the loop waiting: one-thread INT8 SFT steps at qlen 16
     * took 1.3x as long as with 96; 192: no faster) */
    enum { PFD = 96 };
    __m256 acc[3][4];
    for (int i = 0; i < MR; i++)
        for (int v = 0; v < 4; v++)
            acc[i][v] = accum ? _mm256_loadu_ps(crow[i] + j + 8 * v) : _mm256_setzero_ps();
    const int raw = fmt_raw(fmt);
    const int64_t g = raw ? 0 : (W->g0 + j) / W->gs;
    for (int64_t k = 0; k < K; k++) {
        const int64_t r = widx ? widx[k] : k;
        if (k + PFD < K) _mm_prefetch(w_addr(W, widx ? widx[k + PFD] : k + PFD, j), _MM_HINT_T0);
        deq_grp dq = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_set1_epi32(8)};
        if (!raw) dq = deq_group(W, r, g);
        __m256 w[4];
        w_row32(fmt, w_addr(W, r, j), &dq, w);
        for (int i = 0; i < MR; i++) {
            __m256 b = _mm256_broadcast_ss(d[i] + k * dsk);
            for (int v = 0; v < 4; v++) acc[i][v] = _mm256_fmadd_ps(b, w[v], acc[i][v]);
        }
    }
    for (int i = 0; i < MR; i++)
        for (int v = 0; v < 4; v++) _mm256_storeu_ps(crow[i] + j + 8 * v, acc[i][v]);
}

#define QROWS_CASE(MR, FMT)                                                                  \
    case (MR) * 16 + (FMT):                                                                   \
        if (dsk == 1) outer_qrows_cols(FMT, MR, K, dp, 1, W, widx, j, cr, accum);             \
        else outer_qrows_cols(FMT, MR, K, dp, dsk, W, widx, j, cr, accum);                    \
        break;

/* Columns [j, j + 32) (in one quantization group) of the outer form for
 * m = 1..3 rows of D and quantized W: 1 when done, 0 for the panel path. */
static int outer_qrows(int64_t m, int64_t K, const float *d, int64_t dsi, int64_t dsk,
                       const int32_t *didx, const kt_wmat *W, const int32_t *widx, int64_t j,
                       float *c, int64_t ldc, int accum) {
    if (m < 1 || m > 3 || W->fmt == KT_W_BF16 || W->fmt == KT_W_F32 || !kt_cols_one_group(W, j, KT_PW))
        return 0;
    const float *dp[3];
    float *cr[3];
    for (int64_t i = 0; i < m; i++) {
        dp[i] = d + (didx ? didx[i] : i) * dsi;
        cr[i] = c + i * ldc;
    }
    switch (m * 16 + kt_outer_fmt(W)) {
        QROWS_CASE(1, KT_W_I8) QROWS_CASE(2, KT_W_I8) QROWS_CASE(3, KT_W_I8)
        QROWS_CASE(1, KT_W_I4S) QROWS_CASE(2, KT_W_I4S) QROWS_CASE(3, KT_W_I4S)
        QROWS_CASE(1, KT_W_I4Z) QROWS_CASE(2, KT_W_I4Z) QROWS_CASE(3, KT_W_I4Z)
        QROWS_CASE(1, KT_W_I4M) QROWS_CASE(2, KT_W_I4M) QROWS_CASE(3, KT_W_I4M)
        QROWS_CASE(1, KT_W_FP8) QROWS_CASE(2, KT_W_FP8) QROWS_CASE(3, KT_W_FP8)
        QROWS_CASE(1, KT_W_MXFP4) QROWS_CASE(2, KT_W_MXFP4) QROWS_CASE(3, KT_W_MXFP4)
        QROWS_CASE(1, KT_RAW_I8) QROWS_CASE(2, KT_RAW_I8) QROWS_CASE(3, KT_RAW_I8)
        QROWS_CASE(1, KT_RAW_I4S) QROWS_CASE(2, KT_RAW_I4S) QROWS_CASE(3, KT_RAW_I4S)
    default: return 0;
    }
    return 1;
}

/* ---- dot form, few rows of A, quantized W ----
 * With 1-3 rows of A (decode with fp32 activations) the dot form's panel
 * (every W element dequantized, stored and loaded back, the format looked
 * up per 8 columns) cost more than the FMAs it fed: 2-2.7 GB/s of 4-bit
 * codes a thread.  Here 4 W rows at a time are dequantized in registers, 32
 * columns at a time (w_row32: exactly kt_w_at's values, as the panel
 * holds), and each output's sums run in the panel path's order (8 partial
 * sums, lane l taking the columns k = l mod 8 in increasing k, one
 * horizontal sum at the end), so a row's result does not depend on how
 * many rows share the call (the dot kernel's batch invariance).  Paired,
 * one thread, one row of A, 1408 x 2048 W in L3: 2.3x (I4S), 2.7x (I4Z,
 * groups of 128), 2.9x (int8). */
KT_INLINE void dot_qrow_block(const int fmt, const int MR, const int NR, int64_t j, int64_t K,
                              const float *const *x, const kt_wmat *W, float *const *crow, int accum) {
    const int64_t K8 = K & ~(int64_t)7;
    const int64_t ldb = w_addr(W, 1, 0) - w_addr(W, 0, 0);
    const int64_t step = w_addr(W, 0, 32) - w_addr(W, 0, 0); /* bytes of 32 columns */
    const char *row[4];
    __m256 acc[3][4];
    deq_grp d[4];
    for (int t = 0; t < NR; t++) {
        row[t] = w_addr(W, j + t, 0);
        for (int i = 0; i < MR; i++) acc[i][t] = _mm256_setzero_ps();
    }
    for (int64_t k = 0; k < K8;) {
        /* the run of columns in k's group: whole groups of 32 (dot_qrows
         * checked), or 8-column steps up to the row's end */
        int64_t gk = W->g0 + k, end = KT_MIN(K8, k + W->gs - gk % W->gs);
        if (!fmt_raw(fmt)) /* raw: no constants */
            for (int t = 0; t < NR; t++) d[t] = deq_group(W, j + t, gk / W->gs);
        for (; k + 32 <= end; k += 32) {
            const int64_t off = (k / 32) * step;
            for (int t = 0; t < NR; t++) {
                const char *p = row[t] + off;
                if (((uintptr_t)p & 63) < (uintptr_t)step) /* the same line 4 rows on */
                    _mm_prefetch(p + 4 * ldb, _MM_HINT_T0);
                __m256 w[4];
                w_row32(fmt, p, &d[t], w);
                for (int i = 0; i < MR; i++)
                    for (int v = 0; v < 4; v++)
                        acc[i][t] = _mm256_fmadd_ps(_mm256_loadu_ps(x[i] + k + 8 * v), w[v], acc[i][t]);
            }
        }
        for (; k < end; k += 8)
            for (int t = 0; t < NR; t++) {
                __m256 w = deq8(fmt, (const uint8_t *)row[t], k, &d[t]);
                for (int i = 0; i < MR; i++) acc[i][t] = _mm256_fmadd_ps(_mm256_loadu_ps(x[i] + k), w, acc[i][t]);
            }
    }
    for (int i = 0; i < MR; i++)
        for (int t = 0; t < NR; t++) {
            float sum = dot_finish(acc[i][t], x[i], W, j + t, K8, K, fmt_raw(fmt));
            crow[i][j + t] = accum ? crow[i][j + t] + sum : sum;
        }
}

/* Rows x[0..m) of A (m <= KT_QROWS_MAX) against W rows [0, n) (fmt a
 * constant after inlining): blocks of 4 W rows, each dequantized once for
 * every block of 1-3 rows of A (the 4 rows' 32 columns stay in L1 for the
 * blocks after the first); every output's sums are those of the row alone. */
#define KT_QROWS_MAX 11
#define QROW_CASE(MR, NR) \
    case (MR) * 4 + (NR): dot_qrow_block(fmt, MR, NR, j, K, xb, W, cb, accum); break;
KT_INLINE void dot_qrow(const int fmt, int64_t m, int64_t n, int64_t K, const float *const *x,
                        const kt_wmat *W, float *const *crow, int accum) {
    const int64_t nb = (m + 2) / 3, base = m / nb, extra = m % nb;
    for (int64_t j = 0; j < n; j += 4) {
        const int nr = (int)KT_MIN(4, n - j);
        for (int64_t bi = 0, i = 0; bi < nb; i += base + (bi < extra), bi++) {
            const int mr = (int)(base + (bi < extra));
            const float *const *xb = x + i;
            float *const *cb = crow + i;
            switch (mr * 4 + nr) {
                QROW_CASE(3, 4) QROW_CASE(2, 4) QROW_CASE(1, 4) QROW_CASE(3, 3) QROW_CASE(2, 3) QROW_CASE(1, 3)
                QROW_CASE(3, 2) QROW_CASE(2, 2) QROW_CASE(1, 2) QROW_CASE(3, 1) QROW_CASE(2, 1) QROW_CASE(1, 1)
            }
        }
    }
}

/* kt_dot_avx2 for 1-KT_QROWS_MAX rows of A and int8 or 4-bit W whose groups start on
 * multiples of 32 columns (or one group a row): 1 when done, 0 to take the
 * panel path. */
static int dot_qrows(int64_t m, int64_t n, int64_t K, const float *a, int64_t lda,
                     const int32_t *aidx, const kt_wmat *W, float *c, int64_t ldc, int accum) {
    int fmt = W->fmt;
    /* 4-bit W: from 4 rows of A, the panel path (one dequantization, w_row32's) is
     * faster (one-thread SFT steps at qlen 64 and 128, paired: 1.08x); int8: up to 11 */
    if (m < 1 || m > (fmt == KT_W_I8 ? KT_QROWS_MAX : 3) || n < 1 || !(fmt == KT_W_I8 || kt_fmt_is_int4(fmt)))
        return 0;
    if (!(W->g0 % W->gs + K <= W->gs || (W->gs % 32 == 0 && W->g0 % 32 == 0)))
        return 0;
    const float *x[KT_QROWS_MAX];
    float *crow[KT_QROWS_MAX];
    for (int64_t i = 0; i < m; i++) {
        x[i] = a + (aidx ? aidx[i] : i) * lda;
        crow[i] = c + i * ldc;
    }
    if (dot_fold(W, K)) fmt = fmt == KT_W_I8 ? KT_RAW_I8 : KT_RAW_I4S;
    switch (fmt) {
    case KT_RAW_I8: dot_qrow(KT_RAW_I8, m, n, K, x, W, crow, accum); break;
    case KT_RAW_I4S: dot_qrow(KT_RAW_I4S, m, n, K, x, W, crow, accum); break;
    case KT_W_I8: dot_qrow(KT_W_I8, m, n, K, x, W, crow, accum); break;
    case KT_W_I4S: dot_qrow(KT_W_I4S, m, n, K, x, W, crow, accum); break;
    case KT_W_I4Z: dot_qrow(KT_W_I4Z, m, n, K, x, W, crow, accum); break;
    default: dot_qrow(KT_W_I4M, m, n, K, x, W, crow, accum); break;
    }
    return 1;
}

#define OUTER_CASE(MR, NV)                                                                 \
    case (MR) * 4 + (NV):                                                                   \
        if (direct)                                                                         \
            outer_micro(MR, NV, k1 - k0, dp, dsk, NULL, bf16, w, ldw, widx, k0, jh, cr, load_c, NULL, pf); \
        else if (dsk == 1)                                                                  \
            outer_micro(MR, NV, k1 - k0, dp, 1, ph, bf16, w, ldw, widx, k0, jh, cr, load_c, csh, pf); \
        else                                                                                \
            outer_micro(MR, NV, k1 - k0, dp, dsk, ph, bf16, w, ldw, widx, k0, jh, cr, load_c, NULL, pf); \
        break;

/* Rows k0..k1 of the outer panel whose 8 nvec columns lie in one group
 * (fmt a constant after inlining); whole 32-column rows through w_row32. */
KT_INLINE void outer_pack_grp(const int fmt, float *panel, const kt_wmat *W, const int32_t *widx,
                              int64_t k0, int64_t k1, int64_t j, int nvec) {
    int64_t g = (W->g0 + j) / W->gs;
    for (int64_t k = k0; k < k1; k++) {
        int64_t r = widx ? widx[k] : k;
        const uint8_t *row = (const uint8_t *)W->data + r * W->ld;
        deq_grp d = deq_group(W, r, g);
        float *dst = panel + (k - k0) * KT_PW;
        if (nvec == 4) {
            __m256 w[4];
            w_row32(fmt, w_addr(W, r, j), &d, w);
            for (int v = 0; v < 4; v++) _mm256_store_ps(dst + 8 * v, w[v]);
        } else {
            for (int v = 0; v < nvec; v++) _mm256_store_ps(dst + 8 * v, deq8(fmt, row, j + 8 * v, &d));
        }
    }
}

/* Plain W (bf16 or fp32) panel rows [k0, k1), columns [j, j + 8 nvec),
 * converted as they load, without a call per row. */
KT_INLINE void outer_pack_plain(const int bf16, float *panel, const kt_wmat *W, const int32_t *widx,
                                int64_t k0, int64_t k1, int64_t j, int nvec) {
    for (int64_t k = k0; k < k1; k++) {
        int64_t row = (widx ? widx[k] : k) * W->ld + j;
        for (int v = 0; v < nvec; v++) _mm256_store_ps(panel + (k - k0) * KT_PW + 8 * v, ld8_w(W->data, bf16, row + 8 * v));
    }
}

/* W panel rows [k0, k1), columns [j, j + 8 nvec) to fp32, KT_PW floats a row. */
void kt_outer_pack_avx2(float *panel, const kt_wmat *W, const int32_t *widx, int64_t k0,
                       int64_t k1, int64_t j, int nvec) {
    int64_t gc = W->g0 + j;
    int fmt = W->fmt;
    if (fmt == KT_W_BF16) { /* frozen weights */
        outer_pack_plain(1, panel, W, widx, k0, k1, j, nvec);
        return;
    }
    if (fmt == KT_W_F32) { /* gathered activation rows, LoRA factors */
        outer_pack_plain(0, panel, W, widx, k0, k1, j, nvec);
        return;
    }
    if (gc % W->gs + 8 * nvec > W->gs) {
        for (int64_t k = k0; k < k1; k++) deq_seg(panel + (k - k0) * KT_PW, W, widx ? widx[k] : k, j, 8 * nvec);
        return;
    }
    /* the columns lie in one group: one group lookup per row */
    switch (fmt) {
    case KT_W_I8: outer_pack_grp(KT_W_I8, panel, W, widx, k0, k1, j, nvec); break;
    case KT_W_FP8: outer_pack_grp(KT_W_FP8, panel, W, widx, k0, k1, j, nvec); break;
    case KT_W_MXFP4: outer_pack_grp(KT_W_MXFP4, panel, W, widx, k0, k1, j, nvec); break;
    case KT_W_I4M: outer_pack_grp(KT_W_I4M, panel, W, widx, k0, k1, j, nvec); break;
    case KT_W_I4Z: outer_pack_grp(KT_W_I4Z, panel, W, widx, k0, k1, j, nvec); break;
    default: outer_pack_grp(KT_W_I4S, panel, W, widx, k0, k1, j, nvec); break;
    }
}

/* Row blocks of m rows of D: 6 rows each, or 5 or 4 in place of a short
 * last one (panel_pass). */
KT_INLINE int64_t row_blocks(int64_t m) { return (m + 5) / 6; }

/* One panel of columns [j, j + 8 nvec) and K rows [k0, k1) through all m
 * rows of D: row blocks of 6, or of 5 or 4 in place of a short last one (a
 * block of 1-3 rows has too few accumulators to cover the FMA latency).
 * The lines in pf are fetched one every fourth k inside the micro-kernel
 * in blocks of 4-6 rows, a share at the start of the block in the packing
 * block and in blocks of 1-3 rows (whose k steps are short).  Spread out,
 * they arrived in time where a share at the start of each block had come
 * late: on Zen 5 BF16 SFT steps 1.023-1.03x at qlen 512, 1.038x at 128.
 * fuse: the first block packs the panel as its FMAs use it
 * (outer_pack_block), the others read it. */
KT_INLINE void panel_pass(const int bf16, int64_t m, const float *d, int64_t dsi, int64_t dsk,
                          const int32_t *didx, const kt_wmat *W, const int32_t *widx, float *c,
                          int64_t ldc, float *panel, const float *cs, int direct, int fuse,
                          int64_t j, int nvec, int64_t k0, int64_t k1, int load_c, kt_pf *pf,
                          int64_t pf_share) {
    const void *w = W->data;
    const int64_t ldw = W->ld;
    const int64_t nb = row_blocks(m), base = m / KT_MAX(nb, 1), extra = m % KT_MAX(nb, 1);
    for (int64_t bi = 0, i = 0; bi < nb; i += base + (bi < extra), bi++) {
        int mr = (int)(base + (bi < extra));
        if ((fuse && bi == 0) || mr < 4) pf_some(pf, pf_share); /* else inside outer_micro */
        const float *dp[6];
        float *cr[6];
        for (int t = 0; t < mr; t++) {
            dp[t] = d + (didx ? didx[i + t] : i + t) * dsi + k0 * dsk;
            cr[t] = c + (i + t) * ldc;
        }
        for (int h = 0; h < nvec; h += 2) { /* 16-column halves of the panel */
            int64_t jh = j + 8 * h;
            const float *ph = panel + 8 * h;
            const float *csh = cs ? cs + 8 * h : NULL;
            if (fuse && bi == 0 && h == 0) {
                outer_pack_block(mr, k1 - k0, dp, dsk, panel, W, k0, j, cr, load_c);
                continue;
            }
            switch (mr * 4 + KT_MIN(2, nvec - h)) {
                OUTER_CASE(6, 2) OUTER_CASE(5, 2) OUTER_CASE(4, 2)
                OUTER_CASE(3, 2) OUTER_CASE(2, 2) OUTER_CASE(1, 2)
                OUTER_CASE(6, 1) OUTER_CASE(5, 1) OUTER_CASE(4, 1)
                OUTER_CASE(3, 1) OUTER_CASE(2, 1) OUTER_CASE(1, 1)
            }
        }
    }
    pf_some(pf, pf_total(pf)); /* what short blocks left */
}

/* Whether the first row block of outer_chunks (blocks of 4-6 rows) packs
 * the panel of columns [j, j + 8 nvec) (outer_pack_block): whole 32-column
 * panels in one quantization group, W rows in order. */
KT_INLINE int outer_fuse(const kt_wmat *W, const int32_t *widx, int64_t j, int nvec) {
    return !widx && nvec == 4 &&
           (W->fmt == KT_W_BF16 || W->fmt == KT_W_F32 || kt_cols_one_group(W, j, KT_PW));
}

/* The outer form with 4 rows of D or more: K chunk by K chunk, all column
 * panels of a chunk before the next chunk (C's rows see the same sums in
 * the same order as column by column).  The panels of a chunk read the
 * same KT_KC rows of W (half as many for 16- and 32-bit W), and the next
 * chunk's rows are prefetched whole (all nv columns: several consecutive
 * lines a row where nv > 32) over the current chunk's row blocks.  Column
 * panel by column panel (the first row block prefetching the next panel:
 * one line from each of 128 rows 3-4 KB apart), the blocks waited on W:
 * on an Intel Xeon (kernel_ab, 64 experts' bf16 weights, one thread) B2
 * 1.16-1.18x and B4 1.27-1.30x this way; whole SFT steps 1.02-1.03x (BF16,
 * INT8), 0.99-1.01x (INT4). */
KT_INLINE void outer_chunks(const int bf16, int64_t m, int64_t nv, int64_t K, const float *d,
                            int64_t dsi, int64_t dsk, const int32_t *didx, const kt_wmat *W,
                            const int32_t *widx, float *c, int64_t ldc, int accum) {
    float panel[KT_KC * KT_PW] __attribute__((aligned(64)));
    const int64_t npanel = (nv + KT_PW - 1) / KT_PW, nb = row_blocks(m);
    if (npanel == 0) return;
    /* bf16 and fp32 W: chunks of half the rows, so that a bf16 chunk's
     * lines (and the next chunk's, prefetched) take the L1 room of an
     * 8-bit chunk's (BF16 step 1.017x with 64 rows, 1.009x with 96,
     * 0.971x with 32; INT8 and INT4 0.995x with 64: those keep 128) */
    const int64_t kc = w_bytes(W, KT_PW) > KT_PW ? KT_KC / 2 : KT_KC;
    for (int64_t k0 = 0; k0 < K; k0 += kc) {
        int64_t k1 = KT_MIN(K, k0 + kc);
        kt_pf pf;
        pf_init(&pf, W, widx, k1, KT_MIN(K, k1 + kc) - k1, 0, nv);
        int64_t pf_share = (pf_total(&pf) + npanel * nb - 1) / (npanel * nb);
        for (int64_t j = 0; j < nv; j += KT_PW) {
            int nvec = (int)KT_MIN(KT_PW, nv - j) / 8;
            int fuse = outer_fuse(W, widx, j, nvec);
            if (!fuse) kt_outer_pack_avx2(panel, W, widx, k0, k1, j, nvec);
            panel_pass(bf16, m, d, dsi, dsk, didx, W, widx, c, ldc, panel, NULL, 0, fuse, j, nvec,
                       k0, k1, accum || k0 > 0, &pf, pf_share);
        }
    }
}

/* Columns [0, nv) of the outer form (tpack 0), or of dot_many (tpack 1: W's
 * rows transposed into the panel, D = A with dsk = 1, no widx), column
 * panel by column panel: dot_many, and the outer form with 1-3 rows of D. */
KT_INLINE void panel_loop(const int bf16, const int tpack, int64_t m, int64_t nv, int64_t K,
                          const float *d, int64_t dsi, int64_t dsk, const int32_t *didx,
                          const kt_wmat *W, const int32_t *widx, float *c, int64_t ldc, int accum) {
    /* rows on whole lines: aligned to 32 only, the panel sat at 32 mod 64
     * on some calls, each 16-column half of a row then spanning two lines
     * (kernel_ab: B4's outer form 1.05x, B2's 1.01x once aligned to 64) */
    float panel[KT_KC * KT_PW] __attribute__((aligned(64)));
    float cs[KT_PW]; /* column scales folded out of the panel */
    /* too few rows for a packed panel to pay off (outer form, plain W only) */
    const int direct = !tpack && m <= 2 && (W->fmt == KT_W_F32 || W->fmt == KT_W_BF16);
    const int fold = tpack && kt_dot_fold_ok(W, K, accum);
    const int64_t nb = row_blocks(m);
    for (int64_t j = 0; j < nv; j += KT_PW) {
        int nvec = (int)KT_MIN(KT_PW, nv - j) / 8;
        if (!tpack && nvec == 4 && K > 0 && outer_qrows(m, K, d, dsi, dsk, didx, W, widx, j, c, ldc, accum))
            continue;
        if (fold) kt_dot_col_scales(W, j, nvec, cs);
        for (int64_t k0 = 0; k0 < K; k0 += KT_KC) {
            int64_t k1 = KT_MIN(K, k0 + KT_KC);
            kt_pf pf;
            if (tpack) {
                pf_next_dot(&pf, W, K, nv, j, nvec, k1);
                kt_dot_tpack_avx2(panel, W, j, nvec, k0, k1 - k0, fold);
            } else {
                pf_next_outer(&pf, W, widx, K, nv, j, nvec, k1);
                if (!direct) kt_outer_pack_avx2(panel, W, widx, k0, k1, j, nvec);
            }
            panel_pass(bf16, m, d, dsi, dsk, didx, W, widx, c, ldc, panel,
                       fold && k1 == K ? cs : NULL, direct, 0, j, nvec, k0, k1, accum || k0 > 0,
                       &pf, (pf_total(&pf) + nb - 1) / KT_MAX(nb, 1));
        }
    }
}

KT_INLINE void outer_avx2(const int bf16, int64_t m, int64_t n, int64_t K, const float *d,
                          int64_t dsi, int64_t dsk, const int32_t *didx, const kt_wmat *W,
                          const int32_t *widx, float *c, int64_t ldc, int accum) {
    int64_t nv = n & ~(int64_t)7;
    if (K == 0 && !accum)
        for (int64_t i = 0; i < m; i++) memset(c + i * ldc, 0, (size_t)n * 4);
    if (m >= 4) outer_chunks(bf16, m, nv, K, d, dsi, dsk, didx, W, widx, c, ldc, accum);
    else panel_loop(bf16, 0, m, nv, K, d, dsi, dsk, didx, W, widx, c, ldc, accum);
    /* columns past the last multiple of 8 */
    for (int64_t i = 0; i < m && nv < n; i++) {
        const float *di = d + (didx ? didx[i] : i) * dsi;
        for (int64_t j = nv; j < n; j++) {
            float s = 0.0f;
            for (int64_t k = 0; k < K; k++)
                s += di[k * dsk] * kt_w_at(W, widx ? widx[k] : k, j);
            float *cp = c + i * ldc + j;
            *cp = accum ? *cp + s : s;
        }
    }
}

void kt_outer_avx2(int64_t m, int64_t n, int64_t K, const float *d, int64_t dsi,
                           int64_t dsk, const int32_t *didx, const kt_wmat *w,
                           const int32_t *widx, float *c, int64_t ldc, int accum) {
    if (w->fmt == KT_W_F32)
        outer_avx2(0, m, n, K, d, dsi, dsk, didx, w, widx, c, ldc, accum);
    else
        outer_avx2(1, m, n, K, d, dsi, dsk, didx, w, widx, c, ldc, accum);
}

/* ---- dot form through the outer micro-kernel ----
 * With a dozen rows of A or more, x W^T runs as the outer form does: 32 rows
 * of W are converted and transposed into a [k][32] panel, A's elements are
 * broadcast, and the outputs are whole vectors of C's rows.  The dot
 * micro-kernel above needs 7 loads per 12 FMAs and horizontal sums; this one
 * 8 (6 of them broadcasts) and none, which runs nearer the FMA peak.  Its
 * sums run in k order, kt_dot_avx2's in 8 interleaved partial sums: a
 * row's result then depends on how many rows share the call, so this is
 * kt_kernels.dot_many, for layers that do not promise batch invariance. */

/* The 8 x 8 block v[r][q] -> v[q][r]. */
KT_INLINE void transpose8(__m256 v[8]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(v[i], v[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(v[i], v[i + 1]);
    }
    for (int i = 0; i < 8; i += 4)
        for (int h = 0; h < 2; h++) {
            u[i + h] = _mm256_shuffle_ps(t[i + h], t[i + 2 + h], _MM_SHUFFLE(1, 0, 1, 0));
            u[i + 2 + h] = _mm256_shuffle_ps(t[i + h], t[i + 2 + h], _MM_SHUFFLE(3, 2, 3, 2));
        }
    /* u: rows 0..3 of each 128-bit half in u[0], u[2], u[1], u[3] (and +4) */
    const int ord[4] = {0, 2, 1, 3};
    for (int q = 0; q < 4; q++) {
        v[q] = _mm256_permute2f128_ps(u[ord[q]], u[4 + ord[q]], 0x20);
        v[q + 4] = _mm256_permute2f128_ps(u[ord[q]], u[4 + ord[q]], 0x31);
    }
}

/* panel[k][t] = W(j + t, k0 + k) for t < 8 nvec, k < kc (kc a multiple of 8):
 * 8 x 8 blocks loaded (fp32) or dequantized (FP8, MXFP4) straight from the
 * packed rows (each row's group constants looked up when the group
 * changes), then transposed; bf16 and the integer formats transpose first
 * (tpack_words, 16 bytes of each row at a time, and tpack_int where groups
 * or the column origin break 16-byte steps). */
/* 8 rows of W from `row` (row stride ld) x 8 columns from k, dequantized
 * (format fmt, a constant after inlining) with the rows' group constants d. */
KT_INLINE void tpack_rows(const int fmt, __m256 *v, const kt_wmat *W, int64_t row, int64_t k,
                          const deq_grp *d) {
    for (int r = 0; r < 8; r++) {
        int64_t rr = row + r;
        if (fmt == KT_W_F32) v[r] = _mm256_loadu_ps((const float *)W->data + rr * W->ld + k);
        else v[r] = deq8(fmt, (const uint8_t *)W->data + rr * W->ld, k, &d[r]);
    }
}

KT_INLINE void tpack(const int fmt, float *panel, const kt_wmat *W, int64_t j, int nvec, int64_t k0,
                     int64_t kc) {
    deq_grp d[8];
    memset(d, 0, sizeof d); /* set per group below; plain formats do not read it */
    for (int b = 0; b < nvec; b++) {
        int64_t g = -1;
        for (int64_t k = 0; k < kc; k += 8) {
            __m256 v[8];
            if (fmt != KT_W_F32) { /* 8 columns lie in one group */
                int64_t gk = (W->g0 + k0 + k) / W->gs;
                if (gk != g)
                    for (int r = 0; r < 8; r++) d[r] = deq_group(W, j + 8 * b + r, g = gk);
            }
            tpack_rows(fmt, v, W, j + 8 * b, k0 + k, d);
            transpose8(v);
            for (int q = 0; q < 8; q++) _mm256_store_ps(panel + (k + q) * KT_PW + 8 * b, v[q]);
        }
    }
}

/* The integer formats where 16-byte steps do not fit (tpack_words_ok)
 * transpose before they convert too: lane r of one vector holds 4 bytes of
 * row r (8 4-bit codes, or 4 int8 codes), and column q
 * of all 8 rows is one shift and one mask (or two shifts) away, already in
 * the panel's layout; the per-row group constants are vectors over the
 * rows.  Exactly deq8's values ((code - offset) * scale, or I4M's
 * code * scale + min), without deq8's unpacking and the 8 x 8 transpose
 * of fp32 (half the instructions of the 4-bit panel). */
KT_INLINE __m256i rows4(const uint8_t *p, int64_t ld) {
    uint32_t v[8];
    for (int r = 0; r < 8; r++) memcpy(&v[r], p + r * ld, 4);
    return _mm256_loadu_si256((const __m256i *)v);
}

/* The group constants of group g of W rows r0 .. r0 + 8, one lane a row. */
KT_INLINE deq_grp deq_rows8(const int fmt, const kt_wmat *W, int64_t r0, int64_t g) {
    float sv[8], mv[8];
    int32_t zv[8];
    for (int r = 0; r < 8; r++) {
        int64_t gi = (r0 + r) * W->ldg + g;
        sv[r] = W->scale[gi];
        mv[r] = fmt == KT_W_I4M ? ((const float *)W->aux)[gi] : 0.0f;
        zv[r] = fmt == KT_W_I4Z ? ((const uint8_t *)W->aux)[gi] : 8;
    }
    deq_grp d = {_mm256_loadu_ps(sv), _mm256_loadu_ps(mv), _mm256_loadu_si256((const __m256i *)zv)};
    return d;
}

/* Panel rows per 32-bit word of W (fmt a constant after inlining). */
KT_INLINE int word_cols(const int fmt) { return fmt == KT_W_BF16 ? 2 : fmt == KT_W_I8 ? 4 : 8; }

/* Column n of the 8 rows' words w as fp32, with the rows' group constants
 * d (one lane a row): exactly kt_w_at's values. */
KT_INLINE __m256 word_col(const int fmt, __m256i w, int n, const deq_grp *d) {
    if (fmt == KT_W_BF16)
        return _mm256_castsi256_ps(n ? _mm256_and_si256(w, _mm256_set1_epi32((int)0xFFFF0000u))
                                     : _mm256_slli_epi32(w, 16));
    if (fmt == KT_W_I8)
        return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(w, 24 - 8 * n), 24)), d->s);
    return deq_codes(fmt, _mm256_and_si256(_mm256_srli_epi32(w, 4 * n), _mm256_set1_epi32(15)), d);
}

KT_INLINE void tpack_int(const int fmt, float *panel, const kt_wmat *W, int64_t j, int nvec,
                         int64_t k0, int64_t kc) {
    const int i4 = fmt != KT_W_I8;
    for (int b = 0; b < nvec; b++) {
        int64_t row0 = j + 8 * b, g = -1;
        deq_grp d = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_si256()};
        const uint8_t *base = (const uint8_t *)W->data + row0 * W->ld;
        for (int64_t k = 0; k < kc; k += 8) {
            int64_t gk = (W->g0 + k0 + k) / W->gs; /* 8 columns lie in one group */
            if (gk != g) d = deq_rows8(fmt, W, row0, g = gk);
            float *dst = panel + k * KT_PW + 8 * b;
            if (i4) {
                __m256i v = rows4(base + (k0 + k) / 2, W->ld);
                for (int q = 0; q < 8; q++) _mm256_store_ps(dst + q * KT_PW, word_col(fmt, v, q, &d));
            } else {
                for (int h = 0; h < 2; h++) {
                    __m256i v = rows4(base + k0 + k + 4 * h, W->ld);
                    for (int q = 0; q < 4; q++)
                        _mm256_store_ps(dst + (4 * h + q) * KT_PW, word_col(KT_W_I8, v, q, &d));
                }
            }
        }
    }
}

/* bf16, int8 and the integer 4-bit formats transpose before they convert,
 * 8 W rows x 16 bytes at a time at 32-bit granularity: word q of the 8
 * rows in one vector (rows r and r + 4 in the halves of a load, then two
 * rounds of unpacks).  A word holds 2 (bf16), 4 (int8) or 8 (4-bit) panel
 * rows, one shift (and mask) apiece away, already in the panel's layout,
 * with the rows' group constants as vectors over the rows. */
KT_INLINE void rows8x16(const char *p, int64_t ld, __m256i cp[4]) {
    __m256i a[4];
    for (int r = 0; r < 4; r++)
        a[r] = _mm256_loadu2_m128i((const __m128i *)(p + (r + 4) * ld), (const __m128i *)(p + r * ld));
    __m256i t0 = _mm256_unpacklo_epi32(a[0], a[1]), t1 = _mm256_unpackhi_epi32(a[0], a[1]);
    __m256i t2 = _mm256_unpacklo_epi32(a[2], a[3]), t3 = _mm256_unpackhi_epi32(a[2], a[3]);
    cp[0] = _mm256_unpacklo_epi64(t0, t2), cp[1] = _mm256_unpackhi_epi64(t0, t2);
    cp[2] = _mm256_unpacklo_epi64(t1, t3), cp[3] = _mm256_unpackhi_epi64(t1, t3);
}

/* Whether tpack_words can pack the dot-form panel of W's K columns k0 ..
 * k0 + kc: bf16, int8 and the integer 4-bit formats, in whole 16-byte
 * steps that do not cross a group. */
static int tpack_words_ok(const kt_wmat *W, int64_t k0, int64_t kc) {
    int fmt = W->fmt, U;
    if (fmt == KT_W_BF16) U = 8;
    else if (fmt == KT_W_I8) U = 16;
    else if (kt_fmt_is_int4(fmt)) U = 32;
    else return 0;
    return kc % U == 0 && (fmt == KT_W_BF16 || (W->gs % U == 0 && (W->g0 + k0) % U == 0));
}

/* Column n of the 8 rows' words w as the codes' integer values, without the
 * scale (raw panels, kt_dot_fold_ok): int8 as it is; I4S codes u as u - 8,
 * w's nibbles already flipped (u ^ 8 read as a signed nibble is u - 8). */
KT_INLINE __m256 word_col_raw(const int fmt, __m256i w, int n) {
    if (fmt == KT_W_I8) return _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(w, 24 - 8 * n), 24));
    return _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(w, 28 - 4 * n), 28));
}

/* The panel 16 bytes of each W row at a time (tpack_words_ok); raw: the
 * codes without their scales (word_col_raw). */
KT_INLINE void tpack_words(const int fmt, const int raw, float *panel, const kt_wmat *W, int64_t j,
                           int nvec, int64_t k0, int64_t kc) {
    const int wc = word_cols(fmt), U = 4 * wc;
    const int64_t ldb = w_addr(W, 1, 0) - w_addr(W, 0, 0);
    for (int b = 0; b < nvec; b++) {
        int64_t r0 = j + 8 * b, gcur = -1;
        const char *base = w_addr(W, r0, k0);
        deq_grp d;
        memset(&d, 0, sizeof d); /* bf16 does not read it */
        for (int64_t kb = 0; kb < kc; kb += U) {
            if (fmt != KT_W_BF16 && !raw) {
                int64_t g = (W->g0 + k0 + kb) / W->gs;
                if (g != gcur) d = deq_rows8(fmt, W, r0, g), gcur = g;
            }
            __m256i cp[4];
            rows8x16(base + (kb / U) * 16, ldb, cp);
            for (int q = 0; q < 4; q++) {
                if (raw && fmt == KT_W_I4S) cp[q] = _mm256_xor_si256(cp[q], _mm256_set1_epi32((int)0x88888888u));
                for (int n = 0; n < wc; n++)
                    _mm256_store_ps(panel + (kb + q * wc + n) * KT_PW + 8 * b,
                                    raw ? word_col_raw(fmt, cp[q], n) : word_col(fmt, cp[q], n, &d));
            }
        }
    }
}

/* Whether the dot form may fold W's scales out of its panels: int8 or
 * symmetric 4-bit codes with one scale a row over all K columns, whole
 * 16-byte steps, C written (not added to).  The panel then holds the codes'
 * integer values (exact in fp32), and C = (sum_k A(i, k) code(j, k)) *
 * scale(j), one multiply an output instead of one an element of W. */
int kt_dot_fold_ok(const kt_wmat *W, int64_t K, int accum) {
    return !accum && (W->fmt == KT_W_I8 || W->fmt == KT_W_I4S) && W->g0 + K <= W->gs &&
           tpack_words_ok(W, 0, K); /* then every K block's panel too */
}

/* cs[t] = the scale of W row j + t, t < 8 nvec (kt_dot_fold_ok's W: group 0). */
void kt_dot_col_scales(const kt_wmat *W, int64_t j, int nvec, float *cs) {
    for (int t = 0; t < 8 * nvec; t++) cs[t] = W->scale[(j + t) * W->ldg];
}

void kt_dot_tpack_avx2(float *panel, const kt_wmat *W, int64_t j, int nvec, int64_t k0, int64_t kc,
                       int raw) {
    if (raw) { /* kt_dot_fold_ok */
        if (W->fmt == KT_W_I8) tpack_words(KT_W_I8, 1, panel, W, j, nvec, k0, kc);
        else tpack_words(KT_W_I4S, 1, panel, W, j, nvec, k0, kc);
        return;
    }
    if (tpack_words_ok(W, k0, kc)) {
        switch (W->fmt) {
        case KT_W_BF16: tpack_words(KT_W_BF16, 0, panel, W, j, nvec, k0, kc); return;
        case KT_W_I8: tpack_words(KT_W_I8, 0, panel, W, j, nvec, k0, kc); return;
        case KT_W_I4M: tpack_words(KT_W_I4M, 0, panel, W, j, nvec, k0, kc); return;
        case KT_W_I4Z: tpack_words(KT_W_I4Z, 0, panel, W, j, nvec, k0, kc); return;
        default: tpack_words(KT_W_I4S, 0, panel, W, j, nvec, k0, kc); return;
        }
    }
    switch (W->fmt) { /* bf16 (kc a multiple of 8) always took tpack_words */
    case KT_W_F32: tpack(KT_W_F32, panel, W, j, nvec, k0, kc); break;
    case KT_W_I8: tpack_int(KT_W_I8, panel, W, j, nvec, k0, kc); break;
    case KT_W_FP8: tpack(KT_W_FP8, panel, W, j, nvec, k0, kc); break;
    case KT_W_MXFP4: tpack(KT_W_MXFP4, panel, W, j, nvec, k0, kc); break;
    case KT_W_I4M: tpack_int(KT_W_I4M, panel, W, j, nvec, k0, kc); break;
    case KT_W_I4Z: tpack_int(KT_W_I4Z, panel, W, j, nvec, k0, kc); break;
    default: tpack_int(KT_W_I4S, panel, W, j, nvec, k0, kc); break;
    }
}

static void dot_panels(int64_t m, int64_t n, int64_t K, const float *a, int64_t lda,
                       const int32_t *aidx, const kt_wmat *W, float *c, int64_t ldc, int accum) {
    int64_t nv = n & ~(int64_t)7;
    panel_loop(1, 1, m, nv, K, a, lda, 1, aidx, W, NULL, c, ldc, accum);
    if (nv < n) { /* rows of W past the last multiple of 8 */
        kt_wmat rest = kt_wsub(W, nv, 0);
        kt_dot_avx2(m, n - nv, K, a, lda, aidx, &rest, c + nv, ldc, accum);
    }
}

/* kt_kernels.dot_many: the panel form for a dozen rows or more (sums in k
 * order per output, unlike kt_dot_avx2's 8 interleaved partial sums). */
void kt_dot_many_avx2(int64_t m, int64_t n, int64_t K, const float *a, int64_t lda,
                      const int32_t *aidx, const kt_wmat *w, float *c, int64_t ldc, int accum) {
    if (m >= 12 && n >= 8 && K > 0 && K % 8 == 0)
        dot_panels(m, n, K, a, lda, aidx, w, c, ldc, accum);
    else
        kt_dot_avx2(m, n, K, a, lda, aidx, w, c, ldc, accum);
}

/* ---- integer dot form (int8 activations, inference): qdot_ymm.h ---- */

#define KT_VNNI 0
#define KT_QDOT_NAME kt_qdot_avx2
#include "../qdot_ymm.h"

/* ---- activations ---- */

/* exp(x) for x in about [-88, 88]: Cody-Waite range reduction and a degree-5
 * polynomial; relative error below 2e-7. */
KT_INLINE __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

KT_INLINE __m256 sigmoid8(__m256 g) {
    __m256 one = _mm256_set1_ps(1.0f);
    return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
}

static inline float sigmoid1(float x) { return 1.0f / (1.0f + expf(-x)); }

/* The clamped SwiGLU (kt_act_fwd_fn), fwd: h; bwd: as kt_act_bwd_fn. */
static void act_fwd_clamp_avx2(int64_t n, const float *g, const float *u, float *h, const kt_activation *a) {
    const __m256 lim = _mm256_set1_ps(a->limit), nlim = _mm256_set1_ps(-a->limit);
    const __m256 al = _mm256_set1_ps(a->alpha), one = _mm256_set1_ps(1.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 gc = _mm256_min_ps(_mm256_loadu_ps(g + i), lim);
        __m256 uc = _mm256_min_ps(_mm256_max_ps(_mm256_loadu_ps(u + i), nlim), lim);
        __m256 glu = _mm256_mul_ps(gc, sigmoid8(_mm256_mul_ps(al, gc)));
        _mm256_storeu_ps(h + i, _mm256_mul_ps(glu, _mm256_add_ps(uc, one)));
    }
    for (; i < n; i++) h[i] = kt_swiglu_clamp1(g[i], u[i], a);
}

static float act_bwd_clamp_avx2(int64_t n, const float *dh, float *g, float *u, float w, const kt_activation *a) {
    const __m256 lim = _mm256_set1_ps(a->limit), nlim = _mm256_set1_ps(-a->limit);
    const __m256 al = _mm256_set1_ps(a->alpha), one = _mm256_set1_ps(1.0f), wv = _mm256_set1_ps(w);
    __m256 dotv = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 gv = _mm256_loadu_ps(g + i), uv = _mm256_loadu_ps(u + i), dv = _mm256_loadu_ps(dh + i);
        __m256 gc = _mm256_min_ps(gv, lim), uc1 = _mm256_add_ps(_mm256_min_ps(_mm256_max_ps(uv, nlim), lim), one);
        __m256 sg = sigmoid8(_mm256_mul_ps(al, gc)), glu = _mm256_mul_ps(gc, sg);
        __m256 dglu = _mm256_mul_ps(sg, _mm256_fmadd_ps(_mm256_mul_ps(al, gc), _mm256_sub_ps(one, sg), one));
        dotv = _mm256_fmadd_ps(_mm256_mul_ps(dv, glu), uc1, dotv);
        __m256 d = _mm256_mul_ps(wv, dv);
        __m256 gin = _mm256_cmp_ps(gv, lim, _CMP_LE_OQ);
        __m256 uin = _mm256_and_ps(_mm256_cmp_ps(uv, nlim, _CMP_GE_OQ), _mm256_cmp_ps(uv, lim, _CMP_LE_OQ));
        _mm256_storeu_ps(g + i, _mm256_and_ps(gin, _mm256_mul_ps(_mm256_mul_ps(d, uc1), dglu)));
        _mm256_storeu_ps(u + i, _mm256_and_ps(uin, _mm256_mul_ps(d, glu)));
    }
    float dot = hsum8(dotv);
    for (; i < n; i++) dot += kt_swiglu_clamp_bwd1(dh[i], &g[i], &u[i], w, a);
    return dot;
}

void kt_act_fwd_avx2(int64_t n, const float *g, const float *u, float *h, const kt_activation *a) {
    if (a->kind == KTMOE_ACT_SWIGLU_CLAMP) {
        act_fwd_clamp_avx2(n, g, u, h, a);
        return;
    }
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 gv = _mm256_loadu_ps(g + i);
        __m256 hv = _mm256_mul_ps(_mm256_mul_ps(gv, sigmoid8(gv)), _mm256_loadu_ps(u + i));
        _mm256_storeu_ps(h + i, hv);
    }
    for (; i < n; i++) h[i] = g[i] * sigmoid1(g[i]) * u[i];
}

float kt_act_bwd_avx2(int64_t n, const float *dh, float *g, float *u, float w, const kt_activation *a) {
    if (a->kind == KTMOE_ACT_SWIGLU_CLAMP) return act_bwd_clamp_avx2(n, dh, g, u, w, a);
    __m256 dotv = _mm256_setzero_ps(), wv = _mm256_set1_ps(w), one = _mm256_set1_ps(1.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 gv = _mm256_loadu_ps(g + i), uv = _mm256_loadu_ps(u + i), dv = _mm256_loadu_ps(dh + i);
        __m256 sg = sigmoid8(gv);
        __m256 silu = _mm256_mul_ps(gv, sg);
        __m256 dsilu = _mm256_mul_ps(sg, _mm256_fmadd_ps(gv, _mm256_sub_ps(one, sg), one));
        dotv = _mm256_fmadd_ps(_mm256_mul_ps(dv, silu), uv, dotv);
        __m256 d = _mm256_mul_ps(wv, dv);
        _mm256_storeu_ps(g + i, _mm256_mul_ps(_mm256_mul_ps(d, uv), dsilu));
        _mm256_storeu_ps(u + i, _mm256_mul_ps(d, silu));
    }
    float dot = hsum8(dotv);
    for (; i < n; i++) {
        float sg = sigmoid1(g[i]), silu = g[i] * sg, dsilu = sg * (1.0f + g[i] * (1.0f - sg));
        dot += dh[i] * silu * u[i];
        float d = w * dh[i];
        g[i] = d * u[i] * dsilu;
        u[i] = d * silu;
    }
    return dot;
}

/* ---- int8 activations: kt_quant_act, vectorized ---- */

/* One block of 32 values: its codes in column order (deint 0) or even
 * columns first (deint 1), its scale and its code sum.  The same fp32
 * operations as kt_quant_act (max of |x|, amax / 127, x / d rounded to
 * nearest even, clamped), so the same codes. */
static __m256i quant_block(const float *x, int deint, float *d, int *sum) {
    const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    __m256 v[4], mx = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) {
        v[i] = _mm256_loadu_ps(x + 8 * i);
        mx = _mm256_max_ps(mx, _mm256_and_ps(v[i], absm));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    float db = _mm_cvtss_f32(m4) / 127.0f;
    *d = db;
    if (db == 0.0f) {
        *sum = 0;
        return _mm256_setzero_si256();
    }
    const __m256 dv = _mm256_set1_ps(db);
    const __m256i lim = _mm256_set1_epi32(127), nlim = _mm256_set1_epi32(-127);
    __m256i q[4], acc = _mm256_setzero_si256();
    for (int i = 0; i < 4; i++) {
        q[i] = _mm256_cvtps_epi32(_mm256_div_ps(v[i], dv));
        q[i] = _mm256_max_epi32(_mm256_min_epi32(q[i], lim), nlim);
        acc = _mm256_add_epi32(acc, q[i]);
    }
    __m128i a4 = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    a4 = _mm_add_epi32(a4, _mm_shuffle_epi32(a4, 0x4E));
    a4 = _mm_add_epi32(a4, _mm_shuffle_epi32(a4, 0xB1));
    *sum = _mm_cvtsi128_si32(a4);
    /* packs work per 128-bit lane: the permute puts the 32 codes back in order */
    __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    if (deint) {
        /* per lane: 8 even columns, then 8 odd; then evens of both lanes first */
        const __m256i eo = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                            0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
        b = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(b, eo), 0xD8);
    }
    return b;
}

void kt_quant_act_avx2(const float *x, int64_t K, int deint, int8_t *q, float *d, float *s) {
    const int64_t nb = K / KT_QBLK;
    int sum;
    __m256i prev = _mm256_setzero_si256(); /* deint 2: the even block of the pair */
    for (int64_t b = 0; b < nb; b++) {
        __m256i c = quant_block(x + b * KT_QBLK, deint, d + b, &sum);
        s[b] = d[b] * (float)sum;
        if (deint != 2) {
            _mm256_storeu_si256((__m256i *)(q + b * KT_QBLK), c);
        } else if (!(b & 1)) {
            prev = c;
        } else { /* pair (b - 1, b): evens of both blocks, then odds of both */
            _mm256_storeu_si256((__m256i *)(q + (b - 1) * KT_QBLK), _mm256_permute2x128_si256(prev, c, 0x20));
            _mm256_storeu_si256((__m256i *)(q + b * KT_QBLK), _mm256_permute2x128_si256(prev, c, 0x31));
        }
    }
}

const kt_kernels kt_kernels_avx2 = {
    .isa = KTMOE_ISA_AVX2,
    .dot = kt_dot_avx2,
    .dot_many = kt_dot_many_avx2,
    .outer = kt_outer_avx2,
    .qdot = kt_qdot_avx2,
    .act_fwd = kt_act_fwd_avx2,
    .act_bwd = kt_act_bwd_avx2,
    .quant_act = kt_quant_act_avx2,
};
