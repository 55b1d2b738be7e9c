/*
 * ktmoe.h -- the public C interface of libktmoe.
 *
 * libktmoe runs the routed experts of a mixture-of-experts (MoE) layer on the
 * CPU: forward, backward and LoRA gradients, for LoRA fine-tuning (SFT) of MoE
 * language models whose experts stay in CPU memory.
 *
 * Objects
 *   ktmoe_pool  A worker pool split into sub-pools (one per NUMA node or per
 *               tensor-parallel slice) plus a FIFO task queue.  Work is
 *               submitted with ktmoe_*_submit() calls, which return at once;
 *               ktmoe_pool_sync() waits for every queued task and returns the
 *               first error any of them raised.
 *   ktmoe_moe   One MoE layer: the frozen expert weights (one packed copy,
 *               used by forward and backward), borrowed pointers to the six
 *               LoRA factors, and a LIFO cache of forward activations.
 *
 * Math (token t routed to expert e with weight w, s = lora_alpha / lora_rank)
 *   g = x Wg^T + s (x Ag^T) Bg^T,  u = x Wu^T + s (x Au^T) Bu^T,
 *   h = silu(g) * u,  y_e = h Wd^T + s (h Ad^T) Bd^T,  out_t = sum_e w_e y_e.
 *   Wg, Wu: [I, H]; Wd: [H, I]; Ag, Au: [r, H]; Bg, Bu: [I, r]; Ad: [r, I];
 *   Bd: [H, r].  All arrays are row-major and contiguous.
 *
 * Errors
 *   Every function that can fail returns a ktmoe_status.  The message of the
 *   last failure on the calling thread is ktmoe_last_error().  Errors raised
 *   while a queued task runs are returned by ktmoe_pool_sync(), whose caller
 *   then finds the message in ktmoe_last_error().  The library never aborts,
 *   exits or prints.
 *
 * Memory
 *   Memory passed in is borrowed for the duration of the call, except:
 *   arguments of a submitted task are read while it runs, that is until the
 *   next ktmoe_pool_sync(); LoRA factors given to ktmoe_moe_set_lora() are
 *   read in place until the handle is destroyed or the pointers are re-bound.
 *
 * Instruction-set tiers
 *   ref (portable C) < avx2 (AVX2+FMA+F16C) < avx512 < amx.  A handle uses
 *   the best tier that is compiled in, supported by the CPU and the OS, and
 *   not above the cap given by the environment variable KTMOE_ISA or by the
 *   handle's configuration.
 */
#ifndef KTMOE_H
#define KTMOE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(KTMOE_BUILDING) && defined(__GNUC__)
#define KTMOE_API __attribute__((visibility("default")))
#else
#define KTMOE_API
#endif

#define KTMOE_VERSION_MAJOR 0
#define KTMOE_VERSION_MINOR 1
#define KTMOE_VERSION_PATCH 0
#define KTMOE_VERSION_STRING "0.1.0"
/* Bumped on any incompatible change of this header. */
#define KTMOE_ABI_VERSION 1

/* The runtime library's version string, e.g. "0.1.0". */
KTMOE_API const char *ktmoe_version(void);
/* The runtime library's ABI version; compare with KTMOE_ABI_VERSION. */
KTMOE_API int32_t ktmoe_abi_version(void);

/* ------------------------------------------------------------------ */
/* Errors                                                              */

typedef enum ktmoe_status {
    KTMOE_OK = 0,
    KTMOE_ERR_INVALID_ARGUMENT = 1, /* bad shape, size, pointer, id ...  */
    KTMOE_ERR_OUT_OF_MEMORY = 2,
    KTMOE_ERR_UNSUPPORTED = 3,      /* tier, method or size not supported */
    KTMOE_ERR_STATE = 4,            /* call out of order (cache, weights) */
    KTMOE_ERR_INTERNAL = 5,
    KTMOE_ERR_IO = 6
} ktmoe_status;

/* Message of the last error on the calling thread ("" if none). */
KTMOE_API const char *ktmoe_last_error(void);
/* A fixed name for a status code, e.g. "KTMOE_ERR_STATE". */
KTMOE_API const char *ktmoe_status_name(ktmoe_status status);

/* ------------------------------------------------------------------ */
/* CPU features and instruction-set tiers                              */

typedef enum ktmoe_isa {
    KTMOE_ISA_AUTO = -1, /* best usable tier                          */
    KTMOE_ISA_REF = 0,
    KTMOE_ISA_AVX2 = 1,
    KTMOE_ISA_AVX512 = 2,
    KTMOE_ISA_AMX = 3
} ktmoe_isa;

