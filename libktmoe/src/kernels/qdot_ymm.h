/* The integer dot form (kt_qdot_fn) on 256-bit vectors, included by the
 * avx2 tier (KT_VNNI 0: vpmaddubsw + vpmaddwd) and by the avx512 tier's
 * VNNI table (KT_VNNI 1: vpdpbusd, the same three steps in one
 * instruction), which define KT_QDOT_NAME and KT_INLINE.
 *
 * Per block of 32 columns: u8 weight codes x s8 activation codes (int8
 * weights go through the sign trick) give 8 int32 partial sums, converted
 * and scaled by the block's activation scale into a per-group accumulator;
 * at the end of each weight group the accumulator is scaled by the group's
 * scale and the offset term off_g * sum of block sums is added (see
 * kt_qdot_fn).
 *
 * 512-bit forms of this kernel (one pair of blocks per zmm, vpdpbusd) were
 * measured on Zen 4, whose AVX-512 units are 256 bits wide: 1.3-1.6x faster
 * with the weights in L2, but 5-20 % slower than this form once they stream
 * from L3/DRAM, which is where a MoE layer's experts live. */

KT_INLINE __m256i qdp(__m256i acc, __m256i u, __m256i s) {
#if KT_VNNI
    return _mm256_dpbusd_epi32(acc, u, s);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}


/* The 32 codes of the block at column k0 of a row: s8 (I8), or u8 0..15
 * (4-bit) in column order, or with deint even columns first: the low
 * nibbles of the 16 bytes, then the high ones (3 instructions). */
KT_INLINE __m256i wcodes32(int fmt, int deint, const uint8_t *row, int64_t k0) {
    if (fmt == KT_W_I8) return _mm256_loadu_si256((const __m256i *)(row + k0));
    if (deint) {
        __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(row + k0 / 2)));
        v = _mm256_srlv_epi32(v, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4));
        return _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
    }
    __m128i v = _mm_loadu_si128((const __m128i *)(row + k0 / 2));
    const __m128i m4 = _mm_set1_epi8(0x0F);
    __m128i lo = _mm_and_si128(v, m4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4);
    return _mm256_set_m128i(_mm_unpackhi_epi8(lo, hi), _mm_unpacklo_epi8(lo, hi));
}

#define KT_QMR 4 /* activation rows per pass over a weight row */

/* How far ahead the weight codes are prefetched (qdot_prefetch_row,
 * qdot_row1).  Paired runs (tools/kernel_ab.sh, 64 experts from DRAM, one
 * thread): 1.02-1.04x with T0 at 1-4 KB, 0.90x with the T1 hint. */
#define KT_QPF_BYTES 4096

#define KT_QMAXG 2048 /* groups a row may span: K / KT_QBLK at most */
/* Pairs of blocks whose scale vectors (d_b x4, d_b+1 x4) are built once per
 * call: K up to 8192; longer rows build them per use. */
#define KT_QMAXP 64

/* One block (32 columns) of one weight row against MR activation rows,
 * accumulated into acc[t] with the block's activation scale. */
KT_INLINE void qdot_block(const int MR, const int fmt, const int deint, const uint8_t *wrow,
                          int64_t b, const int8_t *const *xq, const float *const *xd,
                          __m256 *acc) {
    const int i8 = fmt == KT_W_I8;
    int64_t k0 = b * KT_QBLK;
    __m256i wv = wcodes32(fmt, deint, wrow, k0);
    __m256i wa = i8 ? _mm256_sign_epi8(wv, wv) : wv;
    for (int t = 0; t < MR; t++) {
        __m256i xv = _mm256_loadu_si256((const __m256i *)(xq[t] + k0));
        if (i8) xv = _mm256_sign_epi8(xv, wv);
        __m256i p = qdp(_mm256_setzero_si256(), wa, xv);
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_broadcast_ss(xd[t] + b), acc[t]);
    }
}

/* The 32 bytes of codes of blocks b and b+1 of a 4-bit row in layout 2:
 * the low nibbles (even columns of both blocks) and the high ones (odd). */
KT_INLINE void nibbles32(const uint8_t *wrow, int64_t b, __m256i *lo, __m256i *hi) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256i v = _mm256_loadu_si256((const __m256i *)(wrow + b * (KT_QBLK / 2)));
    *lo = _mm256_and_si256(v, m4);
    *hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
}

/* The pair's int32 sums against activation codes x (layout 2, x at the
 * pair's first column): lanes 0-3 hold block b, lanes 4-7 block b+1. */
