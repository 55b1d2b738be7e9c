/* The ref tier: portable C, the executable specification of every kernel.
 * Written for clarity, never tuned; every other tier is tested against it. */
#include "../../internal.h"

#include <math.h>

static inline float w_at(const void *w, int is_bf16, int64_t i) {
    return is_bf16 ? kt_bf16_to_f32(((const uint16_t *)w)[i])
                   : ((const float *)w)[i];
}

static void dot_ref(int is_bf16, int64_t m, int64_t n, int64_t K, const float *a,
                    int64_t lda, const int32_t *aidx, const void *w, int64_t ldw,
                    float *c, int64_t ldc, int accum) {
    for (int64_t i = 0; i < m; i++) {
        const float *ai = a + (aidx ? aidx[i] : i) * lda;
        for (int64_t j = 0; j < n; j++) {
            float acc = 0.0f;
            for (int64_t k = 0; k < K; k++) acc += ai[k] * w_at(w, is_bf16, j * ldw + k);
            c[i * ldc + j] = accum ? c[i * ldc + j] + acc : acc;
        }
    }
}

static void outer_ref(int is_bf16, int64_t m, int64_t n, int64_t K, const float *d,
                      int64_t dsi, int64_t dsk, const int32_t *didx, const void *w,
                      int64_t ldw, const int32_t *widx, float *c, int64_t ldc,
                      int accum) {
    for (int64_t i = 0; i < m; i++) {
        const float *di = d + (didx ? didx[i] : i) * dsi;
        for (int64_t j = 0; j < n; j++) {
            float acc = 0.0f;
            for (int64_t k = 0; k < K; k++)
                acc += di[k * dsk] * w_at(w, is_bf16, (widx ? widx[k] : k) * ldw + j);
            c[i * ldc + j] = accum ? c[i * ldc + j] + acc : acc;
        }
    }
}

static void dot_bf16_ref(int64_t m, int64_t n, int64_t K, const float *a, int64_t lda,
                         const int32_t *aidx, const void *w, int64_t ldw, float *c,
                         int64_t ldc, int accum) {
    dot_ref(1, m, n, K, a, lda, aidx, w, ldw, c, ldc, accum);
}

static void dot_f32_ref(int64_t m, int64_t n, int64_t K, const float *a, int64_t lda,
                        const int32_t *aidx, const void *w, int64_t ldw, float *c,
                        int64_t ldc, int accum) {
    dot_ref(0, m, n, K, a, lda, aidx, w, ldw, c, ldc, accum);
}

static void outer_bf16_ref(int64_t m, int64_t n, int64_t K, const float *d, int64_t dsi,
                           int64_t dsk, const int32_t *didx, const void *w, int64_t ldw,
                           const int32_t *widx, float *c, int64_t ldc, int accum) {
    outer_ref(1, m, n, K, d, dsi, dsk, didx, w, ldw, widx, c, ldc, accum);
}

static void outer_f32_ref(int64_t m, int64_t n, int64_t K, const float *d, int64_t dsi,
                          int64_t dsk, const int32_t *didx, const void *w, int64_t ldw,
                          const int32_t *widx, float *c, int64_t ldc, int accum) {
    outer_ref(0, m, n, K, d, dsi, dsk, didx, w, ldw, widx, c, ldc, accum);
}

static inline float sigmoid_ref(float x) { return 1.0f / (1.0f + expf(-x)); }

static void act_fwd_ref(int64_t n, const float *g, const float *u, float *h) {
    for (int64_t i = 0; i < n; i++) h[i] = g[i] * sigmoid_ref(g[i]) * u[i];
}

static float act_bwd_ref(int64_t n, const float *dh, float *g, float *u, float w) {
    float dot = 0.0f;
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
    .dot_bf16 = dot_bf16_ref,
    .dot_f32 = dot_f32_ref,
    .outer_bf16 = outer_bf16_ref,
    .outer_f32 = outer_f32_ref,
    .act_fwd = act_fwd_ref,
    .act_bwd = act_bwd_ref,
};
