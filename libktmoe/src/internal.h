/* Internal declarations shared by the libktmoe sources. Not installed. */
#ifndef KTMOE_INTERNAL_H
#define KTMOE_INTERNAL_H

#include "ktmoe.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

#define KT_UNUSED(x) ((void)(x))
#define KT_MIN(a, b) ((a) < (b) ? (a) : (b))
#define KT_MAX(a, b) ((a) > (b) ? (a) : (b))

/* ---- errors (error.c) ------------------------------------------------ */

/* Records a printf-style message for ktmoe_last_error() and returns st. */
ktmoe_status kt_error(ktmoe_status st, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
void kt_error_clear(void);
/* Copies the current thread's message into buf (for handing errors across
 * threads). */
void kt_error_copy(char *buf, size_t size);
void kt_error_set_message(ktmoe_status st, const char *msg);

/* ---- memory --------------------------------------------------------- */

/* 64-byte aligned allocation; NULL on failure (sets the error message). */
void *kt_alloc(size_t bytes);
void kt_free(void *p);

/* A growable scratch buffer: reused between calls, grown when a call needs
 * more, never shrunk. */
typedef struct kt_buf {
    void *p;
    size_t bytes;
} kt_buf;
ktmoe_status kt_buf_reserve(kt_buf *b, size_t bytes);
void kt_buf_free(kt_buf *b);

/* ---- bf16 ------------------------------------------------------------ */

static inline float kt_bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Round to nearest even; NaN stays NaN. */
static inline uint16_t kt_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* dst[0..n) = src[0..n) of dtype (ktmoe_dtype: f32 or bf16) as fp32. */
static inline void kt_to_f32(const void *src, int dtype, float *dst, int64_t n) {
    if (dtype == KTMOE_DTYPE_F32) {
        memcpy(dst, src, (size_t)n * sizeof(float));
    } else {
        const uint16_t *s = src;
        for (int64_t i = 0; i < n; i++) dst[i] = kt_bf16_to_f32(s[i]);
    }
}

/* ---- CPU features (cpu.c) ------------------------------------------- */

uint32_t kt_cpu_features(void);
/* 1 where 512-bit vectors run at full width (not AMD Zen 4, whose AVX-512
 * units are 256 bits wide: there the avx512 tier keeps the 256-bit panel
 * kernels, 5 % faster on it); KTMOE_ZMM=0|1 overrides. */
int kt_cpu_wide512(void);
int kt_numa_node_count(void);
/* CPUs of NUMA node `node` into cpus[] (at most max); returns the count. */
int kt_numa_node_cpus(int node, int *cpus, int max);

/* ---- weight matrices (quant.c) --------------------------------------- */

/* Storage formats of a weight matrix W [rows][cols] as the kernels read it.
 * Element (r, c), with g = (g0 + c) / gs the group of column c:
 *   F32, BF16   the value
 *   I8          q * scale[r][g]                   (q int8)
 *   I4S         (u - 8) * scale[r][g]             (u the 4-bit code)
 *   I4Z         (u - zero[r][g]) * scale[r][g]    (zero uint8 in aux)
 *   I4M         u * scale[r][g] + min[r][g]       (min float in aux)
 *   FP8         e4m3(q) * scale[r][g]             (q an FP8 E4M3 code)
 *   MXFP4       e2m1(u) * scale[r][g]             (u a 4-bit FP4 E2M1 code;
 *               OCP MX: groups of 32, scale a power of two)
 * 4-bit codes: column c of a row is the low nibble of byte c/2 for even c,
 * the high nibble for odd c. */
enum { KT_W_F32 = 0, KT_W_BF16, KT_W_I8, KT_W_I4S, KT_W_I4Z, KT_W_I4M, KT_W_FP8, KT_W_MXFP4 };

typedef struct kt_wmat {
    int fmt;
    const void *data;    /* element (0, 0): an even column for 4-bit formats */
    int64_t ld;          /* row stride: elements, or bytes for 4-bit formats */
    const float *scale;  /* the group of element (0, 0)                     */
    const void *aux;     /* min (float) or zero (uint8) groups, like scale   */
    int64_t ldg;         /* row stride of scale and aux, in groups           */
    int64_t gs;          /* columns per group (any value >= cols: per row)   */
    int64_t g0;          /* column of element (0, 0) within its group        */
} kt_wmat;

/* Pseudo-formats of the panel kernels: int8 or I4S codes as their integer
 * values (I4S: u - 8), without the scale: the outer form's W whose scales
 * are all 1 (W->ldg == 0, W->scale[0] == 1: the caller has folded the
 * scales into D), and the dot form's W with one scale a row, multiplied
 * into each output once. */
enum { KT_RAW_I8 = 8, KT_RAW_I4S = 9 };

/* W's format for the outer form: its raw pseudo-format when every scale is 1. */
static inline int kt_outer_fmt(const kt_wmat *W) {
    int fmt = W->fmt;
    if ((fmt == KT_W_I8 || fmt == KT_W_I4S) && W->ldg == 0 && W->scale[0] == 1.0f)
        fmt = fmt == KT_W_I8 ? KT_RAW_I8 : KT_RAW_I4S;
    return fmt;
}

/* Whether columns [j, j + n) of a quantized W lie in one group. */
static inline int kt_cols_one_group(const kt_wmat *W, int64_t j, int64_t n) {
    return (W->g0 + j) % W->gs + n <= W->gs;
}

/* The 4-bit integer formats (the integer kernels' 4-bit codes). */
static inline int kt_fmt_is_int4(int fmt) {
    return fmt == KT_W_I4S || fmt == KT_W_I4Z || fmt == KT_W_I4M;
}

/* Formats stored as two 4-bit codes a byte. */
static inline int kt_fmt_is_4bit(int fmt) { return kt_fmt_is_int4(fmt) || fmt == KT_W_MXFP4; }

/* FP4 E2M1 (OCP MX): bit 3 the sign, then 2 exponent bits and 1 mantissa
 * bit; magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6. */
static inline float kt_e2m1_to_f32(int u) {
    static const float mag[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
    return (u & 8) ? -mag[u & 7] : mag[u & 7];
}

/* FP8 E4M3 (the "fn" variant: no infinities; S.1111.111 is NaN, which the
 * loaders reject) to fp32: the 7 magnitude bits shifted into an fp32's
 * exponent and mantissa fields, rebiased by 2^(127-7).  Exact, subnormals
 * included. */
static inline float kt_fp8_to_f32(uint8_t v) {
    uint32_t bits = (uint32_t)(v & 0x7F) << 20;
    float f;
    memcpy(&f, &bits, sizeof f);
    f *= 0x1p120f;
    return (v & 0x80) ? -f : f;
}

/* A plain (F32 or BF16) matrix with row stride ld elements. */
static inline kt_wmat kt_plain(int fmt, const void *data, int64_t ld) {
    kt_wmat w = {fmt, data, ld, NULL, NULL, 0, INT64_MAX, 0};
    return w;
}

/* The sub-matrix starting at row r0, column c0 (c0 even for 4-bit). */
static inline kt_wmat kt_wsub(const kt_wmat *w, int64_t r0, int64_t c0) {
    kt_wmat s = *w;
    int64_t c = w->g0 + c0;
    switch (w->fmt) {
    case KT_W_F32: s.data = (const float *)w->data + r0 * w->ld + c0; return s;
    case KT_W_BF16: s.data = (const uint16_t *)w->data + r0 * w->ld + c0; return s;
    case KT_W_I8:
    case KT_W_FP8: s.data = (const int8_t *)w->data + r0 * w->ld + c0; break;
    default: s.data = (const uint8_t *)w->data + r0 * w->ld + c0 / 2; break;
    }
    s.scale = w->scale + r0 * w->ldg + c / w->gs;
    if (w->aux)
        s.aux = w->fmt == KT_W_I4Z ? (const void *)((const uint8_t *)w->aux + r0 * w->ldg + c / w->gs)
                                   : (const void *)((const float *)w->aux + r0 * w->ldg + c / w->gs);
    s.g0 = c % w->gs;
    return s;
}

/* The integer code of element (r, c) (int8 q, or the 4-bit u) and, through
 * *off, its group's offset per unit of code: value = code * scale + off. */
static inline int kt_w_code(const kt_wmat *w, int64_t r, int64_t c) {
    if (w->fmt == KT_W_I8) return ((const int8_t *)w->data)[r * w->ld + c];
    uint8_t byte = ((const uint8_t *)w->data)[r * w->ld + c / 2];
    return (c & 1) ? byte >> 4 : byte & 15;
}

static inline float kt_w_offset(const kt_wmat *w, int64_t r, int64_t g) {
    float s = w->scale[r * w->ldg + g];
    switch (w->fmt) {
    case KT_W_I4S: return -8.0f * s;
    case KT_W_I4Z: return -(float)((const uint8_t *)w->aux)[r * w->ldg + g] * s;
    case KT_W_I4M: return ((const float *)w->aux)[r * w->ldg + g];
    default: return 0.0f;
    }
}

/* Element (r, c) as fp32: the readable definition of every format.  The
 * vector tiers compute exactly these fp32 values (integer offset first,
 * then one multiply; I4M: multiply, then add). */
static inline float kt_w_at(const kt_wmat *w, int64_t r, int64_t c) {
    if (w->fmt == KT_W_F32) return ((const float *)w->data)[r * w->ld + c];
    if (w->fmt == KT_W_BF16) return kt_bf16_to_f32(((const uint16_t *)w->data)[r * w->ld + c]);
    int64_t g = (w->g0 + c) / w->gs;
    float s = w->scale[r * w->ldg + g];
    if (w->fmt == KT_W_I8) return (float)((const int8_t *)w->data)[r * w->ld + c] * s;
    if (w->fmt == KT_W_FP8) return kt_fp8_to_f32(((const uint8_t *)w->data)[r * w->ld + c]) * s;
    uint8_t byte = ((const uint8_t *)w->data)[r * w->ld + c / 2];
    int u = (c & 1) ? byte >> 4 : byte & 15;
    switch (w->fmt) {
    case KT_W_MXFP4: return kt_e2m1_to_f32(u) * s;
    case KT_W_I4S: return (float)(u - 8) * s;
    case KT_W_I4Z: return (float)(u - ((const uint8_t *)w->aux)[r * w->ldg + g]) * s;
    default: return (float)u * s + ((const float *)w->aux)[r * w->ldg + g];
    }
}

/* Quantizes one row x[0..K) into the packed layout of `fmt` with groups of
 * gs columns (gs >= K: one group): codes into q, group scales into scale,
 * min/zero into aux.  BF16 rounds to bf16 (q as uint16).  Returns
 * KTMOE_ERR_INVALID_ARGUMENT (message set) on a non-finite input. */
ktmoe_status kt_quant_row(int fmt, int64_t gs, const float *x, int64_t K, void *q, float *scale,
                          void *aux);
/* Bytes of one packed row of K columns. */
int64_t kt_row_bytes(int fmt, int64_t K);
/* The storage format of a ktmoe_method (with its options); *kgroup is 1
 * for the K-group methods.  Checks group_size for those. */
ktmoe_status kt_method_format(int32_t method, int32_t group_size, int32_t zero_point, int *fmt,
                              int *kgroup);

/* ---- int8 activations (quant.c) --------------------------------------- */

/* The integer kernels (inference forward) take activations quantized per
 * block of KT_QBLK columns: d = max|x| / 127, q = rint(x / d) (d = 0: q = 0),
 * and the block sum s = d * sum(q). */
#define KT_QBLK 32

typedef struct kt_qact {
    const int8_t *q;   /* codes, row i at q + i * ldq                  */
    const float *d;    /* block scales, row i at d + i * ldb             */
    const float *s;    /* block sums, row i at s + i * ldb               */
    int64_t ldq, ldb;
    int deint;         /* layout of the codes: see kt_act_pos              */
} kt_qact;

/* Position of column c of a row in activation layout `deint`, the order
 * 4-bit weight codes unpack in (low nibbles = even columns, then high):
 *   0  column order (int8 weights)
 *   1  per block of 32: the 16 even columns, then the 16 odd ones
 *   2  per pair of blocks (64 columns): the even columns of both blocks,
 *      then the odd ones (K and the group size multiples of 64). */
static inline int64_t kt_act_pos(int deint, int64_t c) {
    int64_t k = c % KT_QBLK, half = (k & 1) ? KT_QBLK / 2 : 0;
    if (deint == 0) return c;
    if (deint == 1) return c - k + half + k / 2;
    int64_t r = c % (2 * KT_QBLK), blk = r / KT_QBLK;
    return c - r + 2 * half + blk * (KT_QBLK / 2) + k / 2;
}

/* Quantizes x[0..K) (K % KT_QBLK == 0) into q (in layout deint),
 * d[K / KT_QBLK] and s[...]. */
void kt_quant_act(const float *x, int64_t K, int deint, int8_t *q, float *d, float *s);

/* ---- kernel tables (dispatch.c, kernels/<tier>/) --------------------- */

/* Dot form:  C[i][j] (+)= sum_k A_i[k] * W(j, k)
 *   A_i = a + (aidx ? aidx[i] : i) * lda (fp32 rows), W any kt_wmat.
 * Outer form: C[i][j] (+)= sum_k D(i,k) * W(widx ? widx[k] : k, j)
 *   D(i,k) = d[(didx ? didx[i] : i) * dsi + k * dsk] (fp32, any strides).
 * accum = 0 overwrites C, 1 adds to it.  m, n, K >= 0; K == 0 with accum 0
 * writes zeros.  For quantized W the column origin of the calls is a
 * multiple of 8 and group sizes are multiples of 8 (vector tiers dequantize
 * 8 columns at a time). */
typedef void (*kt_dot_fn)(int64_t m, int64_t n, int64_t K, const float *a,
                          int64_t lda, const int32_t *aidx, const kt_wmat *w,
                          float *c, int64_t ldc, int accum);
typedef void (*kt_outer_fn)(int64_t m, int64_t n, int64_t K, const float *d,
                            int64_t dsi, int64_t dsk, const int32_t *didx,
                            const kt_wmat *w, const int32_t *widx,
                            float *c, int64_t ldc, int accum);
/* The expert activation (ktmoe_moe_config.activation). */
typedef struct kt_activation {
    int kind;           /* KTMOE_ACT_SILU or KTMOE_ACT_SWIGLU_CLAMP */
    float alpha, limit; /* SWIGLU_CLAMP                              */
} kt_activation;

/* h[i] = act(g[i], u[i]): silu(g) * u, or the clamped SwiGLU of GPT-OSS
 * (gc = min(g, limit), uc = clamp(u, -limit, limit),
 *  h = gc * sigmoid(alpha gc) * (uc + 1)). */
typedef void (*kt_act_fwd_fn)(int64_t n, const float *g, const float *u,
                              float *h, const kt_activation *a);
/* Given dh (unscaled by the routing weight) and g, u, with scale w:
 *   dot += sum dh*h;  g <- w*dh*dh/dg;  u <- w*dh*dh/du
 * g and u are overwritten with their gradients; returns the dot product.
 * A clamp passes the gradient where its input lies within the bounds
 * (bounds included, as torch.clamp). */
typedef float (*kt_act_bwd_fn)(int64_t n, const float *dh, float *g, float *u,
                               float w, const kt_activation *a);
/* kt_quant_act's result, bit for bit */
typedef void (*kt_quant_act_fn)(const float *x, int64_t K, int deint, int8_t *q, float *d, float *s);

/* The clamped SwiGLU of one element (the scalar definition, and the vector
 * tiers' tails): the forward value, and the backward as kt_act_bwd_fn
 * (returns dh * h; *g, *u become their gradients). */
static inline float kt_swiglu_clamp1(float g, float u, const kt_activation *a) {
    float gc = fminf(g, a->limit), uc = fminf(fmaxf(u, -a->limit), a->limit);
    return gc / (1.0f + expf(-a->alpha * gc)) * (uc + 1.0f);
}

static inline float kt_swiglu_clamp_bwd1(float dh, float *g, float *u, float w, const kt_activation *a) {
    float gc = fminf(*g, a->limit), uc = fminf(fmaxf(*u, -a->limit), a->limit);
    float sg = 1.0f / (1.0f + expf(-a->alpha * gc)), glu = gc * sg;
    float dglu = sg * (1.0f + a->alpha * gc * (1.0f - sg));
    float d = w * dh;
    float du = (*u >= -a->limit && *u <= a->limit) ? d * glu : 0.0f;
    *g = *g <= a->limit ? d * (uc + 1.0f) * dglu : 0.0f;
    *u = du;
    return dh * glu * (uc + 1.0f);
}

/* Integer dot form: C[i][j] = sum_k X_i[k] * W(j, k) with X_i the int8
 * activation row (aidx ? aidx[i] : i) of x and W of an integer format (I8,
 * I4S, I4Z, I4M).  Per block b of 32 columns and weight group g:
 *   C += (d_b * s_g) * sum_k q_k c_k  +  off_g * sum_b
 * with c the weight code (int8 q, or the 4-bit u) and off_g the group's
 * offset per unit code sum (0, -8 s, -zero s, min).  K, the group size and
 * W's column origin are multiples of 32. */
typedef void (*kt_qdot_fn)(int64_t m, int64_t n, int64_t K, const kt_qact *x,
                           const int32_t *aidx, const kt_wmat *w, float *c,
                           int64_t ldc);

typedef struct kt_kernels {
    ktmoe_isa isa;
    kt_dot_fn dot;       /* a row's sums in an order that does not depend on m */
    kt_dot_fn dot_many;  /* NULL, or free to order the sums by m (faster for
                          * many rows; ktmoe_moe_config.batch_invariant = 0) */
    kt_outer_fn outer;   /* a row's sums in an order that does not depend on m */
    kt_outer_fn outer_many; /* NULL, or free to choose its path by m
                             * (batch_invariant = 0: the SFT backward) */
    kt_qdot_fn qdot;     /* a row's sums in an order that does not depend on m */
    kt_qdot_fn qdot_many; /* NULL, or free to choose its path by m
                           * (batch_invariant = 0) */
    kt_act_fwd_fn act_fwd;
    kt_act_bwd_fn act_bwd;
    kt_quant_act_fn quant_act;
    int bwd_cols; /* 0, or the columns one task of the SFT backward gives
                   * the outer form in dh = dO Wd and dx = dg Wg + du Wu
                   * (default 64; at most 256, the scratch's limit) */
} kt_kernels;

const kt_kernels *kt_kernels_get(ktmoe_isa isa); /* NULL if not compiled */
extern const kt_kernels kt_kernels_ref;
extern const kt_kernels kt_kernels_avx2;
extern const kt_kernels kt_kernels_avx512;      /* without AVX512-VNNI */
extern const kt_kernels kt_kernels_avx512_vnni;
extern const kt_kernels kt_kernels_amx;
/* The avx2 tier's kernels, which the avx512 tables share. */
void kt_quant_act_avx2(const float *x, int64_t K, int deint, int8_t *q, float *d, float *s);
void kt_dot_avx2(int64_t m, int64_t n, int64_t K, const float *a, int64_t lda,
                 const int32_t *aidx, const kt_wmat *w, float *c, int64_t ldc, int accum);
void kt_dot_many_avx2(int64_t m, int64_t n, int64_t K, const float *a, int64_t lda,
                      const int32_t *aidx, const kt_wmat *w, float *c, int64_t ldc, int accum);
void kt_outer_avx2(int64_t m, int64_t n, int64_t K, const float *d, int64_t dsi, int64_t dsk,
                   const int32_t *didx, const kt_wmat *w, const int32_t *widx, float *c,
                   int64_t ldc, int accum);
/* The avx2 tier's panel packing, which the avx512 panel kernels share: W
 * to fp32 panels of KT_PANEL_W floats a row (64-byte aligned rows), at most
 * KT_PANEL_K rows.  Outer form: panel[k - k0] = W row k (widx[k] if given),
 * columns [j, j + 8 nvec).  Dot form: panel[k] = column k0 + k of W rows
 * [j, j + 8 nvec) (W transposed; kc a multiple of 8). */
#define KT_PANEL_W 32
#define KT_PANEL_K 128
/* The avx512 tier's panel kernels (kernels/avx512/panels_avx512.c). */
void kt_outer_avx512(int64_t m, int64_t n, int64_t K, const float *d, int64_t dsi, int64_t dsk,
                     const int32_t *didx, const kt_wmat *w, const int32_t *widx, float *c,
                     int64_t ldc, int accum);
void kt_dot_many_avx512(int64_t m, int64_t n, int64_t K, const float *a, int64_t lda,
                        const int32_t *aidx, const kt_wmat *w, float *c, int64_t ldc, int accum);
void kt_outer_pack_avx2(float *panel, const kt_wmat *W, const int32_t *widx, int64_t k0,
                        int64_t k1, int64_t j, int nvec);
void kt_dot_tpack_avx2(float *panel, const kt_wmat *W, int64_t j, int nvec, int64_t k0,
                       int64_t kc, int raw);
int kt_dot_fold_ok(const kt_wmat *W, int64_t K, int accum);
void kt_dot_col_scales(const kt_wmat *W, int64_t j, int nvec, float *cs);
void kt_qdot_avx2(int64_t m, int64_t n, int64_t K, const kt_qact *x, const int32_t *aidx,
                  const kt_wmat *w, float *c, int64_t ldc);
/* The amx tier's AMX-INT8 integer dot form (kernels/amx/qdot_amx.c): int8
 * or 4-bit integer codes, int8 W with activations in layout 0. */
void kt_qdot_amx_int8(int64_t m, int64_t n, int64_t K, const kt_qact *x, const int32_t *aidx,
                      const kt_wmat *w, float *c, int64_t ldc);
void kt_act_fwd_avx2(int64_t n, const float *g, const float *u, float *h, const kt_activation *a);
float kt_act_bwd_avx2(int64_t n, const float *dh, float *g, float *u, float w, const kt_activation *a);

/* ---- pool (pool.c) --------------------------------------------------- */

typedef struct kt_worker_ctx {
    int sub;        /* sub-pool index                  */
    int tid;        /* thread index within the sub-pool */
    int nthreads;   /* threads of the sub-pool          */
    int gtid;       /* global thread index              */
    void *scratch;  /* per-thread scratch (KT_SCRATCH_BYTES) */
} kt_worker_ctx;

#define KT_SCRATCH_BYTES ((size_t)1 << 20)
#define KT_MAX_SUBPOOLS 256

/* Runs fn(ctx, sub, task) for task in [0, ntasks[sub]) on the threads of
 * each sub-pool sub (ntasks has one entry per sub-pool).  Threads that
 * finish their own sub-pool's tasks help the others.  Called only from a
 * task running on the queue thread. */
typedef void (*kt_par_fn)(void *ctx, const kt_worker_ctx *w, int sub,
                          int64_t task);
void kt_pool_parallel(ktmoe_pool *pool, const int64_t *ntasks, kt_par_fn fn,
                      void *ctx);
/* Runs fn over [0, ntasks) on all threads of all sub-pools (sub = 0). */
void kt_pool_parallel_all(ktmoe_pool *pool, int64_t ntasks, kt_par_fn fn,
                          void *ctx);
/* Queues fn(user); release(user) runs after it (or at once on failure). */
ktmoe_status kt_pool_submit_owned(ktmoe_pool *pool, ktmoe_task_fn fn,
                                  void *user, void (*release)(void *));

#endif
