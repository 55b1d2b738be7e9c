/* Paired A/B timing of a whole SFT step (forward + backward, LoRA on) of
 * two builds of libktmoe, loaded side by side in one process (dlopen,
 * RTLD_LOCAL) and timed alternately on the same data: on a machine whose
 * speed drifts by tens of percent from one minute to the next, the median
 * of the per-pair ratios B/A still resolves a few percent.
 * Shape: one DeepSeek-V2-Lite layer (E=64, k=6, H=2048, I=1408, r=16),
 * uniform random routing.
 * Build: cc -O2 -Ilibktmoe/include tools/step_ab.c -ldl -lm -o step_ab
 * Usage: step_ab LIB_A LIB_B [method=0] [qlen=512] [pairs=10] [threads=2]
 *   method: ktmoe_method (0 BF16, 1 INT8, 2 INT4, ...); the avx2 tier, or
 *   the ktmoe_isa in $STEP_AB_ISA ($STEP_AB_ISA_B: B's, if it differs from
 *   A's: two tiers of one build).  $STEP_AB_METHOD_B gives B a method of
 *   its own (LIB_B may then be LIB_A: two methods of one build).
 *   $STEP_AB_NOLORA_B=1 runs B's steps without LoRA (the ratio then
 *   shows what the LoRA terms cost; its GFLOP/s still count their FLOPs).
 *   $STEP_AB_DECODE=1 times inference forwards instead (int8 activations,
 *   no LoRA, nothing saved), each as bench_inference.py's decode rows do:
 *   a 128 MiB read to push the weights out of the caches, an untimed call
 *   with no expert to wake the pool, then the timed call on fresh routing.
 *   The layers have batch_invariant = 0 ($STEP_AB_INVARIANT=1: 1). */
#include "ktmoe.h"

#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { E = 64, K = 6, H = 2048, I = 1408, R = 16 };

typedef struct api {
    void (*pool_config_init)(ktmoe_pool_config *);
    ktmoe_status (*pool_create)(const ktmoe_pool_config *, ktmoe_pool **);
    ktmoe_status (*pool_sync)(ktmoe_pool *);
    void (*moe_config_init)(ktmoe_moe_config *);
    ktmoe_status (*moe_create)(ktmoe_pool *, const ktmoe_moe_config *, ktmoe_moe **);
    ktmoe_status (*load_weights)(ktmoe_moe *, const void *, const void *, const void *, ktmoe_dtype,
                                 const int64_t *, int64_t);
    ktmoe_status (*set_lora)(ktmoe_moe *, ktmoe_dtype, const void *, const void *, const void *,
                             const void *, const void *, const void *);
    ktmoe_status (*forward_submit)(ktmoe_moe *, const ktmoe_forward_args *);
    ktmoe_status (*backward_submit)(ktmoe_moe *, const ktmoe_backward_args *);
    const char *(*last_error)(void);
    ktmoe_pool *pool;
    int lora; /* steps with LoRA (1) or base weights only (0) */
    ktmoe_moe *moe;
} api;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static float frand(unsigned *s) {
    *s = *s * 1664525u + 1013904223u;
    return (float)(*s >> 8) / 16777216.0f - 0.5f;
}

static uint16_t bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

#define SYM(f, name)                                                     \
    do {                                                                 \
        *(void **)&a->f = dlsym(h, name);                                \
        if (!a->f) {                                                     \
            fprintf(stderr, "%s: no symbol %s\n", path, name);           \
            return 1;                                                    \
        }                                                                \
    } while (0)

static int open_api(api *a, const char *path) {
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        fprintf(stderr, "%s\n", dlerror());
        return 1;
    }
    SYM(pool_config_init, "ktmoe_pool_config_init");
    SYM(pool_create, "ktmoe_pool_create");
    SYM(pool_sync, "ktmoe_pool_sync");
    SYM(moe_config_init, "ktmoe_moe_config_init");
    SYM(moe_create, "ktmoe_moe_create");
    SYM(load_weights, "ktmoe_moe_load_weights");
    SYM(set_lora, "ktmoe_moe_set_lora");
    SYM(forward_submit, "ktmoe_moe_forward_submit");
    SYM(backward_submit, "ktmoe_moe_backward_submit");
    SYM(last_error, "ktmoe_last_error");
    return 0;
}

static float *lora[6], *glora[6];
static uint16_t *wg, *wu, *wd, *x, *go, *gx, *out;
static int64_t *ids;
static float *rw;
static int Q, decode;
static int64_t *noids;
static float *flushbuf;
#define FLUSH_FLOATS (32u << 20)

static int check(const api *a, ktmoe_status st, const char *what) {
    if (st == KTMOE_OK) return 0;
    fprintf(stderr, "%s: %s\n", what, a->last_error());
    return 1;
}

