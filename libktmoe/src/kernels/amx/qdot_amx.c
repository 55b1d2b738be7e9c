/* The amx tier's integer dot form (kt_qdot_fn, inference on int8
 * activations) on AMX-INT8 tiles.
 *
 * Orientation: C^T = W X^T.  The A operand is 16 rows of W by one block of
 * 32 columns (int8 codes read in place; 4-bit codes unpacked into bytes),
 * the B operand the activation codes of up to 16 rows for the same block
 * in the VNNI layout (row kq, column i: codes 4kq .. 4kq+3 of activation
 * row i), so C is 16 W rows x up to 16 activation rows of exact int32 block
 * sums: tdpbssd for int8 codes, tdpbusd for the 4-bit codes (unsigned) --
 * one instruction a block, 16 x 16 x 32 products.
 *
 * Each block's sums are scaled in fp32 element by element: per C element
 * (W row j, activation row i) and per weight group g,
 *   ga  = sum over the group's blocks b of float(S_b) * d_b  (fma, b in order)
 *   tot = fma(ga, s_g, tot);  tot = fma(off_g, gsum_g, tot)
 * with d_b row i's block scale, s_g and off_g row j's group scale and offset
 * (kt_w_offset; none for int8) and gsum_g row i's block sums summed over
 * the group in order.  Every element runs that sequence whatever the number
 * of rows, so a row computed alone is the row computed in a batch, bit for
 * bit: the kernel takes every call, decode included.  (The avx512 tier's
 * VNNI kernel sums 8 lanes of partial sums: its results differ in the last
 * bits.)
 *
 * The C tiles hold up to 16 activation columns: a call's last rows use a
 * tile of mp columns (mp a power of two), so that C stored densely is
 * 16 * mp consecutive int32 in which every 16-lane vector sees the same
 * pattern of activation rows (lane e: row e % mp).  Calls (or last rows)
 * of 1-5 rows take qdot_few below: the same block sums on VNNI.
 *
 * Measured (one thread, 64 experts' W streamed from DRAM, the avx512
 * tier's VNNI kernel = 1, DeepSeek-V2-Lite gate shape, INT4 K groups):
 * 1 row 1.00, 4 rows 0.86, 8 rows 1.19, 16 rows 1.94, 48 rows 2.60 (int8
 * with one scale a row: 0.88, 2.43 at 16, 3.56 at 48).  The whole call's
 * scratch (kt_qamx, ~140 KB) lives on the calling thread's stack. */
#include "../../internal.h"

#include "amx_common.h"

#define QA_KC 1024              /* k of the activation tiles packed at a time */
#define QA_NB (QA_KC / KT_QBLK) /* their blocks                               */
#define QA_NC 256               /* W rows whose sums are kept at a time       */
#define QA_NT (QA_NC / 16)

/* Tiles: W (A operands) 0-1, activations (B operands) 2-3, sums 4-7
 * (W tile t, activation tile u: 4 + 2t + u). */
#define TA0 0
#define TA1 1
#define TB0 2
#define TB1 3

typedef struct kt_qamx {
    int8_t x[2][QA_NB][8 * 64] __attribute__((aligned(64))); /* B operands, rows 64 bytes apart */
    float dp[2][QA_NB][16] __attribute__((aligned(64)));      /* d_b, lane e: row e % mp   */
    float gp[2][QA_NB][16] __attribute__((aligned(64)));      /* block sums so far in b's group */
    float ga[QA_NT][2][256] __attribute__((aligned(64)));     /* the group's sums so far   */
    float tot[QA_NT][2][256] __attribute__((aligned(64)));    /* the finished groups'      */
    int32_t cb[4][256] __attribute__((aligned(64)));          /* stored C tiles            */
    uint8_t wx[2][16][QA_NB * 32] __attribute__((aligned(64))); /* W tiles of a chunk: row, block */
    float sp[2][16] __attribute__((aligned(64)));              /* a group's scales of 16 W rows */
    float op[2][16] __attribute__((aligned(64)));              /* and their offsets         */
    float run[2][16];                                          /* in-group block sums of each row */
} kt_qamx;

