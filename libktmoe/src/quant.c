/* Packed weight formats: the quantizer and the layout queries.
 *
 * Rules (per group of columns; a row is one group for the per-row formats),
 * all in fp32, rint() rounding half to even:
 *   BF16  round to nearest even bf16.
 *   I8    s = max|x| / 127; q = clamp(rint(x / s), -127, 127) (s = 0: q = 0).
 *   I4S   m = the x of largest |x| (first one on ties); s = m / -8;
 *         u = clamp(rint(x / s) + 8, 0, 15) (s = 0: u = 8).
 *   I4M   lo = min x, hi = max x; s = (hi - lo) / 15; min = lo;
 *         u = clamp(rint((x - lo) / s), 0, 15) (s = 0: u = 0).
 *   I4Z   lo = min(min x, 0), hi = max(max x, 0); s = (hi - lo) / 15;
 *         zero = clamp(rint(-lo / s), 0, 15); u = clamp(rint(x / s) + zero,
 *         0, 15) (s = 0: u = zero = 0).
 *   FP8   s = max|x| / 448; q = e4m3(clamp(x / s, -448, 448)), rounded to
 *         nearest even (s = 0: q = 0).
 *   MXFP4 (OCP MX, groups of 32) s = 2^(floor(log2(max|x|)) - 2), the
 *         exponent clamped to [-127, 127] (max|x| = 0: s = 2^-127);
 *         u = e2m1(x / s), the nearest of +-{0, .5, 1, 1.5, 2, 3, 4, 6}
 *         (ties to an even code, beyond 6: 6); -0 is stored as 0.
 * docs/quant_formats.md is the user-facing description of the same rules. */
#include "internal.h"

#include <math.h>
#include <stdlib.h>

int64_t kt_row_bytes(int fmt, int64_t K) {
    switch (fmt) {
    case KT_W_F32: return 4 * K;
    case KT_W_BF16: return 2 * K;
    case KT_W_I8:
    case KT_W_FP8: return K;
    default: return (K + 1) / 2;
    }
}

static inline float kt_clampf(float v, float lo, float hi) {
    return v < lo ? lo : (v > hi ? hi : v);
}

/* fp32 (|x| <= 448, finite) to the nearest FP8 E4M3 code, ties to even. */
static uint8_t kt_f32_to_fp8(float x) {
    uint8_t sign = signbit(x) ? 0x80 : 0;
    float a = fabsf(x);
    int e;
    frexpf(a, &e);             /* a in [2^(e-1), 2^e) */
    int E = KT_MAX(e - 1, -6); /* below 2^-6: the subnormal step 2^-9 */
    float step = ldexpf(1.0f, E - 3);
    float r = rintf(a / step) * step; /* exact: a power of two divides */
    if (r == 0.0f) return sign;
    if (r < 0x1p-6f) return (uint8_t)(sign | (int)(r / 0x1p-9f));
    frexpf(r, &e);
    int m = (int)(ldexpf(r, 1 - e) * 8.0f) - 8; /* r = 2^(e-1) (1 + m/8) */
    return (uint8_t)(sign | ((e - 1 + 7) << 3) | m);
}

/* fp32 to the nearest FP4 E2M1 code (ties to the even code, saturating). */
static int kt_f32_to_e2m1(float x) {
    float a = fabsf(x);
    int u = a <= 0.25f ? 0 : a < 0.75f ? 1 : a <= 1.25f ? 2 : a < 1.75f ? 3
          : a <= 2.5f ? 4 : a < 3.5f ? 5 : a <= 5.0f ? 6 : 7;
    return (u && x < 0.0f) ? u | 8 : u;
}

static void kt_put4(uint8_t *q, int64_t c, int u) {
    if (c & 1)
        q[c / 2] = (uint8_t)((q[c / 2] & 0x0F) | (u << 4));
    else
        q[c / 2] = (uint8_t)u; /* the high nibble follows (or stays 0: padding) */
}