/* Feature bits returned by ktmoe_cpu_features(): CPUID and OS state both. */
#define KTMOE_CPU_AVX2 (1u << 0)
#define KTMOE_CPU_FMA (1u << 1)
#define KTMOE_CPU_F16C (1u << 2)
#define KTMOE_CPU_AVX512F (1u << 3)
#define KTMOE_CPU_AVX512BW (1u << 4)
#define KTMOE_CPU_AVX512VL (1u << 5)
#define KTMOE_CPU_AVX512_BF16 (1u << 6)
#define KTMOE_CPU_AVX512_VNNI (1u << 7)
#define KTMOE_CPU_AMX_TILE (1u << 8)
#define KTMOE_CPU_AMX_BF16 (1u << 9)
#define KTMOE_CPU_AMX_INT8 (1u << 10)

KTMOE_API uint32_t ktmoe_cpu_features(void);
/* The CPU's brand string, or "" where the CPU does not say. */
KTMOE_API const char *ktmoe_cpu_name(void);
/* "ref", "avx2", "avx512", "amx"; NULL for an unknown value. */
KTMOE_API const char *ktmoe_isa_name(ktmoe_isa isa);
/* 1 if the tier's kernels are compiled into this library. */
KTMOE_API int32_t ktmoe_isa_compiled(ktmoe_isa isa);
/* 1 if the tier is compiled in and this CPU and OS can run it. */
KTMOE_API int32_t ktmoe_isa_usable(ktmoe_isa isa);
/* 1 if the tier is compiled as a portable emulation of its instructions
 * (the build option emulate=true: the avx512 and amx tiers then run on any
 * AVX2 CPU, correctly but slowly; for testing). */
KTMOE_API int32_t ktmoe_isa_emulated(ktmoe_isa isa);
/* The tier a handle created with KTMOE_ISA_AUTO uses: the best usable tier
 * not above the KTMOE_ISA environment cap (read on each call). */
KTMOE_API ktmoe_isa ktmoe_isa_selected(void);

/* ------------------------------------------------------------------ */
/* Worker pool and task queue                                          */

typedef struct ktmoe_pool ktmoe_pool;

typedef struct ktmoe_pool_config {
    uint32_t struct_size;   /* sizeof(ktmoe_pool_config)                 */
    int32_t subpool_count;  /* >= 1; one per NUMA node / TP slice        */
    int32_t total_threads;  /* >= subpool_count; split as evenly as
                               possible, the remainder to the first
                               sub-pools (61 over 4 -> 16,15,15,15)      */
    int32_t pin_threads;    /* -1: pin when the machine has several NUMA
                               nodes; 0: never; 1: always                */
} ktmoe_pool_config;

/* Fills *config with defaults (1 sub-pool, 1 thread, pin_threads -1). */
KTMOE_API void ktmoe_pool_config_init(ktmoe_pool_config *config);
KTMOE_API ktmoe_status ktmoe_pool_create(const ktmoe_pool_config *config,
                                         ktmoe_pool **out);
/* Waits for queued tasks, then frees the pool.  NULL is accepted. */
KTMOE_API void ktmoe_pool_destroy(ktmoe_pool *pool);
KTMOE_API int32_t ktmoe_pool_subpool_count(const ktmoe_pool *pool);
/* Threads of sub-pool i (0 if i is out of range). */
KTMOE_API int32_t ktmoe_pool_subpool_threads(const ktmoe_pool *pool,
                                             int32_t i);

/* A user task: runs on the pool's queue thread, in FIFO order with every
 * other submitted task.  A non-OK return is reported by ktmoe_pool_sync(),
 * with `message` (may be NULL) as the error message. */
typedef ktmoe_status (*ktmoe_task_fn)(void *user_data);
KTMOE_API ktmoe_status ktmoe_pool_submit(ktmoe_pool *pool, ktmoe_task_fn fn,
                                         void *user_data);
/* Waits until every task submitted so far has run.  Returns the first error
 * of those tasks (later tasks still run) and sets ktmoe_last_error(). */
KTMOE_API ktmoe_status ktmoe_pool_sync(ktmoe_pool *pool);

/* ------------------------------------------------------------------ */
/* MoE layer                                                           */

typedef enum ktmoe_dtype {
    KTMOE_DTYPE_F32 = 0,
    KTMOE_DTYPE_BF16 = 1
} ktmoe_dtype;

