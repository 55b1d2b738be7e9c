/* One MoE layer with LoRA: weights, forward, backward, the forward cache.
 *
 * Layout.  The intermediate dimension I is split into `tp` slices, one per
 * sub-pool.  Slice s owns rows [i0, i0 + Is) of Wg and Wu and the same
 * columns of Wd, stored row-major per expert in the layer's packed format
 * (bf16, int8 or 4-bit codes, with per-row or per-group scales):
 * gate[e][Is][H], down[e][H][Is].  That one copy serves the forward (x W^T:
 * dot form, along rows) and the backward (dh W: outer form, rows contiguous
 * along the output); the kernels dequantize panels of it on the fly.
 *
 * Token-expert pairs are grouped by expert ("routing"); pair p of expert e
 * sits at p in [off[e], off[e+1]) and reads token tok[p] with weight pw[p].
 *
 * Forward, per slice s (partials summed over slices where noted):
 *   F1  xs = s * [x Ag^T | x Au^T]                     [pairs, 2r]
 *   F2  g = x Wg^T + xs_g Bg^T, u likewise; h = silu(g) u  (g, u cached)
 *   F3  hs = s * sum_slices h Ad^T                     [pairs, r]
 *   F4  y = sum_slices h Wd^T + hs Bd^T                [pairs, H]
 *   F5  out[t] = sum_j w_tj y[pair(t, j)]
 * Without LoRA (no F1, F3), F2 and F4 share one parallel region
 * (kt_fwd_fused): an expert's F4 tiles start once its F2 tiles are done.
 * Backward with dO = dOut (the weight w is applied after the down GEMM):
 *   B1  dbs = s * dO Bd,  whs = w * hs                 [pairs, r]
 *   B2  dhu = dO Wd + dbs Ad;  dw += <dhu, h>;  dg, du from w * dhu;
 *       dAd = (w dbs)^T h;  dBg = dg^T xs_g;  dBu = du^T xs_u
 *   B3  dgus = s * sum_slices [dg Bg | du Bu]          [pairs, 2r]
 *   B4  dx_pair = sum_slices dg Wg + du Wu + dgus [Ag; Au];
 *       then per expert (slice 0, same parallel loop):
 *       dAg = dgus_g^T x;  dAu = dgus_u^T x;  dBd = dO^T whs
 *   B5  dx[t] = sum_j dx_pair(t, j);  dw[t, j] = sum of partials
 */
#include "internal.h"

#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>

#define KT_TN 64  /* column tile of the big GEMMs        */
#define KT_MC 64  /* row chunk of the backward epilogue  */

/* One projection of one slice, all experts, packed. */
typedef struct kt_proj {
    uint8_t *data;   /* [E][rows][rb bytes]                  */
    float *scale;    /* [E][rows][G] (NULL for bf16)         */
    void *aux;       /* [E][rows][G] min or zero, or NULL    */
    int fmt;         /* KT_W_*                               */
    int64_t kgs;     /* K-group size, 0 for one group a row  */
    int64_t rows, cols, ld, rb, G, gs;
} kt_proj;

enum { PG, PU, PD }; /* gate, up, down */

typedef struct kt_slice {
    int64_t i0;
    kt_proj p[3];
} kt_slice;

/* Activations of one forward, kept for its backward. */
typedef struct kt_cache {
    int64_t qlen, npairs;
    int32_t nactive;
    int use_lora;
    kt_buf x;     /* f32 [qlen, H]                                   */
    kt_buf off;   /* int64 [E + 1]                                    */
    kt_buf tok;   /* int32 [npairs]                                   */
    kt_buf pos;   /* int32 [qlen * k]: pair of slot (t, j)            */
    kt_buf pw;    /* f32 [npairs]                                     */
    kt_buf act;   /* int32 [E]: active experts                        */
    kt_buf g, u;  /* f32 [tp][npairs][Is]                             */
    kt_buf xs;    /* f32 [npairs][2r]                                 */
    kt_buf hs;    /* f32 [npairs][r]                                  */
} kt_cache;

struct ktmoe_moe {
    ktmoe_pool *pool;
    const kt_kernels *kern;
    int tp;
    int64_t E, k, H, I, Is, r;
    int64_t ldh; /* row stride of the fp32 [.][H] buffers x, dO, y (kt_pad_row_bytes) */
    float scale;
    kt_activation act;
    kt_dot_fn dot; /* kern->dot, or kern->dot_many (batch_invariant = 0) */
    kt_outer_fn outer; /* kern->outer, or kern->outer_many (batch_invariant = 0) */
    kt_qdot_fn qdot;   /* kern->qdot, or kern->qdot_many (batch_invariant = 0) */
    int max_depth;

    kt_slice *slices;
    int weights_loaded;

    int lora_dtype;
    const void *la[6]; /* gate_a, gate_b, up_a, up_b, down_a, down_b */

    pthread_mutex_t mu;  /* guards pending (submit side) */
    int pending;
    int depth;           /* caches in use (queue side) */
    kt_cache *caches;    /* [max_depth] */
    kt_cache nosave;     /* forward without save_for_backward */

    /* scratch reused between calls */
    kt_buf h, y, dO, part, dgus, dbs, whs, dwp, cursor;
    kt_buf f2left; /* atomic_int [tp][nactive]: kt_fwd_fused's counters */
    kt_buf xq, xd, xsum, hq, hd, hsum; /* int8 activations (inference forward) */
};

enum { LGA, LGB, LUA, LUB, LDA, LDB };

/* ------------------------------------------------------------------ */
/* small helpers                                                       */

static void kt_cache_free(kt_cache *c) {
    kt_buf_free(&c->x);
    kt_buf_free(&c->off);
    kt_buf_free(&c->tok);
    kt_buf_free(&c->pos);
    kt_buf_free(&c->pw);
    kt_buf_free(&c->act);
    kt_buf_free(&c->g);
    kt_buf_free(&c->u);
    kt_buf_free(&c->xs);
    kt_buf_free(&c->hs);
}

static size_t kt_cache_bytes(const kt_cache *c) {
    return c->x.bytes + c->off.bytes + c->tok.bytes + c->pos.bytes + c->pw.bytes +
           c->act.bytes + c->g.bytes + c->u.bytes + c->xs.bytes + c->hs.bytes;
}

static inline float *F(const kt_buf *b) { return (float *)b->p; }

/* dst[rows][cols] (leading dim ldd, of dtype) (+)= src[rows][cols] (lds). */
static void kt_store(void *dst, int dtype, int64_t ldd, const float *src,
                     int64_t lds, int64_t rows, int64_t cols, int accum) {
    for (int64_t i = 0; i < rows; i++) {
        const float *s = src + i * lds;
        if (dtype == KTMOE_DTYPE_F32) {
            float *d = (float *)dst + i * ldd;
            if (accum)
                for (int64_t j = 0; j < cols; j++) d[j] += s[j];
            else
                memcpy(d, s, (size_t)cols * sizeof(float));
        } else {
            uint16_t *d = (uint16_t *)dst + i * ldd;
            for (int64_t j = 0; j < cols; j++)
                d[j] = kt_f32_to_bf16(accum ? kt_bf16_to_f32(d[j]) + s[j] : s[j]);
        }
    }
}

static inline size_t kt_dsize(int dtype) { return dtype == KTMOE_DTYPE_F32 ? 4 : 2; }

/* Pointer to element `idx` of an array of dtype. */
static inline void *kt_at(const void *base, int dtype, int64_t idx) {
    return (char *)base + (size_t)idx * kt_dsize(dtype);
}

/* The row size to allocate for rows of `bytes` that a kernel reads or
 * writes several of at once (packed weight rows, fp32 activation rows): a
 * multiple of 1 KB is padded by one cache line.  A weight panel reads one
 * line of each of 128 rows, a micro-kernel tile 6 rows of C or D at one
 * column; rows 4 KB apart put them all in one of the L1's 64 sets, where
 * prefetched weight lines evicted each other and C rows stalled on 4K
 * aliasing (1.6 % more memory for bf16 weight rows of 4 KB, 6.3 % for
 * 4-bit rows of 1 KB). */
static int64_t kt_pad_row_bytes(int64_t bytes) { return bytes % 1024 == 0 ? bytes + 64 : bytes; }

/* LoRA factor `which` from element off, row stride ld. */
static kt_wmat kt_lora(const ktmoe_moe *m, int which, int64_t off, int64_t ld) {
    int fmt = m->lora_dtype == KTMOE_DTYPE_BF16 ? KT_W_BF16 : KT_W_F32;
    return kt_plain(fmt, kt_at(m->la[which], m->lora_dtype, off), ld);
}

/* An fp32 activation matrix used as the W operand. */
static kt_wmat kt_act(const float *p, int64_t ld) { return kt_plain(KT_W_F32, p, ld); }

static size_t kt_aux_size(int fmt) { return fmt == KT_W_I4Z ? 1 : 4; }
static int kt_has_aux(int fmt) { return fmt == KT_W_I4M || fmt == KT_W_I4Z; }

/* Frozen projection pj of slice s, expert e, from row r0 and column c0. */
static kt_wmat kt_frozen(const ktmoe_moe *m, int s, int pj, int64_t e, int64_t r0, int64_t c0) {
    const kt_proj *p = &m->slices[s].p[pj];
    int64_t ge = e * p->rows * p->G;
    kt_wmat w = {p->fmt, p->data + e * p->rows * p->rb, p->ld,
                 p->scale ? p->scale + ge : NULL,
                 p->aux ? (const void *)((const char *)p->aux + ge * kt_aux_size(p->fmt)) : NULL,
                 p->G, p->gs, 0};
    return kt_wsub(&w, r0, c0);
}

static void kt_free_weights(ktmoe_moe *m) {
    if (!m->slices) return;
    for (int s = 0; s < m->tp; s++)
        for (int pj = 0; pj < 3; pj++) {
            kt_proj *p = &m->slices[s].p[pj];
            kt_free(p->data);
            kt_free(p->scale);
            kt_free(p->aux);
            p->data = NULL;
            p->scale = NULL;
            p->aux = NULL;
        }
    m->weights_loaded = 0;
}

/* ------------------------------------------------------------------ */
/* creation                                                            */

KTMOE_API void ktmoe_moe_config_init(ktmoe_moe_config *c) {
    if (!c) return;
    memset(c, 0, sizeof *c);
    c->struct_size = sizeof *c;
    c->method = KTMOE_METHOD_BF16;
    c->lora_rank = 16;
    c->lora_alpha = 32.0f;
    c->max_cache_depth = 1;
    c->isa = KTMOE_ISA_AUTO;
    c->group_size = 128;
    c->zero_point = 1;
    for (int pj = 0; pj < 3; pj++) c->proj_method[pj] = -1;
    c->activation = KTMOE_ACT_SILU;
    c->act_alpha = 1.702f;
    c->act_limit = 7.0f;
    c->batch_invariant = 1;
}

