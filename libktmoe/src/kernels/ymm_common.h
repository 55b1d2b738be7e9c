/* Helpers shared by the kernel files built on 256-bit vectors (the avx2
 * tier, the avx512 tier's VNNI table, the amx tier's packing). */
#ifndef KT_YMM_COMMON_H
#define KT_YMM_COMMON_H

#include <immintrin.h>

#define KT_INLINE static inline __attribute__((always_inline))

#include <stdint.h>
#include <string.h>

/* 8 bf16 as fp32. */
KT_INLINE __m256 ld8_bf16(const uint16_t *p) {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

/* The 4-bit codes of 8 columns starting at byte p (an even column), as int32. */
KT_INLINE __m256i nib8(const uint8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    const __m128i dup = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, -1, -1, -1, -1, -1, -1, -1, -1);
    __m256i x = _mm256_cvtepu8_epi32(_mm_shuffle_epi8(_mm_cvtsi32_si128(v), dup));
    x = _mm256_srlv_epi32(x, _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4));
    return _mm256_and_si256(x, _mm256_set1_epi32(15));
}

/* 8 FP8 E4M3 codes as fp32, as kt_fp8_to_f32: the magnitude bits
 * rebiased, then the sign. */
KT_INLINE __m256 fp8x8(const uint8_t *p) {
    __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    __m256i mag = _mm256_slli_epi32(_mm256_and_si256(v, _mm256_set1_epi32(0x7F)), 20);
    __m256i sgn = _mm256_slli_epi32(_mm256_and_si256(v, _mm256_set1_epi32(0x80)), 24);
    __m256 f = _mm256_mul_ps(_mm256_castsi256_ps(mag), _mm256_set1_ps(0x1p120f));
    return _mm256_or_ps(f, _mm256_castsi256_ps(sgn));
}

/* 8 FP4 E2M1 codes (int32 lanes) as fp32: the magnitude from the 3 low
 * bits, then the sign bit. */
KT_INLINE __m256 e2m1x8(__m256i u) {
    const __m256 mag = _mm256_setr_ps(0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f);
    __m256 v = _mm256_permutevar8x32_ps(mag, u);
    __m256i sgn = _mm256_slli_epi32(_mm256_and_si256(u, _mm256_set1_epi32(8)), 28);
    return _mm256_xor_ps(v, _mm256_castsi256_ps(sgn));
}

KT_INLINE float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#endif
