/* The amx tier: AMX-BF16 (tdpbf16ps) for the dot and outer forms with bf16
 * weights and with integer codes exact in bf16 (below); AMX-INT8
 * (tdpbssd, tdpbusd) for the integer dot form of inference (qdot_amx.c);
 * the other weights and the activations are the avx512 tier's (VNNI
 * table) kernels.  Compiled with
 * the avx512 and AMX flags (the helper code here uses AVX2 only); chosen
 * only when CPUID, XCR0 (XTILECFG, XTILEDATA) and the Linux
 * arch_prctl(ARCH_REQ_XCOMP_PERM) permission allow it.  Checked against
 * the ref tier and a float64 reference by the tests.
 *
 * Tiles.  A tile is up to 16 rows of 64 bytes.  tdpbf16ps C += A B with
 *   C 16 x 16 fp32, A 16 rows x 32 bf16 (16 pairs along k),
 *   B 16 pair-rows x 16 columns x 2 bf16 (the "VNNI" layout: pair-row p,
 *     column n holds (B[2p][n], B[2p+1][n])),
 * i.e. a 16 x 16 x 32 product per instruction, accumulated in fp32.  The
 * tile config is loaded at the start of every kernel call (the pool's
 * threads, and any other code on them, may use other configs) and
 * released at the end.
 *
 * bf16 weights (the frozen base weights of the BF16 methods) go through
 * the tiles as they are stored; the dot form reads its W tiles in place
 * (see "bf16 weights" below).  int8 and I4S codes with one scale a row
 * (wide_codes) go through the same tiles as bf16 codes: the outer form
 * always, dot_many from 16 rows on.  Every other W (fp32 activation rows
 * and LoRA factors, grouped quantized weights) goes to the avx512 tier's
 * kernels:
 * those calls are small or must dequantize, and the old tile path for
 * them (every W split in three, 6 products a step, W repacked for each 16
 * rows of A) ran the BF16 step at a third of the avx512 tier's speed.
 *
 * Accuracy: split bf16.  bf16 keeps 8 significant bits, so one bf16
 * product is far from the fp32 tiers' ~2^-24.  Each fp32 activation x is
 * split as x = h + m + l, h and m truncated to bf16, l = x - h - m, which
 * is exact in bf16: x itself for all but tiny values.  Products of two
 * bf16 are exact in fp32, so A W = Ah W + Am W + Al W (3 tdpbf16ps, exact
 * products, fp32 sums: the fp32 tiers' accuracy).  The instruction
 * flushes denormal inputs and results to zero, which only touches parts
 * below 2^-126.
 */
#include "../../internal.h"

#include "../ymm_common.h"
#include "amx_common.h"

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

static void zero_c(int64_t m, int64_t n, float *c, int64_t ldc) {
    for (int64_t i = 0; i < m; i++) memset(c + i * ldc, 0, (size_t)n * sizeof(float));
}

/* ---- bf16 weights: the weights as one operand, unsplit ----
 *
 * W exact in bf16 needs one part, so the weights enter the tile products
 * as they are stored and only the activations are split (3 products a
 * step, as above).  A group of up to 4 C tiles (64 rows of the
 * activations) shares each W tile:
 *   dot form, C^T = W A^T: the A-operand tile is 16 rows of W read in
 *     place (32 k a row, the row stride W's), the B-operand tiles are the
 *     parts of A^T in the VNNI layout (pair-row p, column i: the bf16
 *     pair (A_i[2p], A_i[2p+1]) as one 32-bit word);
 *   outer form, C = D W: the A-operand tiles are the parts of D, rows of
 *     32 k; the B-operand tile is W's rows k, k+1 interleaved (VNNI).
 * The sums of a chunk of 256 columns stay in fp32 scratch tiles across
 * the k chunks and are added to C once, at the end.  Each output's sum
 * runs over k in the same order whatever the other rows: a row computed
 * alone is the row computed in a batch. */

#define KT_XKB 4  /* 32-k blocks of a k chunk (128 k)           */
#define KT_XMT 4  /* 16-row tiles of a group (64 rows)          */
#define KT_XNT 16 /* 16-column tiles of a column chunk (256)   */

/* Tiles: accumulators 0-3 (C tiles of the group), the W operand 4 (T_W0),
 * the three activation parts 5-7. */
#define T_W0 4
#define T_X0 5
#define T_X1 6
#define T_X2 7

static void tile_config_wide(void) {
    kt_tilecfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t <= T_X2; t++) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    tile_load(&cfg);
}

