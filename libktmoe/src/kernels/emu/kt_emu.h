/* Portable emulation of the AVX-512 / AMX intrinsics the avx512 and amx
 * tiers use, for the emulation build (meson option emulate=true): the tier
 * sources are compiled unchanged with only the avx2 flags and this header
 * force-included (-include) before them.  It includes <immintrin.h> first
 * (which declares the real intrinsics, usable only with their target
 * flags), then defines static inline functions under kt_emu_* names and
 * #defines the intrinsic names to them, so every later use in the tier
 * source expands to the emulation.  An intrinsic a tier uses and this
 * header lacks fails to compile ("target specific option mismatch"), so
 * the list below is exactly what the tiers need.
 *
 * Semantics follow the pseudo-code of the Intel SDM / intrinsics guide:
 *
 *   vpdpbusd (_mm256_dpbusd_epi32, _mm512_dpbusd_epi32)  per dword lane:
 *     the 4 products of unsigned bytes of a and signed bytes of b (exact in
 *     16 bits), summed and added to src with 32-bit wrap-around (no
 *     saturation).
 *   the AVX-512 F/BW integer, shuffle, gather and masked-load operations of
 *     the amx tier's integer dot form (qdot_amx.c), lane by lane as the
 *     intrinsics guide defines them (gathers and masked loads read only
 *     the selected elements).
 *   ldtilecfg / tilerelease / tileloadd / tilestored / tilezero  on a
 *     thread-local tile state (8 tiles of 16 rows x 64 bytes, palette 1);
 *     a load writes rows[t] rows of colsb[t] bytes and zeroes the rest of
 *     the tile; loading a config zeroes all tiles.
 *   tdpbf16ps  for each row m of dst, pair k of src1 and column n:
 *       tmp[n] += f32(a[m].bf16[2k])   * f32(b[k].bf16[2n])
 *       tmp[n] += f32(a[m].bf16[2k+1]) * f32(b[k].bf16[2n+1])
 *     in that order, each product and each sum rounded to fp32 (nearest
 *     even), denormal bf16 inputs read as zero and denormal results
 *     flushed to zero (DAZ/FTZ, MXCSR not consulted).
 *   tdpbssd / tdpbusd  for each row m of dst, dword k of src1 and column n:
 *       dst[m][n] += sum over e < 4 of a[m].byte[4k+e] * b[k].byte[4n+e]
 *     with a's bytes signed (ssd) or unsigned (usd), b's signed, 32-bit
 *     wrap-around.
 * Where the hardware raises #UD or #GP (tiles not configured, shapes that
 * do not match: dst.rows != src1.rows, src1.colsb / 4 != src2.rows,
 * src2.colsb != dst.colsb, bad config), the emulation fills the
 * destination (or the stored memory) with NaN bit patterns instead, so a
 * misuse makes the tests fail rather than pass silently. */
#ifndef KT_EMU_H
#define KT_EMU_H

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define KT_EMULATED 1

/* __m512 values pass between the inline emulation functions of a build
 * without -mavx512f; GCC's note on that ABI does not concern them. */
#pragma GCC diagnostic ignored "-Wpsabi"

/* ---- AVX512-VNNI (256-bit, VL encoding) ---- */

static inline __m256i kt_emu_mm256_dpbusd_epi32(__m256i src, __m256i a, __m256i b) {
    /* even and odd bytes as 16-bit lanes: a zero-extended, b sign-extended;
     * vpmaddwd then sums 2 exact products per dword, twice */
    const __m256i lo8 = _mm256_set1_epi16(0x00FF);
    __m256i ae = _mm256_and_si256(a, lo8), ao = _mm256_srli_epi16(a, 8);
    __m256i be = _mm256_srai_epi16(_mm256_slli_epi16(b, 8), 8), bo = _mm256_srai_epi16(b, 8);
    __m256i s = _mm256_add_epi32(_mm256_madd_epi16(ae, be), _mm256_madd_epi16(ao, bo));
    return _mm256_add_epi32(src, s);
}
#undef _mm256_dpbusd_epi32
#define _mm256_dpbusd_epi32 kt_emu_mm256_dpbusd_epi32

/* ---- AVX-512 F (the fp32 panel kernels, kernels/avx512/panels_avx512.c) ----
 * 16 fp32 lanes; masked loads read only the selected lanes (zero elsewhere),
 * masked stores write only those; fmadd is fused per lane (fmaf). */

