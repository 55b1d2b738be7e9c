/* The amx tier: AMX-BF16 (tdpbf16ps) for the fp32 dot and outer forms,
 * AMX-INT8 (tdpbssd / tdpbsud) for the integer dot form; the activations
 * are the avx2 tier's.  Compiled with the avx512 and AMX flags (the helper
 * code here uses AVX2 only); chosen only when CPUID, XCR0 (XTILECFG,
 * XTILEDATA) and the Linux arch_prctl(ARCH_REQ_XCOMP_PERM) permission allow
 * it.  Checked against the ref tier and a float64 reference by the tests.
 *
 * Tiles.  A tile is up to 16 rows of 64 bytes.  tdpbf16ps C += A B with
 *   C 16 x 16 fp32, A 16 rows x 32 bf16 (16 pairs along k),
 *   B 16 pair-rows x 16 columns x 2 bf16 (the "VNNI" layout: pair-row p,
 *     column n holds (B[2p][n], B[2p+1][n])),
 * i.e. a 16 x 16 x 32 product per instruction, accumulated in fp32.  The
 * weights are stored once, row-major; each call dequantizes (kt_w_at's
 * exact fp32 values) and repacks the W panel it needs into a stack buffer
 * in the VNNI layout.  The tile config is loaded at the start of every
 * kernel call (the pool's threads, and any other code on them, may use
 * other configs) and released at the end.
 *
 * Accuracy: split bf16.  bf16 keeps 8 significant bits, so one bf16
 * product is far from the fp32 tiers' ~2^-24.  Each fp32 operand x is
 * split as x = h + m + l, h = bf16(x), m = bf16(x - h), l = bf16(x - h - m)
 * (round to nearest; both subtractions are exact in fp32), which holds 24
 * significant bits: x itself for all but tiny or huge values.  Products of
 * two bf16 are exact in fp32, so
 *   W exact in bf16 (BF16 weights):  A W = Ah W + Am W + Al W
 *     (3 tdpbf16ps, exact products, fp32 sums: the fp32 tiers' accuracy);
 *   any other W (fp32, dequantized):
 *     A W ~ Ah Wh + Ah Wm + Am Wh + Ah Wl + Am Wm + Al Wh
 *     (6 tdpbf16ps; the dropped terms are below 2^-25 |A W|).
 * The instruction flushes denormal inputs and results to zero, which only
 * touches parts below 2^-126.
 *
 * Integer dot form: one 16 x 16 x 32 tdpbssd (int8 weights) or tdpbsud
 * (4-bit codes 0..15, unsigned) per block of 32 columns, i.e. per
 * activation scale d_b, stored as int32 and scaled in fp32:
 *   C += s_g * sum_b d_b (sum_k q_k c_k) + off_g * sum_b s_b
 * per weight group g (see kt_qdot_fn). */
#include "../../internal.h"

#include "../ymm_common.h"

/* ---- tile configs ---- */

typedef struct kt_tilecfg {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} kt_tilecfg;

/* GCC 12's _tile_loadconfig names only the first 8 bytes of the config as
 * its memory operand, so stores to the rest of a local config could be
 * dropped as dead (the int8 config lost its rows and columns that way:
 * tilezero then raised #UD).  This asm reads the whole config first. */
KT_INLINE void tile_load(const kt_tilecfg *cfg) {
    __asm__ volatile("" : : "m"(*cfg) : "memory");
    _tile_loadconfig(cfg);
}

/* Tiles of the bf16 kernels: C, the 3 parts of A, the 3 parts of W
 * (macros: the intrinsics paste the tile number into the instruction). */
#define T_C 0
#define T_A0 1
#define T_A1 2
#define T_A2 3
#define T_W0 4
#define T_W1 5
#define T_W2 6

static void tile_config_bf16(void) {
    kt_tilecfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t <= T_W2; t++) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    tile_load(&cfg);
}

/* Tiles of the integer kernel: C (16 x 16 int32), X (16 rows x 32 int8),
 * W (8 rows of 4-byte groups x 16 columns). */
#define T_QC 0
#define T_QX 1
#define T_QW 2

