/* Internal declarations shared by the libktmoe sources. Not installed. */
#ifndef KTMOE_INTERNAL_H
#define KTMOE_INTERNAL_H

#include "ktmoe.h"

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

/* ---- CPU features (cpu.c) ------------------------------------------- */

uint32_t kt_cpu_features(void);
int kt_numa_node_count(void);
/* CPUs of NUMA node `node` into cpus[] (at most max); returns the count. */
int kt_numa_node_cpus(int node, int *cpus, int max);

/* ---- kernel tables (dispatch.c, kernels/<tier>/) --------------------- */

/* Dot form:  C[i][j] (+)= sum_k A_i[k] * W[j*ldw + k]
 *   A_i = a + (aidx ? aidx[i] : i) * lda (fp32 rows), W in bf16 or fp32.
 * Outer form: C[i][j] (+)= sum_k D(i,k) * W_k[j]
 *   D(i,k) = d[(didx ? didx[i] : i) * dsi + k * dsk] (fp32, any strides),
 *   W_k = w + (widx ? widx[k] : k) * ldw.
 * accum = 0 overwrites C, 1 adds to it.  m, n, K >= 0; K == 0 with accum 0
 * writes zeros. */
typedef void (*kt_dot_fn)(int64_t m, int64_t n, int64_t K, const float *a,
                          int64_t lda, const int32_t *aidx, const void *w,
                          int64_t ldw, float *c, int64_t ldc, int accum);
typedef void (*kt_outer_fn)(int64_t m, int64_t n, int64_t K, const float *d,
                            int64_t dsi, int64_t dsk, const int32_t *didx,
                            const void *w, int64_t ldw, const int32_t *widx,
                            float *c, int64_t ldc, int accum);
/* h[i] = silu(g[i]) * u[i] */
typedef void (*kt_act_fwd_fn)(int64_t n, const float *g, const float *u,
                              float *h);
/* Given dh (unscaled by the routing weight) and g, u, with scale w:
 *   dot += sum dh*h (h = silu(g)*u);  g <- w*dh*u*silu'(g);  u <- w*dh*silu(g)
 * g and u are overwritten with their gradients; returns the dot product. */
typedef float (*kt_act_bwd_fn)(int64_t n, const float *dh, float *g, float *u,
                               float w);

typedef struct kt_kernels {
    ktmoe_isa isa;
    kt_dot_fn dot_bf16, dot_f32;
    kt_outer_fn outer_bf16, outer_f32;
    kt_act_fwd_fn act_fwd;
    kt_act_bwd_fn act_bwd;
} kt_kernels;

const kt_kernels *kt_kernels_get(ktmoe_isa isa); /* NULL if not compiled */
extern const kt_kernels kt_kernels_ref;
#if defined(KTMOE_HAVE_AVX2)
extern const kt_kernels kt_kernels_avx2;
#endif

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