static inline __attribute__((always_inline)) __m512 kt_emu_mm512_setzero_ps(void) {
    float z[16] = {0};
    __m512 r;
    memcpy(&r, z, sizeof r);
    return r;
}

static inline __attribute__((always_inline)) __m512 kt_emu_mm512_set1_ps(float x) {
    float v[16];
    for (int i = 0; i < 16; i++) v[i] = x;
    __m512 r;
    memcpy(&r, v, sizeof r);
    return r;
}

static inline __attribute__((always_inline)) __m512 kt_emu_mm512_maskz_loadu_ps(__mmask16 k, const void *p) {
    float v[16];
    for (int i = 0; i < 16; i++) {
        v[i] = 0.0f;
        if ((k >> i) & 1) memcpy(&v[i], (const float *)p + i, sizeof(float));
    }
    __m512 r;
    memcpy(&r, v, sizeof r);
    return r;
}

static inline __attribute__((always_inline)) void kt_emu_mm512_mask_storeu_ps(void *p, __mmask16 k, __m512 a) {
    float v[16];
    memcpy(v, &a, sizeof v);
    for (int i = 0; i < 16; i++)
        if ((k >> i) & 1) memcpy((float *)p + i, &v[i], sizeof(float));
}

static inline __attribute__((always_inline)) __m512 kt_emu_mm512_fmadd_ps(__m512 a, __m512 b, __m512 c) {
    float x[16], y[16], z[16];
    memcpy(x, &a, sizeof x);
    memcpy(y, &b, sizeof y);
    memcpy(z, &c, sizeof z);
    for (int i = 0; i < 16; i++) z[i] = fmaf(x[i], y[i], z[i]);
    __m512 r;
    memcpy(&r, z, sizeof r);
    return r;
}

static inline __attribute__((always_inline)) __m512 kt_emu_mm512_mul_ps(__m512 a, __m512 b) {
    float x[16], y[16];
    memcpy(x, &a, sizeof x);
    memcpy(y, &b, sizeof y);
    for (int i = 0; i < 16; i++) x[i] *= y[i];
    __m512 r;
    memcpy(&r, x, sizeof r);
    return r;
}

#undef _mm512_setzero_ps
#define _mm512_setzero_ps kt_emu_mm512_setzero_ps
#undef _mm512_set1_ps
#define _mm512_set1_ps kt_emu_mm512_set1_ps
#undef _mm512_maskz_loadu_ps
#define _mm512_maskz_loadu_ps kt_emu_mm512_maskz_loadu_ps
/* the aligned form: the emulation does not fault on misalignment */
#undef _mm512_maskz_load_ps
#define _mm512_maskz_load_ps kt_emu_mm512_maskz_loadu_ps
static inline __attribute__((always_inline)) __m512 kt_emu_mm512_load_ps(const void *p) {
    __m512 r;
    memcpy(&r, p, sizeof r);
    return r;
}
#undef _mm512_load_ps
#define _mm512_load_ps kt_emu_mm512_load_ps
#undef _mm512_mask_storeu_ps
#define _mm512_mask_storeu_ps kt_emu_mm512_mask_storeu_ps
#undef _mm512_fmadd_ps
#define _mm512_fmadd_ps kt_emu_mm512_fmadd_ps
#undef _mm512_mul_ps
#define _mm512_mul_ps kt_emu_mm512_mul_ps

/* ---- AVX-512 F/BW integer, shuffle and conversion operations (qdot_amx.c;
 * the panel conversions of panels_avx512.c) ---- */

#define KT_EMU_V(T, name) T name[64 / sizeof(T)]
#define KT_EMU_IN(arr, v) memcpy(arr, &(v), 64)
#define KT_EMU_OUT(type, arr) \
    type r_;                  \
    memcpy(&r_, arr, 64);     \
    return r_