typedef struct kt_amx_wide {
    uint16_t x[KT_XMT][KT_XKB][3][16 * 32] __attribute__((aligned(64))); /* activation parts */
    uint16_t w[KT_XKB][16 * 32] __attribute__((aligned(64)));            /* W tiles (copies) */
    float acc[KT_XNT][KT_XMT][16 * 16] __attribute__((aligned(64)));     /* sums of a chunk */
    float kg[KT_XMT][16 * 16] __attribute__((aligned(64)));              /* a K group's sums */
} kt_amx_wide;

/* Two vectors of fp32 bit patterns as 16 bf16 (their high halves), in order. */
KT_INLINE __m256i bf16_pack16(__m256 a, __m256 b) {
    __m256i p = _mm256_packus_epi32(_mm256_srli_epi32(_mm256_castps_si256(a), 16),
                                    _mm256_srli_epi32(_mm256_castps_si256(b), 16));
    return _mm256_permute4x64_epi64(p, 0xD8);
}

/* 16 fp32 values x = h + m + l as 3 x 16 bf16: h, m truncated (the rest of
 * a truncation to 8 significant bits has at most 16, and the rest of that
 * at most 8, so l is exact in bf16 and the sum is x itself).  Blocks with
 * an infinity or NaN go through split8 (infinities stay infinities). */
KT_INLINE void split16(const float *src, uint16_t *const dst[3]) {
    const __m256 hi = _mm256_castsi256_ps(_mm256_set1_epi32((int)0xFFFF0000u));
    const __m256i expm = _mm256_set1_epi32(0x7F800000);
    __m256 x0 = _mm256_loadu_ps(src), x1 = _mm256_loadu_ps(src + 8);
    __m256i e0 = _mm256_and_si256(_mm256_castps_si256(x0), expm);
    __m256i e1 = _mm256_and_si256(_mm256_castps_si256(x1), expm);
    __m256i nf = _mm256_or_si256(_mm256_cmpeq_epi32(e0, expm), _mm256_cmpeq_epi32(e1, expm));
    if (!_mm256_testz_si256(nf, nf)) {
        for (int q = 0; q < 2; q++) {
            __m128i part[3];
            split8(_mm256_loadu_ps(src + 8 * q), 3, part);
            for (int p = 0; p < 3; p++) _mm_storeu_si128((__m128i *)(dst[p] + 8 * q), part[p]);
        }
        return;
    }
    __m256 h0 = _mm256_and_ps(x0, hi), h1 = _mm256_and_ps(x1, hi);
    __m256 r0 = _mm256_sub_ps(x0, h0), r1 = _mm256_sub_ps(x1, h1);
    __m256 m0 = _mm256_and_ps(r0, hi), m1 = _mm256_and_ps(r1, hi);
    _mm256_storeu_si256((__m256i *)dst[0], bf16_pack16(h0, h1));
    _mm256_storeu_si256((__m256i *)dst[1], bf16_pack16(m0, m1));
    _mm256_storeu_si256((__m256i *)dst[2], bf16_pack16(_mm256_sub_ps(r0, m0), _mm256_sub_ps(r1, m1)));
}

/* d[r][0..8) = s[0..8)[r] for 8 x 8 32-bit words, rows 16 words apart. */
KT_INLINE void tr8x8(const uint32_t *s, uint32_t *d) {
    __m256i r[8];
    for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_si256((const __m256i *)(s + 16 * i));
    tr8x8_regs(r);
    for (int i = 0; i < 8; i++) _mm256_storeu_si256((__m256i *)(d + 16 * i), r[i]);
}

/* The parts of activation rows i0 .. i0 + mr (D(i, k) = d[(didx ? didx[i]
 * : i) dsi + k dsk], times ks[k - k0] if ks is given), k0 .. k0 + kc, as
 * tiles of 16 rows x 32 k, rows past mr and k past kc zero; then (vnni)
 * each part tile's 16 x 16 words transposed: pair-row p, column i. */