KTMOE_API ktmoe_status ktmoe_moe_create(ktmoe_pool *pool, const ktmoe_moe_config *cfg,
                                        ktmoe_moe **out) {
    if (!pool || !cfg || !out)
        return kt_error(KTMOE_ERR_INVALID_ARGUMENT, "pool, config and out must not be NULL");
    *out = NULL;
    /* a caller built against an older, shorter config gets defaults for
     * the fields it does not know */
    const size_t v1_size = offsetof(ktmoe_moe_config, group_size);
    if (cfg->struct_size < v1_size || cfg->struct_size > sizeof(ktmoe_moe_config))
        return kt_error(KTMOE_ERR_INVALID_ARGUMENT,
                        "ktmoe_moe_config.struct_size is %u, expected %zu",
                        cfg->struct_size, sizeof(ktmoe_moe_config));
    ktmoe_moe_config full;
    ktmoe_moe_config_init(&full);
    memcpy(&full, cfg, cfg->struct_size);
    const ktmoe_moe_config *c = &full;
    int fmt[3], kgroup[3];
    int64_t gsz[3];
    for (int pj = 0; pj < 3; pj++) {
        int32_t meth = c->proj_method[pj] >= 0 ? c->proj_method[pj] : c->method;
        int32_t gs = c->proj_method[pj] >= 0 ? c->proj_group_size[pj] : c->group_size;
        int32_t zp = c->proj_method[pj] >= 0 ? c->proj_zero_point[pj] : c->zero_point;
        ktmoe_status st = kt_method_format(meth, gs, zp, &fmt[pj], &kgroup[pj]);
        if (st != KTMOE_OK) return st;
        gsz[pj] = kgroup[pj] ? gs : 0;
    }
    if (c->activation != KTMOE_ACT_SILU && c->activation != KTMOE_ACT_SWIGLU_CLAMP)
        return kt_error(KTMOE_ERR_INVALID_ARGUMENT, "unknown activation %d", c->activation);
    if (c->activation == KTMOE_ACT_SWIGLU_CLAMP &&
        !(isfinite(c->act_alpha) && c->act_alpha > 0 && isfinite(c->act_limit) && c->act_limit > 0))
        return kt_error(KTMOE_ERR_INVALID_ARGUMENT, "act_alpha and act_limit must be finite and positive, "
                        "got %g and %g", (double)c->act_alpha, (double)c->act_limit);
    if (c->num_experts <= 0) return kt_error(KTMOE_ERR_INVALID_ARGUMENT, "num_experts must be positive, got %lld", (long long)c->num_experts);
    if (c->hidden_size <= 0) return kt_error(KTMOE_ERR_INVALID_ARGUMENT, "hidden_size must be positive, got %lld", (long long)c->hidden_size);
    if (c->intermediate_size <= 0) return kt_error(KTMOE_ERR_INVALID_ARGUMENT, "moe_intermediate_size must be positive, got %lld", (long long)c->intermediate_size);
    if (c->experts_per_token <= 0) return kt_error(KTMOE_ERR_INVALID_ARGUMENT, "num_experts_per_tok must be positive, got %lld", (long long)c->experts_per_token);
    if (c->experts_per_token > c->num_experts)
        return kt_error(KTMOE_ERR_INVALID_ARGUMENT, "num_experts_per_tok (%lld) cannot exceed num_experts (%lld)",
                        (long long)c->experts_per_token, (long long)c->num_experts);
    if (c->lora_rank <= 0) return kt_error(KTMOE_ERR_INVALID_ARGUMENT, "lora_rank must be positive, got %d", c->lora_rank);
    if (!(c->lora_alpha > 0.0f)) return kt_error(KTMOE_ERR_INVALID_ARGUMENT, "lora_alpha must be positive, got %g", (double)c->lora_alpha);
    if (c->max_cache_depth <= 0) return kt_error(KTMOE_ERR_INVALID_ARGUMENT, "max_cache_depth must be positive, got %d", c->max_cache_depth);
    if (c->num_experts > INT32_MAX || c->hidden_size > 65536 || c->intermediate_size > 65536)
        return kt_error(KTMOE_ERR_UNSUPPORTED, "hidden_size or moe_intermediate_size above 65536, "
                        "or num_experts above 2^31-1, are not supported");
    if (c->lora_rank > 256)
        return kt_error(KTMOE_ERR_UNSUPPORTED, "lora_rank above 256 is not supported, got %d", c->lora_rank);
    int tp = ktmoe_pool_subpool_count(pool);
    if (c->intermediate_size % tp != 0)
        return kt_error(KTMOE_ERR_INVALID_ARGUMENT,
                        "intermediate_size (%lld) must be divisible by threadpool_count (%d)",
                        (long long)c->intermediate_size, tp);
    for (int pj = 0; pj < 3; pj++) {
        int64_t gs = gsz[pj], Is = c->intermediate_size / tp;
        if (!gs) continue;
        if (pj != PD && c->hidden_size % gs != 0)
            return kt_error(KTMOE_ERR_INVALID_ARGUMENT,
                            "hidden_size (%lld) must be divisible by group_size (%lld)",
                            (long long)c->hidden_size, (long long)gs);
        if (pj == PD && c->intermediate_size % gs != 0)
            return kt_error(KTMOE_ERR_INVALID_ARGUMENT,
                            "moe_intermediate_size (%lld) must be divisible by group_size (%lld)",
                            (long long)c->intermediate_size, (long long)gs);
        if (pj == PD && Is % gs != 0)
            return kt_error(KTMOE_ERR_INVALID_ARGUMENT,
                            "moe_intermediate_size / threadpool_count (%lld) must be divisible by "
                            "group_size (%lld)", (long long)Is, (long long)gs);
    }
    ktmoe_isa isa = c->isa == KTMOE_ISA_AUTO ? ktmoe_isa_selected() : (ktmoe_isa)c->isa;
    if (!ktmoe_isa_name(isa) || isa == KTMOE_ISA_AUTO)
        return kt_error(KTMOE_ERR_INVALID_ARGUMENT, "unknown isa %d", c->isa);
    if (!ktmoe_isa_usable(isa))
        return kt_error(KTMOE_ERR_UNSUPPORTED, "ISA tier '%s' is %s", ktmoe_isa_name(isa),
                        ktmoe_isa_compiled(isa) ? "not supported by this CPU" : "not compiled in");

    ktmoe_moe *m = calloc(1, sizeof *m);
    if (!m) return kt_error(KTMOE_ERR_OUT_OF_MEMORY, "out of memory");
    m->pool = pool;
    m->kern = kt_kernels_get(isa);
    m->tp = tp;
    m->E = c->num_experts;
    m->k = c->experts_per_token;
    m->H = c->hidden_size;
    m->I = c->intermediate_size;
    m->Is = m->I / tp;
    m->ldh = kt_pad_row_bytes(m->H * 4) / 4;
    m->r = c->lora_rank;
    m->scale = c->lora_alpha / (float)c->lora_rank;
    m->act.kind = c->activation;
    m->act.alpha = c->act_alpha;
    m->act.limit = c->act_limit;
    /* the dot kernel of the forward products (frozen weights and LoRA) */
    m->dot = !c->batch_invariant && m->kern->dot_many ? m->kern->dot_many : m->kern->dot;
    m->outer = !c->batch_invariant && m->kern->outer_many ? m->kern->outer_many : m->kern->outer;
    m->qdot = !c->batch_invariant && m->kern->qdot_many ? m->kern->qdot_many : m->kern->qdot;
    m->max_depth = c->max_cache_depth;
    pthread_mutex_init(&m->mu, NULL);
    m->slices = calloc((size_t)tp, sizeof(kt_slice));
    m->caches = calloc((size_t)m->max_depth, sizeof(kt_cache));
    if (!m->slices || !m->caches) {
        ktmoe_moe_destroy(m);
        return kt_error(KTMOE_ERR_OUT_OF_MEMORY, "out of memory");
    }
    for (int s = 0; s < tp; s++) {
        kt_slice *sl = &m->slices[s];
        sl->i0 = s * m->Is;
        for (int pj = 0; pj < 3; pj++) {
            kt_proj *p = &sl->p[pj];
            p->rows = pj == PD ? m->H : m->Is;
            p->cols = pj == PD ? m->Is : m->H;
            p->fmt = fmt[pj];
            p->kgs = gsz[pj];
            p->rb = kt_pad_row_bytes(kt_row_bytes(p->fmt, p->cols));
            p->ld = kt_fmt_is_4bit(p->fmt) ? p->rb : p->rb / kt_row_bytes(p->fmt, 1);
            p->G = p->fmt == KT_W_BF16 ? 0 : (p->kgs ? p->cols / p->kgs : 1);
            p->gs = p->kgs ? p->kgs : p->cols;
        }
    }
    *out = m;
    return KTMOE_OK;
}

KTMOE_API void ktmoe_moe_destroy(ktmoe_moe *m) {
    if (!m) return;
    kt_free_weights(m);
    if (m->caches)
        for (int i = 0; i < m->max_depth; i++) kt_cache_free(&m->caches[i]);
    kt_cache_free(&m->nosave);
    kt_buf *bufs[] = {&m->h,  &m->y,  &m->dO,   &m->part, &m->dgus, &m->dbs, &m->whs, &m->dwp,
                      &m->cursor, &m->f2left, &m->xq, &m->xd, &m->xsum, &m->hq, &m->hd, &m->hsum};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) kt_buf_free(bufs[i]);
    pthread_mutex_destroy(&m->mu);
    free(m->slices);
    free(m->caches);
    free(m);
}

KTMOE_API ktmoe_isa ktmoe_moe_isa(const ktmoe_moe *m) {
    return m ? m->kern->isa : KTMOE_ISA_REF;
}

/* Bytes of each part of projection p (all experts). */
static void kt_proj_bytes(const ktmoe_moe *m, const kt_proj *p, size_t *data, size_t *scale,
                          size_t *aux) {
    *data = (size_t)(m->E * p->rows * p->rb);
    *scale = p->G ? (size_t)(m->E * p->rows * p->G) * 4 : 0;
    *aux = kt_has_aux(p->fmt) ? (size_t)(m->E * p->rows * p->G) * kt_aux_size(p->fmt) : 0;
}

