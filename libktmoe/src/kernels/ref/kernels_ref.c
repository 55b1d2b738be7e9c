/* The ref tier: portable C, the executable specification of every kernel.
 * Written for clarity, never tuned; every other tier is tested against it. */
#include "../../internal.h"

#include <math.h>

/* C[i][j] (+)= sum_k A_i[k] W(j, k) */
static void dot_ref(int64_t m, int64_t n, int64_t K, const float *a, int64_t lda,
                    const int32_t *aidx, const kt_wmat *w, float *c, int64_t ldc, int accum) {
    for (int64_t i = 0; i < m; i++) {
        const float *ai = a + (aidx ? aidx[i] : i) * lda;
        for (int64_t j = 0; j < n; j++) {
            float acc = 0.0f;
            for (int64_t k = 0; k < K; k++) acc += ai[k] * kt_w_at(w, j, k);
            c[i * ldc + j] = accum ? c[i * ldc + j] + acc : acc;
        }
    }
}

/* C[i][j] (+)= sum_k D(i, k) W(widx[k], j) */
static void outer_ref(int64_t m, int64_t n, int64_t K, const float *d, int64_t dsi,
                      int64_t dsk, const int32_t *didx, const kt_wmat *w,
                      const int32_t *widx, float *c, int64_t ldc, int accum) {
    for (int64_t i = 0; i < m; i++) {
        const float *di = d + (didx ? didx[i] : i) * dsi;
        for (int64_t j = 0; j < n; j++) {
            float acc = 0.0f;
            for (int64_t k = 0; k < K; k++)
                acc += di[k * dsk] * kt_w_at(w, widx ? widx[k] : k, j);
            c[i * ldc + j] = accum ? c[i * ldc + j] + acc : acc;
        }
    }
}

/* C[i][j] = sum over blocks b of (d_b s_g) sum_k q_k c_k + off_g sum_b */
static void qdot_ref(int64_t m, int64_t n, int64_t K, const kt_qact *x, const int32_t *aidx,
                     const kt_wmat *w, float *c, int64_t ldc) {
    for (int64_t i = 0; i < m; i++) {
        int64_t row = aidx ? aidx[i] : i;
        const int8_t *xq = x->q + row * x->ldq;
        const float *xd = x->d + row * x->ldb, *xs = x->s + row * x->ldb;
        for (int64_t j = 0; j < n; j++) {
            float acc = 0.0f;
            for (int64_t b = 0; b < K / KT_QBLK; b++) {
                int64_t k0 = b * KT_QBLK, g = (w->g0 + k0) / w->gs;
                int32_t isum = 0;
                for (int k = 0; k < KT_QBLK; k++)
                    isum += xq[kt_act_pos(x->deint, k0 + k)] * kt_w_code(w, j, k0 + k);
                acc += xd[b] * w->scale[j * w->ldg + g] * (float)isum + kt_w_offset(w, j, g) * xs[b];
            }
            c[i * ldc + j] = acc;
        }
    }
}

static inline float sigmoid_ref(float x) { return 1.0f / (1.0f + expf(-x)); }

static void act_fwd_ref(int64_t n, const float *g, const float *u, float *h, const kt_activation *a) {
    if (a->kind == KTMOE_ACT_SWIGLU_CLAMP) {
        for (int64_t i = 0; i < n; i++) h[i] = kt_swiglu_clamp1(g[i], u[i], a);
        return;
    }
    for (int64_t i = 0; i < n; i++) h[i] = g[i] * sigmoid_ref(g[i]) * u[i];
}

static float act_bwd_ref(int64_t n, const float *dh, float *g, float *u, float w, const kt_activation *a) {
    float dot = 0.0f;
    if (a->kind == KTMOE_ACT_SWIGLU_CLAMP) {
        for (int64_t i = 0; i < n; i++) dot += kt_swiglu_clamp_bwd1(dh[i], &g[i], &u[i], w, a);
        return dot;
    }
    for (int64_t i = 0; i < n; i++) {
        float sg = sigmoid_ref(g[i]);
        float silu = g[i] * sg;
        float dsilu = sg * (1.0f + g[i] * (1.0f - sg));
        dot += dh[i] * silu * u[i];
        float d = w * dh[i];
        float du = d * silu;
        g[i] = d * u[i] * dsilu;
        u[i] = du;
    }
    return dot;
}

const kt_kernels kt_kernels_ref = {
    .isa = KTMOE_ISA_REF,
    .dot = dot_ref,
    .outer = outer_ref,
    .qdot = qdot_ref,
    .act_fwd = act_fwd_ref,
    .act_bwd = act_bwd_ref,
    .quant_act = kt_quant_act,
};