/* The 32 codes of block b of an activation row in the kernel's order:
 * the row's own order for layouts 0 and 1; layout 2 (kt_act_pos) holds a
 * pair of blocks as the even columns of both, then the odd ones, so block
 * b is taken as layout 1 would hold it (its even columns, then its odd). */
KT_INLINE __m256i act_block(const int8_t *row, int deint, int64_t b) {
    if (deint != 2) return _mm256_loadu_si256((const __m256i *)(row + b * KT_QBLK));
    const int8_t *p = row + (b / 2) * 2 * KT_QBLK + (b % 2) * (KT_QBLK / 2);
    return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)p)),
                                   _mm_loadu_si128((const __m128i *)(p + KT_QBLK)), 1);
}

static int pow2_at_least(int v) {
    int p = 1;
    while (p < v) p *= 2;
    return p;
}

/* Whether block b of the call opens a weight group (block 0 always), and
 * whether it closes one (the call's last block always). */
KT_INLINE int opens_group(const kt_wmat *w, int64_t b) {
    return b == 0 || (w->g0 + b * KT_QBLK) % w->gs == 0;
}
KT_INLINE int closes_group(const kt_wmat *w, int64_t b, int64_t nb) {
    return b == nb - 1 || (w->g0 + (b + 1) * KT_QBLK) % w->gs == 0;
}

/* The load masks of `bytes` bytes read as two 64-byte vectors. */
KT_INLINE void byte_masks(int64_t bytes, __mmask64 *m0, __mmask64 *m1) {
    *m0 = bytes >= 64 ? ~(__mmask64)0 : ((__mmask64)1 << bytes) - 1;
    *m1 = bytes >= 128 ? ~(__mmask64)0 : bytes <= 64 ? 0 : ((__mmask64)1 << (bytes - 64)) - 1;
}

/* The per-element fp32 sequence of the head comment, on 16 elements: a
 * block's exact sums s (as fp32) with the activation scales d into the
 * group's sums ga, and a closed group's sums ga with the scales sv (and
 * the offsets ov times the block sums gsum) into the total.  Both paths
 * (tiles, few rows) run these, so their results agree bit for bit. */
KT_INLINE __m512 add_block(int first, __m512 s, __m512 d, __m512 ga) {
    return first ? _mm512_mul_ps(s, d) : _mm512_fmadd_ps(s, d, ga);
}
KT_INLINE __m512 close_group(__m512 ga, __m512 sv, int offsets, __m512 ov, __m512 gsum, __m512 tot) {
    tot = _mm512_fmadd_ps(ga, sv, tot);
    return offsets ? _mm512_fmadd_ps(ov, gsum, tot) : tot;
}

/* B operands, scales and block sums of activation rows xr[0..mr) (mr <= 16,
 * tile width mp), blocks b0 .. b0 + nbc, for tile u.  Rows past mr are
 * zero.  The in-group block sums (st->run) continue across chunks: the
 * caller packs a call's chunks in order, from block 0. */
static void pack_act(kt_qamx *st, int u, int mr, int mp, const int8_t *const *xr,
                     const float *const *xd, const float *const *xs, int deint, int offsets,
                     const kt_wmat *w, int64_t b0, int nbc) {
    uint32_t (*xb)[8 * 16] = (uint32_t(*)[8 * 16])st->x[u];
    float *run = st->run[u];
    for (int bl = 0; bl < nbc; bl++) {
        int64_t b = b0 + bl;
        uint32_t *dst = xb[bl];
        if (mp >= 8) {
            for (int h = 0; h < mp; h += 8) {
                __m256i r[8];
                for (int i = 0; i < 8; i++)
                    r[i] = h + i < mr ? act_block(xr[h + i], deint, b) : _mm256_setzero_si256();
                tr8x8_regs(r);
                for (int q = 0; q < 8; q++) _mm256_storeu_si256((__m256i *)(dst + 16 * q + h), r[q]);
            }
        } else {
            for (int i = 0; i < mp; i++) {
                uint32_t v[8] = {0};
                if (i < mr) _mm256_storeu_si256((__m256i *)v, act_block(xr[i], deint, b));
                for (int q = 0; q < 8; q++) dst[16 * q + i] = v[q];
            }
        }
        int first = opens_group(w, b);
        for (int i = 0; i < mp; i++) {
            float d = i < mr ? xd[i][b] : 0.0f;
            if (offsets) {
                float s = i < mr ? xs[i][b] : 0.0f;
                run[i] = first ? s : run[i] + s;
            }
            for (int e = i; e < 16; e += mp) {
                st->dp[u][bl][e] = d;
                if (offsets) st->gp[u][bl][e] = run[i];
            }
        }
    }
}

