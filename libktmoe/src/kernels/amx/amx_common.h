/* Helpers shared by the amx tier's files (kernels_amx.c: the AMX-BF16
 * kernels; qdot_amx.c: the AMX-INT8 integer dot form). */
#ifndef KT_AMX_COMMON_H
#define KT_AMX_COMMON_H

#include "../ymm_common.h"

/* ---- tile configs ---- */

typedef struct kt_tilecfg {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} kt_tilecfg;

/* GCC 12's _tile_loadconfig names only the first 8 bytes of the config as
 * its memory operand, so stores to the rest of a local config could be
 * dropped as dead (the int8 config lost its rows and columns that way:
 * tilezero then raised #UD).  This asm reads the whole config first. */
KT_INLINE void tile_load(const kt_tilecfg *cfg) {
    __asm__ volatile("" : : "m"(*cfg) : "memory");
    _tile_loadconfig(cfg);
}

/* r[i] <- column i of the 8 x 8 32-bit words r[0..8) (row j: r[j]). */
KT_INLINE void tr8x8_regs(__m256i r[8]) {
    __m256i t[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        r[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm256_permute2x128_si256(r[i], r[i + 4], 0x20);
        t[i + 4] = _mm256_permute2x128_si256(r[i], r[i + 4], 0x31);
    }
    for (int i = 0; i < 8; i++) r[i] = t[i];
}

#endif