KTMOE_API int64_t ktmoe_moe_weight_bytes(const ktmoe_moe *m) {
    if (!m || !m->weights_loaded) return 0;
    size_t total = 0, d, s, a;
    for (int sl = 0; sl < m->tp; sl++)
        for (int pj = 0; pj < 3; pj++) {
            kt_proj_bytes(m, &m->slices[sl].p[pj], &d, &s, &a);
            total += d + s + a;
        }
    return (int64_t)total;
}

KTMOE_API int64_t ktmoe_moe_buffer_bytes(const ktmoe_moe *m) {
    if (!m) return 0;
    size_t b = kt_cache_bytes(&m->nosave);
    for (int i = 0; i < m->max_depth; i++) b += kt_cache_bytes(&m->caches[i]);
    b += m->xq.bytes + m->xd.bytes + m->xsum.bytes + m->hq.bytes + m->hd.bytes + m->hsum.bytes;
    b += m->h.bytes + m->y.bytes + m->dO.bytes + m->part.bytes + m->dgus.bytes +
         m->dbs.bytes + m->whs.bytes + m->dwp.bytes;
    return (int64_t)b;
}

KTMOE_API int32_t ktmoe_moe_cache_depth(const ktmoe_moe *m) {
    if (!m) return 0;
    pthread_mutex_lock((pthread_mutex_t *)&m->mu);
    int d = m->pending;
    pthread_mutex_unlock((pthread_mutex_t *)&m->mu);
    return d;
}

/* ------------------------------------------------------------------ */
/* weights                                                             */

typedef struct kt_load_ctx {
    ktmoe_moe *m;
    const void *src[3]; /* unpacked source: gate, up, down of src_dtype */
    int src_dtype;
    ktmoe_packed packed[3]; /* or packed source (packed != 0)        */
    int packed_src;
    const int64_t *map;
    atomic_int failed;
    pthread_mutex_t mu;
    ktmoe_status st;
    char msg[256];
} kt_load_ctx;

static const char *const kt_proj_names[3] = {"gate", "up", "down"};

static void kt_load_fail(kt_load_ctx *c, ktmoe_status st) {
    pthread_mutex_lock(&c->mu);
    if (!atomic_load(&c->failed)) {
        kt_error_copy(c->msg, sizeof c->msg);
        c->st = st;
        atomic_store(&c->failed, 1);
    }
    pthread_mutex_unlock(&c->mu);
}

/* Columns [c0, c0 + n) of a packed row of projection p's format (data q,
 * groups s and a) into a packed destination row. */
static void kt_copy_cols(const kt_proj *p, const uint8_t *q, const float *s, const void *a,
                         int64_t c0, int64_t n, uint8_t *dq, float *ds, void *da) {
    int fmt = p->fmt;
    if (kt_fmt_is_4bit(fmt)) {
        if (c0 % 2 == 0) {
            memcpy(dq, q + c0 / 2, (size_t)(n / 2));
            if (n % 2) dq[n / 2] = q[(c0 + n - 1) / 2] & 0x0F;
        } else {
            memset(dq, 0, (size_t)((n + 1) / 2));
            for (int64_t i = 0; i < n; i++) {
                int64_t c = c0 + i;
                int u = (c & 1) ? q[c / 2] >> 4 : q[c / 2] & 15;
                dq[i / 2] |= (uint8_t)((i & 1) ? u << 4 : u);
            }
        }
    } else {
        size_t es = (size_t)kt_row_bytes(fmt, 1);
        memcpy(dq, q + c0 * (int64_t)es, (size_t)n * es);
    }
    if (!ds) return;
    int64_t g0 = p->kgs ? c0 / p->kgs : 0, ng = p->kgs ? n / p->kgs : 1;
    memcpy(ds, s + g0, (size_t)ng * 4);
    if (da) {
        size_t as = kt_aux_size(fmt);
        memcpy(da, (const char *)a + g0 * (int64_t)as, (size_t)ng * as);
    }
}

/* Checks the scales (and zero points) of one packed source row. */
static ktmoe_status kt_check_groups(int fmt, const float *s, const void *a, int64_t G) {
    for (int64_t g = 0; g < G; g++) {
        if (!isfinite(s[g]))
            return kt_error(KTMOE_ERR_INVALID_ARGUMENT, "scale of group %lld is not finite", (long long)g);
        if (fmt == KT_W_I4M && !isfinite(((const float *)a)[g]))
            return kt_error(KTMOE_ERR_INVALID_ARGUMENT, "min of group %lld is not finite", (long long)g);
        if (fmt == KT_W_I4Z && ((const uint8_t *)a)[g] > 15)
            return kt_error(KTMOE_ERR_INVALID_ARGUMENT, "zero point of group %lld is %d, above 15",
                            (long long)g, ((const uint8_t *)a)[g]);
    }
    return KTMOE_OK;
}

/* Task t = (expert e, projection pj): every row of the source expert, packed
 * (or quantized here), scattered to the slices. */
static void kt_load_job(void *vctx, const kt_worker_ctx *w, int sub, int64_t t) {
    KT_UNUSED(sub);
    kt_load_ctx *c = vctx;
    if (atomic_load(&c->failed)) return;
    ktmoe_moe *m = c->m;
    int64_t e = t / 3, src = c->map ? c->map[e] : e;
    int pj = (int)(t % 3);
    const kt_proj *p0 = &m->slices[0].p[pj];
    int64_t rows = pj == PD ? m->H : m->I, cols = pj == PD ? m->I : m->H;
    int fmt = p0->fmt;
    int64_t kgs = p0->kgs, rb = kt_row_bytes(fmt, cols), G = p0->G ? (kgs ? cols / kgs : 1) : 0;
    size_t as = kt_aux_size(fmt), auxb = kt_has_aux(fmt) ? as : 0;
    /* scratch: x [cols] f32, q [rb], s [G], a [G] */
    float *x = w->scratch;
    uint8_t *tq = (uint8_t *)(x + cols);
    float *ts = (float *)(tq + ((rb + 63) & ~(int64_t)63));
    void *ta = ts + G;
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *q;
        const float *sc = NULL;
        const void *ax = NULL;
        int64_t srow = src * rows + r;
        ktmoe_status st;
        if (c->packed_src) {
            const ktmoe_packed *pk = &c->packed[pj];
            q = (const uint8_t *)pk->qweight + srow * rb;
            if (G) sc = pk->scale + srow * G;
            if (auxb) ax = (const char *)pk->aux + srow * G * (int64_t)as;
            st = G ? kt_check_groups(fmt, sc, ax, G) : KTMOE_OK;
            for (int64_t i = 0; fmt == KT_W_FP8 && st == KTMOE_OK && i < cols; i++)
                if ((q[i] & 0x7F) == 0x7F)
                    st = kt_error(KTMOE_ERR_INVALID_ARGUMENT, "FP8 code 0x%02x (NaN) at column %lld",
                                  q[i], (long long)i);
        } else {
            kt_to_f32(kt_at(c->src[pj], c->src_dtype, srow * cols), c->src_dtype, x, cols);
            st = kt_quant_row(fmt, kgs ? kgs : cols, x, cols, tq, G ? ts : NULL, auxb ? ta : NULL);
            q = tq;
            sc = ts;
            ax = ta;
        }
        if (st != KTMOE_OK) {
            char why[200];
            kt_error_copy(why, sizeof why);
            kt_load_fail(c, kt_error(st, "expert %lld, %s_proj row %lld: %s", (long long)src,
                                     kt_proj_names[pj], (long long)r, why));
            return;
        }
        for (int s = 0; s < m->tp; s++) {
            const kt_slice *sl = &m->slices[s];
            const kt_proj *p = &sl->p[pj];
            int64_t lr, c0;
            if (pj == PD) {
                lr = r;
                c0 = sl->i0;
            } else {
                if (r < sl->i0 || r >= sl->i0 + m->Is) continue;
                lr = r - sl->i0;
                c0 = 0;
            }
            int64_t drow = e * p->rows + lr;
            kt_copy_cols(p, q, sc, ax, c0, p->cols, p->data + drow * p->rb,
                         p->G ? p->scale + drow * p->G : NULL,
                         auxb ? (char *)p->aux + drow * p->G * (int64_t)as : NULL);
        }
    }
}

static ktmoe_status kt_load_task(void *vctx) {
    kt_load_ctx *c = vctx;
    kt_pool_parallel_all(c->m->pool, c->m->E * 3, kt_load_job, c);
    if (atomic_load(&c->failed)) {
        kt_error_set_message(c->st, c->msg);
        return c->st;
    }
    return KTMOE_OK;
}

static ktmoe_status kt_check_map(const ktmoe_moe *m, const int64_t *map, int64_t src_experts) {
    if (!map && src_experts != m->E)
        return kt_error(KTMOE_ERR_INVALID_ARGUMENT,
                        "without a map the source must hold num_experts (%lld) experts, got %lld",
                        (long long)m->E, (long long)src_experts);
    if (map)
        for (int64_t e = 0; e < m->E; e++)
            if (map[e] < 0 || map[e] >= src_experts)
                return kt_error(KTMOE_ERR_INVALID_ARGUMENT,
                                "physical_to_logical_map[%lld] = %lld is out of range [0, %lld)",
                                (long long)e, (long long)map[e], (long long)src_experts);
    return KTMOE_OK;
}

static ktmoe_status kt_alloc_weights(ktmoe_moe *m) {
    for (int s = 0; s < m->tp; s++)
        for (int pj = 0; pj < 3; pj++) {
            kt_proj *p = &m->slices[s].p[pj];
            size_t d, sc, a;
            if (p->data) continue;
            kt_proj_bytes(m, p, &d, &sc, &a);
            p->data = kt_alloc(d);
            p->scale = sc ? kt_alloc(sc) : NULL;
            p->aux = a ? kt_alloc(a) : NULL;
            if (!p->data || (sc && !p->scale) || (a && !p->aux)) {
                kt_free_weights(m);
                return kt_error(KTMOE_ERR_OUT_OF_MEMORY, "out of memory allocating the expert weights");
            }
        }
    return KTMOE_OK;
}

/* Runs a load on the pool and waits; the layer is unloaded on failure. */
static ktmoe_status kt_load_run(ktmoe_moe *m, kt_load_ctx *ctx) {
    ktmoe_status st = kt_alloc_weights(m);
    if (st != KTMOE_OK) return st;
    ctx->m = m;
    atomic_init(&ctx->failed, 0);
    pthread_mutex_init(&ctx->mu, NULL);
    m->weights_loaded = 0;
    st = ktmoe_pool_submit(m->pool, kt_load_task, ctx);
    if (st == KTMOE_OK) st = ktmoe_pool_sync(m->pool);
    pthread_mutex_destroy(&ctx->mu);
    if (st == KTMOE_OK) m->weights_loaded = 1;
    return st;
}