static inline __attribute__((always_inline)) __m512i kt_emu_mm512_setzero_si512(void) {
    KT_EMU_V(uint8_t, z) = {0};
    KT_EMU_OUT(__m512i, z);
}
static inline __attribute__((always_inline)) __m512i kt_emu_mm512_set1_epi8(char x) {
    KT_EMU_V(uint8_t, z);
    memset(z, (uint8_t)x, 64);
    KT_EMU_OUT(__m512i, z);
}
static inline __attribute__((always_inline)) __m512i kt_emu_mm512_set1_epi32(int x) {
    KT_EMU_V(int32_t, z);
    for (int i = 0; i < 16; i++) z[i] = x;
    KT_EMU_OUT(__m512i, z);
}
static inline __attribute__((always_inline)) __m512i kt_emu_mm512_set_epi64(long long e7, long long e6, long long e5,
                                                                           long long e4, long long e3, long long e2,
                                                                           long long e1, long long e0) {
    KT_EMU_V(int64_t, z) = {e0, e1, e2, e3, e4, e5, e6, e7};
    KT_EMU_OUT(__m512i, z);
}
static inline __attribute__((always_inline)) __m512i kt_emu_mm512_load_si512(const void *p) {
    __m512i r;
    memcpy(&r, p, 64);
    return r;
}
static inline __attribute__((always_inline)) void kt_emu_mm512_store_si512(void *p, __m512i a) { memcpy(p, &a, 64); }
static inline __attribute__((always_inline)) void kt_emu_mm512_store_ps(void *p, __m512 a) { memcpy(p, &a, 64); }
static inline __attribute__((always_inline)) __m512i kt_emu_mm512_maskz_loadu_epi8(__mmask64 k, const void *p) {
    KT_EMU_V(uint8_t, z) = {0};
    for (int i = 0; i < 64; i++)
        if ((k >> i) & 1) z[i] = ((const uint8_t *)p)[i];
    KT_EMU_OUT(__m512i, z);
}
static inline __attribute__((always_inline)) __m512i kt_emu_mm512_and_si512(__m512i a, __m512i b) {
    KT_EMU_V(uint8_t, x);
    KT_EMU_V(uint8_t, y);
    KT_EMU_IN(x, a);
    KT_EMU_IN(y, b);
    for (int i = 0; i < 64; i++) x[i] &= y[i];
    KT_EMU_OUT(__m512i, x);
}
static inline __attribute__((always_inline)) __m512i kt_emu_mm512_add_epi32(__m512i a, __m512i b) {
    KT_EMU_V(uint32_t, x);
    KT_EMU_V(uint32_t, y);
    KT_EMU_IN(x, a);
    KT_EMU_IN(y, b);
    for (int i = 0; i < 16; i++) x[i] += y[i];
    KT_EMU_OUT(__m512i, x);
}
static inline __attribute__((always_inline)) __m512i kt_emu_mm512_mullo_epi32(__m512i a, __m512i b) {
    KT_EMU_V(uint32_t, x);
    KT_EMU_V(uint32_t, y);
    KT_EMU_IN(x, a);
    KT_EMU_IN(y, b);
    for (int i = 0; i < 16; i++) x[i] *= y[i];
    KT_EMU_OUT(__m512i, x);
}
static inline __attribute__((always_inline)) __m512i kt_emu_mm512_srli_epi16(__m512i a, unsigned int n) {
    KT_EMU_V(uint16_t, x);
    KT_EMU_IN(x, a);
    for (int i = 0; i < 32; i++) x[i] = n > 15 ? 0 : (uint16_t)(x[i] >> n);
    KT_EMU_OUT(__m512i, x);
}
static inline __attribute__((always_inline)) __m512i kt_emu_mm512_srli_epi32(__m512i a, unsigned int n) {
    KT_EMU_V(uint32_t, x);
    KT_EMU_IN(x, a);
    for (int i = 0; i < 16; i++) x[i] = n > 31 ? 0 : x[i] >> n;
    KT_EMU_OUT(__m512i, x);
}
static inline __attribute__((always_inline)) __m512i kt_emu_mm512_dpbusd_epi32(__m512i src, __m512i a, __m512i b) {
    KT_EMU_V(int32_t, s);
    KT_EMU_V(uint8_t, x);
    KT_EMU_V(int8_t, y);
    KT_EMU_IN(s, src);
    KT_EMU_IN(x, a);
    KT_EMU_IN(y, b);
    for (int i = 0; i < 16; i++) {
        int32_t t = 0;
        for (int e = 0; e < 4; e++) t += (int32_t)x[4 * i + e] * (int32_t)y[4 * i + e];
        s[i] = (int32_t)((uint32_t)s[i] + (uint32_t)t);
    }
    KT_EMU_OUT(__m512i, s);
}
static inline __attribute__((always_inline)) __m512i kt_emu_mm512_xor_si512(__m512i a, __m512i b) {
    KT_EMU_V(uint8_t, x);
    KT_EMU_V(uint8_t, y);
    KT_EMU_IN(x, a);
    KT_EMU_IN(y, b);
    for (int i = 0; i < 64; i++) x[i] ^= y[i];
    KT_EMU_OUT(__m512i, x);
}
static inline __attribute__((always_inline)) __m512i kt_emu_mm512_sub_epi32(__m512i a, __m512i b) {
    KT_EMU_V(uint32_t, x);
    KT_EMU_V(uint32_t, y);
    KT_EMU_IN(x, a);
    KT_EMU_IN(y, b);
    for (int i = 0; i < 16; i++) x[i] -= y[i];
    KT_EMU_OUT(__m512i, x);
}
/* per 128-bit lane: dword e of the result is dword (imm >> 2e) & 3 of a's lane */
static inline __attribute__((always_inline)) __m512i kt_emu_mm512_shuffle_epi32(__m512i a, int imm) {
    KT_EMU_V(uint32_t, x);
    KT_EMU_V(uint32_t, z);
    KT_EMU_IN(x, a);
    for (int l = 0; l < 4; l++)
        for (int e = 0; e < 4; e++) z[4 * l + e] = x[4 * l + ((imm >> (2 * e)) & 3)];
    KT_EMU_OUT(__m512i, z);
}
static inline __attribute__((always_inline)) __m512i kt_emu_mm512_permutexvar_epi32(__m512i idx, __m512i a) {
    KT_EMU_V(int32_t, i);
    KT_EMU_V(uint32_t, x);
    KT_EMU_V(uint32_t, z);
    KT_EMU_IN(i, idx);
    KT_EMU_IN(x, a);
    for (int e = 0; e < 16; e++) z[e] = x[i[e] & 15];
    KT_EMU_OUT(__m512i, z);
}
/* per 128-bit lane: the low (hi = 0) or high halves of a and b interleaved
 * in elements of w bytes */