static void tile_config_int8(void) {
    kt_tilecfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    cfg.rows[T_QC] = 16;
    cfg.colsb[T_QC] = 64;
    cfg.rows[T_QX] = 16;
    cfg.colsb[T_QX] = KT_QBLK;
    cfg.rows[T_QW] = KT_QBLK / 4;
    cfg.colsb[T_QW] = 64;
    tile_load(&cfg);
}

/* ---- bf16 split ---- */

/* The fp32 bits of bf16(x) (round to nearest even), low 16 bits zero. */
KT_INLINE __m256i bf16_round8(__m256i u) {
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd));
    return _mm256_and_si256(r, _mm256_set1_epi32((int)0xFFFF0000u));
}

/* The high halves of 8 fp32 bit patterns as 8 bf16. */
KT_INLINE __m128i bf16_pack8(__m256i b) {
    __m256i s = _mm256_srli_epi32(b, 16);
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(s, s), 0x08));
}

/* x = h + m + l (np parts, 1..3) as 8 bf16 each into part[0..np).  A non-
 * finite h (x infinite, NaN, or rounding up to infinity) gets zero lower
 * parts, so infinities stay infinities. */
KT_INLINE void split8(__m256 x, int np, __m128i *part) {
    __m256 r = x;
    const __m256i expm = _mm256_set1_epi32(0x7F800000);
    for (int p = 0; p < np; p++) {
        __m256i h = bf16_round8(_mm256_castps_si256(r));
        part[p] = bf16_pack8(h);
        if (p + 1 == np) break;
        __m256i inf = _mm256_cmpeq_epi32(_mm256_and_si256(h, expm), expm);
        r = _mm256_andnot_ps(_mm256_castsi256_ps(inf), _mm256_sub_ps(r, _mm256_castsi256_ps(h)));
    }
}

/* ---- dequantization (kt_w_at's fp32 values) ---- */

/* 8 columns from column c (a multiple of 8) of row r of a quantized W, all
 * in group g: integer offset first, then one multiply (I4M: multiply, then
 * add), as kt_w_at. */
KT_INLINE __m256 deq8(const kt_wmat *w, int64_t r, int64_t c, int64_t g) {
    const uint8_t *row = (const uint8_t *)w->data + r * w->ld;
    int64_t gi = r * w->ldg + g;
    __m256 s = _mm256_set1_ps(w->scale[gi]);
    switch (w->fmt) {
    case KT_W_I8: {
        __m128i q = _mm_loadl_epi64((const __m128i *)(row + c));
        return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), s);
    }
    case KT_W_FP8: return _mm256_mul_ps(fp8x8(row + c), s);
    case KT_W_MXFP4: return _mm256_mul_ps(e2m1x8(nib8(row + c / 2)), s);
    case KT_W_I4M: {
        __m256 mn = _mm256_set1_ps(((const float *)w->aux)[gi]);
        return _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(nib8(row + c / 2)), s), mn);
    }
    default: { /* I4S, I4Z */
        int z = w->fmt == KT_W_I4Z ? ((const uint8_t *)w->aux)[gi] : 8;
        __m256i u = _mm256_sub_epi32(nib8(row + c / 2), _mm256_set1_epi32(z));
        return _mm256_mul_ps(_mm256_cvtepi32_ps(u), s);
    }
    }
}

/* dst[0..n) = W(r, c .. c+n) as fp32.  For quantized W, c is a multiple of
 * 8 and so are the group size and the column origin (the kt_dot_fn
 * contract), so each 8 columns lie in one group; the last n % 8 columns
 * go through kt_w_at. */
static void deq_row(float *dst, const kt_wmat *w, int64_t r, int64_t c, int64_t n) {
    int64_t i = 0;
    if (w->fmt == KT_W_F32) {
        memcpy(dst, (const float *)w->data + r * w->ld + c, (size_t)n * 4);
        return;
    }
    if (w->fmt == KT_W_BF16) {
        const uint16_t *p = (const uint16_t *)w->data + r * w->ld + c;
        for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, ld8_bf16(p + i));
    } else {
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(dst + i, deq8(w, r, c + i, (w->g0 + c + i) / w->gs));
    }
    for (; i < n; i++) dst[i] = kt_w_at(w, r, c + i);
}

/* ---- bf16 tile products ---- */