/* W rows j .. j + nr, blocks b0 .. b0 + nbc, as the A operands' bytes:
 * dst[r][32 bl ..] is block b0 + bl of row j + r (rows past nr zero).  4-bit
 * codes unpacked in the kernel's order (act_block): each block's low
 * nibbles (even columns), then its high ones; in column order for
 * activations in layout 0.  A row's 64 bytes of codes (4 blocks) go
 * through one vector; writing a chunk before its tiles are loaded leaves
 * the stores time to complete (a tile load right after them stalled). */
static void unpack_w(uint8_t (*dst)[QA_NB * 32], const kt_wmat *w, int64_t j, int nr, int64_t b0, int nbc,
                     int deint) {
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const __m512i i01 = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0), i23 = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
    for (int r = 0; r < 16; r++) {
        if (r >= nr) {
            memset(dst[r], 0, (size_t)nbc * 32);
            continue;
        }
        if (w->fmt == KT_W_I8) {
            memcpy(dst[r], (const int8_t *)w->data + (j + r) * w->ld + b0 * KT_QBLK, (size_t)nbc * 32);
            continue;
        }
        const uint8_t *row = (const uint8_t *)w->data + (j + r) * w->ld + b0 * (KT_QBLK / 2);
        for (int bl = 0; bl < nbc; bl += 4) {
            __mmask64 lm, unused;
            byte_masks(KT_MIN(4, nbc - bl) * (KT_QBLK / 2), &lm, &unused);
            __m512i v = _mm512_maskz_loadu_epi8(lm, row + bl * (KT_QBLK / 2));
            __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
            if (deint == 0) {
                __m512i a = _mm512_unpacklo_epi8(lo, hi), z = _mm512_unpackhi_epi8(lo, hi);
                lo = a, hi = z;
            }
            _mm512_store_si512(dst[r] + 32 * bl, _mm512_permutex2var_epi64(lo, i01, hi));
            _mm512_store_si512(dst[r] + 32 * bl + 64, _mm512_permutex2var_epi64(lo, i23, hi));
        }
    }
}

static const int32_t lane16[16] __attribute__((aligned(64))) = {0, 1, 2,  3,  4,  5,  6,  7,
                                                                 8, 9, 10, 11, 12, 13, 14, 15};

/* Group g's scales and offsets (kt_w_offset; zero without offsets) of W
 * rows j .. j + nr, zero past nr. */
KT_INLINE void group_vec(const kt_wmat *w, int64_t j, int nr, int64_t g, int offsets, __m512 *sv, __m512 *ov) {
    const __mmask16 km = (__mmask16)((1u << nr) - 1);
    const __m512i idx = _mm512_mullo_epi32(_mm512_load_si512(lane16), _mm512_set1_epi32((int)w->ldg));
    const int64_t at = j * w->ldg + g;
    __m512 s = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), km, idx, w->scale + at, 4);
    *sv = s;
    *ov = _mm512_setzero_ps();
    if (!offsets) return;
    if (w->fmt == KT_W_I4S) {
        *ov = _mm512_mul_ps(_mm512_set1_ps(-8.0f), s);
    } else if (w->fmt == KT_W_I4M) {
        *ov = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), km, idx, (const float *)w->aux + at, 4);
    } else { /* I4Z: zero bytes, read as 32-bit words inside their row */
        const uint8_t *z = (const uint8_t *)w->aux + at;
        __m512i zv;
        if (g + 4 <= w->ldg)
            zv = _mm512_and_si512(_mm512_mask_i32gather_epi32(_mm512_setzero_si512(), km, idx, z, 1),
                                  _mm512_set1_epi32(0xFF));
        else if (g >= 3)
            zv = _mm512_srli_epi32(_mm512_mask_i32gather_epi32(_mm512_setzero_si512(), km, idx, z - 3, 1), 24);
        else {
            int32_t zz[16] __attribute__((aligned(64))) = {0};
            for (int r = 0; r < nr; r++) zz[r] = z[r * w->ldg];
            zv = _mm512_load_si512(zz);
        }
        *ov = _mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_cvtepi32_ps(zv)), s);
    }
}