KT_INLINE __m256i pair_sums(__m256i lo, __m256i hi, const int8_t *x) {
#if KT_VNNI
    return qdp(qdp(_mm256_setzero_si256(), lo, _mm256_loadu_si256((const __m256i *)x)), hi,
               _mm256_loadu_si256((const __m256i *)(x + KT_QBLK)));
#else
    __m256i pe = _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)x));
    __m256i po = _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(x + KT_QBLK)));
    return _mm256_madd_epi16(_mm256_add_epi16(pe, po), _mm256_set1_epi16(1));
#endif
}

/* Blocks b and b+1 of a 4-bit weight row against MR activation rows in
 * layout 2 (kt_act_pos): 32 bytes of codes give the even columns of both
 * blocks (low nibbles) and the odd ones (high nibbles) with no shuffle;
 * one vpmaddwd and one FMA serve both blocks, lanes 0-3 holding block b and
 * lanes 4-7 block b+1. */
KT_INLINE void qdot_pair(const int MR, const uint8_t *wrow, int64_t b, const int8_t *const *xq,
                         const float *const *xd, const __m256 (*dpair)[KT_QMAXP], __m256 *acc) {
    __m256i lo, hi;
    nibbles32(wrow, b, &lo, &hi);
    for (int t = 0; t < MR; t++) {
        __m256i p = pair_sums(lo, hi, xq[t] + b * KT_QBLK);
        __m256 d = dpair ? dpair[t][b / 2]
                         : _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_broadcast_ss(xd[t] + b)),
                                                _mm_broadcast_ss(xd[t] + b + 1), 1);
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), d, acc[t]);
    }
}

/* qdot_row's case of one activation row (decode) in layout 2 with the
 * pair scales built, where each weight group of the row spans a multiple of
 * 4 blocks (bpg: the whole row, or the usual K-group of 128 columns): the
 * same sums in the same order (per group, pairs b into ga and b + 2 into
 * gb, then the group's scale; the offset terms last), without the general
 * loop's group bounds and per-pair checks, and with one prefetch of the
 * line KT_QPF_BYTES ahead per line read instead of a separate loop over
 * each row's lines (paired, one thread, one group a row: 1.26-1.33x, with
 * the codes in L2, L3 or DRAM).  The prefetch runs past the call's last
 * rows by KT_QPF_BYTES. */
KT_INLINE float qdot_row1(const uint8_t *wrow, int64_t nb, int64_t bpg, const int8_t *x,
                          const __m256 *dv, const float *gsum, const kt_wmat *w, int64_t j) {
    const int64_t g = w->g0 / w->gs;
    const float *sc = w->scale + j * w->ldg + g;
    __m256 tot = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; sc++) {
        __m256 ga = _mm256_setzero_ps(), gb = _mm256_setzero_ps();
        for (int64_t e = b + bpg; b < e; b += 4) {
            __m256i lo, hi;
            _mm_prefetch((const char *)wrow + b * (KT_QBLK / 2) + KT_QPF_BYTES, _MM_HINT_T0);
            nibbles32(wrow, b, &lo, &hi);
            ga = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pair_sums(lo, hi, x + b * KT_QBLK)), dv[b / 2], ga);
            nibbles32(wrow, b + 2, &lo, &hi);
            gb = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pair_sums(lo, hi, x + (b + 2) * KT_QBLK)),
                                 dv[b / 2 + 1], gb);
        }
        tot = _mm256_fmadd_ps(_mm256_add_ps(ga, gb), _mm256_set1_ps(*sc), tot);
    }
    float offs = 0.0f;
    for (int64_t i = 0; i < nb / bpg; i++) {
        float off = kt_w_offset(w, j, g + i);
        offs += off * gsum[i];
    }
    return hsum8(tot) + offs;
}

/* One weight row j against MR activation rows (MR a constant after
 * inlining, so the accumulators stay in registers).  Blocks go two at a
 * time into two accumulators (to hide the FMA latency); the offset term
 * uses gsum[t][gi], the sum of row t's block sums over group gi, computed
 * once per call since it does not depend on the weight row. */
