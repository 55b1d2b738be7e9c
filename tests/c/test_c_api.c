/* A C program using libktmoe through its public header only: version,
 * pool and queue, errors, and one MoE layer's forward/backward on every
 * usable tier compared with the ref tier; quantized methods (packing,
 * pre-packed loading). */
#include <ktmoe.h>

#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures = 0;
#define CHECK(cond)                                                          \
    do {                                                                     \
        if (!(cond)) {                                                       \
            fprintf(stderr, "%s:%d: CHECK failed: %s (last error: %s)\n",    \
                    __FILE__, __LINE__, #cond, ktmoe_last_error());          \
            failures++;                                                      \
        }                                                                    \
    } while (0)

static ktmoe_status count_task(void *user) {
    (*(int *)user)++;
    return KTMOE_OK;
}

static ktmoe_status fail_task(void *user) {
    (void)user;
    return KTMOE_ERR_INTERNAL;
}

static uint16_t bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static float frand(unsigned *s) {
    *s = *s * 1664525u + 1013904223u;
    return ((*s >> 8) / 16777216.0f) - 0.5f;
}

enum { E = 5, K = 2, H = 40, I = 24, R = 4, Q = 7 };

typedef struct layer_out {
    float out[Q * H], gin[Q * H], gw[Q * K];
    float grads[6][E * H * I];
} layer_out;

static ktmoe_moe_config small_config(int32_t method) {
    ktmoe_moe_config cfg;
    ktmoe_moe_config_init(&cfg);
    cfg.method = method;
    cfg.num_experts = E;
    cfg.experts_per_token = K;
    cfg.hidden_size = H;
    cfg.intermediate_size = I;
    return cfg;
}

static int run_layer(ktmoe_pool *pool, ktmoe_isa isa, const uint16_t *wg, const uint16_t *wu,
                     const uint16_t *wd, float *const lora[6], const float *x, const int64_t *ids,
                     const float *rw, const float *gout, int grad_mask, layer_out *res) {
    ktmoe_moe_config cfg = small_config(KTMOE_METHOD_BF16);
    cfg.lora_rank = R;
    cfg.lora_alpha = 8.0f;
    cfg.isa = isa;
    ktmoe_moe *moe = NULL;
    if (ktmoe_moe_create(pool, &cfg, &moe) != KTMOE_OK) return 0;
    CHECK(ktmoe_moe_isa(moe) == isa);
    CHECK(ktmoe_moe_load_weights(moe, wg, wu, wd, KTMOE_DTYPE_BF16, NULL, E) == KTMOE_OK);
    CHECK(ktmoe_moe_set_lora(moe, KTMOE_DTYPE_F32, lora[0], lora[1], lora[2], lora[3], lora[4],
                             lora[5]) == KTMOE_OK);

    ktmoe_forward_args fa = {sizeof fa, Q, ids, rw, x, KTMOE_DTYPE_F32, res->out,
                             KTMOE_DTYPE_F32, 1, 1};
    CHECK(ktmoe_moe_forward_submit(moe, &fa) == KTMOE_OK);
    CHECK(ktmoe_pool_sync(pool) == KTMOE_OK);
    /* depth 1: a second saving forward is refused at submit */
    CHECK(ktmoe_moe_forward_submit(moe, &fa) == KTMOE_ERR_STATE);
    CHECK(strstr(ktmoe_last_error(), "Forward cache full") != NULL);

    ktmoe_backward_args ba;
    memset(&ba, 0, sizeof ba);
    ba.struct_size = sizeof ba;
    ba.qlen = Q;
    ba.grad_output = gout;
    ba.grad_output_dtype = KTMOE_DTYPE_F32;
    ba.grad_input = res->gin;
    ba.grad_input_dtype = KTMOE_DTYPE_F32;
    ba.grad_weights = res->gw;
    /* LoRA gradients: bit j of grad_mask gives the j-th, else NULL (skipped) */
    void **gp[6] = {&ba.grad_gate_a, &ba.grad_gate_b, &ba.grad_up_a, &ba.grad_up_b, &ba.grad_down_a,
                    &ba.grad_down_b};
    for (int j = 0; j < 6; j++) *gp[j] = (grad_mask >> j) & 1 ? res->grads[j] : NULL;
    ba.grad_lora_dtype = KTMOE_DTYPE_F32;
    CHECK(ktmoe_moe_backward_submit(moe, &ba) == KTMOE_OK);
    CHECK(ktmoe_pool_sync(pool) == KTMOE_OK);
    CHECK(ktmoe_moe_backward_submit(moe, &ba) == KTMOE_ERR_STATE);
    CHECK(strstr(ktmoe_last_error(), "No forward cache") != NULL);

    /* an expert id out of range fails the task, not the process */
    int64_t bad[Q * K];
    memcpy(bad, ids, sizeof bad);
    bad[3] = E;
    fa.expert_ids = bad;
    fa.save_for_backward = 0;
    CHECK(ktmoe_moe_forward_submit(moe, &fa) == KTMOE_OK);
    CHECK(ktmoe_pool_sync(pool) == KTMOE_ERR_INVALID_ARGUMENT);
    CHECK(strstr(ktmoe_last_error(), "out of range") != NULL);
    ktmoe_moe_destroy(moe);
    return 1;
}

static double rel_err(const float *a, const float *b, int n) {
    double num = 0, den = 0;
    for (int i = 0; i < n; i++) {
        num += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
        den += (double)b[i] * b[i];
    }
    return sqrt(num / (den > 0 ? den : 1));
}

/* Quantized methods: ktmoe_quantize + ktmoe_moe_load_packed hold the same
 * bits as online quantization by ktmoe_moe_load_weights. */
static void quant_checks(ktmoe_pool *pool, const uint16_t *wg, const uint16_t *wu,
                         const uint16_t *wd, const float *x, const int64_t *ids,
                         const float *rw) {
    ktmoe_packed_layout lay;
    CHECK(ktmoe_packed_layout_get(KTMOE_METHOD_INT4_1, 0, 0, 41, &lay) == KTMOE_OK);
    CHECK(lay.row_bytes == 21 && lay.groups == 1 && lay.aux == 1);
    CHECK(ktmoe_packed_layout_get(KTMOE_METHOD_INT4_KGROUP, 32, 1, 96, &lay) == KTMOE_OK);
    CHECK(lay.row_bytes == 48 && lay.groups == 3 && lay.aux == 2);
    CHECK(ktmoe_packed_layout_get(KTMOE_METHOD_INT4_KGROUP, 32, 1, 40, &lay) == KTMOE_ERR_INVALID_ARGUMENT);
    CHECK(strstr(ktmoe_last_error(), "divisible by group_size") != NULL);
    CHECK(ktmoe_packed_layout_get(KTMOE_METHOD_INT4_KGROUP, 24, 1, 48, &lay) == KTMOE_ERR_INVALID_ARGUMENT);
    CHECK(ktmoe_packed_layout_get(99, 0, 0, 40, &lay) == KTMOE_ERR_UNSUPPORTED);

    int methods[2] = {KTMOE_METHOD_INT8, KTMOE_METHOD_INT4_1};
    for (int mi = 0; mi < 2; mi++) {
        int method = methods[mi];
        ktmoe_moe_config cfg = small_config(method);
        ktmoe_moe *moe = NULL;
        CHECK(ktmoe_moe_create(pool, &cfg, &moe) == KTMOE_OK);
        if (!moe) return;
        /* pack the three projections */
        static uint8_t q[3][E * H * I];
        static float sc[3][E * H], mn[3][E * H];
        const uint16_t *src[3] = {wg, wu, wd};
        int rows[3] = {I, I, H}, cols[3] = {H, H, I};
        ktmoe_packed pk[3];
        for (int p = 0; p < 3; p++) {
            CHECK(ktmoe_quantize(method, 0, 0, KTMOE_DTYPE_BF16, src[p], (int64_t)E * rows[p], cols[p],
                                 q[p], sc[p], mn[p]) == KTMOE_OK);
            pk[p].qweight = q[p];
            pk[p].scale = sc[p];
            pk[p].aux = method == KTMOE_METHOD_INT4_1 ? mn[p] : NULL;
        }
        float out1[Q * H], out2[Q * H];
        ktmoe_forward_args fa = {sizeof fa, Q, ids, rw, x, KTMOE_DTYPE_F32, out1, KTMOE_DTYPE_F32, 0, 0};
        CHECK(ktmoe_moe_load_weights(moe, wg, wu, wd, KTMOE_DTYPE_BF16, NULL, E) == KTMOE_OK);
        CHECK(ktmoe_moe_forward_submit(moe, &fa) == KTMOE_OK);
        CHECK(ktmoe_pool_sync(pool) == KTMOE_OK);
        CHECK(ktmoe_moe_load_packed(moe, &pk[0], &pk[1], &pk[2], NULL, E) == KTMOE_OK);
        fa.output = out2;
        CHECK(ktmoe_moe_forward_submit(moe, &fa) == KTMOE_OK);
        CHECK(ktmoe_pool_sync(pool) == KTMOE_OK);
        CHECK(memcmp(out1, out2, sizeof out1) == 0);
        CHECK(ktmoe_moe_weight_bytes(moe) < (int64_t)3 * E * H * I * 2 * 6 / 10);
        /* a bad scale: clear error, layer unloaded */
        sc[2][3] = NAN;
        CHECK(ktmoe_moe_load_packed(moe, &pk[0], &pk[1], &pk[2], NULL, E) == KTMOE_ERR_INVALID_ARGUMENT);
        CHECK(strstr(ktmoe_last_error(), "not finite") != NULL);
        CHECK(ktmoe_moe_forward_submit(moe, &fa) == KTMOE_ERR_STATE);
        ktmoe_moe_destroy(moe);
    }

    /* a caller built against the first, shorter config gets the defaults */
    ktmoe_moe_config cfg = small_config(KTMOE_METHOD_BF16);
    cfg.struct_size = (uint32_t)offsetof(ktmoe_moe_config, group_size);
    ktmoe_moe *moe = NULL;
    CHECK(ktmoe_moe_create(pool, &cfg, &moe) == KTMOE_OK);
    ktmoe_moe_destroy(moe);
    cfg.struct_size = 8;
    CHECK(ktmoe_moe_create(pool, &cfg, &moe) == KTMOE_ERR_INVALID_ARGUMENT);
}

int main(void) {
    CHECK(ktmoe_abi_version() == KTMOE_ABI_VERSION);
    CHECK(strcmp(ktmoe_version(), KTMOE_VERSION_STRING) == 0);
    CHECK(ktmoe_isa_usable(KTMOE_ISA_REF));

    ktmoe_pool_config pc;
    ktmoe_pool_config_init(&pc);
    pc.subpool_count = 4;
    pc.total_threads = 61;
    pc.pin_threads = 0;
    ktmoe_pool *big = NULL;
    CHECK(ktmoe_pool_create(&pc, &big) == KTMOE_OK);
    if (big) {
        int want[4] = {16, 15, 15, 15};
        for (int i = 0; i < 4; i++) CHECK(ktmoe_pool_subpool_threads(big, i) == want[i]);
        int n = 0;
        for (int i = 0; i < 100; i++) CHECK(ktmoe_pool_submit(big, count_task, &n) == KTMOE_OK);
        CHECK(ktmoe_pool_submit(big, fail_task, NULL) == KTMOE_OK);
        CHECK(ktmoe_pool_submit(big, count_task, &n) == KTMOE_OK);
        CHECK(ktmoe_pool_sync(big) == KTMOE_ERR_INTERNAL);
        CHECK(n == 101);
        CHECK(ktmoe_pool_sync(big) == KTMOE_OK);
    }
    ktmoe_pool_destroy(big);
    ktmoe_pool_destroy(NULL);
    pc.total_threads = 2;
    CHECK(ktmoe_pool_create(&pc, &big) == KTMOE_ERR_INVALID_ARGUMENT);

    unsigned seed = 1;
    static uint16_t wg[E * I * H], wu[E * I * H], wd[E * H * I];
    for (int i = 0; i < E * I * H; i++) {
        wg[i] = bf16(frand(&seed) * 0.3f);
        wu[i] = bf16(frand(&seed) * 0.3f);
        wd[i] = bf16(frand(&seed) * 0.3f);
    }
    static float lora_buf[6][E * H * I];
    float *lora[6];
    for (int j = 0; j < 6; j++) {
        lora[j] = lora_buf[j];
        for (int i = 0; i < E * H * I; i++) lora_buf[j][i] = frand(&seed) * 0.2f;
    }
    float x[Q * H], rw[Q * K], gout[Q * H];
    int64_t ids[Q * K];
    for (int i = 0; i < Q * H; i++) x[i] = frand(&seed), gout[i] = frand(&seed);
    for (int t = 0; t < Q; t++) {
        ids[t * K] = t % E;
        ids[t * K + 1] = (t + 2) % E;
        rw[t * K] = 0.6f;
        rw[t * K + 1] = 0.4f;
    }

    pc.subpool_count = 1;
    pc.total_threads = 2;
    ktmoe_pool *pool = NULL;
    CHECK(ktmoe_pool_create(&pc, &pool) == KTMOE_OK);
    if (!pool) return 1;
    static layer_out ref, other;
    CHECK(run_layer(pool, KTMOE_ISA_REF, wg, wu, wd, lora, x, ids, rw, gout, 63, &ref));
    for (int isa = KTMOE_ISA_AVX2; isa <= KTMOE_ISA_AMX; isa++) {
        if (!ktmoe_isa_usable((ktmoe_isa)isa)) continue;
        CHECK(run_layer(pool, (ktmoe_isa)isa, wg, wu, wd, lora, x, ids, rw, gout, 63, &other));
        CHECK(rel_err(other.out, ref.out, Q * H) < 1e-4);
        CHECK(rel_err(other.gin, ref.gin, Q * H) < 1e-4);
        CHECK(rel_err(other.gw, ref.gw, Q * K) < 1e-4);
        int sizes[6] = {E * R * H, E * I * R, E * R * H, E * I * R, E * R * I, E * H * R};
        for (int j = 0; j < 6; j++) CHECK(rel_err(other.grads[j], ref.grads[j], sizes[j]) < 1e-4);
        printf("tier %s matches ref\n", ktmoe_isa_name((ktmoe_isa)isa));
    }
    /* some LoRA gradients skipped (NULL): the others as before, the skipped
     * arrays untouched, on every usable tier */
    for (int isa = KTMOE_ISA_REF; isa <= KTMOE_ISA_AMX; isa++) {
        if (!ktmoe_isa_usable((ktmoe_isa)isa)) continue;
        const int masks[3] = {1 | 32, 2 | 4 | 16, 8};
        int sizes[6] = {E * R * H, E * I * R, E * R * H, E * I * R, E * R * I, E * H * R};
        for (int mi = 0; mi < 3; mi++) {
            for (int j = 0; j < 6; j++)
                for (int i = 0; i < sizes[j]; i++) other.grads[j][i] = 7.0f;
            CHECK(run_layer(pool, (ktmoe_isa)isa, wg, wu, wd, lora, x, ids, rw, gout, masks[mi], &other));
            CHECK(rel_err(other.gin, ref.gin, Q * H) < 1e-4);
            for (int j = 0; j < 6; j++) {
                if ((masks[mi] >> j) & 1) {
                    CHECK(rel_err(other.grads[j], ref.grads[j], sizes[j]) < 1e-4);
                } else {
                    int same = 1;
                    for (int i = 0; i < sizes[j]; i++) same &= other.grads[j][i] == 7.0f;
                    CHECK(same);
                }
            }
        }
    }
    quant_checks(pool, wg, wu, wd, x, ids, rw);
    ktmoe_pool_destroy(pool);
    printf("c_api: %d check(s) failed\n", failures);
    return failures == 0 ? 0 : 1;
}