#define KT_AMX_KC 256 /* k per packed chunk (a multiple of 32)          */
#define KT_TM 16      /* rows of a C tile                                */
#define KT_TN 16      /* columns of a C tile                             */

/* The packed operands of one (16 rows) x (16 columns) x (kc) step:
 *   a[p][i][k]        part p of A row i, column k (row stride KT_AMX_KC)
 *   w[p][k/2][j][k%2] part p of W(j, k) in the VNNI layout
 * Padding (rows, columns, k past the ends) is zero. */
typedef struct kt_amx_pack {
    uint16_t a[3][KT_TM * KT_AMX_KC] __attribute__((aligned(64)));
    uint16_t w[3][KT_AMX_KC * KT_TN] __attribute__((aligned(64)));
} kt_amx_pack;

/* Row i of the A parts from the fp32 values src[0..kc), zero to kcp. */
static void pack_a_row(kt_amx_pack *pk, int i, const float *src, int64_t kc, int64_t kcp) {
    float tmp[8];
    for (int64_t k = 0; k < kcp; k += 8) {
        __m256 x;
        if (k + 8 <= kc) {
            x = _mm256_loadu_ps(src + k);
        } else {
            for (int t = 0; t < 8; t++) tmp[t] = k + t < kc ? src[k + t] : 0.0f;
            x = _mm256_loadu_ps(tmp);
        }
        __m128i part[3];
        split8(x, 3, part);
        for (int p = 0; p < 3; p++) _mm_storeu_si128((__m128i *)(pk->a[p] + i * KT_AMX_KC + k), part[p]);
    }
}

/* Rows i0 .. i0 + mr of D (D(i, k) = d[(didx ? didx[i] : i) dsi + k dsk]),
 * columns k0 .. k0 + kc, into the A parts; the tile's other rows zero. */
static void pack_a_rows(kt_amx_pack *pk, int mr, const float *d, int64_t dsi, int64_t dsk,
                        const int32_t *didx, int64_t i0, int64_t k0, int64_t kc, int64_t kcp) {
    float dv[KT_AMX_KC] __attribute__((aligned(32)));
    for (int i = 0; i < KT_TM; i++) {
        if (i >= mr) {
            for (int p = 0; p < 3; p++) memset(pk->a[p] + i * KT_AMX_KC, 0, (size_t)kcp * 2);
            continue;
        }
        const float *di = d + (didx ? didx[i0 + i] : i0 + i) * dsi + k0 * dsk;
        if (dsk != 1) {
            for (int64_t k = 0; k < kc; k++) dv[k] = di[k * dsk];
            di = dv;
        }
        pack_a_row(pk, i, di, kc, kcp);
    }
}

/* Column j of the W parts from the fp32 values v[0..kcp) along k (dot form:
 * a row of W). */
static void pack_w_col(kt_amx_pack *pk, int np, int j, const float *v, int64_t kcp) {
    for (int64_t k = 0; k < kcp; k += 8) {
        __m128i part[3];
        split8(_mm256_loadu_ps(v + k), np, part);
        for (int p = 0; p < np; p++) {
            uint32_t pairs[4];
            _mm_storeu_si128((__m128i *)pairs, part[p]);
            for (int q = 0; q < 4; q++)
                memcpy(pk->w[p] + ((k / 2 + q) * KT_TN + j) * 2, &pairs[q], 4);
        }
    }
}

/* Pair-row k/2 of the W parts from two rows of 16 fp32 values along j (the
 * outer form: rows k and k+1 of W). */
static void pack_w_pair(kt_amx_pack *pk, int np, int64_t k, const float *v0, const float *v1) {
    for (int h = 0; h < KT_TN; h += 8) {
        __m128i p0[3], p1[3];
        split8(_mm256_loadu_ps(v0 + h), np, p0);
        split8(_mm256_loadu_ps(v1 + h), np, p1);
        for (int p = 0; p < np; p++) {
            uint16_t *dst = pk->w[p] + ((k / 2) * KT_TN + h) * 2;
            _mm_storeu_si128((__m128i *)dst, _mm_unpacklo_epi16(p0[p], p1[p]));
            _mm_storeu_si128((__m128i *)(dst + 8), _mm_unpackhi_epi16(p0[p], p1[p]));
        }
    }
}