KT_INLINE void qdot_row(const int MR, const int fmt, const int deint, int64_t nb,
                        const int8_t *const *xq, const float *const *xd,
                        const __m256 (*dpair)[KT_QMAXP], float (*gsum)[KT_QMAXG],
                        const kt_wmat *w, int64_t j, float *const *crow) {
    const uint8_t *wrow = (const uint8_t *)w->data + j * w->ld;
    __m256 tot[KT_QMR], ga[KT_QMR], gb[KT_QMR];
    float offs[KT_QMR];
    for (int t = 0; t < MR; t++) {
        tot[t] = ga[t] = gb[t] = _mm256_setzero_ps();
        offs[t] = 0.0f;
    }
    int64_t g = w->g0 / w->gs, gi = 0;
    int64_t gend = w->gs - w->g0 % w->gs; /* column where the current group ends */
    if (deint == 2 && w->gs == 4 * KT_QBLK && w->g0 % w->gs == 0 && nb % 4 == 0) {
        /* groups of 128 columns (the usual K-group size) and K a multiple
         * of them: two pairs a group, no bounds to compute */
        const float *sc = w->scale + j * w->ldg + g;
        for (int64_t b = 0; b < nb; b += 4, gi++) {
            qdot_pair(MR, wrow, b, xq, xd, dpair, ga);
            qdot_pair(MR, wrow, b + 2, xq, xd, dpair, gb);
            __m256 sv = _mm256_broadcast_ss(sc + gi);
            for (int t = 0; t < MR; t++) {
                tot[t] = _mm256_fmadd_ps(_mm256_add_ps(ga[t], gb[t]), sv, tot[t]);
                ga[t] = gb[t] = _mm256_setzero_ps();
            }
        }
        for (int64_t i = 0; i < gi; i++) {
            float off = kt_w_offset(w, j, g + i);
            for (int t = 0; t < MR; t++) offs[t] += off * gsum[t][i];
        }
        for (int t = 0; t < MR; t++) crow[t][j] = hsum8(tot[t]) + offs[t];
        return;
    }
    for (int64_t b = 0; b < nb; gi++, g++, gend += w->gs) {
        int64_t bend = KT_MIN(nb, gend / KT_QBLK);
        if (deint == 2) { /* groups hold whole pairs of blocks */
            for (; b + 4 <= bend; b += 4) {
                qdot_pair(MR, wrow, b, xq, xd, dpair, ga);
                qdot_pair(MR, wrow, b + 2, xq, xd, dpair, gb);
            }
            if (b < bend) {
                qdot_pair(MR, wrow, b, xq, xd, dpair, ga);
                b += 2;
            }
        } else {
            for (; b + 2 <= bend; b += 2) {
                qdot_block(MR, fmt, deint, wrow, b, xq, xd, ga);
                qdot_block(MR, fmt, deint, wrow, b + 1, xq, xd, gb);
            }
            if (b < bend) qdot_block(MR, fmt, deint, wrow, b++, xq, xd, ga);
        }
        __m256 sv = _mm256_set1_ps(w->scale[j * w->ldg + g]);
        /* int8 weights have no offset, and their gsum is never set:
         * 0 * garbage is NaN when the garbage is Inf or NaN */
        const float off = fmt == KT_W_I8 ? 0.0f : kt_w_offset(w, j, g);
        for (int t = 0; t < MR; t++) {
            tot[t] = _mm256_fmadd_ps(_mm256_add_ps(ga[t], gb[t]), sv, tot[t]);
            ga[t] = gb[t] = _mm256_setzero_ps();
            if (fmt != KT_W_I8) offs[t] += off * gsum[t][gi];
        }
    }
    for (int t = 0; t < MR; t++) crow[t][j] = hsum8(tot[t]) + offs[t];
}

/* Software prefetch of the weight row `ahead` rows on (those of the call
 * only), a few KB in front of the one being read: the rows of a call are
 * one sequential stream, but with one activation row (decode) perf put a
 * quarter of the kernel's samples on the first use of each load of codes. */

KT_INLINE void qdot_prefetch_row(const kt_wmat *w, int64_t j, int64_t n, int64_t bytes) {
    if (j >= n) return;
    const char *p = (const char *)w->data + j * w->ld;
    for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(p + o, _MM_HINT_T0);
}

#define QDOT_CASE(MR, FMT, DI)                                                             \
    case (MR) * 32 + (FMT) * 4 + (DI):                                                      \
        for (int64_t j = 0; j < n; j++) {                                                   \
            qdot_prefetch_row(w, j + ahead, n, rowbytes);                                   \
            qdot_row(MR, FMT, DI, nb, xq, xd, dp, gsum, w, j, cr);                          \
        }                                                                                   \
        break;