static inline __attribute__((always_inline)) __m512i kt_emu_unpack(__m512i a, __m512i b, int w, int hi) {
    KT_EMU_V(uint8_t, x);
    KT_EMU_V(uint8_t, y);
    KT_EMU_V(uint8_t, z);
    KT_EMU_IN(x, a);
    KT_EMU_IN(y, b);
    for (int l = 0; l < 4; l++)
        for (int e = 0; e < 8 / w; e++) {
            int src = 16 * l + (hi ? 8 : 0) + w * e;
            memcpy(z + 16 * l + 2 * w * e, x + src, (size_t)w);
            memcpy(z + 16 * l + 2 * w * e + w, y + src, (size_t)w);
        }
    KT_EMU_OUT(__m512i, z);
}
#define KT_EMU_UNPACK(name, w, hi) \
    static inline __attribute__((always_inline)) __m512i name(__m512i a, __m512i b) { return kt_emu_unpack(a, b, w, hi); }
KT_EMU_UNPACK(kt_emu_mm512_unpacklo_epi8, 1, 0)
KT_EMU_UNPACK(kt_emu_mm512_unpackhi_epi8, 1, 1)
KT_EMU_UNPACK(kt_emu_mm512_unpacklo_epi32, 4, 0)
KT_EMU_UNPACK(kt_emu_mm512_unpackhi_epi32, 4, 1)
KT_EMU_UNPACK(kt_emu_mm512_unpacklo_epi64, 8, 0)
KT_EMU_UNPACK(kt_emu_mm512_unpackhi_epi64, 8, 1)
static inline __attribute__((always_inline)) __m512i kt_emu_mm512_shuffle_i32x4(__m512i a, __m512i b, int imm) {
    KT_EMU_V(uint8_t, x);
    KT_EMU_V(uint8_t, y);
    KT_EMU_V(uint8_t, z);
    KT_EMU_IN(x, a);
    KT_EMU_IN(y, b);
    for (int l = 0; l < 4; l++) memcpy(z + 16 * l, (l < 2 ? x : y) + 16 * ((imm >> (2 * l)) & 3), 16);
    KT_EMU_OUT(__m512i, z);
}
static inline __attribute__((always_inline)) __m512i kt_emu_mm512_permutex2var_epi64(__m512i a, __m512i idx, __m512i b) {
    KT_EMU_V(int64_t, x);
    KT_EMU_V(int64_t, y);
    KT_EMU_V(int64_t, i);
    KT_EMU_V(int64_t, z);
    KT_EMU_IN(x, a);
    KT_EMU_IN(y, b);
    KT_EMU_IN(i, idx);
    for (int e = 0; e < 8; e++) z[e] = (i[e] & 8) ? y[i[e] & 7] : x[i[e] & 7];
    KT_EMU_OUT(__m512i, z);
}
static inline __attribute__((always_inline)) __m512 kt_emu_mm512_permutexvar_ps(__m512i idx, __m512 a) {
    KT_EMU_V(int32_t, i);
    KT_EMU_V(float, x);
    KT_EMU_V(float, z);
    KT_EMU_IN(i, idx);
    KT_EMU_IN(x, a);
    for (int e = 0; e < 16; e++) z[e] = x[i[e] & 15];
    KT_EMU_OUT(__m512, z);
}
static inline __attribute__((always_inline)) __m512 kt_emu_mm512_cvtepi32_ps(__m512i a) {
    KT_EMU_V(int32_t, x);
    KT_EMU_V(float, z);
    KT_EMU_IN(x, a);
    for (int e = 0; e < 16; e++) z[e] = (float)x[e];
    KT_EMU_OUT(__m512, z);
}
static inline __attribute__((always_inline)) __m512 kt_emu_mm512_add_ps(__m512 a, __m512 b) {
    KT_EMU_V(float, x);
    KT_EMU_V(float, y);
    KT_EMU_IN(x, a);
    KT_EMU_IN(y, b);
    for (int e = 0; e < 16; e++) x[e] += y[e];
    KT_EMU_OUT(__m512, x);
}
static inline __attribute__((always_inline)) __m512 kt_emu_mm512_sub_ps(__m512 a, __m512 b) {
    KT_EMU_V(float, x);
    KT_EMU_V(float, y);
    KT_EMU_IN(x, a);
    KT_EMU_IN(y, b);
    for (int e = 0; e < 16; e++) x[e] -= y[e];
    KT_EMU_OUT(__m512, x);
}
static inline __attribute__((always_inline)) __m512 kt_emu_mm512_loadu_ps(const void *p) {
    __m512 r;
    memcpy(&r, p, sizeof r);
    return r;
}
static inline __attribute__((always_inline)) void kt_emu_mm512_storeu_ps(void *p, __m512 a) { memcpy(p, &a, 64); }
static inline __attribute__((always_inline)) __m512 kt_emu_mm512_castsi512_ps(__m512i a) {
    __m512 r;
    memcpy(&r, &a, sizeof r);
    return r;
}
/* 16 uint16 (zero-extended) or int8 (sign-extended) lanes to int32 */
static inline __attribute__((always_inline)) __m512i kt_emu_mm512_cvtepu16_epi32(__m256i a) {
    uint16_t x[16];
    KT_EMU_V(int32_t, z);
    memcpy(x, &a, sizeof x);
    for (int e = 0; e < 16; e++) z[e] = x[e];
    KT_EMU_OUT(__m512i, z);
}
static inline __attribute__((always_inline)) __m512i kt_emu_mm512_cvtepi8_epi32(__m128i a) {
    int8_t x[16];
    KT_EMU_V(int32_t, z);
    memcpy(x, &a, sizeof x);
    for (int e = 0; e < 16; e++) z[e] = x[e];
    KT_EMU_OUT(__m512i, z);
}
static inline __attribute__((always_inline)) __m512i kt_emu_mm512_slli_epi32(__m512i a, unsigned int n) {
    KT_EMU_V(uint32_t, x);
    KT_EMU_IN(x, a);
    for (int e = 0; e < 16; e++) x[e] = n > 31 ? 0 : x[e] << n;
    KT_EMU_OUT(__m512i, x);
}
/* the selected elements read from base + vindex * scale, the others src's */
static inline __attribute__((always_inline)) __m512i kt_emu_gather32(__m512i src, __mmask16 k, __m512i vindex,
                                                                    const void *base, int scale) {
    KT_EMU_V(int32_t, z);
    KT_EMU_V(int32_t, i);
    KT_EMU_IN(z, src);
    KT_EMU_IN(i, vindex);
    for (int e = 0; e < 16; e++)
        if ((k >> e) & 1) memcpy(&z[e], (const uint8_t *)base + (int64_t)i[e] * scale, 4);
    KT_EMU_OUT(__m512i, z);
}
static inline __attribute__((always_inline)) __m512i kt_emu_mm512_mask_i32gather_epi32(__m512i src, __mmask16 k,
                                                                                       __m512i vindex, const void *base,
                                                                                       int scale) {
    return kt_emu_gather32(src, k, vindex, base, scale);
}
static inline __attribute__((always_inline)) __m512 kt_emu_mm512_mask_i32gather_ps(__m512 src, __mmask16 k, __m512i vindex,
                                                                                   const void *base, int scale) {
    __m512i s, r;
    memcpy(&s, &src, 64);
    r = kt_emu_gather32(s, k, vindex, base, scale);
    __m512 f;
    memcpy(&f, &r, 64);
    return f;
}

