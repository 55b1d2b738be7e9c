/* Instruction-set tiers: which are compiled, which this CPU runs, which is
 * chosen.  Kernels of a tier live in kernels/<tier>/.
 *
 * In the emulation build (KTMOE_EMULATE, meson option emulate) the avx512
 * and amx tier sources are compiled against kernels/emu/kt_emu.h, portable
 * code for the AVX-512 / AMX instructions they use, with the avx2 flags
 * only: those tiers then need only what the avx2 tier needs, and the
 * avx512 tier always takes its VNNI table (emulated vpdpbusd). */
#include "internal.h"

#include <stdlib.h>
#include <strings.h>

KTMOE_API const char *ktmoe_isa_name(ktmoe_isa isa) {
    switch (isa) {
    case KTMOE_ISA_AUTO: return "auto";
    case KTMOE_ISA_REF: return "ref";
    case KTMOE_ISA_AVX2: return "avx2";
    case KTMOE_ISA_AVX512: return "avx512";
    case KTMOE_ISA_AMX: return "amx";
    }
    return NULL;
}

const kt_kernels *kt_kernels_get(ktmoe_isa isa) {
    switch (isa) {
    case KTMOE_ISA_REF: return &kt_kernels_ref;
#if defined(KTMOE_HAVE_AVX2)
    case KTMOE_ISA_AVX2: return &kt_kernels_avx2;
#endif
#if defined(KTMOE_HAVE_AVX512)
    case KTMOE_ISA_AVX512:
#if defined(KTMOE_EMULATE)
        return &kt_kernels_avx512_vnni;
#else
        return (kt_cpu_features() & KTMOE_CPU_AVX512_VNNI) ? &kt_kernels_avx512_vnni
                                                           : &kt_kernels_avx512;
#endif
#endif
#if defined(KTMOE_HAVE_AMX)
    case KTMOE_ISA_AMX: return &kt_kernels_amx;
#endif
    default: return NULL;
    }
}

KTMOE_API int32_t ktmoe_isa_compiled(ktmoe_isa isa) {
    return kt_kernels_get(isa) != NULL;
}

static int kt_cpu_has(ktmoe_isa isa) {
    uint32_t f = kt_cpu_features();
    const uint32_t avx2 = KTMOE_CPU_AVX2 | KTMOE_CPU_FMA | KTMOE_CPU_F16C;
    const uint32_t avx512 = avx2 | KTMOE_CPU_AVX512F | KTMOE_CPU_AVX512BW |
                            KTMOE_CPU_AVX512VL;
    /* the amx files are compiled with the AVX512-VNNI/BF16 flags too (every
     * AMX CPU has them; the tier's integer kernel is the VNNI one) */
    const uint32_t amx = avx512 | KTMOE_CPU_AVX512_VNNI | KTMOE_CPU_AVX512_BF16 |
                         KTMOE_CPU_AMX_TILE | KTMOE_CPU_AMX_BF16;
#if defined(KTMOE_EMULATE)
    if (isa == KTMOE_ISA_AVX512 || isa == KTMOE_ISA_AMX) return (f & avx2) == avx2;
#endif
    switch (isa) {
    case KTMOE_ISA_REF: return 1;
    case KTMOE_ISA_AVX2: return (f & avx2) == avx2;
    case KTMOE_ISA_AVX512: return (f & avx512) == avx512;
    case KTMOE_ISA_AMX: return (f & amx) == amx;
    default: return 0;
    }
}

KTMOE_API int32_t ktmoe_isa_usable(ktmoe_isa isa) {
    return ktmoe_isa_compiled(isa) && kt_cpu_has(isa);
}

KTMOE_API int32_t ktmoe_isa_emulated(ktmoe_isa isa) {
#if defined(KTMOE_EMULATE)
    return (isa == KTMOE_ISA_AVX512 || isa == KTMOE_ISA_AMX) && ktmoe_isa_compiled(isa);
#else
    KT_UNUSED(isa);
    return 0;
#endif
}

/* The KTMOE_ISA environment cap; AMX (the top) when unset or unknown. */
static ktmoe_isa kt_env_cap(void) {
    const char *s = getenv("KTMOE_ISA");
    if (!s || !*s) return KTMOE_ISA_AMX;
    for (int i = KTMOE_ISA_REF; i <= KTMOE_ISA_AMX; i++)
        if (strcasecmp(s, ktmoe_isa_name((ktmoe_isa)i)) == 0) return (ktmoe_isa)i;
    return KTMOE_ISA_AMX;
}

KTMOE_API ktmoe_isa ktmoe_isa_selected(void) {
    ktmoe_isa cap = kt_env_cap();
    for (int i = cap; i > KTMOE_ISA_REF; i--)
        if (ktmoe_isa_usable((ktmoe_isa)i)) return (ktmoe_isa)i;
    return KTMOE_ISA_REF;
}