/* One C tile's block sums (stored densely, 16 x mp) into its sums, as the
 * head comment says. */
KT_INLINE void scale_tile(const int32_t *cb, float *ga, float *tot, int mp, const float *dp,
                          const float *gp, int first, int last, const float *sp, const float *op,
                          int offsets) {
    __m512 d = _mm512_load_ps(dp);
    for (int v = 0; v < mp; v++) {
        __m512 s = _mm512_cvtepi32_ps(_mm512_load_si512(cb + 16 * v));
        __m512 a = add_block(first, s, d, first ? _mm512_setzero_ps() : _mm512_load_ps(ga + 16 * v));
        if (!last) {
            _mm512_store_ps(ga + 16 * v, a);
            continue;
        }
        /* lane e: W row (16 v + e) / mp */
        __m512i idx = _mm512_srli_epi32(_mm512_add_epi32(_mm512_set1_epi32(16 * v), _mm512_load_si512(lane16)),
                                        (unsigned)__builtin_ctz((unsigned)mp));
        __m512 ov = offsets ? _mm512_permutexvar_ps(idx, _mm512_load_ps(op)) : _mm512_setzero_ps();
        __m512 gs = offsets ? _mm512_load_ps(gp) : _mm512_setzero_ps();
        __m512 sv = _mm512_permutexvar_ps(idx, _mm512_load_ps(sp));
        _mm512_store_ps(tot + 16 * v, close_group(a, sv, offsets, ov, gs, _mm512_load_ps(tot + 16 * v)));
    }
}

static void tile_config_q(const int *mp, int mt) {
    kt_tilecfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 2; t++) {
        cfg.rows[TA0 + t] = 16;
        cfg.colsb[TA0 + t] = KT_QBLK;
    }
    for (int u = 0; u < mt; u++) {
        cfg.rows[TB0 + u] = KT_QBLK / 4;
        cfg.colsb[TB0 + u] = (uint16_t)(4 * mp[u]);
        for (int t = 0; t < 2; t++) {
            cfg.rows[4 + 2 * t + u] = 16;
            cfg.colsb[4 + 2 * t + u] = (uint16_t)(4 * mp[u]);
        }
    }
    tile_load(&cfg);
}

/* ---- few rows: the same sums on VNNI ----
 *
 * With 1-5 activation rows (decode) a C tile is mostly empty and each
 * block's stored tile a round trip through memory.  For 4-bit codes with
 * activations in layout 1 or 2, and int8 codes with activations in layout
 * 0, this path computes the same exact block sums with vpdpbusd, 16 W rows
 * x 4 blocks at a time (a step: lane 4q + l of a W row's vector holds part
 * l of block q), adds them up across lanes in integers and runs the
 * per-element fp32 sequence above: its results are the tile path's, bit for
 * bit.  With 1 row it reads the weights at 0.9-1.0x the VNNI kernel's
 * speed (16 rows side by side against one row at a time), with 3-5 rows
 * 0.8-0.9x; AMX tiles of 1-4 columns ran at 0.6-0.7x. */

#define QF_MAX 4   /* activation rows of a pass of the VNNI path */
#define QF_ROWS 5 /* rows of a call (or of its last rows) that take it */

/* The activation codes of blocks b .. b + 3 of a row (nbq of them, the
 * rest zero) as the W codes pair with them: for 4-bit codes (layout 1 or
 * 2) the even columns (x[0], 128-bit lane q: block b + q) and the odd
 * ones (x[1]); for int8 codes (layout 0) blocks b, b + 1 (x[0]) and b + 2,
 * b + 3 (x[1]). */