#undef _mm512_setzero_si512
#define _mm512_setzero_si512 kt_emu_mm512_setzero_si512
#undef _mm512_set1_epi8
#define _mm512_set1_epi8 kt_emu_mm512_set1_epi8
#undef _mm512_set1_epi32
#define _mm512_set1_epi32 kt_emu_mm512_set1_epi32
#undef _mm512_set_epi64
#define _mm512_set_epi64 kt_emu_mm512_set_epi64
#undef _mm512_load_si512
#define _mm512_load_si512 kt_emu_mm512_load_si512
#undef _mm512_store_si512
#define _mm512_store_si512 kt_emu_mm512_store_si512
#undef _mm512_store_ps
#define _mm512_store_ps kt_emu_mm512_store_ps
#undef _mm512_maskz_loadu_epi8
#define _mm512_maskz_loadu_epi8 kt_emu_mm512_maskz_loadu_epi8
#undef _mm512_and_si512
#define _mm512_and_si512 kt_emu_mm512_and_si512
#undef _mm512_add_epi32
#define _mm512_add_epi32 kt_emu_mm512_add_epi32
#undef _mm512_sub_epi32
#define _mm512_sub_epi32 kt_emu_mm512_sub_epi32
#undef _mm512_xor_si512
#define _mm512_xor_si512 kt_emu_mm512_xor_si512
#undef _mm512_shuffle_epi32
#define _mm512_shuffle_epi32(a, imm) kt_emu_mm512_shuffle_epi32(a, (int)(imm))
#undef _mm512_permutexvar_epi32
#define _mm512_permutexvar_epi32 kt_emu_mm512_permutexvar_epi32
#undef _mm512_mullo_epi32
#define _mm512_mullo_epi32 kt_emu_mm512_mullo_epi32
#undef _mm512_srli_epi16
#define _mm512_srli_epi16 kt_emu_mm512_srli_epi16
#undef _mm512_srli_epi32
#define _mm512_srli_epi32 kt_emu_mm512_srli_epi32
#undef _mm512_dpbusd_epi32
#define _mm512_dpbusd_epi32 kt_emu_mm512_dpbusd_epi32
#undef _mm512_unpacklo_epi8
#define _mm512_unpacklo_epi8 kt_emu_mm512_unpacklo_epi8
#undef _mm512_unpackhi_epi8
#define _mm512_unpackhi_epi8 kt_emu_mm512_unpackhi_epi8
#undef _mm512_unpacklo_epi32
#define _mm512_unpacklo_epi32 kt_emu_mm512_unpacklo_epi32
#undef _mm512_unpackhi_epi32
#define _mm512_unpackhi_epi32 kt_emu_mm512_unpackhi_epi32
#undef _mm512_unpacklo_epi64
#define _mm512_unpacklo_epi64 kt_emu_mm512_unpacklo_epi64
#undef _mm512_unpackhi_epi64
#define _mm512_unpackhi_epi64 kt_emu_mm512_unpackhi_epi64
#undef _mm512_shuffle_i32x4
#define _mm512_shuffle_i32x4 kt_emu_mm512_shuffle_i32x4
#undef _mm512_permutex2var_epi64
#define _mm512_permutex2var_epi64 kt_emu_mm512_permutex2var_epi64
#undef _mm512_permutexvar_ps
#define _mm512_permutexvar_ps kt_emu_mm512_permutexvar_ps
#undef _mm512_loadu_ps
#define _mm512_loadu_ps kt_emu_mm512_loadu_ps
#undef _mm512_storeu_ps
#define _mm512_storeu_ps kt_emu_mm512_storeu_ps
#undef _mm512_castsi512_ps
#define _mm512_castsi512_ps kt_emu_mm512_castsi512_ps
#undef _mm512_cvtepu16_epi32
#define _mm512_cvtepu16_epi32 kt_emu_mm512_cvtepu16_epi32
#undef _mm512_cvtepi8_epi32
#define _mm512_cvtepi8_epi32 kt_emu_mm512_cvtepi8_epi32
#undef _mm512_slli_epi32
#define _mm512_slli_epi32 kt_emu_mm512_slli_epi32
#undef _mm512_cvtepi32_ps
#define _mm512_cvtepi32_ps kt_emu_mm512_cvtepi32_ps
#undef _mm512_add_ps
#define _mm512_add_ps kt_emu_mm512_add_ps
#undef _mm512_sub_ps
#define _mm512_sub_ps kt_emu_mm512_sub_ps
#undef _mm512_mask_i32gather_epi32
#define _mm512_mask_i32gather_epi32 kt_emu_mm512_mask_i32gather_epi32
#undef _mm512_mask_i32gather_ps
#define _mm512_mask_i32gather_ps kt_emu_mm512_mask_i32gather_ps

