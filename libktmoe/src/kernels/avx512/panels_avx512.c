/* The avx512 tier's panel kernels: the outer form (dh W, backward) and the
 * many-row dot form (x W^T through a transposed W panel, SFT forward) of
 * the avx2 tier, on 512-bit registers.  The panels are the avx2 tier's
 * (kt_outer_pack_avx2, kt_dot_tpack_avx2: KT_PANEL_K rows of KT_PANEL_W =
 * 32 fp32 columns, i.e. two zmm a row); what changes is the register tile:
 * 12 rows of D x 32 columns, 24 zmm accumulators (AVX-512 has 32
 * registers), 2 panel loads and 12 broadcasts per 24 FMAs against the
 * avx2 tile's 2 + 6 per 12.  A last column block of 8 goes through a mask.
 * In the outer form, the first block of rows of each panel converts W as
 * its FMAs use it and stores the panel for the others (zmicro_pack): on
 * Zen 5 (full-width AVX-512, 2 threads) the separate packing pass had
 * taken 7 % of a BF16 SFT step; without it the steps ran 1.046x (BF16),
 * 1.047x (INT8), 1.057x (INT4) as fast at qlen 512, 1.12-1.13x at 32-128.
 *
 * On Zen 4, whose AVX-512 units are 256 bits wide, this tile ran 5 % slower
 * than the avx2 one (kernel microbenchmark, 48 x 256 x 2048 and 48 x 64 x
 * 1408, in cache: 87 / 88 against 92 / 93 GFLOP/s), so there the calls go
 * to the avx2 kernels (kt_cpu_wide512; KTMOE_ZMM=1 forces this path).
 *
 * Every output is the same k-ordered chain of FMAs as in the avx2 kernels,
 * so the two tiers give the same bits (the tests check against ref).
 * Calls with few rows, and columns past the last multiple of 8, go to the
 * avx2 kernels. */
#include "../../internal.h"

#include "../prefetch.h"

#include <immintrin.h>

#define KT_ZMR 12 /* rows of D per micro-kernel */

/* C[i][j0 .. j0 + 16 NZ) (+)= sum_{k < kc} D(i, k) panel[k][0 .. 16 NZ) for
 * i < MR; the last zmm's columns masked by `last`; cs != NULL: the sums
 * times the column scales cs[0 .. 16 NZ) (folded weight scales).  One line
 * of pf every other k: spread out, the next panel's lines arrived in time
 * (fetched a share at the start of each block, the dot form's W lines
 * came late: its packing pass took 16 % of its time on Zen 5, 4 % with
 * the lines in L1). */
KT_INLINE void zmicro(const int MR, const int NZ, const int FULL, __mmask16 last, int64_t kc,
                      const float *const *d, int64_t dsk, const float *panel,
                      float *const *crow, int64_t j0, int load_c, const float *cs, kt_pf *pf) {
    __m512 acc[KT_ZMR][2];
    for (int i = 0; i < MR; i++)
        for (int v = 0; v < NZ; v++) {
            __mmask16 mk = v == NZ - 1 ? last : (__mmask16)0xFFFF;
            acc[i][v] = load_c ? _mm512_maskz_loadu_ps(mk, crow[i] + j0 + 16 * v) : _mm512_setzero_ps();
        }
    for (int64_t k = 0; k < kc; k++) {
        if (k & 1) pf_some(pf, 1);
        __m512 w[2];
        for (int v = 0; v < NZ; v++) /* whole rows: a masked load only for a half block */
            w[v] = FULL || v < NZ - 1 ? _mm512_load_ps(panel + k * KT_PANEL_W + 16 * v)
                                      : _mm512_maskz_load_ps(last, panel + k * KT_PANEL_W + 16 * v);
        for (int i = 0; i < MR; i++) {
            __m512 b = _mm512_set1_ps(d[i][k * dsk]);
            for (int v = 0; v < NZ; v++) acc[i][v] = _mm512_fmadd_ps(b, w[v], acc[i][v]);
        }
    }
    if (cs)
        for (int v = 0; v < NZ; v++) {
            __m512 sv = _mm512_maskz_loadu_ps(v == NZ - 1 ? last : (__mmask16)0xFFFF, cs + 16 * v);
            for (int i = 0; i < MR; i++) acc[i][v] = _mm512_mul_ps(acc[i][v], sv);
        }
    for (int i = 0; i < MR; i++)
        for (int v = 0; v < NZ; v++)
            _mm512_mask_storeu_ps(crow[i] + j0 + 16 * v, v == NZ - 1 ? last : (__mmask16)0xFFFF,
                                  acc[i][v]);
}