KT_INLINE void act_step(const int8_t *row, int deint, int i8, int64_t b, int nbq, __m512i x[2]) {
    __mmask64 m0, m1;
    byte_masks(nbq * KT_QBLK, &m0, &m1);
    __m512i z0 = _mm512_maskz_loadu_epi8(m0, row + b * KT_QBLK);
    __m512i z1 = _mm512_maskz_loadu_epi8(m1, row + b * KT_QBLK + 64);
    if (i8) {
        x[0] = z0, x[1] = z1;
    } else if (deint == 2) { /* pairs: evens of both blocks, then odds */
        x[0] = _mm512_shuffle_i32x4(z0, z1, 0x44);
        x[1] = _mm512_shuffle_i32x4(z0, z1, 0xEE);
    } else { /* blocks: evens, then odds */
        x[0] = _mm512_shuffle_i32x4(z0, z1, 0x88);
        x[1] = _mm512_shuffle_i32x4(z0, z1, 0xDD);
    }
}

/* Pairs of 128-bit lanes added (lanes 4q + l of the result: block q, from
 * the 8-lane sums of blocks 0, 1 in p0 and 2, 3 in p1). */
KT_INLINE __m512i lanes4(__m512i p0, __m512i p1) {
    return _mm512_add_epi32(_mm512_shuffle_i32x4(p0, p1, 0x88), _mm512_shuffle_i32x4(p0, p1, 0xDD));
}

/* The two rounds of a transposing sum within each 128-bit lane: with a, b
 * the 4 partial sums of two rows, sum_pairs32 gives (a0+a2, b0+b2, a1+a3,
 * b1+b3); sum_pairs64 of two such results, one per pair of rows, gives the
 * 4 rows' totals. */
KT_INLINE __m512i sum_pairs32(__m512i a, __m512i b) {
    return _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
}
KT_INLINE __m512i sum_pairs64(__m512i a, __m512i b) {
    return _mm512_add_epi32(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b));
}

/* One W row's step at wrow (masks m0, m1: its bytes) as part_sums takes
 * it: int8 codes as unsigned w + 128 (vpdpbusd multiplies unsigned by
 * signed; code_sums128 gives the offset), 4-bit codes as their low (v[0])
 * and high (v[1]) nibbles. */
KT_INLINE void load_step(const uint8_t *wrow, int i8, __mmask64 m0, __mmask64 m1, __m512i v[2]) {
    if (i8) {
        const __m512i sign = _mm512_set1_epi8((char)0x80);
        v[0] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m0, wrow), sign);
        v[1] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m1, wrow + 64), sign);
        return;
    }
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    __m512i c = _mm512_maskz_loadu_epi8(m0, wrow);
    v[0] = _mm512_and_si512(c, m4);
    v[1] = _mm512_and_si512(_mm512_srli_epi16(c, 4), m4);
}

/* The partial sums of a W row's step v (load_step) against an activation
 * row's step x (act_step): lane 4q + l, part l of block q. */
KT_INLINE __m512i part_sums(const __m512i v[2], int i8, const __m512i x[2]) {
    const __m512i z = _mm512_setzero_si512();
    if (i8) return lanes4(_mm512_dpbusd_epi32(z, v[0], x[0]), _mm512_dpbusd_epi32(z, v[1], x[1]));
    return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(z, v[0], x[0]), v[1], x[1]);
}

/* 128 times the sum of block b + q's activation codes, in every lane of
 * c[q] (part_sums' offset for int8 codes). */
KT_INLINE void code_sums128(const __m512i x[2], __m512i c[4]) {
    const __m512i z = _mm512_setzero_si512(), k128 = _mm512_set1_epi8((char)0x80);
    __m512i s = lanes4(_mm512_dpbusd_epi32(z, k128, x[0]), _mm512_dpbusd_epi32(z, k128, x[1]));
    s = _mm512_add_epi32(s, _mm512_shuffle_epi32(s, (_MM_PERM_ENUM)0x4E));
    s = _mm512_add_epi32(s, _mm512_shuffle_epi32(s, (_MM_PERM_ENUM)0xB1));
    for (int q = 0; q < 4; q++) c[q] = _mm512_permutexvar_epi32(_mm512_set1_epi32(4 * q), s);
}

/* Exact sums of blocks b .. b + 3 of W rows wr, wr + ld, ... (nr of 16;
 * bytes of the step in masks m0, m1) against MR activation rows' steps
 * x[i]: S[i][q] lane r = block b + q of row r.  Each W row is loaded and
 * split once for the MR activation rows, 4 rows at a time. */
