/* The avx512 tier: chosen only when CPUID and the OS (XCR0 opmask and ZMM
 * state) allow AVX-512 F/BW/VL; compiled with those flags.  Checked against
 * the ref tier by the test suite.
 *
 * What it adds: the 512-bit panel kernels of the outer form and dot_many
 * (panels_avx512.c; on CPUs with 256-bit AVX-512 units they hand over to
 * the avx2 ones), and the integer dot form on AVX512-VNNI (vpdpbusd,
 * kernels_avx512_vnni.c, the table dispatch.c picks on CPUs that have it).
 * The row-order dot form and the activations are the avx2 tier's.  512-bit
 * forms of the integer kernel were measured on Zen 4 and not kept: see
 * qdot_ymm.h.
 *
 * The SFT backward's column tile (bwd_cols) is 256: each D row (dO, dg,
 * du) is read once a tile, and the 512-bit panels' 12 x 32 register tile
 * runs 4x as long a task.  Paired against 64 on a full-width AVX-512 Intel
 * CPU (2 threads): BF16 1.04x at qlen 512, 1.08x at 64, 1.05x at 16;
 * INT8/INT4 1.02-1.05x.  On 256-bit units the panels are the avx2 tier's,
 * where 256 columns measured 1.00-1.03x on that CPU. */
#include "../../internal.h"

const kt_kernels kt_kernels_avx512 = {
    .isa = KTMOE_ISA_AVX512,
    .dot = kt_dot_avx2,
    .dot_many = kt_dot_many_avx512,
    .outer = kt_outer_avx512,
    .qdot = kt_qdot_avx2,
    .act_fwd = kt_act_fwd_avx2,
    .act_bwd = kt_act_bwd_avx2,
    .quant_act = kt_quant_act_avx2,
    .bwd_cols = 256,
};