static void pack_x(kt_amx_wide *wk, int vnni, int mr, const float *d, int64_t dsi, int64_t dsk,
                   const int32_t *didx, int64_t i0, int64_t k0, int64_t kc, const float *ks) {
    float dv[KT_XKB * 32] __attribute__((aligned(32)));
    const int nkb = (int)((kc + 31) / 32), mt = (mr + 15) / 16;
    for (int i = 0; i < 16 * mt; i++) {
        int t = i / 16, ii = i % 16;
        if (i >= mr) {
            for (int kb = 0; kb < nkb; kb++)
                for (int p = 0; p < 3; p++) memset(wk->x[t][kb][p] + ii * 32, 0, 64);
            continue;
        }
        const float *di = d + (didx ? didx[i0 + i] : i0 + i) * dsi + k0 * dsk;
        if (dsk != 1 || kc % 32 || ks) {
            int64_t k = 0;
            if (ks) for (; k < kc; k++) dv[k] = di[k * dsk] * ks[k];
            else for (; k < kc; k++) dv[k] = di[k * dsk];
            for (; k < 32 * nkb; k++) dv[k] = 0.0f;
            di = dv;
        }
        for (int kb = 0; kb < nkb; kb++)
            for (int q = 0; q < 2; q++) {
                uint16_t *dst[3];
                for (int p = 0; p < 3; p++) dst[p] = wk->x[t][kb][p] + ii * 32 + 16 * q;
                split16(di + 32 * kb + 16 * q, dst);
            }
    }
    if (!vnni) return;
    uint32_t tmp[16 * 16] __attribute__((aligned(32)));
    for (int t = 0; t < mt; t++)
        for (int kb = 0; kb < nkb; kb++)
            for (int p = 0; p < 3; p++) { /* word (i, q) to (q, i) */
                uint32_t *tile = (uint32_t *)wk->x[t][kb][p];
                memcpy(tmp, tile, sizeof tmp);
                tr8x8(tmp, tile);
                tr8x8(tmp + 8, tile + 8 * 16);
                tr8x8(tmp + 8 * 16, tile + 8);
                tr8x8(tmp + 8 * 16 + 8, tile + 8 * 16 + 8);
            }
}

/* The codes (int8, FP8 E4M3, 4-bit u less the zero point: I4S 8, I4Z its
 * zero) are exact in bf16, so they enter the tiles as bf16 like bf16
 * weights.  Scales: with one a row, the dot form multiplies each output by
 * its row's scale once and the outer form each activation k by W row k's
 * scale (pack_x); with one per group of `gs` columns (K groups), the dot
 * form scales the sums of each 128-k chunk (gs a multiple of 128, groups
 * starting on a chunk) as it adds them up, and the outer form splits D's
 * columns again for each group of its columns (16-column tiles inside a
 * group).  I4M (u s + min) stays on the avx512 kernels: its min as a sum
 * of its own (sum_k A_i[k] min) cancels against the codes' sum where W is
 * near 0, and missed the fp32 tiers' accuracy there (1.3e-5 of sum |A W|
 * for one k).  Taken by dot_many from 16 rows on: each call converts the
 * W tiles it reads, which fewer rows do not repay (SFT step, INT8, qlen
 * 16: 0.96x with every row count; qlen 512: 1.14x), and the row-order dot
 * keeps the avx512 kernel's few-rows paths.  n: the columns of W read;
 * outer: the form. */
KT_INLINE int wide_codes(const kt_wmat *w, int64_t n, int outer) {
    if (w->fmt != KT_W_I8 && w->fmt != KT_W_I4S && w->fmt != KT_W_I4Z && w->fmt != KT_W_FP8) return 0;
    if (w->g0 + n <= w->gs) return 1; /* one scale a row */
    int64_t span = outer ? 16 : 32 * KT_XKB;
    return w->gs % span == 0 && w->g0 % span == 0;
}

/* 8 int8 codes as 8 fp32 bit patterns of their bf16 values (exact). */
KT_INLINE __m256 codes8(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)); }

/* The 16 codes at p (int8 or FP8, or 8 bytes of 4-bit codes u, low nibble
 * first: u - z) as 16 bf16. */
KT_INLINE __m256i codes16(int fmt, const uint8_t *p, int z) {
    __m128i c;
    if (fmt == KT_W_FP8) return bf16_pack16(fp8x8(p), fp8x8(p + 8)); /* ymm_common.h */
    if (fmt == KT_W_I8) {
        c = _mm_loadu_si128((const __m128i *)p);
    } else {
        __m128i v = _mm_loadl_epi64((const __m128i *)p), m4 = _mm_set1_epi8(0x0F);
        __m128i lo = _mm_and_si128(v, m4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4);
        c = _mm_sub_epi8(_mm_unpacklo_epi8(lo, hi), _mm_set1_epi8((char)z));
    }
    return bf16_pack16(codes8(c), codes8(_mm_srli_si128(c, 8)));
}

/* The zero point of the 4-bit codes of W row r in group g (I4S 8, I4Z its
 * zero: u - z is the code the tiles take). */
KT_INLINE int w_zero(const kt_wmat *w, int fmt, int64_t r, int64_t g) {
    return fmt == KT_W_I4S ? 8 : fmt == KT_W_I4Z ? ((const uint8_t *)w->aux)[r * w->ldg + g] : 0;
}

/* The bytes of W row r from column k (even for 4-bit); fmt is w->fmt, a
 * constant where the callers are specialized by format. */