/* ---- AMX ---- */

typedef struct kt_emu_tilestate {
    int configured;
    uint16_t colsb[8];
    uint8_t rows[8];
    uint8_t t[8][16][64];
} kt_emu_tilestate;

static __thread kt_emu_tilestate kt_emu_tiles;

static inline void kt_emu_tile_poison(uint8_t *p, int64_t rows, int64_t colsb, int64_t stride) {
    for (int64_t r = 0; r < rows; r++) memset(p + r * stride, 0xFF, (size_t)colsb);
}

static inline void kt_emu_tile_release(void) { memset(&kt_emu_tiles, 0, sizeof kt_emu_tiles); }

/* The 64-byte config: palette (byte 0), start_row (1), reserved (2-15),
 * colsb of tiles 0-15 (16-bit, bytes 16-47), rows of tiles 0-15 (48-63).
 * Palette 0 releases; palette 1: 8 tiles of at most 16 rows x 64 bytes. */
static inline void kt_emu_tile_loadconfig(const void *config) {
    const uint8_t *c = (const uint8_t *)config;
    kt_emu_tile_release();
    if (c[0] == 0) return;
    int ok = c[0] == 1;
    for (int i = 2; i < 16; i++) ok &= c[i] == 0;
    for (int i = 0; i < 16; i++) {
        uint16_t colsb;
        memcpy(&colsb, c + 16 + 2 * i, 2);
        uint8_t rows = c[48 + i];
        if (i >= 8) {
            ok &= colsb == 0 && rows == 0;
            continue;
        }
        ok &= colsb <= 64 && rows <= 16 && (colsb == 0) == (rows == 0);
        kt_emu_tiles.colsb[i] = colsb;
        kt_emu_tiles.rows[i] = rows;
    }
    kt_emu_tiles.configured = ok;
}

