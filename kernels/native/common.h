/* batchlm native CPU kernels: what gemv.c and layers.c share. The vector width
 * of this build (AVX-512, AVX2 or none), vector helpers over float32 lanes,
 * and bfloat16 <-> float32 as torch converts (round to nearest, ties to even).
 */
#ifndef BATCHLM_NATIVE_COMMON_H
#define BATCHLM_NATIVE_COMMON_H
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#define RB 4             /* output channels per block */
#define PREFETCH 4096    /* bytes ahead in the weight stream, fetched into L2 */

#if defined(__AVX512F__)
#define VW 16
typedef __m512 vf;
static inline vf vzero(void) { return _mm512_setzero_ps(); }
static inline vf vload(const float *p) { return _mm512_loadu_ps(p); }
static inline vf vload_i8(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
static inline vf vload_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline void vstore(float *p, vf a) { _mm512_storeu_ps(p, a); }
static inline vf vset1(float a) { return _mm512_set1_ps(a); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vsum(vf a) { return _mm512_reduce_add_ps(a); }
#define HAVE_VEC 1
#elif defined(__AVX2__) && defined(__FMA__)
#define VW 8
typedef __m256 vf;
static inline vf vzero(void) { return _mm256_setzero_ps(); }
static inline vf vload(const float *p) { return _mm256_loadu_ps(p); }
static inline vf vload_i8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
static inline vf vload_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
static inline void vstore(float *p, vf a) { _mm256_storeu_ps(p, a); }
static inline vf vset1(float a) { return _mm256_set1_ps(a); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline float vsum(vf a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#define HAVE_VEC 1
#else
#define HAVE_VEC 0
#endif

static inline float bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v = { (uint32_t)h << 16 };
    return v.f;
}

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, as torch */
    union { float f; uint32_t u; } v = { f };
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40);  /* NaN stays NaN */
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}

/* element i of a float32 or (bf16) bfloat16 array, as float32; and a store rounding to it */
static inline float ld(const void *p, int bf16, size_t i) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void st(void *p, int bf16, size_t i, float v) {
    if (bf16) ((uint16_t *)p)[i] = f32_to_bf16(v);
    else ((float *)p)[i] = v;
}

/* the int4 tile layout (gemv.c's contract: 16 channels x 8 inputs per 64 bytes), one code at a time */
static inline int int4_code(const uint8_t *w, int K, int n, int k) {
    const uint8_t *tile = w + ((size_t)(n / 16) * (K / 8) + k / 8) * 64;
    int r = n % 16, i = (k % 8) / 2, p = k % 2, word = 2 * r + p;
    uint16_t v = (uint16_t)(tile[2 * word] | (tile[2 * word + 1] << 8));
    return (v >> (4 * i)) & 0xF;
}

#endif