#define ZCASE(MR)                                                                          \
    case MR:                                                                                \
        if (nz == 2 && last == 0xFFFF) zmicro(MR, 2, 1, last, kc, dp, dsk, panel, cr, j, load_c, cs, pf); \
        else if (nz == 2) zmicro(MR, 2, 0, last, kc, dp, dsk, panel, cr, j, load_c, cs, pf);   \
        else zmicro(MR, 1, 0, last, kc, dp, dsk, panel, cr, j, load_c, cs, pf);                 \
        break;

/* ---- the outer form's panel packed by its first block of rows ----
 * Formats of W this path converts (zfmt): plain bf16 and fp32, int8 and
 * the symmetric or zero-point 4-bit codes (one scale a group), and their
 * scale-free forms (KT_RAW_*: every scale 1, the backward's dx whose dg, du
 * carry the scales), and the 4-bit codes with a scale and a min (I4M).
 * Each value is the one kt_outer_pack_avx2 stores (the codes' integers,
 * times the scale once, plus the min), so the results do not change.  FP8
 * and MXFP4 take the packing pass. */
enum { ZNONE = -1 };

static int zfmt(const kt_wmat *W) {
    int fmt = kt_outer_fmt(W);
    return fmt == KT_W_FP8 || fmt == KT_W_MXFP4 ? ZNONE : fmt;
}

/* W row columns [j0, j0 + 32) at p as two zmm; s, z, mn: the group's
 * scale, zero point (I4S: 8) and min (I4M). */
KT_INLINE void zrow32(const int fmt, const char *p, float s, int z, float mn, __m512 *w0,
                      __m512 *w1) {
    if (fmt == KT_W_BF16) {
        const __m256i *q = (const __m256i *)p;
        *w0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(q)), 16));
        *w1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(q + 1)), 16));
        return;
    }
    if (fmt == KT_W_F32) {
        *w0 = _mm512_loadu_ps((const float *)p);
        *w1 = _mm512_loadu_ps((const float *)p + 16);
        return;
    }
    __m512i i0, i1;
    if (fmt == KT_W_I8 || fmt == KT_RAW_I8) {
        i0 = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p));
        i1 = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p + 1));
    } else { /* 16 bytes: 32 codes, low nibble first, less the zero point (I4M: none) */
        __m128i v = _mm_loadu_si128((const __m128i *)p), m4 = _mm_set1_epi8(0x0F);
        __m128i zz = _mm_set1_epi8((char)(fmt == KT_W_I4Z ? z : fmt == KT_W_I4M ? 0 : 8));
        __m128i lo = _mm_and_si128(v, m4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4);
        i0 = _mm512_cvtepi8_epi32(_mm_sub_epi8(_mm_unpacklo_epi8(lo, hi), zz));
        i1 = _mm512_cvtepi8_epi32(_mm_sub_epi8(_mm_unpackhi_epi8(lo, hi), zz));
    }
    *w0 = _mm512_cvtepi32_ps(i0);
    *w1 = _mm512_cvtepi32_ps(i1);
    if (fmt != KT_RAW_I8 && fmt != KT_RAW_I4S) {
        __m512 sv = _mm512_set1_ps(s);
        *w0 = _mm512_mul_ps(*w0, sv);
        *w1 = _mm512_mul_ps(*w1, sv);
    }
    if (fmt == KT_W_I4M) { /* code * scale + min, as the avx2 tier's panels */
        __m512 mv = _mm512_set1_ps(mn);
        *w0 = _mm512_add_ps(*w0, mv);
        *w1 = _mm512_add_ps(*w1, mv);
    }
}

/* zmicro for the first block of rows of an outer-form panel, 32 whole
 * columns: each W row is converted as the block uses it and stored to the
 * panel for the other blocks, so that the conversion runs beside the FMAs
 * instead of in a packing pass before them (on a full-width AVX-512 CPU
 * that pass took 7 % of a BF16 SFT step). */