static inline int kt_emu_tile_ok(int t) {
    return kt_emu_tiles.configured && t >= 0 && t < 8 && kt_emu_tiles.rows[t] > 0;
}

static inline void kt_emu_tile_poison_tile(int t) {
    if (t >= 0 && t < 8) memset(kt_emu_tiles.t[t], 0xFF, sizeof kt_emu_tiles.t[t]);
}

static inline void kt_emu_tile_loadd(int t, const void *base, int64_t stride) {
    if (!kt_emu_tile_ok(t)) {
        kt_emu_tile_poison_tile(t);
        return;
    }
    memset(kt_emu_tiles.t[t], 0, sizeof kt_emu_tiles.t[t]);
    for (int r = 0; r < kt_emu_tiles.rows[t]; r++)
        memcpy(kt_emu_tiles.t[t][r], (const uint8_t *)base + r * stride, kt_emu_tiles.colsb[t]);
}

static inline void kt_emu_tile_stored(int t, void *base, int64_t stride) {
    if (!kt_emu_tile_ok(t)) {
        if (kt_emu_tiles.configured && t >= 0 && t < 8)
            kt_emu_tile_poison((uint8_t *)base, kt_emu_tiles.rows[t], kt_emu_tiles.colsb[t], stride);
        return;
    }
    for (int r = 0; r < kt_emu_tiles.rows[t]; r++)
        memcpy((uint8_t *)base + r * stride, kt_emu_tiles.t[t][r], kt_emu_tiles.colsb[t]);
}

static inline void kt_emu_tile_zero(int t) {
    if (!kt_emu_tile_ok(t)) {
        kt_emu_tile_poison_tile(t);
        return;
    }
    memset(kt_emu_tiles.t[t], 0, sizeof kt_emu_tiles.t[t]);
}

/* The #UD shape checks of the tile dot products. */
static inline int kt_emu_tile_dp_ok(int d, int a, int b) {
    const kt_emu_tilestate *s = &kt_emu_tiles;
    return kt_emu_tile_ok(d) && kt_emu_tile_ok(a) && kt_emu_tile_ok(b) && d != a && d != b &&
           a != b && s->rows[d] == s->rows[a] && s->colsb[a] % 4 == 0 && s->colsb[d] % 4 == 0 &&
           s->colsb[a] / 4 == s->rows[b] && s->colsb[b] == s->colsb[d];
}

