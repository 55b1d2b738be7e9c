/* The avx512 tier: chosen only when CPUID and the OS (XCR0 opmask and ZMM
 * state) allow AVX-512 F/BW/VL; compiled with those flags.  Checked against
 * the ref tier by the test suite.
 *
 * What it adds today is the integer dot form on AVX512-VNNI (vpdpbusd,
 * kernels_avx512_vnni.c, the table dispatch.c picks on CPUs that have it);
 * every other kernel is the avx2 tier's.  512-bit forms were measured on
 * Zen 4 (256-bit AVX-512 units) and not kept: see qdot_ymm.h. */
#include "../../internal.h"

const kt_kernels kt_kernels_avx512 = {
    .isa = KTMOE_ISA_AVX512,
    .dot = kt_dot_avx2,
    .dot_many = kt_dot_many_avx512,
    .outer = kt_outer_avx512,
    .qdot = kt_qdot_avx2,
    .act_fwd = kt_act_fwd_avx2,
    .act_bwd = kt_act_bwd_avx2,
};