KT_INLINE void sums16x4(const int MR, const uint8_t *wr, int64_t ld, int nr, int i8, __mmask64 m0,
                        __mmask64 m1, const __m512i (*x)[2], __m512i (*S)[4]) {
    __m512i t[QF_MAX][4];
    for (int k = 0; k < 4; k++) { /* rows 4k .. 4k + 3 */
        __m512i h[QF_MAX][2];
        for (int pr = 0; pr < 2; pr++) {
            __m512i v[2][2];
            for (int e = 0; e < 2; e++) {
                int r = 4 * k + 2 * pr + e;
                if (r < nr) load_step(wr + r * ld, i8, m0, m1, v[e]);
                else v[e][0] = v[e][1] = _mm512_setzero_si512();
            }
            for (int i = 0; i < MR; i++) h[i][pr] = sum_pairs32(part_sums(v[0], i8, x[i]), part_sums(v[1], i8, x[i]));
        }
        for (int i = 0; i < MR; i++) t[i][k] = sum_pairs64(h[i][0], h[i][1]);
    }
    /* t[i][k] lane q = rows 4k .. 4k + 3 of block q: transpose the 4 x 4 lanes */
    for (int i = 0; i < MR; i++) {
        __m512i u0 = _mm512_shuffle_i32x4(t[i][0], t[i][1], 0x44), u1 = _mm512_shuffle_i32x4(t[i][0], t[i][1], 0xEE);
        __m512i u2 = _mm512_shuffle_i32x4(t[i][2], t[i][3], 0x44), u3 = _mm512_shuffle_i32x4(t[i][2], t[i][3], 0xEE);
        S[i][0] = _mm512_shuffle_i32x4(u0, u2, 0x88);
        S[i][1] = _mm512_shuffle_i32x4(u0, u2, 0xDD);
        S[i][2] = _mm512_shuffle_i32x4(u1, u3, 0x88);
        S[i][3] = _mm512_shuffle_i32x4(u1, u3, 0xDD);
    }
}

#define QF_PFL 16 /* lines of the next 16 W rows each step prefetches */

/* Activation rows xr[0..mr) (mr <= QF_MAX) into C rows cr (the formats and
 * layouts above).  A step reads a line of each of 16 W rows (two for int8
 * codes); it also prefetches
 * QF_PFL lines of the next 16 rows into L2, in order: one sequential
 * stream ahead of the 16 being read. */