static int setup(api *a, int method, int isa, int threads) {
    ktmoe_pool_config pc;
    a->pool_config_init(&pc);
    pc.total_threads = threads;
    if (check(a, a->pool_create(&pc, &a->pool), "pool")) return 1;
    ktmoe_moe_config c;
    a->moe_config_init(&c);
    c.method = method;
    c.num_experts = E;
    c.experts_per_token = K;
    c.hidden_size = H;
    c.intermediate_size = I;
    c.lora_rank = R;
    c.lora_alpha = 32.0f;
    c.max_cache_depth = 1;
    c.group_size = 128;
    /* SFT layers' setting; $STEP_AB_INVARIANT=1: 1, as inference layers may set it */
    c.batch_invariant = getenv("STEP_AB_INVARIANT") && atoi(getenv("STEP_AB_INVARIANT"));
    c.isa = isa;
    if (check(a, a->moe_create(a->pool, &c, &a->moe), "create")) return 1;
    if (check(a, a->load_weights(a->moe, wg, wu, wd, KTMOE_DTYPE_BF16, NULL, E), "load")) return 1;
    return check(a, a->set_lora(a->moe, KTMOE_DTYPE_F32, lora[0], lora[1], lora[2], lora[3], lora[4],
                                lora[5]), "lora");
}

static volatile float sink;

/* The forward arguments both modes share: Q tokens of x, routing `route`. */
static ktmoe_forward_args fwd_args(const int64_t *route) {
    ktmoe_forward_args f;
    memset(&f, 0, sizeof f);
    f.struct_size = sizeof f;
    f.qlen = Q;
    f.expert_ids = route;
    f.weights = rw;
    f.input = x;
    f.input_dtype = KTMOE_DTYPE_BF16;
    f.output = out;
    f.output_dtype = KTMOE_DTYPE_BF16;
    return f;
}

/* one inference forward, cold: flush, wake call, timed call on routing r */
static double decode_call(api *a, int r) {
    float acc = 0.0f;
    for (size_t i = 0; i < FLUSH_FLOATS; i += 16) acc += flushbuf[i];
    sink = acc;
    ktmoe_forward_args f = fwd_args(noids);
    f.int8_activations = 1;
    if (check(a, a->forward_submit(a->moe, &f), "wake") || check(a, a->pool_sync(a->pool), "sync")) exit(1);
    f.expert_ids = ids + (size_t)r * Q * K;
    double t0 = now();
    if (check(a, a->forward_submit(a->moe, &f), "forward") || check(a, a->pool_sync(a->pool), "sync"))
        exit(1);
    return now() - t0;
}

static double step(api *a) {
    ktmoe_forward_args f = fwd_args(ids);
    f.save_for_backward = 1;
    f.use_lora = a->lora;
    ktmoe_backward_args b;
    memset(&b, 0, sizeof b);
    b.struct_size = sizeof b;
    b.qlen = Q;
    b.grad_output = go;
    b.grad_output_dtype = KTMOE_DTYPE_BF16;
    b.grad_input = gx;
    b.grad_input_dtype = KTMOE_DTYPE_BF16;
    if (a->lora) {
        b.grad_gate_a = glora[0], b.grad_gate_b = glora[1], b.grad_up_a = glora[2];
        b.grad_up_b = glora[3], b.grad_down_a = glora[4], b.grad_down_b = glora[5];
        b.grad_lora_dtype = KTMOE_DTYPE_F32;
    }
    double t0 = now();
    if (check(a, a->forward_submit(a->moe, &f), "forward") ||
        check(a, a->backward_submit(a->moe, &b), "backward") || check(a, a->pool_sync(a->pool), "sync"))
        exit(1);
    return now() - t0;
}