/* The C tile of the packed step into ct[16][16]: sum over k of A W with
 * np_w parts of W (1: W exact in bf16, else 3), smallest terms first. */
static void tile_products(const kt_amx_pack *pk, int np_w, int64_t kcp, float *ct) {
    _tile_zero(T_C);
    for (int64_t s = 0; s < kcp / 32; s++) {
        _tile_loadd(T_A0, pk->a[0] + s * 32, KT_AMX_KC * 2);
        _tile_loadd(T_A1, pk->a[1] + s * 32, KT_AMX_KC * 2);
        _tile_loadd(T_A2, pk->a[2] + s * 32, KT_AMX_KC * 2);
        _tile_loadd(T_W0, pk->w[0] + s * 16 * KT_TN * 2, KT_TN * 4);
        if (np_w == 1) {
            _tile_dpbf16ps(T_C, T_A2, T_W0);
            _tile_dpbf16ps(T_C, T_A1, T_W0);
            _tile_dpbf16ps(T_C, T_A0, T_W0);
        } else {
            _tile_loadd(T_W1, pk->w[1] + s * 16 * KT_TN * 2, KT_TN * 4);
            _tile_loadd(T_W2, pk->w[2] + s * 16 * KT_TN * 2, KT_TN * 4);
            _tile_dpbf16ps(T_C, T_A2, T_W0);
            _tile_dpbf16ps(T_C, T_A1, T_W1);
            _tile_dpbf16ps(T_C, T_A0, T_W2);
            _tile_dpbf16ps(T_C, T_A1, T_W0);
            _tile_dpbf16ps(T_C, T_A0, T_W1);
            _tile_dpbf16ps(T_C, T_A0, T_W0);
        }
    }
    _tile_stored(T_C, ct, KT_TN * 4);
}

/* C rows [0, mr) x columns [0, nr) at c (+)= ct. */
static void tile_add(float *c, int64_t ldc, const float *ct, int mr, int nr, int add) {
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) {
            float *cp = c + i * ldc + j;
            *cp = add ? *cp + ct[i * KT_TN + j] : ct[i * KT_TN + j];
        }
}

static void zero_c(int64_t m, int64_t n, float *c, int64_t ldc) {
    for (int64_t i = 0; i < m; i++) memset(c + i * ldc, 0, (size_t)n * sizeof(float));
}

/* C[i][j] (+)= sum_k A_i[k] W(j, k)   (kt_dot_fn) */
static void kt_dot_amx(int64_t m, int64_t n, int64_t K, const float *a, int64_t lda,
                       const int32_t *aidx, const kt_wmat *w, float *c, int64_t ldc, int accum) {
    if (m <= 0 || n <= 0) return;
    if (K <= 0) {
        if (!accum) zero_c(m, n, c, ldc);
        return;
    }
    kt_amx_pack pk;
    float wv[KT_AMX_KC] __attribute__((aligned(32)));
    float ct[KT_TM * KT_TN] __attribute__((aligned(64)));
    const int np_w = w->fmt == KT_W_BF16 ? 1 : 3;
    tile_config_bf16();
    for (int64_t i0 = 0; i0 < m; i0 += KT_TM) {
        int mr = (int)KT_MIN(KT_TM, m - i0);
        for (int64_t k0 = 0; k0 < K; k0 += KT_AMX_KC) {
            int64_t kc = KT_MIN(KT_AMX_KC, K - k0), kcp = (kc + 31) & ~(int64_t)31;
            pack_a_rows(&pk, mr, a, lda, 1, aidx, i0, k0, kc, kcp);
            for (int64_t j0 = 0; j0 < n; j0 += KT_TN) {
                int nr = (int)KT_MIN(KT_TN, n - j0);
                for (int j = 0; j < KT_TN; j++) {
                    int64_t len = j < nr ? kc : 0;
                    if (len) deq_row(wv, w, j0 + j, k0, len);
                    memset(wv + len, 0, (size_t)(kcp - len) * sizeof(float));
                    pack_w_col(&pk, np_w, j, wv, kcp);
                }
                tile_products(&pk, np_w, kcp, ct);
                tile_add(c + i0 * ldc + j0, ldc, ct, mr, nr, accum || k0 > 0);
            }
        }
    }
    _tile_release();
}