/* Numeric format of the frozen expert weights (docs/quant_formats.md).
 * A matrix W [rows, cols] (cols: the reduction dimension K) is packed as
 *   qweight  bf16 [rows][cols] (BF16), int8 [rows][cols] (INT8), or 4-bit
 *            codes u in 0..15, two per byte, [rows][(cols + 1) / 2]: column
 *            c is the low nibble of byte c/2 for even c, the high one for odd
 *   scale    float [rows][groups] (not for BF16)
 *   aux      float min [rows][groups] (INT4_1, INT4_1_KGROUP) or uint8
 *            zero [rows][groups] (INT4_KGROUP with zero_point), else none
 * Value of W[r][c], g = c / group_size (0 for the per-row formats):
 *   INT8               q * scale[r][g]
 *   INT4, INT4_KGROUP  (u - 8) * scale[r][g]       (zero_point = 0)
 *   INT4_KGROUP        (u - zero[r][g]) * scale[r][g]  (zero_point = 1)
 *   INT4_1, INT4_1_KGROUP  u * scale[r][g] + min[r][g]
 *   INT8_KGROUP        q * scale[r][g]
 *   FP8                e4m3(q) * scale[r][g]  (qweight: uint8 FP8 E4M3
 *                      codes [rows][cols]; DeepSeek-V3's 128x128 block
 *                      scale_inv is its per-row scale with group_size 128)
 *   MXFP4              e2m1(u) * scale[r][g]  (OCP MX FP4: u a 4-bit E2M1
 *                      code, sign bit 3, magnitudes 0 .5 1 1.5 2 3 4 6, in
 *                      the 4-bit layout; group_size KTMOE_MXFP4_GROUP_SIZE;
 *                      an E8M0 scale byte b is the float 2^(b - 127))
 * The K-group methods (INT4_KGROUP, INT4_1_KGROUP, INT8_KGROUP, FP8, MXFP4) need
 * cols % group_size == 0 and group_size a
 * positive multiple of KTMOE_GROUP_SIZE_MULTIPLE. */
typedef enum ktmoe_method {
    KTMOE_METHOD_BF16 = 0,
    KTMOE_METHOD_INT8 = 1,          /* symmetric, one scale per row        */
    KTMOE_METHOD_INT4 = 2,          /* symmetric, one scale per row        */
    KTMOE_METHOD_INT4_1 = 3,        /* scale + min per row                 */
    KTMOE_METHOD_INT4_KGROUP = 4,   /* scale (+ zero point) per K group    */
    KTMOE_METHOD_INT4_1_KGROUP = 5, /* scale + min per K group             */
    KTMOE_METHOD_INT8_KGROUP = 6,   /* symmetric, scale per K group        */
    KTMOE_METHOD_FP8 = 7,           /* FP8 E4M3, scale per K group         */
    KTMOE_METHOD_MXFP4 = 8          /* FP4 E2M1, power-of-two scale per 32 */
} ktmoe_method;

#define KTMOE_MXFP4_GROUP_SIZE 32

#define KTMOE_GROUP_SIZE_MULTIPLE 16

/* The packed layout of one [rows, cols] matrix of a method. */
typedef struct ktmoe_packed_layout {
    int64_t row_bytes;  /* bytes of qweight per row                        */
    int64_t groups;     /* scale (and aux) entries per row; 0 for BF16     */
    int32_t aux;        /* 0: none, 1: float min, 2: uint8 zero point      */
} ktmoe_packed_layout;

KTMOE_API ktmoe_status ktmoe_packed_layout_get(int32_t method, int32_t group_size,
                                               int32_t zero_point, int64_t cols,
                                               ktmoe_packed_layout *out);

/* Packs src [rows, cols] (bf16 or fp32) into qweight, scale and aux as laid
 * out above, on the calling thread.  The same code packs the weights given
 * to ktmoe_moe_load_weights.  Fails (KTMOE_ERR_INVALID_ARGUMENT) on a NaN
 * or infinite weight for the integer methods. */
KTMOE_API ktmoe_status ktmoe_quantize(int32_t method, int32_t group_size, int32_t zero_point,
                                      ktmoe_dtype src_dtype, const void *src, int64_t rows,
                                      int64_t cols, void *qweight, float *scale, void *aux);