KT_INLINE const uint8_t *w_row(const kt_wmat *w, int fmt, int64_t r, int64_t k) {
    switch (fmt) {
    case KT_W_BF16: return (const uint8_t *)((const uint16_t *)w->data + r * w->ld + k);
    case KT_W_I8:
    case KT_W_FP8: return (const uint8_t *)w->data + r * w->ld + k;
    default: return (const uint8_t *)w->data + r * w->ld + k / 2;
    }
}

/* dst[0..n) = W row r from column k (even) as bf16: the values, or
 * (wide_codes) the codes, those of a 4-bit row less its zero in group g. */
KT_INLINE void row_bf16(const kt_wmat *w, int fmt, int64_t r, int64_t k, int n, uint16_t *dst, int64_t g) {
    const uint8_t *p = w_row(w, fmt, r, k);
    const int z = w_zero(w, fmt, r, g);
    if (fmt == KT_W_BF16) {
        memcpy(dst, p, (size_t)n * 2);
        return;
    }
    const int64_t b16 = kt_fmt_is_int4(fmt) ? 8 : 16; /* bytes of 16 codes */
    int t = 0;
    for (; t + 16 <= n; t += 16, p += b16) _mm256_storeu_si256((__m256i *)(dst + t), codes16(fmt, p, z));
    for (int q = 0; t < n; t++, q++) {
        float v = fmt == KT_W_I8    ? (float)(int8_t)p[q]
                  : fmt == KT_W_FP8 ? kt_fp8_to_f32(p[q])
                                    : (float)(((p[q / 2] >> (4 * (q & 1))) & 15) - z);
        uint32_t u;
        memcpy(&u, &v, 4);
        dst[t] = (uint16_t)(u >> 16);
    }
}

/* 16 elements of W row r from column j as bf16 (row_bf16). */
KT_INLINE __m256i row16(const kt_wmat *w, int fmt, int64_t r, int64_t j, int64_t g) {
    const uint8_t *p = w_row(w, fmt, r, j);
    return fmt == KT_W_BF16 ? _mm256_loadu_si256((const __m256i *)p) : codes16(fmt, p, w_zero(w, fmt, r, g));
}

/* CALL(f) with f the constant format the W helpers are specialized for. */
#define KT_BY_FMT(fmt, CALL)                                                 \
    do {                                                                     \
        switch (fmt) {                                                       \
        case KT_W_BF16: CALL(KT_W_BF16); break;                              \
        case KT_W_I8: CALL(KT_W_I8); break;                                  \
        case KT_W_FP8: CALL(KT_W_FP8); break;                                \
        case KT_W_I4S: CALL(KT_W_I4S); break;                                \
        default: CALL(KT_W_I4Z); break;                                      \
        }                                                                    \
    } while (0)

/* Outer form: W rows k0 .. k0 + kc (widx), columns j .. j + nr, as VNNI
 * tiles (pair-row p: rows k0 + 2p, k0 + 2p + 1 interleaved), zero past kc
 * and nr, bf16 W or wide_codes; the next k chunk's rows prefetched (W's
 * rows lie a row stride apart, each read for 32 bytes or less: without it
 * the copy waits on memory). */
KT_INLINE void pack_w_vnni(kt_amx_wide *wk, const kt_wmat *w0, int fmt, const int32_t *widx, int64_t K,
                           int64_t k0, int64_t kc, int64_t j, int nr, int64_t g) {
    const kt_wmat wl = *w0, *w = &wl; /* held in registers: the vector stores may alias *w0 */
    const int nkb = (int)((kc + 31) / 32);
    for (int64_t k = 0; k < 32 * nkb; k += 2) {
        for (int e = 0; e < 2; e++) { /* the same columns of the next chunk's rows */
            int64_t kn = k0 + k + e + 32 * KT_XKB;
            if (kn < K) _mm_prefetch((const char *)w_row(w, fmt, widx ? widx[kn] : kn, j), _MM_HINT_T1);
        }
        uint16_t *dst = wk->w[k / 32] + (k % 32) / 2 * 32;
        __m256i a, b;
        if (k + 1 < kc && nr == 16) { /* two whole rows */
            a = row16(w, fmt, widx ? widx[k0 + k] : k0 + k, j, g);
            b = row16(w, fmt, widx ? widx[k0 + k + 1] : k0 + k + 1, j, g);
        } else { /* a last odd row, or fewer than 16 columns */
            uint16_t r[2][16];
            for (int e = 0; e < 2; e++) {
                memset(r[e], 0, sizeof r[e]);
                if (k + e < kc) row_bf16(w, fmt, widx ? widx[k0 + k + e] : k0 + k + e, j, nr, r[e], g);
            }
            a = _mm256_loadu_si256((const __m256i *)r[0]);
            b = _mm256_loadu_si256((const __m256i *)r[1]);
        }
        __m256i lo = _mm256_unpacklo_epi16(a, b), hi = _mm256_unpackhi_epi16(a, b);
        _mm256_storeu_si256((__m256i *)dst, _mm256_permute2x128_si256(lo, hi, 0x20));
        _mm256_storeu_si256((__m256i *)(dst + 16), _mm256_permute2x128_si256(lo, hi, 0x31));
    }
}

