/* Helpers shared by the kernel files built on 256-bit vectors (the avx2
 * tier, and the avx512 tier's VNNI table). */
#ifndef KT_YMM_COMMON_H
#define KT_YMM_COMMON_H

#include <immintrin.h>

#define KT_INLINE static inline __attribute__((always_inline))

KT_INLINE float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#endif