KT_INLINE void zmicro_pack(const int MR, const int fmt, int64_t kc, const float *const *d,
                           int64_t dsk, float *restrict panel, const kt_wmat *W,
                           const int32_t *widx, int64_t k0, float *const *crow, int64_t j0,
                           int load_c) {
    /* named accumulators: in an array, gcc kept them in memory around the
     * panel stores (which may alias anything), as in the avx2 tier */
    __m512 a0_0, a0_1, a1_0, a1_1, a2_0, a2_1, a3_0, a3_1, a4_0, a4_1, a5_0, a5_1;
    __m512 a6_0, a6_1, a7_0, a7_1, a8_0, a8_1, a9_0, a9_1, a10_0, a10_1, a11_0, a11_1;
#define ZLD(i)                                                                              \
    a##i##_0 = a##i##_1 = _mm512_setzero_ps();                                              \
    if (MR > i && load_c)                                                                   \
        a##i##_0 = _mm512_loadu_ps(crow[i] + j0), a##i##_1 = _mm512_loadu_ps(crow[i] + j0 + 16);
    ZLD(0) ZLD(1) ZLD(2) ZLD(3) ZLD(4) ZLD(5) ZLD(6) ZLD(7) ZLD(8) ZLD(9) ZLD(10) ZLD(11)
#undef ZLD
    const char *w = w_addr(W, 0, j0);
    const int64_t wld = w_addr(W, 1, 0) - w_addr(W, 0, 0);
    const int scaled = fmt == KT_W_I8 || fmt == KT_W_I4S || fmt == KT_W_I4Z || fmt == KT_W_I4M;
    const int64_t g = scaled ? (W->g0 + j0) / W->gs : 0;
    for (int64_t k = 0; k < kc; k++) {
        int64_t r = widx ? widx[k0 + k] : k0 + k;
        float sc = scaled ? W->scale[r * W->ldg + g] : 1.0f;
        int z = fmt == KT_W_I4Z ? ((const uint8_t *)W->aux)[r * W->ldg + g] : 8;
        float mn = fmt == KT_W_I4M ? ((const float *)W->aux)[r * W->ldg + g] : 0.0f;
        __m512 w0, w1;
        zrow32(fmt, w + r * wld, sc, z, mn, &w0, &w1);
        _mm512_store_ps(panel + k * KT_PANEL_W, w0);
        _mm512_store_ps(panel + k * KT_PANEL_W + 16, w1);
        __m512 b;
#define ZF(i)                                                                               \
        if (MR > i) {                                                                       \
            b = _mm512_set1_ps(d[i][k * dsk]);                                              \
            a##i##_0 = _mm512_fmadd_ps(b, w0, a##i##_0);                                    \
            a##i##_1 = _mm512_fmadd_ps(b, w1, a##i##_1);                                    \
        }
        ZF(0) ZF(1) ZF(2) ZF(3) ZF(4) ZF(5) ZF(6) ZF(7) ZF(8) ZF(9) ZF(10) ZF(11)
#undef ZF
    }
#define ZST(i)                                                                              \
    if (MR > i) _mm512_storeu_ps(crow[i] + j0, a##i##_0), _mm512_storeu_ps(crow[i] + j0 + 16, a##i##_1);
    ZST(0) ZST(1) ZST(2) ZST(3) ZST(4) ZST(5) ZST(6) ZST(7) ZST(8) ZST(9) ZST(10) ZST(11)
#undef ZST
}

#define ZPACK_CASE(MR, FMT)                                                                 \
    case MR: zmicro_pack(MR, FMT, kc, dp, dsk, panel, W, widx, k0, cr, j, load_c); break;

/* zmicro_pack for a first block of mr rows, one function a format (in one
 * function with a switch over the formats, the bf16 step ran 4 % slower:
 * the quantized formats' setup was hoisted ahead of the switch). */
#define ZPACK_FN(NAME, FMT)                                                                 \
    static void NAME(int mr, int64_t kc, const float *const *dp, int64_t dsk, float *panel, \
                     const kt_wmat *W, const int32_t *widx, int64_t k0, float *const *cr,   \
                     int64_t j, int load_c) {                                               \
        switch (mr) {                                                                       \
            ZPACK_CASE(1, FMT) ZPACK_CASE(2, FMT) ZPACK_CASE(3, FMT) ZPACK_CASE(4, FMT)     \
            ZPACK_CASE(5, FMT) ZPACK_CASE(6, FMT) ZPACK_CASE(7, FMT) ZPACK_CASE(8, FMT)     \
            ZPACK_CASE(9, FMT) ZPACK_CASE(10, FMT) ZPACK_CASE(11, FMT) ZPACK_CASE(12, FMT)  \
        }                                                                                   \
    }

ZPACK_FN(zpack_bf16, KT_W_BF16)
ZPACK_FN(zpack_f32, KT_W_F32)
ZPACK_FN(zpack_i8, KT_W_I8)
ZPACK_FN(zpack_raw_i8, KT_RAW_I8)
ZPACK_FN(zpack_i4s, KT_W_I4S)
ZPACK_FN(zpack_raw_i4s, KT_RAW_I4S)
ZPACK_FN(zpack_i4z, KT_W_I4Z)
ZPACK_FN(zpack_i4m, KT_W_I4M)

/* zmicro_pack for a first block of mr rows; fmt: zfmt(W). */
static void zpack_block(int mr, int fmt, int64_t kc, const float *const *dp, int64_t dsk,
                        float *panel, const kt_wmat *W, const int32_t *widx, int64_t k0,
                        float *const *cr, int64_t j, int load_c) {
    switch (fmt) {
    case KT_W_BF16: zpack_bf16(mr, kc, dp, dsk, panel, W, widx, k0, cr, j, load_c); break;
    case KT_W_F32: zpack_f32(mr, kc, dp, dsk, panel, W, widx, k0, cr, j, load_c); break;
    case KT_W_I8: zpack_i8(mr, kc, dp, dsk, panel, W, widx, k0, cr, j, load_c); break;
    case KT_RAW_I8: zpack_raw_i8(mr, kc, dp, dsk, panel, W, widx, k0, cr, j, load_c); break;
    case KT_W_I4S: zpack_i4s(mr, kc, dp, dsk, panel, W, widx, k0, cr, j, load_c); break;
    case KT_RAW_I4S: zpack_raw_i4s(mr, kc, dp, dsk, panel, W, widx, k0, cr, j, load_c); break;
    case KT_W_I4Z: zpack_i4z(mr, kc, dp, dsk, panel, W, widx, k0, cr, j, load_c); break;
    default: zpack_i4m(mr, kc, dp, dsk, panel, W, widx, k0, cr, j, load_c); break;
    }
}

/* Whether the first block of rows packs the outer-form panel of columns
 * [j, j + 8 nvec): 32 whole columns in one quantization group, a format
 * zrow32 converts. */
static int zfuse(const kt_wmat *W, int fmt, int64_t j, int nvec) {
    if (nvec != 4 || fmt == ZNONE) return 0;
    return fmt == KT_W_BF16 || fmt == KT_W_F32 || kt_cols_one_group(W, j, KT_PANEL_W);
}

/* One panel (kc rows of k, 8 nvec columns from j) against all m rows of D:
 * D(i, k) = d[i][k * dsk] through the row pointers rows[i]. */
KT_INLINE void zpanel(int64_t m, const float *const *rows, int64_t dsk, float *panel,
                   int64_t kc, int nvec, float *c, int64_t ldc, int64_t j, int load_c,
                   const float *cs, kt_pf *pf, int zf, const kt_wmat *W, const int32_t *widx,
                   int64_t k0) {
    int nz = (nvec + 1) / 2;
    __mmask16 last = nvec & 1 ? (__mmask16)0x00FF : (__mmask16)0xFFFF;
    int64_t blocks = (m + KT_ZMR - 1) / KT_ZMR;
    int64_t pf_share = (pf_total(pf) + blocks - 1) / blocks;
    for (int64_t i = 0; i < m; i += KT_ZMR) {
        int mr = (int)KT_MIN(KT_ZMR, m - i);
        const float *dp[KT_ZMR];
        float *cr[KT_ZMR];
        for (int t = 0; t < mr; t++) {
            dp[t] = rows[i + t];
            cr[t] = c + (i + t) * ldc;
        }
        if (zf != ZNONE && i == 0) { /* the first block packs the panel (format zf) */
            pf_some(pf, pf_share);
            zpack_block(mr, zf, kc, dp, dsk, panel, W, widx, k0, cr, j, load_c);
            continue;
        }
        switch (mr) {
            ZCASE(1) ZCASE(2) ZCASE(3) ZCASE(4) ZCASE(5) ZCASE(6)
            ZCASE(7) ZCASE(8) ZCASE(9) ZCASE(10) ZCASE(11) ZCASE(12)
        }
    }
    pf_some(pf, pf_total(pf)); /* what the blocks left (short ones) */
}

/* Rows of D (or A) per pass, so that their pointers fit on the stack. */
#define KT_ZROWS 256

/* Both forms over columns [0, nv) of C: D(i, k) = d[(didx ? didx[i] : i)
 * dsi + k dsk]; the W panel packed as the outer form reads W (rows k
 * through widx), or transposed for the dot form (tpack). */
KT_INLINE void zdrive(const int tpack, int64_t m, int64_t nv, int64_t K, const float *d, int64_t dsi,
                   int64_t dsk, const int32_t *didx, const kt_wmat *W, const int32_t *widx,
                   float *c, int64_t ldc, int accum) {
    float panel[KT_PANEL_K * KT_PANEL_W] __attribute__((aligned(64)));
    float cs[KT_PANEL_W]; /* column scales folded out of the panel */
    const float *rows[KT_ZROWS];
    const int fold = tpack && kt_dot_fold_ok(W, K, accum);
    const int zf = tpack ? ZNONE : zfmt(W);
    for (int64_t i0 = 0; i0 < m; i0 += KT_ZROWS) {
        int64_t mc = KT_MIN(KT_ZROWS, m - i0);
        for (int64_t j = 0; j < nv; j += KT_PANEL_W) {
            int nvec = (int)KT_MIN(KT_PANEL_W, nv - j) / 8;
            if (fold) kt_dot_col_scales(W, j, nvec, cs);
            /* the outer form's plain W: packed by the first block of rows */
            const int fuse = !tpack && zfuse(W, zf, j, nvec);
            for (int64_t k0 = 0; k0 < K; k0 += KT_PANEL_K) {
                int64_t kc = KT_MIN(KT_PANEL_K, K - k0), k1 = k0 + kc;
                kt_pf pf;
                if (tpack) {
                    pf_next_dot(&pf, W, K, nv, j, nvec, k1);
                    kt_dot_tpack_avx2(panel, W, j, nvec, k0, kc, fold);
                } else {
                    pf_next_outer(&pf, W, widx, K, nv, j, nvec, k1);
                    if (!fuse) kt_outer_pack_avx2(panel, W, widx, k0, k1, j, nvec);
                }
                for (int64_t i = 0; i < mc; i++)
                    rows[i] = d + (didx ? didx[i0 + i] : i0 + i) * dsi + k0 * dsk;
                zpanel(mc, rows, dsk, panel, kc, nvec, c + i0 * ldc, ldc, j, accum || k0 > 0,
                       fold && k1 == K ? cs : NULL, &pf, fuse ? zf : ZNONE, W, widx, k0);
            }
        }
    }
}

void kt_outer_avx512(int64_t m, int64_t n, int64_t K, const float *d, int64_t dsi, int64_t dsk,
                     const int32_t *didx, const kt_wmat *W, const int32_t *widx, float *c,
                     int64_t ldc, int accum) {
    int64_t nv = n & ~(int64_t)7;
    if (m <= 2 || K == 0 || nv == 0 || !kt_cpu_wide512()) {
        kt_outer_avx2(m, n, K, d, dsi, dsk, didx, W, widx, c, ldc, accum);
        return;
    }
    zdrive(0, m, nv, K, d, dsi, dsk, didx, W, widx, c, ldc, accum);
    if (nv < n) { /* columns past the last multiple of 8 */
        kt_wmat rest = kt_wsub(W, 0, nv);
        kt_outer_avx2(m, n - nv, K, d, dsi, dsk, didx, &rest, widx, c + nv, ldc, accum);
    }
}

/* kt_kernels.dot_many: with a dozen rows of A or more, W rows transposed
 * into the panel and A broadcast (k-ordered sums, as kt_dot_many_avx2). */
void kt_dot_many_avx512(int64_t m, int64_t n, int64_t K, const float *a, int64_t lda,
                        const int32_t *aidx, const kt_wmat *W, float *c, int64_t ldc, int accum) {
    int64_t nv = n & ~(int64_t)7;
    if (m < 12 || nv == 0 || K == 0 || K % 8 != 0 || !kt_cpu_wide512()) {
        kt_dot_many_avx2(m, n, K, a, lda, aidx, W, c, ldc, accum);
        return;
    }
    zdrive(1, m, nv, K, a, lda, 1, aidx, W, NULL, c, ldc, accum);
    if (nv < n) { /* rows of W past the last multiple of 8 */
        kt_wmat rest = kt_wsub(W, nv, 0);
        kt_dot_avx2(m, n - nv, K, a, lda, aidx, &rest, c + nv, ldc, accum);
    }
}
