/* batchlm native CPU kernels: matmuls at a few rows that stream quantized weights.
 *
 * Contract (the Python side is kernels/cpu_native.py; its reference is
 * kernels/quant_matmul.py's dequantize-then-F.linear in float32):
 *
 *   bl_int8_mm(x, x_bf16, w, scale, y, y_bf16, M, N, K, threads)
 *     x [M, K] and y [M, N] float32, or bfloat16 where x_bf16 / y_bf16;
 *     w int8 [N, K], scale float32 [N]:
 *     y[m, n] = scale[n] * sum_k x[m, k] * w[n, k]   (float32 accumulate,
 *     rounded to bfloat16 on store as torch rounds: to nearest, ties to even)
 *
 * Any M, N, K. Rows of y are computed in blocks of RB output channels, the
 * threads splitting the blocks evenly (OpenMP, `threads` of them).
 *
 * NOTE: why this exists. At one to a few rows a matmul is a pass over the
 * weight, so its speed is how fast the weight is read. torch's int8 CPU
 * kernels (aten._weight_int8pack_mm, _int_mm) read a cold int8 weight at
 * 11 GB/s on a 2-core Xeon (2026-11-26) where an fp32 F.linear reads 26:
 * each core waits on memory with too few loads in flight. This loop is the
 * same arithmetic plus a software prefetch PREFETCH bytes ahead in the
 * weight stream into L2 (rows of one block are adjacent, so the stream is
 * one contiguous run per thread). Same machine, one row, 600 MB of distinct
 * 3072x576 weights (more than the L3, so every byte comes from memory):
 * 17.8 GB/s; 15.8 with an L1 prefetch 8 KB ahead, ~13 without any; within
 * the L3 (60 weights, 106 MB) 36 GB/s.
 */
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
#define MB 4
typedef __m512 vf;
static inline vf vzero(void) { return _mm512_setzero_ps(); }
static inline vf vload(const float *p) { return _mm512_loadu_ps(p); }
static inline vf vload_i8(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vsum(vf a) { return _mm512_reduce_add_ps(a); }
#define HAVE_VEC 1
#elif defined(__AVX2__) && defined(__FMA__)
#define VW 8
#define MB 2
typedef __m256 vf;
static inline vf vzero(void) { return _mm256_setzero_ps(); }
static inline vf vload(const float *p) { return _mm256_loadu_ps(p); }
static inline vf vload_i8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
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

#if !HAVE_VEC
#define MB 4
#endif

/* RB channels from n against mb (<= MB) rows of x: res[m][r] (scaled) */
static inline __attribute__((always_inline)) void int8_block(const float *x, const int8_t *w, const float *scale,
                              int mb, int K, int n, float res[MB][RB]) {
    const int8_t *wn = w + (size_t)n * K;
    int k = 0;
#if HAVE_VEC
    int kv = K - K % VW;
    vf acc[MB][RB];
    for (int m = 0; m < MB; m++)
        for (int r = 0; r < RB; r++) acc[m][r] = vzero();
    const char *pf = (const char *)wn + PREFETCH;
    for (; k < kv; k += VW) {
        /* RB rows x VW bytes consumed per step: one 64-byte line ahead covers them */
        if ((k * RB) % 64 < VW * RB) _mm_prefetch(pf + (size_t)k * RB, _MM_HINT_T1);
        vf wv[RB];
        for (int r = 0; r < RB; r++) wv[r] = vload_i8(wn + (size_t)r * K + k);
        for (int m = 0; m < mb; m++) {
            vf xv = vload(x + (size_t)m * K + k);
            for (int r = 0; r < RB; r++) acc[m][r] = vfma(xv, wv[r], acc[m][r]);
        }
    }
    for (int m = 0; m < mb; m++)
        for (int r = 0; r < RB; r++) res[m][r] = vsum(acc[m][r]);
#else
    for (int m = 0; m < mb; m++)
        for (int r = 0; r < RB; r++) res[m][r] = 0.f;
#endif
    for (int m = 0; m < mb; m++)  /* the inputs the vector loop leaves */
        for (int r = 0; r < RB; r++) {
            float acc1 = 0.f;
            for (int kk = k; kk < K; kk++) acc1 += x[(size_t)m * K + kk] * (float)wn[(size_t)r * K + kk];
            res[m][r] = (res[m][r] + acc1) * scale[n + r];
        }
}

/* NOTE: called with a constant mb (1..MB), so that each copy unrolls its loops over m and keeps
 * its accumulators in registers; with a variable mb gcc 12 kept them on the stack (spilled on
 * every step). */
static void int8_block_mb(const float *x, const int8_t *w, const float *scale,
                          int mb, int K, int n, float res[MB][RB]) {
    switch (mb) {
    case 1: int8_block(x, w, scale, 1, K, n, res); break;
    case 2: int8_block(x, w, scale, 2, K, n, res); break;
#if MB > 2
    case 3: int8_block(x, w, scale, 3, K, n, res); break;
    case 4: int8_block(x, w, scale, 4, K, n, res); break;
#endif
    }
}

static inline void store(void *y, int y_bf16, size_t i, float v) {
    if (y_bf16) ((uint16_t *)y)[i] = f32_to_bf16(v);
    else ((float *)y)[i] = v;
}

/* x: float32, or bfloat16 when x_bf16 (widened once into a float32 copy); y likewise */
void bl_int8_mm(const void *x_in, int x_bf16, const int8_t *w, const float *scale, void *y,
                int y_bf16, int M, int N, int K, int threads) {
    float *xw = NULL;
    const float *x = (const float *)x_in;
    if (x_bf16) {
        xw = (float *)malloc((size_t)M * K * sizeof(float));
        if (!xw) return;  /* the caller poisons nothing: an out-of-memory leaves y unwritten */
        for (size_t i = 0; i < (size_t)M * K; i++) xw[i] = bf16_to_f32(((const uint16_t *)x_in)[i]);
        x = xw;
    }
    int blocks = (N + RB - 1) / RB;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int b = 0; b < blocks; b++) {
        int n = b * RB;
        if (n + RB <= N) {
            for (int m0 = 0; m0 < M; m0 += MB) {
                int mb = M - m0 < MB ? M - m0 : MB;
                float res[MB][RB];
                int8_block_mb(x + (size_t)m0 * K, w, scale, mb, K, n, res);
                for (int m = 0; m < mb; m++)
                    for (int r = 0; r < RB; r++) store(y, y_bf16, (size_t)(m0 + m) * N + n + r, res[m][r]);
            }
        } else {  /* the last N % RB channels */
            for (int m = 0; m < M; m++)
                for (int nn = n; nn < N; nn++) {
                    float acc1 = 0.f;
                    for (int kk = 0; kk < K; kk++) acc1 += x[(size_t)m * K + kk] * (float)w[(size_t)nn * K + kk];
                    store(y, y_bf16, (size_t)m * N + nn, acc1 * scale[nn]);
                }
        }
    }
    free(xw);
}