/* The group's mt C tiles over one k chunk: at each 32-k block the W tile
 * (wp[kb], row stride wst[kb] bytes), then the products with the
 * activation parts 2, 1, 0 (smallest first), each part over the C tiles in
 * turn so that consecutive products go to different accumulators.
 * outer: C = X W, else C^T = W X. */
#define WIDE_DP(T, X)                                        \
    do {                                                     \
        if (outer) _tile_dpbf16ps(T, X, T_W0);               \
        else _tile_dpbf16ps(T, T_W0, X);                     \
    } while (0)
/* the product of C tile T with part P, through X tile X */
#define WIDE_STEP(T, P, X)                                   \
    do {                                                     \
        if (mt > T) {                                        \
            _tile_loadd(X, wk->x[T][kb][P], 64);             \
            WIDE_DP(T, X);                                   \
        }                                                    \
    } while (0)
#define WIDE_ACC(T, OP)                                      \
    do {                                                     \
        if (mt > T) OP(T, acc[T], 64);                       \
    } while (0)

static void wide_chunk(const kt_amx_wide *wk, int outer, int mt, int nkb, const void *const *wp,
                       const int64_t *wst, float (*acc)[16 * 16], int first, const char *pf,
                       int64_t pfst, int64_t pfkb) {
    if (first) {
        _tile_zero(0); /* the C tiles past mt are zeroed and never stored */
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
    } else {
        WIDE_ACC(0, _tile_loadd);
        WIDE_ACC(1, _tile_loadd);
        WIDE_ACC(2, _tile_loadd);
        WIDE_ACC(3, _tile_loadd);
    }
    for (int kb = 0; kb < nkb; kb++) {
        if (pf) /* the next W tile's block kb: 16 rows of pfkb bytes, into L2 */
            for (int r = 0; r < 16; r++) _mm_prefetch(pf + r * pfst + pfkb * kb, _MM_HINT_T1);
        _tile_loadd(T_W0, wp[kb], wst[kb]);
        /* the X tiles in rotation: 12 products, 3 tiles */
        WIDE_STEP(0, 2, T_X0);
        WIDE_STEP(1, 2, T_X1);
        WIDE_STEP(2, 2, T_X2);
        WIDE_STEP(3, 2, T_X0);
        WIDE_STEP(0, 1, T_X1);
        WIDE_STEP(1, 1, T_X2);
        WIDE_STEP(2, 1, T_X0);
        WIDE_STEP(3, 1, T_X1);
        WIDE_STEP(0, 0, T_X2);
        WIDE_STEP(1, 0, T_X0);
        WIDE_STEP(2, 0, T_X1);
        WIDE_STEP(3, 0, T_X2);
    }
    WIDE_ACC(0, _tile_stored);
    WIDE_ACC(1, _tile_stored);
    WIDE_ACC(2, _tile_stored);
    WIDE_ACC(3, _tile_stored);
}

/* C[i0 + i][j0 + j] (+)= the chunk's sums, i < mr, j < nc (tr: the scratch
 * holds C^T tiles), each times cs[j] if cs is given. */
static void wide_store(const kt_amx_wide *wk, int tr, int mr, int nc, float *c, int64_t ldc, int add,
                       const float *cs) {
    for (int i = 0; i < mr; i++) {
        float *cr = c + i * ldc;
        for (int j = 0; j < nc; j++) {
            const float *tile = wk->acc[j / 16][i / 16];
            float v = tr ? tile[(j % 16) * 16 + i % 16] : tile[(i % 16) * 16 + j % 16];
            if (cs) v *= cs[j];
            cr[j] = add ? cr[j] + v : v;
        }
    }
}

/* Dot form, K groups: the C^T tiles of column tile jt (+)= (first: =) the
 * chunk's sums (wk->kg) times their rows' scales, group g; rows r < nr are
 * outputs j + r. */