ktmoe_status kt_quant_row(int fmt, int64_t gs, const float *x, int64_t K, void *qv,
                          float *scale, void *aux) {
    if (fmt == KT_W_BF16) {
        uint16_t *q = qv;
        for (int64_t c = 0; c < K; c++) q[c] = kt_f32_to_bf16(x[c]);
        return KTMOE_OK;
    }
    for (int64_t c = 0; c < K; c++)
        if (!isfinite(x[c]))
            return kt_error(KTMOE_ERR_INVALID_ARGUMENT,
                            "cannot quantize a weight that is NaN or infinite (column %lld)",
                            (long long)c);
    if (gs > K) gs = K;
    for (int64_t g = 0, c0 = 0; c0 < K; g++, c0 += gs) {
        int64_t n = KT_MIN(gs, K - c0);
        const float *xs = x + c0;
        float lo = xs[0], hi = xs[0], big = xs[0];
        for (int64_t i = 1; i < n; i++) {
            lo = fminf(lo, xs[i]);
            hi = fmaxf(hi, xs[i]);
            if (fabsf(xs[i]) > fabsf(big)) big = xs[i];
        }
        if (fmt == KT_W_I8) {
            int8_t *q = (int8_t *)qv + c0;
            float s = fabsf(big) / 127.0f;
            for (int64_t i = 0; i < n; i++)
                q[i] = s != 0.0f ? (int8_t)kt_clampf(rintf(xs[i] / s), -127.0f, 127.0f) : 0;
            scale[g] = s;
            continue;
        }
        if (fmt == KT_W_FP8) {
            uint8_t *q = (uint8_t *)qv + c0;
            float s = fabsf(big) / 448.0f;
            for (int64_t i = 0; i < n; i++)
                q[i] = s != 0.0f ? kt_f32_to_fp8(kt_clampf(xs[i] / s, -448.0f, 448.0f)) : 0;
            scale[g] = s;
            continue;
        }
        uint8_t *q = qv;
        float s;
        if (fmt == KT_W_MXFP4) {
            int e = -127;
            if (fabsf(big) > 0.0f) {
                frexpf(fabsf(big), &e); /* |big| in [2^(e-1), 2^e) */
                e = KT_MAX(KT_MIN(e - 1 - 2, 127), -127);
            }
            s = ldexpf(1.0f, e);
            for (int64_t i = 0; i < n; i++) kt_put4(q, c0 + i, kt_f32_to_e2m1(xs[i] / s));
        } else if (fmt == KT_W_I4S) {
            s = big / -8.0f;
            for (int64_t i = 0; i < n; i++)
                kt_put4(q, c0 + i, s != 0.0f ? (int)kt_clampf(rintf(xs[i] / s) + 8.0f, 0.0f, 15.0f) : 8);
        } else if (fmt == KT_W_I4M) {
            s = (hi - lo) / 15.0f;
            for (int64_t i = 0; i < n; i++)
                kt_put4(q, c0 + i, s != 0.0f ? (int)kt_clampf(rintf((xs[i] - lo) / s), 0.0f, 15.0f) : 0);
            ((float *)aux)[g] = lo;
        } else { /* KT_W_I4Z */
            lo = fminf(lo, 0.0f);
            hi = fmaxf(hi, 0.0f);
            s = (hi - lo) / 15.0f;
            float z = s != 0.0f ? kt_clampf(rintf(-lo / s), 0.0f, 15.0f) : 0.0f;
            for (int64_t i = 0; i < n; i++)
                kt_put4(q, c0 + i, s != 0.0f ? (int)kt_clampf(rintf(xs[i] / s) + z, 0.0f, 15.0f) : 0);
            ((uint8_t *)aux)[g] = (uint8_t)z;
        }
        scale[g] = s;
    }
    return KTMOE_OK;
}

void kt_quant_act(const float *x, int64_t K, int deint, int8_t *q, float *d, float *s) {
    for (int64_t b = 0; b < K / KT_QBLK; b++) {
        const float *xb = x + b * KT_QBLK;
        float amax = 0.0f;
        for (int i = 0; i < KT_QBLK; i++) amax = fmaxf(amax, fabsf(xb[i]));
        float db = amax / 127.0f;
        int sum = 0;
        for (int i = 0; i < KT_QBLK; i++) {
            int v = db != 0.0f ? (int)kt_clampf(rintf(xb[i] / db), -127.0f, 127.0f) : 0;
            q[kt_act_pos(deint, b * KT_QBLK + i)] = (int8_t)v;
            sum += v;
        }
        d[b] = db;
        s[b] = db * (float)sum;
    }
}

/* ------------------------------------------------------------------ */
/* public API                                                          */

ktmoe_status kt_method_format(int32_t method, int32_t group_size, int32_t zero_point, int *fmt,
                              int *kgroup) {
    switch (method) {
    case KTMOE_METHOD_BF16: *fmt = KT_W_BF16; *kgroup = 0; break;
    case KTMOE_METHOD_INT8: *fmt = KT_W_I8; *kgroup = 0; break;
    case KTMOE_METHOD_INT4: *fmt = KT_W_I4S; *kgroup = 0; break;
    case KTMOE_METHOD_INT4_1: *fmt = KT_W_I4M; *kgroup = 0; break;
    case KTMOE_METHOD_INT4_KGROUP: *fmt = zero_point ? KT_W_I4Z : KT_W_I4S; *kgroup = 1; break;
    case KTMOE_METHOD_INT4_1_KGROUP: *fmt = KT_W_I4M; *kgroup = 1; break;
    case KTMOE_METHOD_INT8_KGROUP: *fmt = KT_W_I8; *kgroup = 1; break;
    case KTMOE_METHOD_FP8: *fmt = KT_W_FP8; *kgroup = 1; break;
    case KTMOE_METHOD_MXFP4:
        *fmt = KT_W_MXFP4;
        *kgroup = 1;
        if (group_size != KTMOE_MXFP4_GROUP_SIZE)
            return kt_error(KTMOE_ERR_INVALID_ARGUMENT, "MXFP4 has groups of %d columns, got group_size %d",
                            KTMOE_MXFP4_GROUP_SIZE, group_size);
        break;
    default: return kt_error(KTMOE_ERR_UNSUPPORTED, "method %d is not supported", method);
    }
    if (*kgroup && (group_size <= 0 || group_size % KTMOE_GROUP_SIZE_MULTIPLE != 0))
        return kt_error(KTMOE_ERR_INVALID_ARGUMENT,
                        "group_size must be a positive multiple of %d, got %d",
                        KTMOE_GROUP_SIZE_MULTIPLE, group_size);
    return KTMOE_OK;
}