KTMOE_API ktmoe_status ktmoe_moe_load_weights(ktmoe_moe *m, const void *gate, const void *up,
                                              const void *down, ktmoe_dtype dtype,
                                              const int64_t *map, int64_t src_experts) {
    if (!m || !gate || !up || !down)
        return kt_error(KTMOE_ERR_INVALID_ARGUMENT, "moe and weight pointers must not be NULL");
    if (dtype != KTMOE_DTYPE_BF16 && dtype != KTMOE_DTYPE_F32)
        return kt_error(KTMOE_ERR_INVALID_ARGUMENT, "unknown weight dtype %d", (int)dtype);
    ktmoe_status st = kt_check_map(m, map, src_experts);
    if (st != KTMOE_OK) return st;
    kt_load_ctx ctx;
    memset(&ctx, 0, sizeof ctx);
    ctx.src[PG] = gate;
    ctx.src[PU] = up;
    ctx.src[PD] = down;
    ctx.src_dtype = dtype;
    ctx.map = map;
    return kt_load_run(m, &ctx);
}

KTMOE_API ktmoe_status ktmoe_moe_load_packed(ktmoe_moe *m, const ktmoe_packed *gate,
                                             const ktmoe_packed *up, const ktmoe_packed *down,
                                             const int64_t *map, int64_t src_experts) {
    if (!m || !gate || !up || !down)
        return kt_error(KTMOE_ERR_INVALID_ARGUMENT, "moe and packed weights must not be NULL");
    const ktmoe_packed *pk[3] = {gate, up, down};
    for (int pj = 0; pj < 3; pj++) {
        int fmt = m->slices[0].p[pj].fmt;
        if (!pk[pj]->qweight || (fmt != KT_W_BF16 && !pk[pj]->scale) || (kt_has_aux(fmt) && !pk[pj]->aux))
            return kt_error(KTMOE_ERR_INVALID_ARGUMENT, "%s_proj: a part this method needs is NULL",
                            kt_proj_names[pj]);
    }
    ktmoe_status st = kt_check_map(m, map, src_experts);
    if (st != KTMOE_OK) return st;
    kt_load_ctx ctx;
    memset(&ctx, 0, sizeof ctx);
    for (int pj = 0; pj < 3; pj++) ctx.packed[pj] = *pk[pj];
    ctx.packed_src = 1;
    ctx.map = map;
    return kt_load_run(m, &ctx);
}

KTMOE_API ktmoe_status ktmoe_moe_set_lora(ktmoe_moe *m, ktmoe_dtype dtype, const void *ga,
                                          const void *gb, const void *ua, const void *ub,
                                          const void *da, const void *db) {
    if (!m) return kt_error(KTMOE_ERR_INVALID_ARGUMENT, "moe must not be NULL");
    if (dtype != KTMOE_DTYPE_BF16 && dtype != KTMOE_DTYPE_F32)
        return kt_error(KTMOE_ERR_INVALID_ARGUMENT, "unknown LoRA dtype %d", (int)dtype);
    const void *p[6] = {ga, gb, ua, ub, da, db};
    int nnull = 0;
    for (int i = 0; i < 6; i++) nnull += p[i] == NULL;
    if (nnull != 0 && nnull != 6)
        return kt_error(KTMOE_ERR_INVALID_ARGUMENT, "either all six LoRA pointers or none must be given");
    /* Tasks already queued read the old pointers: rebind in queue order. */
    ktmoe_status st = ktmoe_pool_sync(m->pool);
    if (st != KTMOE_OK) return st;
    m->lora_dtype = dtype;
    memcpy(m->la, p, sizeof p);
    return KTMOE_OK;
}

/* ------------------------------------------------------------------ */
/* routing                                                             */

static ktmoe_status kt_route(ktmoe_moe *m, kt_cache *c, int64_t qlen, const int64_t *ids,
                             const float *weights) {
    int64_t E = m->E, k = m->k, np = qlen * k;
    ktmoe_status st;
    if ((st = kt_buf_reserve(&c->off, (size_t)(E + 1) * 8)) ||
        (st = kt_buf_reserve(&c->tok, (size_t)np * 4)) ||
        (st = kt_buf_reserve(&c->pos, (size_t)np * 4)) ||
        (st = kt_buf_reserve(&c->pw, (size_t)np * 4)) ||
        (st = kt_buf_reserve(&c->act, (size_t)E * 4)))
        return st;
    int64_t *off = c->off.p;
    int32_t *tok = c->tok.p, *pos = c->pos.p, *act = c->act.p;
    float *pw = c->pw.p;
    memset(off, 0, (size_t)(E + 1) * 8);
    for (int64_t i = 0; i < np; i++) {
        int64_t e = ids[i];
        if (e == KTMOE_SKIP_EXPERT) continue;
        if (e < 0 || e >= E)
            return kt_error(KTMOE_ERR_INVALID_ARGUMENT,
                            "expert id %lld at [%lld, %lld] is out of range [0, %lld)",
                            (long long)e, (long long)(i / k), (long long)(i % k), (long long)E);
        off[e + 1]++;
    }
    int32_t na = 0;
    for (int64_t e = 0; e < E; e++) {
        if (off[e + 1] > 0) act[na++] = (int32_t)e;
        off[e + 1] += off[e];
    }
    /* place each slot at its expert's running cursor */
    if ((st = kt_buf_reserve(&m->cursor, (size_t)E * 8))) return st;
    int64_t *cur = m->cursor.p;
    memcpy(cur, off, (size_t)E * 8);
    for (int64_t i = 0; i < np; i++) {
        if (ids[i] == KTMOE_SKIP_EXPERT) {
            pos[i] = -1;
            continue;
        }
        int64_t p = cur[ids[i]]++;
        tok[p] = (int32_t)(i / k);
        pw[p] = weights[i];
        pos[i] = (int32_t)p;
    }
    c->qlen = qlen;
    c->npairs = off[E];
    c->nactive = na;
    return KTMOE_OK;
}

/* Expert of active index ai; *o = its first pair, *cnt = its pair count. */
static inline int64_t kt_expert(const kt_cache *c, int64_t ai, int64_t *o, int64_t *cnt) {
    int64_t e = ((const int32_t *)c->act.p)[ai];
    *o = ((const int64_t *)c->off.p)[e];
    *cnt = ((const int64_t *)c->off.p)[e + 1] - *o;
    return e;
}

/* acc[0..H) = sum_j w_j sum_s rows_s[pair(t, j)], rows_s = rows + s*np*H;
 * w_j is the routing weight when `weighted`, else 1. */
static void kt_sum_pairs(const ktmoe_moe *m, const kt_cache *c, const float *rows, int64_t t,
                         int weighted, float *acc) {
    int64_t H = m->H, k = m->k, np = c->npairs;
    memset(acc, 0, (size_t)H * 4);
    for (int64_t j = 0; j < k; j++) {
        int64_t p = ((const int32_t *)c->pos.p)[t * k + j];
        if (p < 0) continue; /* skipped slot */
        float wt = weighted ? ((const float *)c->pw.p)[p] : 1.0f;
        for (int s = 0; s < m->tp; s++) {
            const float *y = rows + (s * np + p) * m->ldh;
            for (int64_t i = 0; i < H; i++) acc[i] += wt * y[i];
        }
    }
}

/* ------------------------------------------------------------------ */
/* forward                                                             */

typedef struct kt_fwd {
    ktmoe_moe *m;
    kt_cache *c;
    ktmoe_forward_args a;
    int lora;
    int qact; /* the integer kernels on int8 activations */
    int64_t tn, ntile_i, ntile_h; /* column tile of F2 and F4, tiles of I and H */
    /* F2-F4 in one parallel region (kt_fwd_fused): per (slice, active
     * expert), 1 + its F2 tiles not done yet; 0 once its h is ready */
    atomic_int *left;
} kt_fwd;

/* The activation layout (kt_act_pos) for projections pj0..pj1 reading K
 * columns: the order 4-bit weights unpack in when they all are 4-bit, by
 * pairs of blocks where K and their groups allow.  x feeds gate and up, h
 * feeds down. */
static int kt_act_layout(const ktmoe_moe *m, int pj0, int pj1, int64_t K) {
    int pairs = K % (2 * KT_QBLK) == 0;
    for (int pj = pj0; pj <= pj1; pj++) {
        const kt_proj *p = &m->slices[0].p[pj];
        if (!kt_fmt_is_int4(p->fmt)) return 0;
        if (p->kgs % (2 * KT_QBLK)) pairs = 0;
    }
    return pairs ? 2 : 1;
}
static int kt_x_deint(const ktmoe_moe *m) { return kt_act_layout(m, PG, PU, m->H); }
static int kt_h_deint(const ktmoe_moe *m) { return kt_act_layout(m, PD, PD, m->Is); }

/* The int8 activations of x (rows = tokens) or h (rows = slice-major pairs). */
static kt_qact kt_xact(const ktmoe_moe *m) {
    kt_qact a = {m->xq.p, F(&m->xd), F(&m->xsum), m->H, m->H / KT_QBLK, kt_x_deint(m)};
    return a;
}
static kt_qact kt_hact(const ktmoe_moe *m, const kt_cache *c, int s, int64_t o) {
    int64_t row = s * c->npairs + o, Is = m->Is;
    kt_qact a = {(const int8_t *)m->hq.p + row * Is, F(&m->hd) + row * (Is / KT_QBLK),
                 F(&m->hsum) + row * (Is / KT_QBLK), Is, Is / KT_QBLK, kt_h_deint(m)};
    return a;
}

static void kt_fwd_input(void *v, const kt_worker_ctx *w, int sub, int64_t t) {
    KT_UNUSED(w);
    KT_UNUSED(sub);
    kt_fwd *f = v;
    ktmoe_moe *m = f->m;
    int64_t H = m->H;
    float *x = F(&f->c->x) + t * m->ldh;
    kt_to_f32(kt_at(f->a.input, f->a.input_dtype, t * H), f->a.input_dtype, x, H);
    if (f->qact)
        m->kern->quant_act(x, H, kt_x_deint(m), (int8_t *)m->xq.p + t * H, F(&m->xd) + t * (H / KT_QBLK),
                           F(&m->xsum) + t * (H / KT_QBLK));
}