static void qdot_few(int mr, const int8_t *const *xr, const float *const *xd, const float *const *xs,
                     int deint, int64_t n, int64_t K, const kt_wmat *w, float *const *cr) {
    const int i8 = w->fmt == KT_W_I8, bstep = i8 ? 4 * KT_QBLK : 2 * KT_QBLK; /* W bytes a step */
    const int64_t nb = K / KT_QBLK, lines = (nb * (bstep / 4) + 63) / 64;
    for (int64_t j = 0; j < n; j += 16) {
        int nr = (int)KT_MIN(16, n - j);
        const uint8_t *wr = (const uint8_t *)w->data + j * w->ld;
        __m512 ga[QF_MAX], tot[QF_MAX];
        float run[QF_MAX];
        for (int i = 0; i < mr; i++) tot[i] = ga[i] = _mm512_setzero_ps(), run[i] = 0.0f;
        const char *pf = (const char *)wr + 16 * w->ld;
        int64_t pfr = 0, pfl = 0, pfrows = KT_MIN(16, n - j - 16);
        for (int64_t b = 0; b < nb; b += 4) {
            int nbq = (int)KT_MIN(4, nb - b);
            for (int r = 0; r < QF_PFL && pfr < pfrows; r++) {
                _mm_prefetch(pf + pfr * w->ld + 64 * pfl, _MM_HINT_T0);
                if (++pfl == lines) pfl = 0, pfr++;
            }
            __mmask64 m0, m1;
            byte_masks(nbq * (bstep / 4), &m0, &m1);
            __m512 sv[4], ov[4];
            for (int q = 0; q < nbq; q++)
                if (closes_group(w, b + q, nb))
                    group_vec(w, j, nr, (w->g0 + (b + q) * KT_QBLK) / w->gs, !i8, &sv[q], &ov[q]);
            __m512i x[QF_MAX][2], S[QF_MAX][4];
            for (int i = 0; i < mr; i++) act_step(xr[i], deint, i8, b, nbq, x[i]);
            const uint8_t *ws = wr + b / 4 * bstep;
            switch (mr * 2 + i8) { /* MR and the format constant: each its own loop */
            case 2: sums16x4(1, ws, w->ld, nr, 0, m0, m1, x, S); break;
            case 3: sums16x4(1, ws, w->ld, nr, 1, m0, m1, x, S); break;
            case 4: sums16x4(2, ws, w->ld, nr, 0, m0, m1, x, S); break;
            case 5: sums16x4(2, ws, w->ld, nr, 1, m0, m1, x, S); break;
            case 6: sums16x4(3, ws, w->ld, nr, 0, m0, m1, x, S); break;
            case 7: sums16x4(3, ws, w->ld, nr, 1, m0, m1, x, S); break;
            case 8: sums16x4(4, ws, w->ld, nr, 0, m0, m1, x, S); break;
            default: sums16x4(4, ws, w->ld, nr, 1, m0, m1, x, S); break;
            }
            for (int i = 0; i < mr; i++) {
                __m512i c[4];
                if (i8) code_sums128(x[i], c);
                for (int q = 0; q < nbq; q++) {
                    int64_t bb = b + q;
                    int first = opens_group(w, bb);
                    __m512i si = i8 ? _mm512_sub_epi32(S[i][q], c[q]) : S[i][q];
                    ga[i] = add_block(first, _mm512_cvtepi32_ps(si), _mm512_set1_ps(xd[i][bb]), ga[i]);
                    if (!i8) run[i] = first ? xs[i][bb] : run[i] + xs[i][bb];
                    if (closes_group(w, bb, nb))
                        tot[i] = close_group(ga[i], sv[q], !i8, ov[q], _mm512_set1_ps(run[i]), tot[i]);
                }
            }
        }
        for (int i = 0; i < mr; i++) _mm512_mask_storeu_ps(cr[i] + j, (__mmask16)((1u << nr) - 1), tot[i]);
    }
}

/* One block of nt W tiles (A operands loaded) against mt activation tiles
 * (B operands loaded): the C tiles (4 + 2t + u: tile numbers are literals
 * in the instructions), stored densely into st->cb[2t + u]. */
#define QA_DP(TC, TA, TB, Q, U, INS)                                        \
    do {                                                                    \
        _tile_zero(TC);                                                     \
        INS(TC, TA, TB);                                                    \
        _tile_stored(TC, st->cb[Q], 4 * mp[U]);                             \
    } while (0)

#define QA_BLOCK(INS)                                                       \
    do {                                                                    \
        QA_DP(4, 0, 2, 0, 0, INS);                                          \
        if (mt > 1) QA_DP(5, 0, 3, 1, 1, INS);                              \
        if (nt > 1) {                                                       \
            QA_DP(6, 1, 2, 2, 0, INS);                                      \
            if (mt > 1) QA_DP(7, 1, 3, 3, 1, INS);                          \
        }                                                                   \
    } while (0)