static void kgroup_add(kt_amx_wide *wk, int jt, int mt, int nr, const kt_wmat *w, int64_t j, int64_t g,
                       int first) {
    for (int r = 0; r < nr; r++) {
        __m256 sv = _mm256_set1_ps(w->scale[(j + r) * w->ldg + g]);
        for (int t = 0; t < mt; t++) {
            float *acc = wk->acc[jt][t] + 16 * r;
            const float *src = wk->kg[t] + 16 * r;
            for (int h = 0; h < 16; h += 8) {
                __m256 v = _mm256_mul_ps(sv, _mm256_load_ps(src + h));
                if (!first) v = _mm256_add_ps(v, _mm256_load_ps(acc + h));
                _mm256_store_ps(acc + h, v);
            }
        }
    }
}

/* The empty cases of a call (C zeroed unless accum when K is 0); else the
 * tile config loaded and 1 (the caller releases the tiles). */
static int wide_begin(int64_t m, int64_t n, int64_t K, float *c, int64_t ldc, int accum) {
    if (m <= 0 || n <= 0) return 0;
    if (K <= 0) {
        if (!accum) zero_c(m, n, c, ldc);
        return 0;
    }
    tile_config_wide();
    return 1;
}

/* Dot form, W in bf16 or wide_codes: C[i][j] (+)= sum_k A_i[k] W(j, k). */
static void dot_wide(int64_t m, int64_t n, int64_t K, const float *a, int64_t lda,
                     const int32_t *aidx, const kt_wmat *w, float *c, int64_t ldc, int accum) {
    if (!wide_begin(m, n, K, c, ldc, accum)) return;
    kt_amx_wide wks, *wk = &wks;
    const uint16_t *wd = (const uint16_t *)w->data;
    const int codes = w->fmt != KT_W_BF16; /* wide_codes */
    /* a scale a 128-k chunk, applied as the chunk's sums are added up */
    const int kgroups = codes && w->g0 + K > w->gs;
    /* bytes of a W row per 32-k block, and the row stride in bytes */
    const int64_t bkb = w->fmt == KT_W_BF16 ? 64 : kt_fmt_is_int4(w->fmt) ? 16 : 32;
    const int64_t ldb = w->fmt == KT_W_BF16 ? w->ld * 2 : w->ld;
    float cs[16 * KT_XNT];
    for (int64_t i0 = 0; i0 < m; i0 += 16 * KT_XMT) {
        int mr = (int)KT_MIN(16 * KT_XMT, m - i0), mt = (mr + 15) / 16;
        for (int64_t j0 = 0; j0 < n; j0 += 16 * KT_XNT) {
            int nc = (int)KT_MIN(16 * KT_XNT, n - j0);
            for (int j = 0; codes && !kgroups && j < nc; j++) cs[j] = w->scale[(j0 + j) * w->ldg];
            for (int64_t k0 = 0; k0 < K; k0 += 32 * KT_XKB) {
                int64_t kc = KT_MIN(32 * KT_XKB, K - k0);
                int nkb = (int)((kc + 31) / 32);
                pack_x(wk, 1, mr, a, lda, 1, aidx, i0, k0, kc, NULL);
                for (int jt = 0; jt < (nc + 15) / 16; jt++) {
                    int64_t j = j0 + 16 * jt;
                    int nr = (int)KT_MIN(16, n - j);
                    const void *wp[KT_XKB];
                    int64_t wst[KT_XKB];
                    for (int kb = 0; kb < nkb; kb++) {
                        int64_t k = k0 + 32 * kb;
                        if (!codes && nr == 16 && k + 32 <= K) { /* 16 rows of W in place */
                            wp[kb] = wd + j * w->ld + k;
                            wst[kb] = w->ld * 2;
                            continue;
                        }
                        uint16_t *dst = wk->w[kb]; /* a copy, zero past the ends */
                        memset(dst, 0, 16 * 64);
                        int kn = (int)KT_MIN(32, K - k);
#define KT_ROWS(F)                                                             \
    for (int r = 0; r < nr; r++) row_bf16(w, F, j + r, k, kn, dst + r * 32, (w->g0 + k) / w->gs)
                        KT_BY_FMT(w->fmt, KT_ROWS);
#undef KT_ROWS
                        wp[kb] = dst;
                        wst[kb] = 64;
                    }
                    /* the next 16 rows (or the next chunk's first 16), whole
                     * tiles only */
                    int64_t jn = j + 16 < j0 + nc ? j + 16 : j0, kn = j + 16 < j0 + nc ? k0 : k0 + kc;
                    const char *pf = jn + 16 <= n && kn + 32 * KT_XKB <= K
                                         ? (const char *)w->data + jn * ldb + kn * bkb / 32 : NULL;
                    if (!kgroups) {
                        wide_chunk(wk, 0, mt, nkb, wp, wst, wk->acc[jt], k0 == 0, pf, ldb, bkb);
                        continue;
                    }
                    wide_chunk(wk, 0, mt, nkb, wp, wst, wk->kg, 1, pf, ldb, bkb);
                    kgroup_add(wk, jt, mt, nr, w, j, (w->g0 + k0) / w->gs, k0 == 0);
                }
            }
            wide_store(wk, 1, mr, nc, c + i0 * ldc + j0, ldc, accum, codes && !kgroups ? cs : NULL);
        }
    }
    _tile_release();
}