/* F2b (integer path): int8 activations of h, one pair of a slice */
static void kt_fwd_quant_h(void *v, const kt_worker_ctx *w, int s, int64_t p) {
    KT_UNUSED(w);
    kt_fwd *f = v;
    ktmoe_moe *m = f->m;
    int64_t Is = m->Is, row = s * f->c->npairs + p;
    m->kern->quant_act(F(&m->h) + row * Is, Is, kt_h_deint(m), (int8_t *)m->hq.p + row * Is,
                       F(&m->hd) + row * (Is / KT_QBLK), F(&m->hsum) + row * (Is / KT_QBLK));
}

/* F1: xs = s [x Ag^T | x Au^T] */
static void kt_fwd_lora_a(void *v, const kt_worker_ctx *w, int sub, int64_t ai) {
    KT_UNUSED(w);
    KT_UNUSED(sub);
    kt_fwd *f = v;
    ktmoe_moe *m = f->m;
    kt_cache *c = f->c;
    int64_t o, cnt, e = kt_expert(c, ai, &o, &cnt), H = m->H, r = m->r;
    const int32_t *tok = (int32_t *)c->tok.p + o;
    float *xs = F(&c->xs) + o * 2 * r;
    kt_wmat ag = kt_lora(m, LGA, e * r * H, H), au = kt_lora(m, LUA, e * r * H, H);
    m->dot(cnt, r, H, F(&c->x), m->ldh, tok, &ag, xs, 2 * r, 0);
    m->dot(cnt, r, H, F(&c->x), m->ldh, tok, &au, xs + r, 2 * r, 0);
    for (int64_t i = 0; i < cnt * 2 * r; i++) xs[i] *= m->scale;
}

/* F2: g, u, h for one (expert, I tile) of a slice */
static void kt_fwd_gate_up(void *v, const kt_worker_ctx *w, int s, int64_t task) {
    KT_UNUSED(w);
    kt_fwd *f = v;
    ktmoe_moe *m = f->m;
    kt_cache *c = f->c;
    int64_t o, cnt, e = kt_expert(c, task / f->ntile_i, &o, &cnt), j0 = (task % f->ntile_i) * f->tn;
    int64_t H = m->H, Is = m->Is, r = m->r, tn = KT_MIN(f->tn, Is - j0), np = c->npairs;
    const int32_t *tok = (int32_t *)c->tok.p + o;
    float *g = F(&c->g) + s * np * Is + o * Is + j0;
    float *u = F(&c->u) + s * np * Is + o * Is + j0;
    float *h = F(&m->h) + s * np * Is + o * Is + j0;
    kt_wmat wg = kt_frozen(m, s, PG, e, j0, 0), wu = kt_frozen(m, s, PU, e, j0, 0);
    if (f->qact) {
        kt_qact xa = kt_xact(m);
        m->qdot(cnt, tn, H, &xa, tok, &wg, g, Is);
        m->qdot(cnt, tn, H, &xa, tok, &wu, u, Is);
    } else {
        m->dot(cnt, tn, H, F(&c->x), m->ldh, tok, &wg, g, Is, 0);
        m->dot(cnt, tn, H, F(&c->x), m->ldh, tok, &wu, u, Is, 0);
    }
    if (f->lora) {
        int64_t brow = (e * m->I + m->slices[s].i0 + j0) * r;
        const float *xs = F(&c->xs) + o * 2 * r;
        kt_wmat bg = kt_lora(m, LGB, brow, r), bu = kt_lora(m, LUB, brow, r);
        m->dot(cnt, tn, r, xs, 2 * r, NULL, &bg, g, Is, 1);
        m->dot(cnt, tn, r, xs + r, 2 * r, NULL, &bu, u, Is, 1);
    }
    for (int64_t i = 0; i < cnt; i++) m->kern->act_fwd(tn, g + i * Is, u + i * Is, h + i * Is, &m->act);
}

/* F3: partial h Ad^T of a slice, for one expert */
static void kt_fwd_down_a(void *v, const kt_worker_ctx *w, int s, int64_t ai) {
    KT_UNUSED(w);
    kt_fwd *f = v;
    ktmoe_moe *m = f->m;
    kt_cache *c = f->c;
    int64_t o, cnt, e = kt_expert(c, ai, &o, &cnt), Is = m->Is, r = m->r, np = c->npairs;
    const float *h = F(&m->h) + s * np * Is + o * Is;
    float *part = F(&m->part) + (s * np + o) * r;
    kt_wmat ad = kt_lora(m, LDA, e * r * m->I + m->slices[s].i0, m->I);
    m->dot(cnt, r, Is, h, Is, NULL, &ad, part, r, 0);
}

/* F4: y = h Wd^T (+ hs Bd^T on slice 0) for one (expert, H tile) */
static void kt_fwd_down(void *v, const kt_worker_ctx *w, int s, int64_t task) {
    KT_UNUSED(w);
    kt_fwd *f = v;
    ktmoe_moe *m = f->m;
    kt_cache *c = f->c;
    int64_t o, cnt, e = kt_expert(c, task / f->ntile_h, &o, &cnt), n0 = (task % f->ntile_h) * f->tn;
    int64_t H = m->H, Is = m->Is, r = m->r, tn = KT_MIN(f->tn, H - n0), np = c->npairs;
    const float *h = F(&m->h) + s * np * Is + o * Is;
    float *y = F(&m->y) + (s * np + o) * m->ldh + n0;
    kt_wmat wd = kt_frozen(m, s, PD, e, n0, 0);
    if (f->qact) {
        kt_qact ha = kt_hact(m, c, s, o);
        m->qdot(cnt, tn, Is, &ha, NULL, &wd, y, m->ldh);
    } else {
        m->dot(cnt, tn, Is, h, Is, NULL, &wd, y, m->ldh, 0);
    }
    if (f->lora && s == 0) {
        kt_wmat bd = kt_lora(m, LDB, (e * H + n0) * r, r);
        m->dot(cnt, tn, r, F(&c->hs) + o * r, r, NULL, &bd, y, m->ldh, 1);
    }
}

/* F2 and F4 without LoRA in one parallel region, so that no thread waits at
 * a barrier between them: tasks [0, nactive ntile_i) are F2's, in expert
 * order, the rest F4's, in the same order.  The thread that finishes an
 * expert's last F2 tile quantizes its h rows (integer path), then sets the
 * expert's counter to 0; an F4 task waits for that 0.  Every F2 task is claimed
 * before any F4 task (one counter per slice, taken in order), and F2 tasks
 * wait for nothing, so the wait ends.  A decode token's threads otherwise
 * idled at each barrier for up to a task (a quarter-MB weight tile). */
static void kt_fwd_fused(void *v, const kt_worker_ctx *w, int s, int64_t task) {
    kt_fwd *f = v;
    kt_cache *c = f->c;
    int64_t nf2 = c->nactive * f->ntile_i;
    if (task < nf2) {
        kt_fwd_gate_up(v, w, s, task);
        int64_t ai = task / f->ntile_i;
        atomic_int *left = &f->left[s * c->nactive + ai];
        if (atomic_fetch_sub_explicit(left, 1, memory_order_acq_rel) == 2) { /* the expert's last tile */
            if (f->qact) {
                int64_t o, cnt;
                kt_expert(c, ai, &o, &cnt);
                for (int64_t p = o; p < o + cnt; p++) kt_fwd_quant_h(v, w, s, p);
            }
            atomic_store_explicit(left, 0, memory_order_release);
        }
        return;
    }
    task -= nf2;
    atomic_int *left = &f->left[s * c->nactive + task / f->ntile_h];
    for (int n = 0; atomic_load_explicit(left, memory_order_acquire) != 0; n++)
        if (n >= 64) sched_yield();
    kt_fwd_down(v, w, s, task);
}

/* F5: out[t] = sum_j w_tj y[pair(t, j)] */
static void kt_fwd_combine(void *v, const kt_worker_ctx *w, int sub, int64_t t) {
    KT_UNUSED(sub);
    kt_fwd *f = v;
    int64_t H = f->m->H;
    kt_sum_pairs(f->m, f->c, F(&f->m->y), t, 1, w->scratch);
    kt_store(kt_at(f->a.output, f->a.output_dtype, t * H), f->a.output_dtype, H, w->scratch, H, 1, H, 0);
}

static ktmoe_status kt_fwd_reserve(ktmoe_moe *m, kt_cache *c, int64_t qlen) {
    int64_t np = qlen * m->k, tp = m->tp;
    ktmoe_status st;
    if ((st = kt_buf_reserve(&c->x, (size_t)(qlen * m->ldh) * 4)) ||
        (st = kt_buf_reserve(&c->g, (size_t)(np * m->I) * 4)) ||
        (st = kt_buf_reserve(&c->u, (size_t)(np * m->I) * 4)) ||
        (st = kt_buf_reserve(&c->xs, (size_t)(np * 2 * m->r) * 4)) ||
        (st = kt_buf_reserve(&c->hs, (size_t)(np * m->r) * 4)) ||
        (st = kt_buf_reserve(&m->h, (size_t)(np * m->I) * 4)) ||
        (st = kt_buf_reserve(&m->y, (size_t)(tp * np * m->ldh) * 4)) ||
        (st = kt_buf_reserve(&m->part, (size_t)(tp * np * 2 * m->r) * 4)))
        return st;
    return KTMOE_OK;
}

static ktmoe_status kt_qact_reserve(ktmoe_moe *m, int64_t qlen) {
    int64_t np = qlen * m->k, nbx = qlen * (m->H / KT_QBLK), nbh = np * (m->I / KT_QBLK);
    ktmoe_status st;
    if ((st = kt_buf_reserve(&m->xq, (size_t)(qlen * m->H))) ||
        (st = kt_buf_reserve(&m->xd, (size_t)nbx * 4)) ||
        (st = kt_buf_reserve(&m->xsum, (size_t)nbx * 4)) ||
        (st = kt_buf_reserve(&m->hq, (size_t)(np * m->I))) ||
        (st = kt_buf_reserve(&m->hd, (size_t)nbh * 4)) ||
        (st = kt_buf_reserve(&m->hsum, (size_t)nbh * 4)))
        return st;
    return KTMOE_OK;
}

/* Whether the integer kernels can run this layer: integer formats, and K,
 * slices and groups in whole blocks of KT_QBLK. */
static int kt_qact_possible(const ktmoe_moe *m) {
    if (m->H % KT_QBLK || m->Is % KT_QBLK) return 0;
    for (int pj = 0; pj < 3; pj++) {
        const kt_proj *p = &m->slices[0].p[pj];
        if (p->fmt != KT_W_I8 && !kt_fmt_is_int4(p->fmt)) return 0;
        if (p->kgs % KT_QBLK) return 0;
    }
    return 1;
}

