"""The cffi binding of libktmoe: the only module that touches ``ffi``/``lib``.

The declarations below mirror ``libktmoe/include/ktmoe.h`` (a test checks that
every function of the header is declared here with the same signature).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import cffi

CDEF = r"""
const char *ktmoe_version(void);
int32_t ktmoe_abi_version(void);

typedef enum ktmoe_status {
    KTMOE_OK = 0,
    KTMOE_ERR_INVALID_ARGUMENT = 1,
    KTMOE_ERR_OUT_OF_MEMORY = 2,
    KTMOE_ERR_UNSUPPORTED = 3,
    KTMOE_ERR_STATE = 4,
    KTMOE_ERR_INTERNAL = 5,
    KTMOE_ERR_IO = 6
} ktmoe_status;
const char *ktmoe_last_error(void);
const char *ktmoe_status_name(ktmoe_status status);

typedef enum ktmoe_isa {
    KTMOE_ISA_AUTO = -1,
    KTMOE_ISA_REF = 0,
    KTMOE_ISA_AVX2 = 1,
    KTMOE_ISA_AVX512 = 2,
    KTMOE_ISA_AMX = 3
} ktmoe_isa;
uint32_t ktmoe_cpu_features(void);
const char *ktmoe_cpu_name(void);
const char *ktmoe_isa_name(ktmoe_isa isa);
int32_t ktmoe_isa_compiled(ktmoe_isa isa);
int32_t ktmoe_isa_usable(ktmoe_isa isa);
int32_t ktmoe_isa_emulated(ktmoe_isa isa);
ktmoe_isa ktmoe_isa_selected(void);

typedef struct ktmoe_pool ktmoe_pool;
typedef struct ktmoe_pool_config {
    uint32_t struct_size;
    int32_t subpool_count;
    int32_t total_threads;
    int32_t pin_threads;
} ktmoe_pool_config;
void ktmoe_pool_config_init(ktmoe_pool_config *config);
ktmoe_status ktmoe_pool_create(const ktmoe_pool_config *config, ktmoe_pool **out);
void ktmoe_pool_destroy(ktmoe_pool *pool);
int32_t ktmoe_pool_subpool_count(const ktmoe_pool *pool);
int32_t ktmoe_pool_subpool_threads(const ktmoe_pool *pool, int32_t i);
typedef ktmoe_status (*ktmoe_task_fn)(void *user_data);
ktmoe_status ktmoe_pool_submit(ktmoe_pool *pool, ktmoe_task_fn fn, void *user_data);
ktmoe_status ktmoe_pool_sync(ktmoe_pool *pool);