/* fp32 with a denormal flushed to (signed) zero. */
static inline float kt_emu_ftz(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7F800000u) == 0) u &= 0x80000000u;
    memcpy(&x, &u, 4);
    return x;
}

/* A bf16 as fp32, denormals read as zero. */
static inline float kt_emu_bf16_daz(const uint8_t *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    uint32_t u = (uint32_t)v << 16;
    if ((u & 0x7F800000u) == 0) u &= 0x80000000u;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Rows past dst.rows and bytes past dst.colsb are zeroed (write_row_and_zero,
 * zero_upper_rows). */
static inline void kt_emu_tile_dpbf16ps(int d, int a, int b) {
    kt_emu_tilestate *s = &kt_emu_tiles;
    if (!kt_emu_tile_dp_ok(d, a, b)) {
        kt_emu_tile_poison_tile(d);
        return;
    }
    int M = s->rows[d], N = s->colsb[d] / 4, KP = s->colsb[a] / 4;
    for (int m = 0; m < M; m++) {
        float tmp[16];
        memcpy(tmp, s->t[d][m], (size_t)N * 4);
        for (int k = 0; k < KP; k++)
            for (int n = 0; n < N; n++) {
                for (int e = 0; e < 2; e++) {
                    float x = kt_emu_bf16_daz(&s->t[a][m][4 * k + 2 * e]);
                    float y = kt_emu_bf16_daz(&s->t[b][k][4 * n + 2 * e]);
                    float p = kt_emu_ftz(x * y);
                    tmp[n] = kt_emu_ftz(tmp[n] + p);
                }
            }
        memset(s->t[d][m], 0, 64);
        memcpy(s->t[d][m], tmp, (size_t)N * 4);
    }
    for (int m = M; m < 16; m++) memset(s->t[d][m], 0, 64);
}

/* tdpbssd (asigned 1) / tdpbusd (0): int8 dot products of dwords, 32-bit
 * wrap-around; rows and bytes past dst's shape zeroed as above. */
static inline void kt_emu_tile_dpb(int d, int a, int b, int asigned) {
    kt_emu_tilestate *s = &kt_emu_tiles;
    if (!kt_emu_tile_dp_ok(d, a, b)) {
        kt_emu_tile_poison_tile(d);
        return;
    }
    int M = s->rows[d], N = s->colsb[d] / 4, KD = s->colsb[a] / 4;
    for (int m = 0; m < M; m++) {
        uint32_t acc[16];
        memcpy(acc, s->t[d][m], (size_t)N * 4);
        for (int k = 0; k < KD; k++)
            for (int n = 0; n < N; n++)
                for (int e = 0; e < 4; e++) {
                    uint8_t av = s->t[a][m][4 * k + e];
                    int32_t x = asigned ? (int32_t)(int8_t)av : (int32_t)av;
                    int32_t y = (int8_t)s->t[b][k][4 * n + e];
                    acc[n] += (uint32_t)(x * y);
                }
        memset(s->t[d][m], 0, 64);
        memcpy(s->t[d][m], acc, (size_t)N * 4);
    }
    for (int m = M; m < 16; m++) memset(s->t[d][m], 0, 64);
}

#undef _tile_loadd
#undef _tile_stream_loadd
#undef _tile_stored
#undef _tile_zero
#undef _tile_dpbf16ps
#define _tile_loadconfig kt_emu_tile_loadconfig
#define _tile_release kt_emu_tile_release
#define _tile_loadd(t, base, stride) kt_emu_tile_loadd(t, base, stride)
#define _tile_stream_loadd(t, base, stride) kt_emu_tile_loadd(t, base, stride)
#define _tile_stored(t, base, stride) kt_emu_tile_stored(t, base, stride)
#define _tile_zero(t) kt_emu_tile_zero(t)
#define _tile_dpbf16ps(d, a, b) kt_emu_tile_dpbf16ps(d, a, b)
#undef _tile_dpbssd
#undef _tile_dpbusd
#define _tile_dpbssd(d, a, b) kt_emu_tile_dpb(d, a, b, 1)
#define _tile_dpbusd(d, a, b) kt_emu_tile_dpb(d, a, b, 0)

#endif