void KT_QDOT_NAME(int64_t m, int64_t n, int64_t K, const kt_qact *x, const int32_t *aidx,
                      const kt_wmat *w, float *c, int64_t ldc) {
    const int64_t nb = K / KT_QBLK;
    /* bytes of codes a row reads, and how many rows ahead to prefetch */
    const int64_t rowbytes = w->fmt == KT_W_I8 ? K : K / 2;
    const int64_t ahead = (KT_QPF_BYTES + rowbytes - 1) / KT_MAX(rowbytes, 1);
    float gsum[KT_QMR][KT_QMAXG];
    __m256 dpair[KT_QMR][KT_QMAXP];
    const int pairs = x->deint == 2 && w->fmt != KT_W_I8 && nb <= 2 * KT_QMAXP;
    const __m256(*dp)[KT_QMAXP] = pairs ? (const __m256(*)[KT_QMAXP])dpair : NULL;
    for (int64_t i0 = 0; i0 < m; i0 += KT_QMR) {
        int mr = (int)KT_MIN(KT_QMR, m - i0);
        const int8_t *xq[KT_QMR];
        const float *xd[KT_QMR];
        float *cr[KT_QMR];
        for (int t = 0; t < mr; t++) {
            int64_t row = aidx ? aidx[i0 + t] : i0 + t;
            xq[t] = x->q + row * x->ldq;
            xd[t] = x->d + row * x->ldb;
            cr[t] = c + (i0 + t) * ldc;
            for (int64_t b = 0; pairs && b + 1 < nb; b += 2)
                dpair[t][b / 2] = _mm256_insertf128_ps(_mm256_set1_ps(xd[t][b]), _mm_set1_ps(xd[t][b + 1]), 1);
            /* row t's block sums, summed per weight group */
            const float *xs = x->s + row * x->ldb;
            int64_t gi = 0, gend = w->gs - w->g0 % w->gs;
            float acc = 0.0f;
            for (int64_t b = 0; b < nb && w->fmt != KT_W_I8; b++) {
                acc += xs[b];
                if (b == nb - 1 || (b + 1) * KT_QBLK >= gend) {
                    gsum[t][gi++] = acc;
                    acc = 0.0f;
                    gend += w->gs;
                }
            }
        }
        /* decode, whole groups of a multiple of 4 blocks: qdot_row1 */
        int64_t bpg = w->gs - w->g0 % w->gs >= nb * KT_QBLK ? nb
                      : w->g0 % w->gs == 0 && w->gs % (4 * KT_QBLK) == 0 && nb % (w->gs / KT_QBLK) == 0
                          ? w->gs / KT_QBLK : 0;
        if (mr == 1 && pairs && bpg % 4 == 0 && bpg > 0) {
            const uint8_t *w0 = w->data;
            if (bpg == 4) /* groups of 128 columns: the inner loop unrolled */
                for (int64_t j = 0; j < n; j++)
                    cr[0][j] = qdot_row1(w0 + j * w->ld, nb, 4, xq[0], dpair[0], gsum[0], w, j);
            else
                for (int64_t j = 0; j < n; j++)
                    cr[0][j] = qdot_row1(w0 + j * w->ld, nb, bpg, xq[0], dpair[0], gsum[0], w, j);
            continue;
        }
        /* the 4-bit formats differ only in kt_w_offset: one instance serves
         * them; int8 weights read activations in column order only */
        int f = w->fmt == KT_W_I8 ? KT_W_I8 : KT_W_I4M, di = f != KT_W_I8 ? x->deint : 0;
        switch (mr * 32 + f * 4 + di) {
            QDOT_CASE(1, KT_W_I8, 0) QDOT_CASE(2, KT_W_I8, 0) QDOT_CASE(3, KT_W_I8, 0) QDOT_CASE(4, KT_W_I8, 0)
            QDOT_CASE(1, KT_W_I4M, 0) QDOT_CASE(2, KT_W_I4M, 0) QDOT_CASE(3, KT_W_I4M, 0) QDOT_CASE(4, KT_W_I4M, 0)
            QDOT_CASE(1, KT_W_I4M, 1) QDOT_CASE(2, KT_W_I4M, 1) QDOT_CASE(3, KT_W_I4M, 1) QDOT_CASE(4, KT_W_I4M, 1)
            QDOT_CASE(1, KT_W_I4M, 2) QDOT_CASE(2, KT_W_I4M, 2) QDOT_CASE(3, KT_W_I4M, 2) QDOT_CASE(4, KT_W_I4M, 2)
        }
    }
}