typedef enum ktmoe_dtype {
    KTMOE_DTYPE_F32 = 0,
    KTMOE_DTYPE_BF16 = 1
} ktmoe_dtype;
typedef enum ktmoe_method {
    KTMOE_METHOD_BF16 = 0,
    KTMOE_METHOD_INT8 = 1,
    KTMOE_METHOD_INT4 = 2,
    KTMOE_METHOD_INT4_1 = 3,
    KTMOE_METHOD_INT4_KGROUP = 4,
    KTMOE_METHOD_INT4_1_KGROUP = 5,
    KTMOE_METHOD_INT8_KGROUP = 6,
    KTMOE_METHOD_FP8 = 7
} ktmoe_method;
typedef struct ktmoe_packed_layout {
    int64_t row_bytes;
    int64_t groups;
    int32_t aux;
} ktmoe_packed_layout;
ktmoe_status ktmoe_packed_layout_get(int32_t method, int32_t group_size, int32_t zero_point, int64_t cols, ktmoe_packed_layout *out);
ktmoe_status ktmoe_quantize(int32_t method, int32_t group_size, int32_t zero_point, ktmoe_dtype src_dtype, const void *src, int64_t rows, int64_t cols, void *qweight, float *scale, void *aux);
typedef struct ktmoe_moe_config {
    uint32_t struct_size;
    int32_t method;
    int64_t num_experts;
    int64_t experts_per_token;
    int64_t hidden_size;
    int64_t intermediate_size;
    int32_t lora_rank;
    float lora_alpha;
    int32_t max_cache_depth;
    int32_t isa;
    int32_t group_size;
    int32_t zero_point;
    int32_t proj_method[3];
    int32_t proj_group_size[3];
    int32_t proj_zero_point[3];
    int32_t activation;
    float act_alpha;
    float act_limit;
    int32_t batch_invariant;
} ktmoe_moe_config;
typedef struct ktmoe_moe ktmoe_moe;
void ktmoe_moe_config_init(ktmoe_moe_config *config);
ktmoe_status ktmoe_moe_create(ktmoe_pool *pool, const ktmoe_moe_config *config, ktmoe_moe **out);
void ktmoe_moe_destroy(ktmoe_moe *moe);
ktmoe_isa ktmoe_moe_isa(const ktmoe_moe *moe);
int64_t ktmoe_moe_weight_bytes(const ktmoe_moe *moe);
int64_t ktmoe_moe_buffer_bytes(const ktmoe_moe *moe);
int32_t ktmoe_moe_cache_depth(const ktmoe_moe *moe);
ktmoe_status ktmoe_moe_load_weights(ktmoe_moe *moe, const void *gate, const void *up, const void *down, ktmoe_dtype dtype, const int64_t *map, int64_t src_experts);
typedef struct ktmoe_packed {
    const void *qweight;
    const float *scale;
    const void *aux;
} ktmoe_packed;
ktmoe_status ktmoe_moe_load_packed(ktmoe_moe *moe, const ktmoe_packed *gate, const ktmoe_packed *up, const ktmoe_packed *down, const int64_t *map, int64_t src_experts);
ktmoe_status ktmoe_moe_set_lora(ktmoe_moe *moe, ktmoe_dtype dtype, const void *gate_a, const void *gate_b, const void *up_a, const void *up_b, const void *down_a, const void *down_b);
typedef struct ktmoe_forward_args {
    uint32_t struct_size;
    int64_t qlen;
    const int64_t *expert_ids;
    const float *weights;
    const void *input;
    int32_t input_dtype;
    void *output;
    int32_t output_dtype;
    int32_t save_for_backward;
    int32_t use_lora;
    int32_t int8_activations;
} ktmoe_forward_args;
typedef struct ktmoe_backward_args {
    uint32_t struct_size;
    int64_t qlen;
    const void *grad_output;
    int32_t grad_output_dtype;
    void *grad_input;
    int32_t grad_input_dtype;
    float *grad_weights;
    void *grad_gate_a, *grad_gate_b, *grad_up_a, *grad_up_b, *grad_down_a, *grad_down_b;
    int32_t grad_lora_dtype;
    int32_t accumulate;
} ktmoe_backward_args;
ktmoe_status ktmoe_moe_forward_submit(ktmoe_moe *moe, const ktmoe_forward_args *args);
ktmoe_status ktmoe_moe_backward_submit(ktmoe_moe *moe, const ktmoe_backward_args *args);
ktmoe_status ktmoe_moe_cache_drop_submit(ktmoe_moe *moe);
"""

#: Feature bits of ``ktmoe_cpu_features()``, in bit order.
CPU_FEATURES = (
    "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
    "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8",
)
ISA_NAMES = ("ref", "avx2", "avx512", "amx")

ffi = cffi.FFI()
ffi.cdef(CDEF)

_LIB_NAMES = {"linux": "libktmoe.so", "darwin": "libktmoe.dylib", "win32": "ktmoe.dll"}


def _candidates():
    env = os.environ.get("KTMOE_LIBRARY")
    if env:
        yield Path(env)
    name = _LIB_NAMES.get(sys.platform, "libktmoe.so")
    here = Path(__file__).resolve().parent
    yield here / name
    # editable installs (meson-python) keep the library in the build tree
    try:
        from importlib.resources import files

        yield Path(str(files("ktmoe") / name))
    except Exception:  # pragma: no cover - resources may not resolve
        pass
    for build in sorted(here.parent.glob("build*/**/libktmoe/" + name)):
        yield build


def _editable_rebuild_path():
    """meson-python editable installs: ask the loader where the library is."""
    for finder in sys.meta_path:
        rebuild = getattr(finder, "_rebuild", None)
        if rebuild is None:
            continue
        try:
            tree = rebuild()
            node = tree.get("ktmoe", {}) if isinstance(tree, dict) else {}
            for name, path in node.items() if isinstance(node, dict) else []:
                if name.startswith("libktmoe") and isinstance(path, str):
                    return Path(path)
        except Exception:  # pragma: no cover
            continue
    return None


def _load():
    tried = []
    paths = list(_candidates())
    editable = _editable_rebuild_path()
    if editable is not None:
        paths.insert(1, editable)
    for p in paths:
        tried.append(str(p))
        if p.is_file():
            return ffi.dlopen(str(p)), p
    raise ImportError(
        "libktmoe shared library not found; tried: " + ", ".join(tried)
        + ". Reinstall the package (pip install .) or set KTMOE_LIBRARY."
    )


lib, LIBRARY_PATH = _load()

if lib.ktmoe_abi_version() != 1:
    raise ImportError(
        f"libktmoe at {LIBRARY_PATH} has ABI version {lib.ktmoe_abi_version()}, "
        "this package expects 1"
    )

DTYPE_F32 = lib.KTMOE_DTYPE_F32
DTYPE_BF16 = lib.KTMOE_DTYPE_BF16

_EXC = {
    lib.KTMOE_ERR_INVALID_ARGUMENT: ValueError,
    lib.KTMOE_ERR_OUT_OF_MEMORY: MemoryError,
    lib.KTMOE_ERR_UNSUPPORTED: ValueError,
    lib.KTMOE_ERR_STATE: RuntimeError,
    lib.KTMOE_ERR_INTERNAL: RuntimeError,
    lib.KTMOE_ERR_IO: OSError,
}


def last_error() -> str:
    return ffi.string(lib.ktmoe_last_error()).decode("utf-8", "replace")


def check(status: int, what: str = "") -> None:
    """Raise the exception class mapped to a non-OK status."""
    if status == lib.KTMOE_OK:
        return
    msg = last_error() or ffi.string(lib.ktmoe_status_name(status)).decode()
    raise _EXC.get(status, RuntimeError)(f"{what}: {msg}" if what and not msg else msg)


def isa_from_name(name):
    """'ref'/'avx2'/... or None -> ktmoe_isa value."""
    if name is None or name == "auto":
        return lib.KTMOE_ISA_AUTO
    try:
        return ISA_NAMES.index(str(name).lower())
    except ValueError:
        raise ValueError(f"unknown isa {name!r}; valid: {', '.join(ISA_NAMES)} or None") from None


def isa_name(value: int) -> str:
    return ffi.string(lib.ktmoe_isa_name(value)).decode()


def cpu_info() -> dict:
    feats = lib.ktmoe_cpu_features()
    compiled = [n for i, n in enumerate(ISA_NAMES) if lib.ktmoe_isa_compiled(i)]
    usable = [n for i, n in enumerate(ISA_NAMES) if lib.ktmoe_isa_usable(i)]
    return {
        "cpu": ffi.string(lib.ktmoe_cpu_name()).decode("utf-8", "replace"),
        "features": [n for i, n in enumerate(CPU_FEATURES) if feats & (1 << i)],
        "compiled_tiers": compiled,
        "usable_tiers": usable,
        "emulated_tiers": [n for i, n in enumerate(ISA_NAMES) if lib.ktmoe_isa_emulated(i)],
        "selected_tier": isa_name(lib.ktmoe_isa_selected()),
        "isa_cap": os.environ.get("KTMOE_ISA") or None,
        "library": str(LIBRARY_PATH),
        "version": ffi.string(lib.ktmoe_version()).decode(),
        "abi_version": lib.ktmoe_abi_version(),
        "logical_cpus": os.cpu_count(),
    }


def ptr(tensor, ctype: str = "void *"):
    """A cffi pointer to a (validated, contiguous, CPU) tensor's data."""
    return ffi.cast(ctype, tensor.data_ptr())