void kt_qdot_amx_int8(int64_t m, int64_t n, int64_t K, const kt_qact *x, const int32_t *aidx,
                      const kt_wmat *w, float *c, int64_t ldc) {
    kt_qamx sts, *st = &sts;
    const int i8 = w->fmt == KT_W_I8, offsets = !i8, deint = x->deint;
    const int64_t nb = K / KT_QBLK;
    for (int64_t i0 = 0; i0 < m; i0 += 32) {
        int mr = (int)KT_MIN(32, m - i0), mt = mr > 16 ? 2 : 1;
        int mp[2] = {mt > 1 ? 16 : pow2_at_least(mr), mt > 1 ? pow2_at_least(mr - 16) : 0};
        int mru[2] = {KT_MIN(mr, 16), mr - KT_MIN(mr, 16)};
        const int8_t *xr[32];
        const float *xd[32], *xs[32];
        for (int i = 0; i < mr; i++) {
            int64_t row = aidx ? aidx[i0 + i] : i0 + i;
            xr[i] = x->q + row * x->ldq;
            xd[i] = x->d + row * x->ldb;
            xs[i] = x->s + row * x->ldb;
        }
        if (mr <= QF_ROWS && (i8 ? deint == 0 : deint != 0)) {
            for (int f = 0; f < mr; f += QF_MAX) {
                int fr = KT_MIN(QF_MAX, mr - f);
                float *cr[QF_MAX];
                for (int i = 0; i < fr; i++) cr[i] = c + (i0 + f + i) * ldc;
                qdot_few(fr, xr + f, xd + f, xs + f, deint, n, K, w, cr);
            }
            continue;
        }
        tile_config_q(mp, mt);
        for (int64_t jc = 0; jc < n; jc += QA_NC) {
            int nc = (int)KT_MIN(QA_NC, n - jc), ntl = (nc + 15) / 16;
            for (int jt = 0; jt < ntl; jt++)
                for (int u = 0; u < mt; u++) memset(st->tot[jt][u], 0, 16 * (size_t)mp[u] * sizeof(float));
            for (int64_t b0 = 0; b0 < nb; b0 += QA_NB) {
                int nbc = (int)KT_MIN(QA_NB, nb - b0);
                for (int u = 0; u < mt; u++)
                    pack_act(st, u, mru[u], mp[u], xr + 16 * u, xd + 16 * u, xs + 16 * u, deint, offsets, w,
                             b0, nbc);
                for (int jt = 0; jt < ntl; jt += 2) {
                    int nt = KT_MIN(2, ntl - jt);
                    int64_t j = jc + 16 * jt;
                    int nr[2] = {(int)KT_MIN(16, n - j), nt > 1 ? (int)KT_MIN(16, n - j - 16) : 0};
                    for (int t = 0; t < nt; t++)
                        if (!i8 || nr[t] < 16) unpack_w(st->wx[t], w, j + 16 * t, nr[t], b0, nbc, deint);
                    for (int bl = 0; bl < nbc; bl++) {
                        int64_t b = b0 + bl, k = b * KT_QBLK;
                        int64_t g = (w->g0 + k) / w->gs;
                        int first = opens_group(w, b), last = closes_group(w, b, nb);
                        for (int t = 0; t < nt; t++) {
                            const void *ap = st->wx[t][0] + 32 * bl;
                            int64_t as = QA_NB * 32;
                            if (i8 && nr[t] == 16) { /* in place */
                                ap = (const int8_t *)w->data + (j + 16 * t) * w->ld + k;
                                as = w->ld;
                            }
                            if (t == 0) _tile_loadd(TA0, ap, as);
                            else _tile_loadd(TA1, ap, as);
                            if (last) {
                                __m512 sv, ov;
                                group_vec(w, j + 16 * t, nr[t], g, offsets, &sv, &ov);
                                _mm512_store_ps(st->sp[t], sv);
                                _mm512_store_ps(st->op[t], ov);
                            }
                        }
                        _tile_loadd(TB0, st->x[0][bl], 64);
                        if (mt > 1) _tile_loadd(TB1, st->x[1][bl], 64);
                        if (i8) QA_BLOCK(_tile_dpbssd);
                        else QA_BLOCK(_tile_dpbusd);
                        for (int t = 0; t < nt; t++)
                            for (int u = 0; u < mt; u++)
                                scale_tile(st->cb[2 * t + u], st->ga[jt + t][u], st->tot[jt + t][u], mp[u],
                                           st->dp[u][bl], st->gp[u][bl], first, last, st->sp[t], st->op[t],
                                           offsets);
                    }
                }
            }
            for (int jt = 0; jt < ntl; jt++) {
                int nrj = (int)KT_MIN(16, n - jc - 16 * jt);
                for (int u = 0; u < mt; u++)
                    for (int r = 0; r < nrj; r++)
                        for (int i = 0; i < mru[u]; i++)
                            c[(i0 + 16 * u + i) * ldc + jc + 16 * jt + r] = st->tot[jt][u][r * mp[u] + i];
            }
        }
    }
    _tile_release();
}