/* Outer form, W in bf16 or wide_codes: C[i][j] (+)= sum_k D(i, k)
 * W(widx[k], j); the codes' scales (W row k's, of column j's group)
 * multiply D's columns (one rounding, as the fp32 tiers' scaled weights
 * have), D split again for each group. */
static void outer_wide(int64_t m, int64_t n, int64_t K, const float *d, int64_t dsi, int64_t dsk,
                       const int32_t *didx, const kt_wmat *w, const int32_t *widx, float *c,
                       int64_t ldc, int accum) {
    if (!wide_begin(m, n, K, c, ldc, accum)) return;
    kt_amx_wide wks, *wk = &wks;
    /* the rows' scales, unless bf16 or all 1 (kt_unit_scales) */
    const int scaled = w->fmt != KT_W_BF16 && (w->ldg != 0 || w->scale[0] != 1.0f);
    const int64_t gs = w->g0 + n <= w->gs ? INT64_MAX : w->gs; /* columns of a group */
    float ks[32 * KT_XKB];
    for (int64_t i0 = 0; i0 < m; i0 += 16 * KT_XMT) {
        int mr = (int)KT_MIN(16 * KT_XMT, m - i0), mt = (mr + 15) / 16;
        for (int64_t j0 = 0; j0 < n; j0 += 16 * KT_XNT) {
            int nc = (int)KT_MIN(16 * KT_XNT, n - j0);
            for (int64_t k0 = 0; k0 < K; k0 += 32 * KT_XKB) {
                int64_t kc = KT_MIN(32 * KT_XKB, K - k0);
                int nkb = (int)((kc + 31) / 32);
                int64_t packed = -1; /* the group D is split for */
                for (int jt = 0; jt < (nc + 15) / 16; jt++) {
                    int64_t j = j0 + 16 * jt, g = (w->g0 + j) / gs;
                    if (g != packed) {
                        for (int64_t k = 0; scaled && k < kc; k++)
                            ks[k] = w->scale[(widx ? widx[k0 + k] : k0 + k) * w->ldg + g];
                        pack_x(wk, 0, mr, d, dsi, dsk, didx, i0, k0, kc, scaled ? ks : NULL);
                        packed = g;
                    }
                    const void *wp[KT_XKB];
                    int64_t wst[KT_XKB];
                    int nr = (int)KT_MIN(16, n - j);
#define KT_PACK(F) pack_w_vnni(wk, w, F, widx, K, k0, kc, j, nr, g)
                    KT_BY_FMT(w->fmt, KT_PACK);
#undef KT_PACK
                    for (int kb = 0; kb < nkb; kb++) {
                        wp[kb] = wk->w[kb];
                        wst[kb] = 64;
                    }
                    wide_chunk(wk, 1, mt, nkb, wp, wst, wk->acc[jt], k0 == 0, NULL, 0, 0);
                }
            }
            wide_store(wk, 0, mr, nc, c + i0 * ldc + j0, ldc, accum, NULL);
        }
    }
    _tile_release();
}

/* C[i][j] (+)= sum_k A_i[k] W(j, k)   (kt_dot_fn); W other than bf16 (and
 * than wide_codes in dot_many): the avx512 tier's row-order kernel (many:
 * its dot_many, which also takes 1-2 rows of bf16 W: a C tile with one or
 * two of its 16 columns used ran at 0.85-0.9 of its speed there, 48 x 256
 * x 2048 at 1 and 2 rows, one thread) */
KT_INLINE void dot_amx(int many, int64_t m, int64_t n, int64_t K, const float *a, int64_t lda,
                       const int32_t *aidx, const kt_wmat *w, float *c, int64_t ldc, int accum) {
    if ((w->fmt != KT_W_BF16 && !(many && m >= 16 && wide_codes(w, K, 0))) || (many && m <= 2)) {
        (many ? kt_kernels_avx512.dot_many : kt_kernels_avx512.dot)(m, n, K, a, lda, aidx, w, c, ldc, accum);
        return;
    }
    dot_wide(m, n, K, a, lda, aidx, w, c, ldc, accum);
}