/* C[i][j] (+)= sum_k D(i, k) W(widx[k], j)   (kt_outer_fn) */
static void kt_outer_amx(int64_t m, int64_t n, int64_t K, const float *d, int64_t dsi,
                         int64_t dsk, const int32_t *didx, const kt_wmat *w,
                         const int32_t *widx, float *c, int64_t ldc, int accum) {
    if (m <= 0 || n <= 0) return;
    if (K <= 0) {
        if (!accum) zero_c(m, n, c, ldc);
        return;
    }
    kt_amx_pack pk;
    float wv[2][KT_TN] __attribute__((aligned(32)));
    float ct[KT_TM * KT_TN] __attribute__((aligned(64)));
    const int np_w = w->fmt == KT_W_BF16 ? 1 : 3;
    tile_config_bf16();
    for (int64_t i0 = 0; i0 < m; i0 += KT_TM) {
        int mr = (int)KT_MIN(KT_TM, m - i0);
        for (int64_t k0 = 0; k0 < K; k0 += KT_AMX_KC) {
            int64_t kc = KT_MIN(KT_AMX_KC, K - k0), kcp = (kc + 31) & ~(int64_t)31;
            pack_a_rows(&pk, mr, d, dsi, dsk, didx, i0, k0, kc, kcp);
            for (int64_t j0 = 0; j0 < n; j0 += KT_TN) {
                int nr = (int)KT_MIN(KT_TN, n - j0);
                for (int64_t k = 0; k < kcp; k += 2) {
                    for (int e = 0; e < 2; e++) {
                        int64_t kk = k + e;
                        memset(wv[e], 0, sizeof wv[e]);
                        if (kk < kc) deq_row(wv[e], w, widx ? widx[k0 + kk] : k0 + kk, j0, nr);
                    }
                    pack_w_pair(&pk, np_w, k, wv[0], wv[1]);
                }
                tile_products(&pk, np_w, kcp, ct);
                tile_add(c + i0 * ldc + j0, ldc, ct, mr, nr, accum || k0 > 0);
            }
        }
    }
    _tile_release();
}

/* ---- integer dot form ---- */

/* Column (within its block) of position p of a block's 32 codes: column
 * order (layout 0), or the 16 even columns, then the 16 odd ones (layouts
 * 1 and 2, the order 4-bit codes unpack in; kt_act_pos). */
KT_INLINE int qpos_col(int deint, int p) {
    return deint == 0 ? p : p < 16 ? 2 * p : 2 * (p - 16) + 1;
}

/* The 32 activation codes of block b (columns k0..k0+32) of row xq, in the
 * order of qpos_col. */
static void q_gather_x(int8_t *dst, const int8_t *xq, int deint, int64_t k0) {
    if (deint != 2) {
        memcpy(dst, xq + k0, KT_QBLK); /* layout 0, or 1 (evens, odds of the block) */
        return;
    }
    /* layout 2: the evens of a 64-column pair first, then its odds */
    int64_t base = k0 - k0 % (2 * KT_QBLK), blk = (k0 / KT_QBLK) % 2;
    memcpy(dst, xq + base + blk * 16, 16);
    memcpy(dst + 16, xq + base + 2 * 16 + blk * 16, 16);
}

/* Weight row j's codes of the block at k0 into the B tile column jt
 * (dst[p / 4][jt * 4 + p % 4] = code at position p). */
static void q_gather_w(uint8_t *dst, const kt_wmat *w, int deint, int64_t j, int64_t k0, int jt) {
    uint8_t code[KT_QBLK];
    if (w->fmt == KT_W_I8) {
        const int8_t *row = (const int8_t *)w->data + j * w->ld + k0;
        for (int p = 0; p < KT_QBLK; p++) code[p] = (uint8_t)row[qpos_col(deint, p)];
    } else {
        const uint8_t *row = (const uint8_t *)w->data + j * w->ld + k0 / 2;
        if (deint) {
            for (int p = 0; p < 16; p++) {
                code[p] = row[p] & 15;
                code[p + 16] = row[p] >> 4;
            }
        } else {
            for (int p = 0; p < 16; p++) {
                code[2 * p] = row[p] & 15;
                code[2 * p + 1] = row[p] >> 4;
            }
        }
    }
    for (int r = 0; r < KT_QBLK / 4; r++) memcpy(dst + r * 64 + jt * 4, code + 4 * r, 4);
}