typedef struct ktmoe_moe_config {
    uint32_t struct_size;       /* sizeof(ktmoe_moe_config)              */
    int32_t method;             /* ktmoe_method                          */
    int64_t num_experts;        /* E                                     */
    int64_t experts_per_token;  /* k                                     */
    int64_t hidden_size;        /* H                                     */
    int64_t intermediate_size;  /* I, divisible by the pool's sub-pools  */
    int32_t lora_rank;          /* r                                     */
    float lora_alpha;           /* s = lora_alpha / lora_rank            */
    int32_t max_cache_depth;    /* forward caches kept for backward      */
    int32_t isa;                /* ktmoe_isa: AUTO, or a tier to use     */
    int32_t group_size;         /* K-group methods: columns per group    */
    int32_t zero_point;         /* INT4_KGROUP: 1 integer zero point per
                                   group, 0 the fixed offset 8          */
    /* Per projection (gate, up, down): a method of its own, e.g. for GGUF
     * files that mix types; -1 (the default) takes method, group_size and
     * zero_point above. */
    int32_t proj_method[3];
    int32_t proj_group_size[3];
    int32_t proj_zero_point[3];
    /* The expert activation h(g, u) of the gate and up projections:
     *   KTMOE_ACT_SILU          silu(g) * u                  (default)
     *   KTMOE_ACT_SWIGLU_CLAMP  GPT-OSS: gc = min(g, limit),
     *                           uc = clamp(u, -limit, limit),
     *                           h = gc * sigmoid(alpha * gc) * (uc + 1)
     * (act_alpha 1.702 and act_limit 7.0 by default; both finite, > 0). */
    int32_t activation;
    float act_alpha;
    float act_limit;
    /* 1 (the default): a token's result does not depend on the other tokens
     * of a call, bit for bit (a chunked prefill equals one call).  0: the
     * forward and backward kernels may choose their order of summation by
     * the number of tokens per expert, which is faster (SFT layers, and the
     * Python package's inference layers by default). */
    int32_t batch_invariant;
} ktmoe_moe_config;

enum { KTMOE_ACT_SILU = 0, KTMOE_ACT_SWIGLU_CLAMP = 1 };

typedef struct ktmoe_moe ktmoe_moe;

KTMOE_API void ktmoe_moe_config_init(ktmoe_moe_config *config);
/* The layer keeps `pool` (borrowed) and splits I over its sub-pools. */
KTMOE_API ktmoe_status ktmoe_moe_create(ktmoe_pool *pool,
                                        const ktmoe_moe_config *config,
                                        ktmoe_moe **out);
/* Frees the layer.  The caller syncs its pool first.  NULL is accepted. */
KTMOE_API void ktmoe_moe_destroy(ktmoe_moe *moe);
/* The tier this layer's kernels use. */
KTMOE_API ktmoe_isa ktmoe_moe_isa(const ktmoe_moe *moe);
/* Bytes of frozen weights the layer holds (packed data, scales, mins).
 * Packed rows of a multiple of 1 KB are held one cache line longer
 * (docs/architecture.md, Memory), which counts here. */
KTMOE_API int64_t ktmoe_moe_weight_bytes(const ktmoe_moe *moe);
/* Bytes of activation caches and scratch buffers the layer holds now. */
KTMOE_API int64_t ktmoe_moe_buffer_bytes(const ktmoe_moe *moe);
/* Forward caches currently held (0..max_cache_depth). */
KTMOE_API int32_t ktmoe_moe_cache_depth(const ktmoe_moe *moe);

/* Copies the frozen weights in, packing them in the layer's method (runs
 * on the pool; synchronous).
 * gate, up: [E_src, I, H]; down: [E_src, H, I] in `dtype`.  Physical expert
 * p of the layer takes source expert map[p] (0 <= map[p] < E_src);
 * map == NULL means the identity (then E_src == E). */
KTMOE_API ktmoe_status ktmoe_moe_load_weights(ktmoe_moe *moe, const void *gate,
                                              const void *up, const void *down,
                                              ktmoe_dtype dtype,
                                              const int64_t *map,
                                              int64_t src_experts);

/* One projection of src_experts experts, packed as ktmoe_quantize writes
 * it for this layer's method: qweight [E_src][rows][row_bytes], scale and
 * aux [E_src][rows][groups] (NULL where the method has none). */
typedef struct ktmoe_packed {
    const void *qweight;
    const float *scale;
    const void *aux;
} ktmoe_packed;

/* Loads pre-packed frozen weights (e.g. read from a weight file), with the
 * same map rule as ktmoe_moe_load_weights.  Scales must be finite and
 * zero points at most 15 (KTMOE_ERR_INVALID_ARGUMENT otherwise). */
