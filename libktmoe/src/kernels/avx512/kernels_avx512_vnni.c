/* The avx512 tier's table for CPUs with AVX512-VNNI: the integer dot form
 * of qdot_ymm.h on vpdpbusd (256-bit, AVX512-VL encoding; compiled with
 * -mavx512vnni). */
#include "../../internal.h"

#include "../ymm_common.h"

#define KT_VNNI 1
#define KT_QDOT_NAME kt_qdot_avx512_vnni
#include "../qdot_ymm.h"

const kt_kernels kt_kernels_avx512_vnni = {
    .isa = KTMOE_ISA_AVX512,
    .dot = kt_dot_avx2,
    .dot_many = kt_dot_many_avx512,
    .outer = kt_outer_avx512,
    .qdot = kt_qdot_avx512_vnni,
    .act_fwd = kt_act_fwd_avx2,
    .act_bwd = kt_act_bwd_avx2,
    .quant_act = kt_quant_act_avx2,
    .bwd_cols = 256, /* see kernels_avx512.c */
};