static void kt_dot_amx(int64_t m, int64_t n, int64_t K, const float *a, int64_t lda,
                       const int32_t *aidx, const kt_wmat *w, float *c, int64_t ldc, int accum) {
    dot_amx(0, m, n, K, a, lda, aidx, w, c, ldc, accum);
}

static void kt_dot_many_amx(int64_t m, int64_t n, int64_t K, const float *a, int64_t lda,
                            const int32_t *aidx, const kt_wmat *w, float *c, int64_t ldc, int accum) {
    dot_amx(1, m, n, K, a, lda, aidx, w, c, ldc, accum);
}

/* C[i][j] (+)= sum_k D(i, k) W(widx[k], j)   (kt_outer_fn); W other than
 * bf16 and wide_codes (fp32 activations and LoRA factors, grouped
 * quantized weights): the avx512 tier's kernel.  The choice does not
 * depend on m: a row computed alone is the row computed in a batch. */
static void kt_outer_amx(int64_t m, int64_t n, int64_t K, const float *d, int64_t dsi,
                         int64_t dsk, const int32_t *didx, const kt_wmat *w,
                         const int32_t *widx, float *c, int64_t ldc, int accum) {
    if (w->fmt != KT_W_BF16 && !wide_codes(w, n, 1))
        kt_kernels_avx512.outer(m, n, K, d, dsi, dsk, didx, w, widx, c, ldc, accum);
    else
        outer_wide(m, n, K, d, dsi, dsk, didx, w, widx, c, ldc, accum);
}

/* kt_kernels.outer_many (the SFT backward): 1-2 rows of D go to the
 * avx512 tier's kernel, whose sums run in another order.  A C tile with 1-2
 * of its 16 rows used wastes the tiles, and int8 / I4S codes are converted
 * for each call; its few-rows paths convert in registers.  Paired, amx
 * tier, 2 threads, qlen 16 (1-2 tokens an expert): BF16 1.07x, INT4 1.19x;
 * qlen 64 1.01x; with up to 8 rows, INT8 at qlen 64 0.93x. */
static void kt_outer_many_amx(int64_t m, int64_t n, int64_t K, const float *d, int64_t dsi,
                              int64_t dsk, const int32_t *didx, const kt_wmat *w,
                              const int32_t *widx, float *c, int64_t ldc, int accum) {
    if (m <= 2) kt_kernels_avx512.outer(m, n, K, d, dsi, dsk, didx, w, widx, c, ldc, accum);
    else kt_outer_amx(m, n, K, d, dsi, dsk, didx, w, widx, c, ldc, accum);
}

/* The integer dot form (int8 activations, inference): AMX-INT8 tiles
 * (qdot_amx.c) for int8 and 4-bit integer codes, at every row count, its
 * few-rows path computing the same exact block sums. */
static void kt_qdot_amx(int64_t m, int64_t n, int64_t K, const kt_qact *x, const int32_t *aidx,
                        const kt_wmat *w, float *c, int64_t ldc) {
    if ((w->fmt == KT_W_I8 && x->deint == 0) || kt_fmt_is_int4(w->fmt))
        kt_qdot_amx_int8(m, n, K, x, aidx, w, c, ldc);
    else
        kt_kernels_avx512_vnni.qdot(m, n, K, x, aidx, w, c, ldc);
}

/* kt_kernels.qdot_many (batch_invariant = 0): up to KT_QAMX_FEW rows go to
 * the avx512 tier's VNNI kernel, whose sums are not the tiles' exact block
 * sums.  With 1-6 rows both read the weights once and are bound by memory;
 * the VNNI kernel reads each W row in one stream and reached 20 GB/s on a
 * decode token (2 threads) where the exact path reached 17.7. */
#define KT_QAMX_FEW 6
static void kt_qdot_many_amx(int64_t m, int64_t n, int64_t K, const kt_qact *x, const int32_t *aidx,
                             const kt_wmat *w, float *c, int64_t ldc) {
    if (m <= KT_QAMX_FEW) kt_kernels_avx512_vnni.qdot(m, n, K, x, aidx, w, c, ldc);
    else kt_qdot_amx(m, n, K, x, aidx, w, c, ldc);
}

const kt_kernels kt_kernels_amx = {
    .isa = KTMOE_ISA_AMX,
    .dot = kt_dot_amx,
    .dot_many = kt_dot_many_amx,
    .outer = kt_outer_amx,
    .outer_many = kt_outer_many_amx,
    .qdot = kt_qdot_amx,
    .qdot_many = kt_qdot_many_amx,
    .act_fwd = kt_act_fwd_avx2,
    .act_bwd = kt_act_bwd_avx2,
    .quant_act = kt_quant_act_avx2,
    .bwd_cols = 256, /* the outer form splits its rows of D once a call */
};