/* Call n of one side: a decode forward on routing n, or a whole step. */
static double timed(api *a, int n) { return decode ? decode_call(a, n) : step(a); }

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: step_ab LIB_A LIB_B [method] [qlen] [pairs] [threads]\n");
        return 2;
    }
    int method = argc > 3 ? atoi(argv[3]) : 0;
    Q = argc > 4 ? atoi(argv[4]) : 512;
    int pairs = argc > 5 ? atoi(argv[5]) : 10, threads = argc > 6 ? atoi(argv[6]) : 2;
    if (Q < 1 || pairs < 2 || threads < 1) return 2;
    api A, B;
    memset(&A, 0, sizeof A);
    memset(&B, 0, sizeof B);
    if (open_api(&A, argv[1]) || open_api(&B, argv[2])) return 1;
    unsigned s = 1;
    size_t nw = (size_t)E * H * I;
    wg = malloc(nw * 2), wu = malloc(nw * 2), wd = malloc(nw * 2);
    x = malloc((size_t)Q * H * 2), go = malloc((size_t)Q * H * 2);
    gx = malloc((size_t)Q * H * 2), out = malloc((size_t)Q * H * 2);
    decode = getenv("STEP_AB_DECODE") && atoi(getenv("STEP_AB_DECODE"));
    int nroute = decode ? 2 * pairs + 4 : 1; /* fresh routing for every decode call */
    ids = malloc((size_t)nroute * Q * K * 8), rw = malloc((size_t)Q * K * 4);
    noids = malloc((size_t)Q * K * 8), flushbuf = decode ? malloc(FLUSH_FLOATS * 4) : NULL;
    if (!noids || (decode && !flushbuf)) return 1;
    for (size_t i = 0; i < (size_t)Q * K; i++) noids[i] = -1;
    for (size_t i = 0; decode && i < FLUSH_FLOATS; i++) flushbuf[i] = 1.0f;
    const size_t ln[6] = {(size_t)E * R * H, (size_t)E * I * R, (size_t)E * R * H,
                          (size_t)E * I * R, (size_t)E * R * I, (size_t)E * H * R};
    for (int i = 0; i < 6; i++) {
        lora[i] = malloc(ln[i] * 4), glora[i] = malloc(ln[i] * 4);
        if (!lora[i] || !glora[i]) return 1;
        for (size_t j = 0; j < ln[i]; j++) lora[i][j] = 0.02f * frand(&s);
    }
    if (!wg || !wu || !wd || !x || !go || !gx || !out || !ids || !rw) return 1;
    for (size_t i = 0; i < nw; i++) {
        wg[i] = bf16(0.04f * frand(&s));
        wu[i] = bf16(0.04f * frand(&s));
        wd[i] = bf16(0.05f * frand(&s));
    }
    for (size_t i = 0; i < (size_t)Q * H; i++) x[i] = bf16(frand(&s)), go[i] = bf16(0.01f * frand(&s));
    for (int t = 0; t < nroute * Q; t++)
        for (int j = 0; j < K; j++) {
            int64_t e;
            int dup;
            do { /* k distinct experts */
                s = s * 1664525u + 1013904223u;
                e = (int64_t)((s >> 8) % E);
                dup = 0;
                for (int q = 0; q < j; q++) dup |= ids[t * K + q] == e;
            } while (dup);
            ids[t * K + j] = e;
            if (t < Q) rw[t * K + j] = 1.0f / K;
        }
    int method_b = getenv("STEP_AB_METHOD_B") ? atoi(getenv("STEP_AB_METHOD_B")) : method;
    A.lora = 1;
    B.lora = !(getenv("STEP_AB_NOLORA_B") && atoi(getenv("STEP_AB_NOLORA_B")));
    int isa = getenv("STEP_AB_ISA") ? atoi(getenv("STEP_AB_ISA")) : KTMOE_ISA_AVX2;
    int isa_b = getenv("STEP_AB_ISA_B") ? atoi(getenv("STEP_AB_ISA_B")) : isa;
    if (setup(&A, method, isa, threads) || setup(&B, method_b, isa_b, threads)) return 1;
    int n = 0; /* calls so far: decode routing index */
    for (int w = 0; w < 2; w++) timed(&A, n++), timed(&B, n++); /* caches, scratch, page faults */
    double *r = malloc(sizeof(double) * 3 * (size_t)pairs), *ta = r + pairs, *tb = ta + pairs;
    if (!r) return 1;
    for (int i = 0; i < pairs; i++, n += 2) {
        if (i & 1) tb[i] = timed(&B, n + 1), ta[i] = timed(&A, n);
        else ta[i] = timed(&A, n), tb[i] = timed(&B, n + 1);
        r[i] = ta[i] / tb[i];
    }
    qsort(r, (size_t)pairs, sizeof *r, cmp);
    qsort(ta, (size_t)pairs, sizeof *ta, cmp);
    qsort(tb, (size_t)pairs, sizeof *tb, cmp);
    printf("step_ab%s method %d/%d qlen %d threads %d pairs %d: speed B/A median %.3f (quartiles %.3f %.3f); ",
           decode ? " decode" : "", method, method_b, Q, threads, pairs, r[pairs / 2], r[pairs / 4],
           r[3 * pairs / 4]);
    if (decode) {
        printf("A median %.3f ms, B median %.3f ms, best A %.3f B %.3f ms\n", 1e3 * ta[pairs / 2],
               1e3 * tb[pairs / 2], 1e3 * ta[0], 1e3 * tb[0]);
    } else {
        double flops = 2.0 * 6 * Q * K * (double)H * I + 2.0 * 3 * Q * K * R * (double)(H + I) * 3;
        printf("A median %.1f ms (%.1f GFLOP/s), B median %.1f ms (%.1f GFLOP/s), best A %.1f B %.1f ms\n",
               1e3 * ta[pairs / 2], flops / ta[pairs / 2] / 1e9, 1e3 * tb[pairs / 2],
               flops / tb[pairs / 2] / 1e9, 1e3 * ta[0], 1e3 * tb[0]);
    }
    return 0;
}