KTMOE_API ktmoe_status ktmoe_packed_layout_get(int32_t method, int32_t group_size, int32_t zero_point,
                                           int64_t cols, ktmoe_packed_layout *out) {
    int fmt, kgroup;
    if (!out) return kt_error(KTMOE_ERR_INVALID_ARGUMENT, "out must not be NULL");
    ktmoe_status st = kt_method_format(method, group_size, zero_point, &fmt, &kgroup);
    if (st != KTMOE_OK) return st;
    if (cols < 0) return kt_error(KTMOE_ERR_INVALID_ARGUMENT, "cols must not be negative");
    if (kgroup && cols % group_size != 0)
        return kt_error(KTMOE_ERR_INVALID_ARGUMENT,
                        "K (%lld) must be divisible by group_size (%d)", (long long)cols, group_size);
    out->row_bytes = kt_row_bytes(fmt, cols);
    out->groups = fmt == KT_W_BF16 ? 0 : (kgroup ? cols / group_size : 1);
    out->aux = fmt == KT_W_I4M ? 1 : (fmt == KT_W_I4Z ? 2 : 0);
    return KTMOE_OK;
}

typedef struct kt_qjob {
    int fmt;
    int64_t gs, K, G, rb;
    int src_dtype;
    const void *src;
    uint8_t *q;
    float *scale;
    void *aux;
} kt_qjob;

static ktmoe_status kt_quant_rows(const kt_qjob *j, int64_t r0, int64_t r1, float *x) {
    for (int64_t r = r0; r < r1; r++) {
        size_t es = j->src_dtype == KTMOE_DTYPE_F32 ? 4 : 2;
        kt_to_f32((const char *)j->src + (size_t)(r * j->K) * es, j->src_dtype, x, j->K);
        void *aux = j->aux == NULL ? NULL
                    : j->fmt == KT_W_I4Z ? (void *)((uint8_t *)j->aux + r * j->G)
                                         : (void *)((float *)j->aux + r * j->G);
        ktmoe_status st = kt_quant_row(j->fmt, j->gs, x, j->K, j->q + r * j->rb,
                                       j->scale ? j->scale + r * j->G : NULL, aux);
        if (st != KTMOE_OK) {
            char msg[256];
            kt_error_copy(msg, sizeof msg);
            return kt_error(st, "row %lld: %s", (long long)r, msg);
        }
    }
    return KTMOE_OK;
}

KTMOE_API ktmoe_status ktmoe_quantize(int32_t method, int32_t group_size, int32_t zero_point,
                                      ktmoe_dtype src_dtype, const void *src, int64_t rows,
                                      int64_t cols, void *qweight, float *scale, void *aux) {
    ktmoe_packed_layout lay;
    ktmoe_status st = ktmoe_packed_layout_get(method, group_size, zero_point, cols, &lay);
    if (st != KTMOE_OK) return st;
    if (src_dtype != KTMOE_DTYPE_BF16 && src_dtype != KTMOE_DTYPE_F32)
        return kt_error(KTMOE_ERR_INVALID_ARGUMENT, "unknown source dtype %d", (int)src_dtype);
    if (rows < 0) return kt_error(KTMOE_ERR_INVALID_ARGUMENT, "rows must not be negative");
    if (rows == 0 || cols == 0) return KTMOE_OK;
    if (!src || !qweight || (lay.groups && !scale) || (lay.aux && !aux))
        return kt_error(KTMOE_ERR_INVALID_ARGUMENT, "a pointer this format needs is NULL");
    kt_qjob j;
    int kgroup;
    kt_method_format(method, group_size, zero_point, &j.fmt, &kgroup);
    j.gs = kgroup ? group_size : cols;
    j.K = cols;
    j.G = lay.groups;
    j.rb = lay.row_bytes;
    j.src_dtype = src_dtype;
    j.src = src;
    j.q = qweight;
    j.scale = lay.groups ? scale : NULL;
    j.aux = lay.aux ? aux : NULL;
    float *x = malloc((size_t)cols * sizeof(float));
    if (!x) return kt_error(KTMOE_ERR_OUT_OF_MEMORY, "out of memory");
    st = kt_quant_rows(&j, 0, rows, x);
    free(x);
    return st;
}