/* C[i][j] = sum over blocks b of (d_b s_g) sum_k q_k c_k + off_g s_b   (kt_qdot_fn) */
static void kt_qdot_amx(int64_t m, int64_t n, int64_t K, const kt_qact *x, const int32_t *aidx,
                        const kt_wmat *w, float *c, int64_t ldc) {
    if (m <= 0 || n <= 0) return;
    const int64_t nb = K / KT_QBLK;
    const int i8 = w->fmt == KT_W_I8;
    int8_t xt[KT_TM * KT_QBLK] __attribute__((aligned(64)));
    uint8_t wt[(KT_QBLK / 4) * 64] __attribute__((aligned(64)));
    int32_t it[KT_TM * KT_TN] __attribute__((aligned(64)));
    float tot[KT_TM][KT_TN], gacc[KT_TM][KT_TN], gsum[KT_TM];
    tile_config_int8();
    for (int64_t i0 = 0; i0 < m; i0 += KT_TM) {
        int mr = (int)KT_MIN(KT_TM, m - i0);
        const int8_t *xq[KT_TM];
        const float *xd[KT_TM], *xs[KT_TM];
        for (int i = 0; i < mr; i++) {
            int64_t row = aidx ? aidx[i0 + i] : i0 + i;
            xq[i] = x->q + row * x->ldq;
            xd[i] = x->d + row * x->ldb;
            xs[i] = x->s + row * x->ldb;
        }
        memset(xt, 0, sizeof xt);
        for (int64_t j0 = 0; j0 < n; j0 += KT_TN) {
            int nr = (int)KT_MIN(KT_TN, n - j0);
            memset(wt, 0, sizeof wt);
            memset(tot, 0, sizeof tot);
            memset(gacc, 0, sizeof gacc);
            memset(gsum, 0, sizeof gsum);
            for (int64_t b = 0; b < nb; b++) {
                int64_t k0 = b * KT_QBLK, gc = w->g0 + k0, g = gc / w->gs;
                for (int i = 0; i < mr; i++) q_gather_x(xt + i * KT_QBLK, xq[i], x->deint, k0);
                for (int j = 0; j < nr; j++) q_gather_w(wt, w, x->deint, j0 + j, k0, j);
                _tile_zero(T_QC);
                _tile_loadd(T_QX, xt, KT_QBLK);
                _tile_loadd(T_QW, wt, 64);
                if (i8) _tile_dpbssd(T_QC, T_QX, T_QW);
                else _tile_dpbsud(T_QC, T_QX, T_QW);
                _tile_stored(T_QC, it, KT_TN * 4);
                for (int i = 0; i < mr; i++) {
                    float db = xd[i][b];
                    for (int j = 0; j < nr; j++) gacc[i][j] += db * (float)it[i * KT_TN + j];
                    gsum[i] += xs[i][b];
                }
                if (b + 1 < nb && (gc + KT_QBLK) % w->gs != 0) continue;
                /* the end of group g: its scale and offset */
                for (int j = 0; j < nr; j++) {
                    float s = w->scale[(j0 + j) * w->ldg + g];
                    float off = i8 ? 0.0f : kt_w_offset(w, j0 + j, g);
                    for (int i = 0; i < mr; i++) {
                        tot[i][j] += s * gacc[i][j] + off * gsum[i];
                        gacc[i][j] = 0.0f;
                    }
                }
                memset(gsum, 0, sizeof gsum);
            }
            for (int i = 0; i < mr; i++)
                for (int j = 0; j < nr; j++) c[(i0 + i) * ldc + j0 + j] = tot[i][j];
        }
    }
    _tile_release();
}

const kt_kernels kt_kernels_amx = {
    .isa = KTMOE_ISA_AMX,
    .dot = kt_dot_amx,
    .outer = kt_outer_amx,
    .qdot = kt_qdot_amx,
    .act_fwd = kt_act_fwd_avx2,
    .act_bwd = kt_act_bwd_avx2,
    .quant_act = kt_quant_act_avx2,
};