KTMOE_API ktmoe_status ktmoe_moe_load_packed(ktmoe_moe *moe, const ktmoe_packed *gate,
                                             const ktmoe_packed *up,
                                             const ktmoe_packed *down,
                                             const int64_t *map, int64_t src_experts);

/* Binds the six LoRA factors (read in place, not copied).  Shapes as in the
 * header comment, each with an expert dimension E in front; all of `dtype`.
 * Call again whenever a tensor moved.  NULL pointers unbind LoRA. */
KTMOE_API ktmoe_status ktmoe_moe_set_lora(ktmoe_moe *moe, ktmoe_dtype dtype,
                                          const void *gate_a,
                                          const void *gate_b,
                                          const void *up_a, const void *up_b,
                                          const void *down_a,
                                          const void *down_b);

/* An expert id that routes nothing: the slot adds nothing to the output
 * and its routing-weight gradient is 0 (dropped tokens, experts computed
 * elsewhere). */
#define KTMOE_SKIP_EXPERT (-1)

typedef struct ktmoe_forward_args {
    uint32_t struct_size;        /* sizeof(ktmoe_forward_args)            */
    int64_t qlen;                /* tokens                                */
    const int64_t *expert_ids;   /* [qlen, k]                             */
    const float *weights;        /* [qlen, k] routing weights             */
    const void *input;           /* [qlen, H] of input_dtype              */
    int32_t input_dtype;         /* ktmoe_dtype                           */
    void *output;                /* [qlen, H] of output_dtype             */
    int32_t output_dtype;        /* ktmoe_dtype                           */
    int32_t save_for_backward;   /* push a forward cache for backward     */
    int32_t use_lora;            /* 0: base weights only; with
                                  * save_for_backward its backward computes
                                  * no LoRA terms (grad_input and
                                  * grad_weights only; LoRA gradients given
                                  * are zero) */
    /* Inference: 1 runs the integer kernels on activations quantized to
     * int8 per block of 32 (d = max|x| / 127), x and h alike, when the
     * call has no LoRA and no save_for_backward, every projection is INT8,
     * INT8_KGROUP or a 4-bit method, and hidden_size, the intermediate
     * slice and group sizes are multiples of 32; otherwise ignored (fp32
     * activations).  Faster, at ~0.5% relative error on the output. */
    int32_t int8_activations;
} ktmoe_forward_args;

typedef struct ktmoe_backward_args {
    uint32_t struct_size;        /* sizeof(ktmoe_backward_args)           */
    int64_t qlen;                /* must equal the cached forward's       */
    const void *grad_output;     /* [qlen, H] of grad_output_dtype        */
    int32_t grad_output_dtype;
    void *grad_input;            /* [qlen, H] of grad_input_dtype         */
    int32_t grad_input_dtype;
    float *grad_weights;         /* [qlen, k] or NULL                     */
    /* The six LoRA gradients, shaped like the factors, of grad_lora_dtype.
     * NULL skips one (all NULL: grad_lora_dtype is not read).  With
     * accumulate != 0 they are added to. */
    void *grad_gate_a, *grad_gate_b, *grad_up_a, *grad_up_b, *grad_down_a,
        *grad_down_b;
    int32_t grad_lora_dtype;
    int32_t accumulate;
} ktmoe_backward_args;

/* Queues a forward.  With save_for_backward the activations are pushed on
 * the layer's LIFO cache (KTMOE_ERR_STATE when it is full).  Expert ids out
 * of [0, E), other than KTMOE_SKIP_EXPERT, fail the task with
 * KTMOE_ERR_INVALID_ARGUMENT.  The arguments
 * struct is copied; the arrays it points to are read until sync. */
KTMOE_API ktmoe_status ktmoe_moe_forward_submit(ktmoe_moe *moe,
                                                const ktmoe_forward_args *args);
/* Queues a backward of the newest cached forward and pops it
 * (KTMOE_ERR_STATE when the cache is empty). */
KTMOE_API ktmoe_status ktmoe_moe_backward_submit(
    ktmoe_moe *moe, const ktmoe_backward_args *args);
/* Queues the release of the newest cached forward, unused (a forward whose
 * backward will not come, e.g. recomputed under gradient checkpointing);
 * KTMOE_ERR_STATE when the cache is empty. */
KTMOE_API ktmoe_status ktmoe_moe_cache_drop_submit(ktmoe_moe *moe);

#ifdef __cplusplus
}
#endif

#endif /* KTMOE_H */