/* The column tile of F2 and F4: 256 rows of W where every thread still
 * gets 8 tiles or more of the projection with the fewest rows, else
 * halved down to KT_TN.  Long tiles are long sequential weight streams for
 * the hardware prefetcher: one DeepSeek-V2-Lite decode token (AMXINT4, 2
 * threads) took 0.61 ms with 256 against 0.70-0.90 ms with 64 (512: 0.71 ms,
 * too few tiles to balance). */
static int64_t kt_fwd_tile(const ktmoe_moe *m, int64_t nactive) {
    int64_t threads = 0, rows = KT_MIN(m->Is, m->H), tn = 256;
    for (int s = 0; s < ktmoe_pool_subpool_count(m->pool); s++)
        threads += ktmoe_pool_subpool_threads(m->pool, s);
    while (tn > KT_TN && nactive * ((rows + tn - 1) / tn) < 8 * threads) tn /= 2;
    return tn;
}

/* F2-F4 without LoRA: one parallel region (kt_fwd_fused). */
static ktmoe_status kt_fwd_run_fused(kt_fwd *f) {
    ktmoe_moe *m = f->m;
    int64_t nact = f->c->nactive, n[KT_MAX_SUBPOOLS];
    if (nact == 0) return KTMOE_OK;
    size_t slots = (size_t)(m->tp * nact);
    ktmoe_status st = kt_buf_reserve(&m->f2left, slots * sizeof *f->left);
    if (st != KTMOE_OK) return st;
    f->left = m->f2left.p;
    for (size_t i = 0; i < slots; i++) atomic_init(&f->left[i], (int)f->ntile_i + 1);
    for (int s = 0; s < m->tp; s++) n[s] = nact * (f->ntile_i + f->ntile_h);
    kt_pool_parallel(m->pool, n, kt_fwd_fused, f);
    return KTMOE_OK;
}

static ktmoe_status kt_forward_run(kt_fwd *f) {
    ktmoe_moe *m = f->m;
    kt_cache *c = f->c;
    const ktmoe_forward_args *a = &f->a;
    ktmoe_status st = kt_route(m, c, a->qlen, a->expert_ids, a->weights);
    if (st != KTMOE_OK) return st;
    if ((st = kt_fwd_reserve(m, c, a->qlen)) != KTMOE_OK) return st;
    if (f->qact && (st = kt_qact_reserve(m, a->qlen)) != KTMOE_OK) return st;
    c->use_lora = f->lora;
    int64_t np = c->npairs, r = m->r, tp = m->tp, n[KT_MAX_SUBPOOLS];
    f->tn = kt_fwd_tile(m, c->nactive);
    f->ntile_i = (m->Is + f->tn - 1) / f->tn;
    f->ntile_h = (m->H + f->tn - 1) / f->tn;

    kt_pool_parallel_all(m->pool, a->qlen, kt_fwd_input, f);
    if (!f->lora) {
        if ((st = kt_fwd_run_fused(f)) != KTMOE_OK) return st;
    } else {
        kt_pool_parallel_all(m->pool, c->nactive, kt_fwd_lora_a, f);
        for (int s = 0; s < tp; s++) n[s] = c->nactive * f->ntile_i;
        kt_pool_parallel(m->pool, n, kt_fwd_gate_up, f);
        for (int s = 0; s < tp; s++) n[s] = c->nactive;
        kt_pool_parallel(m->pool, n, kt_fwd_down_a, f);
        float *hs = F(&c->hs), *part = F(&m->part);
        for (int64_t i = 0; i < np * r; i++) {
            float acc = 0.0f;
            for (int s = 0; s < tp; s++) acc += part[s * np * r + i];
            hs[i] = m->scale * acc;
        }
        for (int s = 0; s < tp; s++) n[s] = c->nactive * f->ntile_h;
        kt_pool_parallel(m->pool, n, kt_fwd_down, f);
    }
    kt_pool_parallel_all(m->pool, a->qlen, kt_fwd_combine, f);
    return KTMOE_OK;
}

static ktmoe_status kt_forward_task(void *v) {
    kt_fwd *f = v;
    ktmoe_moe *m = f->m;
    if (f->a.save_for_backward) {
        if (m->depth >= m->max_depth)
            return kt_error(KTMOE_ERR_STATE, "Forward cache full (depth=%d, max=%d)", m->depth, m->max_depth);
        f->c = &m->caches[m->depth];
    } else {
        f->c = &m->nosave;
    }
    ktmoe_status st = kt_forward_run(f);
    if (st == KTMOE_OK && f->a.save_for_backward) m->depth++;
    if (st != KTMOE_OK && f->a.save_for_backward) {
        pthread_mutex_lock(&m->mu);
        m->pending--;
        pthread_mutex_unlock(&m->mu);
    }
    return st;
}

KTMOE_API ktmoe_status ktmoe_moe_forward_submit(ktmoe_moe *m, const ktmoe_forward_args *args) {
    if (!m || !args) return kt_error(KTMOE_ERR_INVALID_ARGUMENT, "moe and args must not be NULL");
    /* a caller built against the first, shorter struct gets 0 for the rest */
    const size_t v1_size = offsetof(ktmoe_forward_args, int8_activations);
    if (args->struct_size < v1_size || args->struct_size > sizeof *args)
        return kt_error(KTMOE_ERR_INVALID_ARGUMENT, "ktmoe_forward_args.struct_size is %u, expected %zu",
                        args->struct_size, sizeof *args);
    ktmoe_forward_args full;
    memset(&full, 0, sizeof full);
    memcpy(&full, args, args->struct_size);
    const ktmoe_forward_args *a = &full;
    if (!m->weights_loaded) return kt_error(KTMOE_ERR_STATE, "Weights not loaded");
    if (a->qlen < 0 || a->qlen * m->k > INT32_MAX)
        return kt_error(KTMOE_ERR_INVALID_ARGUMENT, "qlen %lld out of range", (long long)a->qlen);
    if (a->qlen > 0 && (!a->expert_ids || !a->weights || !a->input || !a->output))
        return kt_error(KTMOE_ERR_INVALID_ARGUMENT, "forward arrays must not be NULL");
    if ((a->input_dtype != KTMOE_DTYPE_F32 && a->input_dtype != KTMOE_DTYPE_BF16) ||
        (a->output_dtype != KTMOE_DTYPE_F32 && a->output_dtype != KTMOE_DTYPE_BF16))
        return kt_error(KTMOE_ERR_INVALID_ARGUMENT, "unknown input or output dtype");
    int lora = a->use_lora != 0;
    if (lora && !m->la[0]) {
        if (a->save_for_backward) return kt_error(KTMOE_ERR_STATE, "LoRA weights not initialized");
        lora = 0;
    }
    /* save_for_backward without LoRA (frozen experts): the backward gives
     * grad_input and the routing-weight gradient only */
    kt_fwd *f = calloc(1, sizeof *f);
    if (!f) return kt_error(KTMOE_ERR_OUT_OF_MEMORY, "out of memory");
    f->m = m;
    f->a = *a;
    f->lora = lora;
    f->qact = a->int8_activations && !lora && !a->save_for_backward && kt_qact_possible(m);
    if (a->save_for_backward) {
        pthread_mutex_lock(&m->mu);
        if (m->pending >= m->max_depth) {
            int d = m->pending;
            pthread_mutex_unlock(&m->mu);
            free(f);
            return kt_error(KTMOE_ERR_STATE,
                            "Forward cache full (depth=%d, max=%d). Call backward() to free cache slots.",
                            d, m->max_depth);
        }
        m->pending++;
        pthread_mutex_unlock(&m->mu);
    }
    return kt_pool_submit_owned(m->pool, kt_forward_task, f, free);
}

/* ------------------------------------------------------------------ */
/* backward                                                            */

typedef struct kt_bwd {
    ktmoe_moe *m;
    kt_cache *c;
    ktmoe_backward_args a;
    int64_t ntile_i, ntile_h, tc; /* tc: B2's and B4's column tile (kt_kernels.bwd_cols) */
    void *grad[6];
} kt_bwd;

static void kt_bwd_input(void *v, const kt_worker_ctx *w, int sub, int64_t t) {
    KT_UNUSED(w);
    KT_UNUSED(sub);
    kt_bwd *b = v;
    int64_t H = b->m->H;
    kt_to_f32(kt_at(b->a.grad_output, b->a.grad_output_dtype, t * H), b->a.grad_output_dtype,
              F(&b->m->dO) + t * b->m->ldh, H);
}

/* B1: dbs = s dO Bd; whs = w hs */
static void kt_bwd_lora_db(void *v, const kt_worker_ctx *w, int sub, int64_t ai) {
    KT_UNUSED(w);
    KT_UNUSED(sub);
    kt_bwd *b = v;
    ktmoe_moe *m = b->m;
    kt_cache *c = b->c;
    int64_t o, cnt, e = kt_expert(c, ai, &o, &cnt), H = m->H, r = m->r;
    float *dbs = F(&m->dbs) + o * r, *whs = F(&m->whs) + o * r;
    const float *hs = F(&c->hs) + o * r, *pw = F(&c->pw) + o;
    kt_wmat bd = kt_lora(m, LDB, e * H * r, r);
    m->outer(cnt, r, H, F(&m->dO), m->ldh, 1, (int32_t *)c->tok.p + o, &bd, NULL, dbs, r, 0);
    for (int64_t i = 0; i < cnt; i++)
        for (int64_t j = 0; j < r; j++) {
            dbs[i * r + j] *= m->scale;
            whs[i * r + j] = pw[i] * hs[i * r + j];
        }
}

static void kt_write_grad(kt_bwd *b, int which, int64_t off, int64_t ldd, const float *src,
                          int64_t lds, int64_t rows, int64_t cols) {
    if (!b->grad[which]) return;
    kt_store(kt_at(b->grad[which], b->a.grad_lora_dtype, off), b->a.grad_lora_dtype, ldd, src, lds,
             rows, cols, b->a.accumulate);
}

/* Whether B4 takes the gate and up scales out of Wg, Wu: int8 or
 * symmetric 4-bit codes with one scale a row.  dx = dg Wg = (dg diag(s))
 * codes: once dg, du have no other reader left (after B3, or B2 without
 * LoRA), their columns are multiplied by the rows' scales, and B4 reads Wg,
 * Wu with unit scales (kt_unit_scales), whose panels the kernels convert
 * without a multiply an element. */
static int kt_fold_gu(const ktmoe_moe *m) {
    const kt_proj *p = &m->slices[0].p[PG];
    return (p->fmt == KT_W_I8 || p->fmt == KT_W_I4S) && p->kgs == 0 && m->slices[0].p[PU].kgs == 0;
}

/* dg[i][n] *= scale of Wg row n0 + n, du likewise with Wu, for i < rows,
 * n < tn; rows ld floats apart (kt_fold_gu). */
