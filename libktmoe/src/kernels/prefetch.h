/* Weight-panel prefetching, shared by the panel kernels of the avx2 and
 * avx512 tiers (plain SSE prefetch instructions). */
#ifndef KT_PREFETCH_H
#define KT_PREFETCH_H

#include "../internal.h"

#include <immintrin.h>

#ifndef KT_INLINE
#define KT_INLINE static inline __attribute__((always_inline))
#endif

/* ---- prefetching ----
 * The weights stream from DRAM once per pass; the panel kernels convert a
 * panel while the next one is fetched: kt_pf spreads the next panel's
 * cache lines over the row blocks of the current one. */

/* Address of W(r, c) in its data array, and the bytes of n columns. */
KT_INLINE const char *w_addr(const kt_wmat *w, int64_t r, int64_t c) {
    const char *d = w->data;
    switch (w->fmt) {
    case KT_W_F32: return d + (r * w->ld + c) * 4;
    case KT_W_BF16: return d + (r * w->ld + c) * 2;
    case KT_W_I8:
    case KT_W_FP8: return d + r * w->ld + c;
    default: return d + r * w->ld + c / 2;
    }
}

KT_INLINE int64_t w_bytes(const kt_wmat *w, int64_t n) {
    switch (w->fmt) {
    case KT_W_F32: return n * 4;
    case KT_W_BF16: return n * 2;
    case KT_W_I8:
    case KT_W_FP8: return n;
    default: return (n + 1) / 2;
    }
}

/* The lines of `rows` row segments (row r0 + t at column c, n columns;
 * row index widx[...] if given), fetched a share at a time.  The cursor
 * (row t, line l of it) moves without a division: pf_some runs between
 * the micro-kernel calls, where an idiv a line cost 4-5 % of a step. */
typedef struct kt_pf {
    const kt_wmat *w;
    const int32_t *widx;
    const char *line;  /* the next line to fetch (row t's segment, line l) */
    int64_t r0, c, lines_per_row, t, l, left;
} kt_pf;

KT_INLINE const char *pf_row(const kt_pf *p) {
    int64_t r = p->widx ? p->widx[p->r0 + p->t] : p->r0 + p->t;
    return (const char *)((uintptr_t)w_addr(p->w, r, p->c) & ~(uintptr_t)63);
}

KT_INLINE void pf_init(kt_pf *p, const kt_wmat *w, const int32_t *widx, int64_t r0, int64_t rows,
                       int64_t c, int64_t n) {
    p->w = w;
    p->widx = widx;
    p->r0 = r0;
    p->c = c;
    uintptr_t a = (uintptr_t)w_addr(w, 0, c);
    p->lines_per_row = ((int64_t)(a & 63) + w_bytes(w, n) + 63) / 64;
    p->t = 0;
    p->l = 0;
    p->left = rows > 0 && n > 0 ? rows * p->lines_per_row : 0;
    p->line = p->left ? pf_row(p) : NULL;
}

/* All lines of the segments (for a caller's share per block). */
KT_INLINE int64_t pf_total(const kt_pf *p) { return p->left; }

KT_INLINE void pf_some(kt_pf *p, int64_t count) {
    for (count = KT_MIN(count, p->left); count > 0; count--) {
        _mm_prefetch(p->line + 64 * p->l, _MM_HINT_T0);
        p->left--;
        if (++p->l == p->lines_per_row) {
            p->l = 0;
            p->t++;
            if (p->left) p->line = pf_row(p);
        }
    }
}

/* The panel after the one of columns [j, j + 8 nvec) and K rows ending at
 * k1 (KT_PANEL_K x KT_PANEL_W panels, nv columns in all): the next K rows,
 * else the first ones of the next column block.  Outer form: W rows are
 * K (through widx); dot form: W rows are the columns, K runs along them. */
KT_INLINE void pf_next_outer(kt_pf *p, const kt_wmat *W, const int32_t *widx, int64_t K,
                             int64_t nv, int64_t j, int nvec, int64_t k1) {
    if (k1 < K)
        pf_init(p, W, widx, k1, KT_MIN(K, k1 + KT_PANEL_K) - k1, j, 8 * nvec);
    else
        pf_init(p, W, widx, 0, j + KT_PANEL_W < nv ? KT_MIN(K, KT_PANEL_K) : 0, j + KT_PANEL_W,
                KT_MIN(KT_PANEL_W, nv - j - KT_PANEL_W));
}

KT_INLINE void pf_next_dot(kt_pf *p, const kt_wmat *W, int64_t K, int64_t nv, int64_t j, int nvec,
                           int64_t k1) {
    if (k1 < K)
        pf_init(p, W, NULL, j, 8 * nvec, k1, KT_MIN(KT_PANEL_K, K - k1));
    else
        pf_init(p, W, NULL, j + KT_PANEL_W, KT_MIN(KT_PANEL_W, nv - j - KT_PANEL_W), 0,
                KT_MIN(KT_PANEL_K, K));
}

#endif
