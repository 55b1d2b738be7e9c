/* The avx512 tier's panel kernels: the outer form (dh W, backward) and the
 * many-row dot form (x W^T through a transposed W panel, SFT forward) of
 * the avx2 tier, on 512-bit registers.  The panels are the avx2 tier's
 * (kt_outer_pack_avx2, kt_dot_tpack_avx2: KT_PANEL_K rows of KT_PANEL_W =
 * 32 fp32 columns, i.e. two zmm a row); what changes is the register tile:
 * 12 rows of D x 32 columns, 24 zmm accumulators (AVX-512 has 32
 * registers), 2 panel loads and 12 broadcasts per 24 FMAs against the
 * avx2 tile's 2 + 6 per 12.  A last column block of 8 goes through a mask.
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
 * times the column scales cs[0 .. 16 NZ) (folded weight scales). */
KT_INLINE void zmicro(const int MR, const int NZ, const int FULL, __mmask16 last, int64_t kc,
                      const float *const *d, int64_t dsk, const float *panel,
                      float *const *crow, int64_t j0, int load_c, const float *cs) {
    __m512 acc[KT_ZMR][2];
    for (int i = 0; i < MR; i++)
        for (int v = 0; v < NZ; v++) {
            __mmask16 mk = v == NZ - 1 ? last : (__mmask16)0xFFFF;
            acc[i][v] = load_c ? _mm512_maskz_loadu_ps(mk, crow[i] + j0 + 16 * v) : _mm512_setzero_ps();
        }
    for (int64_t k = 0; k < kc; k++) {
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
        if (nz == 2 && last == 0xFFFF) zmicro(MR, 2, 1, last, kc, dp, dsk, panel, cr, j, load_c, cs); \
        else if (nz == 2) zmicro(MR, 2, 0, last, kc, dp, dsk, panel, cr, j, load_c, cs);   \
        else zmicro(MR, 1, 0, last, kc, dp, dsk, panel, cr, j, load_c, cs);                 \
        break;

/* One panel (kc rows of k, 8 nvec columns from j) against all m rows of D:
 * D(i, k) = d[i][k * dsk] through the row pointers rows[i]. */
static void zpanel(int64_t m, const float *const *rows, int64_t dsk, const float *panel,
                   int64_t kc, int nvec, float *c, int64_t ldc, int64_t j, int load_c,
                   const float *cs, kt_pf *pf) {
    int nz = (nvec + 1) / 2;
    __mmask16 last = nvec & 1 ? (__mmask16)0x00FF : (__mmask16)0xFFFF;
    int64_t blocks = (m + KT_ZMR - 1) / KT_ZMR;
    int64_t pf_share = (pf_total(pf) + blocks - 1) / blocks;
    for (int64_t i = 0; i < m; i += KT_ZMR) {
        int mr = (int)KT_MIN(KT_ZMR, m - i);
        pf_some(pf, pf_share);
        const float *dp[KT_ZMR];
        float *cr[KT_ZMR];
        for (int t = 0; t < mr; t++) {
            dp[t] = rows[i + t];
            cr[t] = c + (i + t) * ldc;
        }
        switch (mr) {
            ZCASE(1) ZCASE(2) ZCASE(3) ZCASE(4) ZCASE(5) ZCASE(6)
            ZCASE(7) ZCASE(8) ZCASE(9) ZCASE(10) ZCASE(11) ZCASE(12)
        }
    }
}

/* Rows of D (or A) per pass, so that their pointers fit on the stack. */
#define KT_ZROWS 256

/* Both forms over columns [0, nv) of C: D(i, k) = d[(didx ? didx[i] : i)
 * dsi + k dsk]; the W panel packed as the outer form reads W (rows k
 * through widx), or transposed for the dot form (tpack). */
static void zdrive(int tpack, int64_t m, int64_t nv, int64_t K, const float *d, int64_t dsi,
                   int64_t dsk, const int32_t *didx, const kt_wmat *W, const int32_t *widx,
                   float *c, int64_t ldc, int accum) {
    float panel[KT_PANEL_K * KT_PANEL_W] __attribute__((aligned(64)));
    float cs[KT_PANEL_W]; /* column scales folded out of the panel */
    const float *rows[KT_ZROWS];
    const int fold = tpack && kt_dot_fold_ok(W, K, accum);
    for (int64_t i0 = 0; i0 < m; i0 += KT_ZROWS) {
        int64_t mc = KT_MIN(KT_ZROWS, m - i0);
        for (int64_t j = 0; j < nv; j += KT_PANEL_W) {
            int nvec = (int)KT_MIN(KT_PANEL_W, nv - j) / 8;
            if (fold) kt_dot_col_scales(W, j, nvec, cs);
            for (int64_t k0 = 0; k0 < K; k0 += KT_PANEL_K) {
                int64_t kc = KT_MIN(KT_PANEL_K, K - k0), k1 = k0 + kc;
                kt_pf pf;
                if (tpack) {
                    pf_next_dot(&pf, W, K, nv, j, nvec, k1);
                    kt_dot_tpack_avx2(panel, W, j, nvec, k0, kc, fold);
                } else {
                    pf_next_outer(&pf, W, widx, K, nv, j, nvec, k1);
                    kt_outer_pack_avx2(panel, W, widx, k0, k1, j, nvec);
                }
                for (int64_t i = 0; i < mc; i++)
                    rows[i] = d + (didx ? didx[i0 + i] : i0 + i) * dsi + k0 * dsk;
                zpanel(mc, rows, dsk, panel, kc, nvec, c + i0 * ldc, ldc, j, accum || k0 > 0,
                       fold && k1 == K ? cs : NULL, &pf);
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