static void kt_fold_dgu(const ktmoe_moe *m, int s, int64_t e, float *dg, float *du, int64_t ld,
                        int64_t rows, int64_t n0, int64_t tn) {
    const kt_proj *pg = &m->slices[s].p[PG], *pu = &m->slices[s].p[PU];
    const float *sg = pg->scale + e * pg->rows + n0, *su = pu->scale + e * pu->rows + n0;
    for (int64_t i = 0; i < rows; i++)
        for (int64_t n = 0; n < tn; n++) {
            dg[i * ld + n] *= sg[n];
            du[i * ld + n] *= su[n];
        }
}

/* W with every scale 1 (one group a row): the codes' integer values. */
static void kt_unit_scales(kt_wmat *w) {
    static const float one = 1.0f;
    w->scale = &one;
    w->ldg = 0;
}

/* Asks for the lines of columns [c0, c0 + n) of `rows` fp32 rows (row p
 * at base + p ld) to be brought into the caches (L2): rows that a task
 * reads only after its big product, which takes long enough for them to
 * arrive. */
static void kt_prefetch_rows(const float *base, int64_t ld, int64_t rows, int64_t c0, int64_t n) {
    for (int64_t p = 0; p < rows; p++) {
        const char *a = (const char *)(base + p * ld + c0), *end = (const char *)(base + p * ld + c0 + n);
        for (a = (const char *)((uintptr_t)a & ~(uintptr_t)63); a < end; a += 64) __builtin_prefetch(a, 0, 2);
    }
}

/* B2: for one (expert, I tile) of a slice: dhu, dw partials, dg, du, and
 * the tile's dAd, dBg, dBu. */
static void kt_bwd_down(void *v, const kt_worker_ctx *w, int s, int64_t task) {
    kt_bwd *b = v;
    ktmoe_moe *m = b->m;
    kt_cache *c = b->c;
    int64_t jt = task % b->ntile_i, tc = b->tc;
    int64_t o, cnt, e = kt_expert(c, task / b->ntile_i, &o, &cnt), j0 = jt * tc;
    int64_t H = m->H, I = m->I, Is = m->Is, r = m->r, np = c->npairs, tn = KT_MIN(tc, Is - j0);
    int64_t i0 = m->slices[s].i0;
    int lora = c->use_lora;
    kt_wmat wd = kt_frozen(m, s, PD, e, 0, j0), ad = kt_lora(m, LDA, e * r * I + i0 + j0, I);
    float *dhu = w->scratch;      /* [KT_MC][tc] */
    float *h = dhu + KT_MC * tc;  /* [KT_MC][tc] */
    float *wdb = h + KT_MC * tc;  /* [KT_MC][r]  */
    float *gAd = wdb + KT_MC * r; /* [r][tc]     */
    float *gBg = gAd + r * tc;    /* [tc][r]     */
    float *gBu = gBg + tc * r;    /* [tc][r]     */
    float *dwp = F(&m->dwp) + (s * b->ntile_i + jt) * np;
    const float *pw = F(&c->pw);
    /* g and u: read after dO Wd by the activation's backward (and forward) */
    kt_prefetch_rows(F(&c->g) + s * np * Is + o * Is + j0, Is, KT_MIN(cnt, KT_MC), 0, tn);
    kt_prefetch_rows(F(&c->u) + s * np * Is + o * Is + j0, Is, KT_MIN(cnt, KT_MC), 0, tn);
    for (int64_t p0 = 0; p0 < cnt; p0 += KT_MC) {
        int64_t mc = KT_MIN(KT_MC, cnt - p0), q = o + p0;
        float *g = F(&c->g) + s * np * Is + q * Is + j0;
        float *u = F(&c->u) + s * np * Is + q * Is + j0;
        m->outer(mc, tn, H, F(&m->dO), m->ldh, 1, (int32_t *)c->tok.p + q, &wd, NULL, dhu, tc, 0);
        if (lora) {
            m->outer(mc, tn, r, F(&m->dbs) + q * r, r, 1, NULL, &ad, NULL, dhu, tc, 1);
            /* dAd[:, tile] += (w dbs)^T h */
            for (int64_t i = 0; i < mc; i++) {
                m->kern->act_fwd(tn, g + i * Is, u + i * Is, h + i * tc, &m->act);
                for (int64_t j = 0; j < r; j++) wdb[i * r + j] = pw[q + i] * F(&m->dbs)[(q + i) * r + j];
            }
            kt_wmat hm = kt_act(h, tc);
            m->outer(r, tn, mc, wdb, 1, r, NULL, &hm, NULL, gAd, tc, p0 > 0);
        }
        for (int64_t i = 0; i < mc; i++)
            dwp[q + i] = m->kern->act_bwd(tn, dhu + i * tc, g + i * Is, u + i * Is, pw[q + i], &m->act);
        if (!lora && kt_fold_gu(m)) kt_fold_dgu(m, s, e, g, u, Is, mc, j0, tn);
        if (lora) {
            const float *xs = F(&c->xs) + q * 2 * r;
            kt_wmat xg = kt_act(xs, 2 * r), xu = kt_act(xs + r, 2 * r);
            m->outer(tn, r, mc, g, 1, Is, NULL, &xg, NULL, gBg, r, p0 > 0);
            m->outer(tn, r, mc, u, 1, Is, NULL, &xu, NULL, gBu, r, p0 > 0);
        }
    }
    if (lora) {
        kt_write_grad(b, LDA, e * r * I + i0 + j0, I, gAd, tc, r, tn);
        kt_write_grad(b, LGB, (e * I + i0 + j0) * r, r, gBg, r, tn, r);
        kt_write_grad(b, LUB, (e * I + i0 + j0) * r, r, gBu, r, tn, r);
    }
}

/* B3: partial [dg Bg | du Bu] of a slice, one expert */
static void kt_bwd_lora_gu(void *v, const kt_worker_ctx *w, int s, int64_t ai) {
    KT_UNUSED(w);
    kt_bwd *b = v;
    ktmoe_moe *m = b->m;
    kt_cache *c = b->c;
    int64_t o, cnt, e = kt_expert(c, ai, &o, &cnt), Is = m->Is, r = m->r, np = c->npairs;
    int64_t brow = (e * m->I + m->slices[s].i0) * r;
    float *part = F(&m->part) + (s * np + o) * 2 * r;
    kt_wmat bg = kt_lora(m, LGB, brow, r), bu = kt_lora(m, LUB, brow, r);
    float *dg = F(&c->g) + s * np * Is + o * Is, *du = F(&c->u) + s * np * Is + o * Is;
    m->outer(cnt, r, Is, dg, Is, 1, NULL, &bg, NULL, part, 2 * r, 0);
    m->outer(cnt, r, Is, du, Is, 1, NULL, &bu, NULL, part + r, 2 * r, 0);
    if (kt_fold_gu(m)) kt_fold_dgu(m, s, e, dg, du, Is, cnt, 0, Is);
}

/* B4: dx per pair for one (expert, H tile) of a slice, with the LoRA
 * terms on slice 0. */
static void kt_bwd_gate_up(void *v, const kt_worker_ctx *w, int s, int64_t task) {
    KT_UNUSED(w);
    kt_bwd *b = v;
    ktmoe_moe *m = b->m;
    kt_cache *c = b->c;
    int64_t o, cnt, e = kt_expert(c, task / b->ntile_h, &o, &cnt), n0 = (task % b->ntile_h) * b->tc;
    int64_t H = m->H, Is = m->Is, r = m->r, np = c->npairs, tn = KT_MIN(b->tc, H - n0);
    const float *dg = F(&c->g) + s * np * Is + o * Is, *du = F(&c->u) + s * np * Is + o * Is;
    float *dx = F(&m->y) + (s * np + o) * m->ldh + n0;
    kt_wmat wg = kt_frozen(m, s, PG, e, 0, n0), wu = kt_frozen(m, s, PU, e, 0, n0);
    if (kt_fold_gu(m)) kt_unit_scales(&wg), kt_unit_scales(&wu);
    m->outer(cnt, tn, Is, dg, Is, 1, NULL, &wg, NULL, dx, m->ldh, 0);
    m->outer(cnt, tn, Is, du, Is, 1, NULL, &wu, NULL, dx, m->ldh, 1);
    if (!c->use_lora || s != 0) return;
    const float *dgus = F(&m->dgus) + o * 2 * r;
    kt_wmat ag = kt_lora(m, LGA, e * r * H + n0, H), au = kt_lora(m, LUA, e * r * H + n0, H);
    m->outer(cnt, tn, r, dgus, 2 * r, 1, NULL, &ag, NULL, dx, m->ldh, 1);
    m->outer(cnt, tn, r, dgus + r, 2 * r, 1, NULL, &au, NULL, dx, m->ldh, 1);
}

/* B4's LoRA gradients of one expert: dAg = dgus_g^T x, dAu = dgus_u^T x
 * (one product: dgus's 2r columns are the rows of [dAg; dAu]) and dBd =
 * (whs^T dO)^T, x and dO rows gathered by the expert's tokens; all of H per
 * product (column chunks that fit the scratch), so that the gathered rows
 * stream through the kernels' panel prefetch: per (expert, 64-column tile),
 * three small products waited on their rows and their gradient rows, at
 * a quarter of the kernels' speed.  Skipped where no gradient is asked. */
static void kt_bwd_lora_grads(kt_bwd *b, const kt_worker_ctx *w, int64_t ai) {
    ktmoe_moe *m = b->m;
    kt_cache *c = b->c;
    int64_t o, cnt, e = kt_expert(c, ai, &o, &cnt), H = m->H, r = m->r;
    const float *dgus = F(&m->dgus) + o * 2 * r, *whs = F(&m->whs) + o * r;
    const int32_t *tok = (int32_t *)c->tok.p + o;
    int ga = b->grad[LGA] || b->grad[LUA], gd = b->grad[LDB] != NULL;
    /* scratch: acc [2r][ld], acc2 [ch][r]; ld = ch + 16 (rows a line apart
     * from a multiple of 1 KB) */
    int64_t ch = KT_MIN(H, ((int64_t)(KT_SCRATCH_BYTES / 4) / (3 * r) - 16) / KT_TN * KT_TN);
    for (int64_t n0 = 0; n0 < H; n0 += ch) {
        int64_t tn = KT_MIN(ch, H - n0), ld = tn + 16;
        float *acc = w->scratch, *acc2 = acc + 2 * r * ld;
        if (ga) {
            kt_wmat xm = kt_act(F(&c->x) + n0, m->ldh);
            m->outer(2 * r, tn, cnt, dgus, 1, 2 * r, NULL, &xm, tok, acc, ld, 0);
            kt_write_grad(b, LGA, e * r * H + n0, H, acc, ld, r, tn);
            kt_write_grad(b, LUA, e * r * H + n0, H, acc + r * ld, ld, r, tn);
        }
        if (gd) {
            kt_wmat dom = kt_act(F(&m->dO) + n0, m->ldh);
            m->outer(r, tn, cnt, whs, 1, r, NULL, &dom, tok, acc, ld, 0);
            for (int64_t n = 0; n < tn; n++)
                for (int64_t j = 0; j < r; j++) acc2[n * r + j] = acc[j * ld + n];
            kt_write_grad(b, LDB, (e * H + n0) * r, r, acc2, r, tn, r);
        }
    }
}

/* B4's tasks: nactive ntile_h (expert, H tile) products, then on slice 0,
 * where LoRA gradients are asked, one kt_bwd_lora_grads task per expert. */
static void kt_bwd_gate_up_task(void *v, const kt_worker_ctx *w, int s, int64_t task) {
    kt_bwd *b = v;
    int64_t nt = b->c->nactive * b->ntile_h;
    if (task < nt)
        kt_bwd_gate_up(v, w, s, task);
    else
        kt_bwd_lora_grads(b, w, task - nt);
}

/* B5: dx[t], dw[t, j] */
static void kt_bwd_combine(void *v, const kt_worker_ctx *w, int sub, int64_t t) {
    KT_UNUSED(sub);
    kt_bwd *b = v;
    ktmoe_moe *m = b->m;
    kt_cache *c = b->c;
    int64_t H = m->H, k = m->k, np = c->npairs;
    kt_sum_pairs(m, c, F(&m->y), t, 0, w->scratch);
    kt_store(kt_at(b->a.grad_input, b->a.grad_input_dtype, t * H), b->a.grad_input_dtype, H,
             w->scratch, H, 1, H, 0);
    if (!b->a.grad_weights) return;
    for (int64_t j = 0; j < k; j++) {
        int64_t p = ((int32_t *)c->pos.p)[t * k + j];
        float dw = 0.0f; /* a skipped slot's weight does not matter */
        for (int64_t x = 0; p >= 0 && x < m->tp * b->ntile_i; x++) dw += F(&m->dwp)[x * np + p];
        b->a.grad_weights[t * k + j] = dw;
    }
}

static void kt_bwd_zero_idle(kt_bwd *b) {
    ktmoe_moe *m = b->m;
    kt_cache *c = b->c;
    const int64_t *off = c->off.p;
    int64_t H = m->H, I = m->I, r = m->r;
    int64_t per[6] = {r * H, I * r, r * H, I * r, r * I, H * r};
    size_t es = kt_dsize(b->a.grad_lora_dtype);
    for (int64_t e = 0; e < m->E; e++) {
        if (off[e + 1] > off[e] && c->use_lora) continue;
        for (int q = 0; q < 6; q++)
            if (b->grad[q]) memset((char *)b->grad[q] + (size_t)(e * per[q]) * es, 0, (size_t)per[q] * es);
    }
}

static ktmoe_status kt_backward_run(kt_bwd *b) {
    ktmoe_moe *m = b->m;
    kt_cache *c = b->c;
    int64_t np = c->npairs, r = m->r, tp = m->tp, n[KT_MAX_SUBPOOLS], qlen = c->qlen;
    ktmoe_status st;
    b->tc = m->kern->bwd_cols ? m->kern->bwd_cols : KT_TN;
    if ((size_t)(2 * KT_MC * b->tc + KT_MC * r + 3 * r * b->tc) * 4 > KT_SCRATCH_BYTES)
        b->tc = KT_TN; /* kt_bwd_down's scratch at large ranks */
    b->ntile_i = (m->Is + b->tc - 1) / b->tc;
    b->ntile_h = (m->H + b->tc - 1) / b->tc;
    if ((st = kt_buf_reserve(&m->dO, (size_t)(qlen * m->ldh) * 4)) ||
        (st = kt_buf_reserve(&m->dbs, (size_t)(np * r) * 4)) ||
        (st = kt_buf_reserve(&m->whs, (size_t)(np * r) * 4)) ||
        (st = kt_buf_reserve(&m->dgus, (size_t)(np * 2 * r) * 4)) ||
        (st = kt_buf_reserve(&m->dwp, (size_t)(tp * b->ntile_i * np) * 4)) ||
        (st = kt_buf_reserve(&m->y, (size_t)(tp * np * m->ldh) * 4)) ||
        (st = kt_buf_reserve(&m->part, (size_t)(tp * np * 2 * r) * 4)))
        return st;
    if (!b->a.accumulate) kt_bwd_zero_idle(b);
    kt_pool_parallel_all(m->pool, qlen, kt_bwd_input, b);
    if (c->use_lora) kt_pool_parallel_all(m->pool, c->nactive, kt_bwd_lora_db, b);
    for (int s = 0; s < tp; s++) n[s] = c->nactive * b->ntile_i;
    kt_pool_parallel(m->pool, n, kt_bwd_down, b);
    if (c->use_lora) {
        for (int s = 0; s < tp; s++) n[s] = c->nactive;
        kt_pool_parallel(m->pool, n, kt_bwd_lora_gu, b);
        float *dgus = F(&m->dgus), *part = F(&m->part);
        for (int64_t i = 0; i < np * 2 * r; i++) {
            float acc = 0.0f;
            for (int s = 0; s < tp; s++) acc += part[s * np * 2 * r + i];
            dgus[i] = m->scale * acc;
        }
    }
    for (int s = 0; s < tp; s++) n[s] = c->nactive * b->ntile_h;
    if (c->use_lora && (b->grad[LGA] || b->grad[LUA] || b->grad[LDB])) n[0] += c->nactive;
    kt_pool_parallel(m->pool, n, kt_bwd_gate_up_task, b);
    kt_pool_parallel_all(m->pool, qlen, kt_bwd_combine, b);
    return KTMOE_OK;
}

/* A backward or a cache drop claims the newest cached forward when it is
 * submitted (so that submissions beyond the caches fail at once); its task
 * gives the claim back when it cannot pop the cache after all. */
static ktmoe_status kt_claim_cache(ktmoe_moe *m) {
    pthread_mutex_lock(&m->mu);
    int ok = m->pending > 0;
    if (ok) m->pending--;
    pthread_mutex_unlock(&m->mu);
    return ok ? KTMOE_OK
              : kt_error(KTMOE_ERR_STATE,
                         "No forward cache available. Call forward_sft() with save_for_backward=True first.");
}

static void kt_unclaim_cache(ktmoe_moe *m) {
    pthread_mutex_lock(&m->mu);
    m->pending++;
    pthread_mutex_unlock(&m->mu);
}

static ktmoe_status kt_backward_task(void *v) {
    kt_bwd *b = v;
    ktmoe_moe *m = b->m;
    if (m->depth <= 0) {
        kt_unclaim_cache(m);
        return kt_error(KTMOE_ERR_STATE, "No forward cache available");
    }
    kt_cache *c = &m->caches[m->depth - 1];
    if (c->qlen != b->a.qlen) {
        kt_unclaim_cache(m);
        return kt_error(KTMOE_ERR_INVALID_ARGUMENT,
                        "grad_output has %lld tokens but the cached forward had %lld",
                        (long long)b->a.qlen, (long long)c->qlen);
    }
    if (c->use_lora && !m->la[0]) {
        kt_unclaim_cache(m);
        return kt_error(KTMOE_ERR_STATE, "LoRA weights not initialized");
    }
    m->depth--;
    b->c = c;
    return kt_backward_run(b);
}

KTMOE_API ktmoe_status ktmoe_moe_backward_submit(ktmoe_moe *m, const ktmoe_backward_args *a) {
    if (!m || !a) return kt_error(KTMOE_ERR_INVALID_ARGUMENT, "moe and args must not be NULL");
    if (a->struct_size < sizeof *a)
        return kt_error(KTMOE_ERR_INVALID_ARGUMENT, "ktmoe_backward_args.struct_size is %u, expected %zu",
                        a->struct_size, sizeof *a);
    if (a->qlen < 0) return kt_error(KTMOE_ERR_INVALID_ARGUMENT, "qlen must not be negative");
    if (a->qlen > 0 && (!a->grad_output || !a->grad_input))
        return kt_error(KTMOE_ERR_INVALID_ARGUMENT, "grad_output and grad_input must not be NULL");
    int any_lora_grad = a->grad_gate_a || a->grad_gate_b || a->grad_up_a || a->grad_up_b ||
                        a->grad_down_a || a->grad_down_b;
    if ((a->grad_output_dtype != KTMOE_DTYPE_F32 && a->grad_output_dtype != KTMOE_DTYPE_BF16) ||
        (a->grad_input_dtype != KTMOE_DTYPE_F32 && a->grad_input_dtype != KTMOE_DTYPE_BF16) ||
        (any_lora_grad && a->grad_lora_dtype != KTMOE_DTYPE_F32 && a->grad_lora_dtype != KTMOE_DTYPE_BF16))
        return kt_error(KTMOE_ERR_INVALID_ARGUMENT, "unknown gradient dtype");
    kt_bwd *b = calloc(1, sizeof *b);
    if (!b) return kt_error(KTMOE_ERR_OUT_OF_MEMORY, "out of memory");
    b->m = m;
    b->a = *a;
    void *g[6] = {a->grad_gate_a, a->grad_gate_b, a->grad_up_a, a->grad_up_b, a->grad_down_a, a->grad_down_b};
    memcpy(b->grad, g, sizeof g);
    ktmoe_status st = kt_claim_cache(m);
    if (st != KTMOE_OK) {
        free(b);
        return st;
    }
    return kt_pool_submit_owned(m->pool, kt_backward_task, b, free);
}

/* Pops the newest forward cache without computing anything. */
static ktmoe_status kt_cache_drop_task(void *v) {
    ktmoe_moe *m = v;
    if (m->depth <= 0) {
        kt_unclaim_cache(m);
        return kt_error(KTMOE_ERR_STATE, "No forward cache available");
    }
    m->depth--;
    return KTMOE_OK;
}

KTMOE_API ktmoe_status ktmoe_moe_cache_drop_submit(ktmoe_moe *m) {
    if (!m) return kt_error(KTMOE_ERR_INVALID_ARGUMENT, "moe must not be NULL");
    ktmoe_status st = kt_claim_cache(m);
    if (st != KTMOE_OK) return st;
    return kt_pool_submit_owned(m->pool, kt_cache_drop_task, m, NULL);
}
