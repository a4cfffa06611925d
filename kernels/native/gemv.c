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
#include "common.h"

#define RB 4             /* output channels per block */
#define PREFETCH 4096    /* bytes ahead in the weight stream, fetched into L2 */

#if defined(__AVX512F__) || !HAVE_VEC
#define MB 4             /* rows of x per block */
#else
#define MB 2
#endif

/* sum_k x[k] * w[k] over k0..K-1, one at a time (the tails the vector loops leave) */
static inline float dot_i8(const float *x, const int8_t *w, int k0, int K) {
    float acc = 0.f;
    for (int k = k0; k < K; k++) acc += x[k] * (float)w[k];
    return acc;
}

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
        for (int r = 0; r < RB; r++)
            res[m][r] = (res[m][r] + dot_i8(x + (size_t)m * K, wn + (size_t)r * K, k, K)) * scale[n + r];
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
                    for (int r = 0; r < RB; r++) st(y, y_bf16, (size_t)(m0 + m) * N + n + r, res[m][r]);
            }
        } else {  /* the last N % RB channels */
            for (int m = 0; m < M; m++)
                for (int nn = n; nn < N; nn++)
                    st(y, y_bf16, (size_t)m * N + nn, dot_i8(x + (size_t)m * K, w + (size_t)nn * K, 0, K) * scale[nn]);
        }
    }
    free(xw);
}


/* ---- int4 ------------------------------------------------------------------ *
 *   bl_int4_mm(x, x_bf16, w, scale, zero, y, y_bf16, M, N, K, G, threads)
 *     w: 4-bit codes q of [N, K] in tiles (below); scale, zero bfloat16
 *     [N/16, K/G, 16] (G, the group: 32, 64 or 128); N a multiple of 16,
 *     K of G:
 *     y[m, n] = sum_k bf16(x[m, k]) * (scale[n, g] * q[n, k] + zero[n, g]),
 *     g = k / G. x is rounded to bfloat16 first (as torch's int4pack kernel
 *     takes it); float32 sums.
 *   bl_int4_fast() -> 1 where bl_int4_mm is the AVX-512 BF16 loop, 0 where it
 *     is the plain C one (correct, slow; callers then keep torch's int4).
 *
 * Tiles: 16 output channels x 8 inputs are 64 bytes, read as 32 little-endian
 * 16-bit words; word 2*r + p holds, in nibble i (0..3, from the low bits), the
 * code of channel r and input 8*t + 2*i + p. Tiles run along K within a block
 * of 16 channels, blocks one after another: each thread streams one contiguous
 * run. One shift and mask of a tile gives 16 channels x one pair of inputs,
 * and `0x4300 | q` is q + 128 as a bfloat16, so the codes are operands of
 * vdpbf16ps (channels in lanes, the pair summed in each) against the pair of
 * x broadcast, with no conversion; the scales multiply once per group, 16
 * channels at a time, and the 128 comes back out through the sums of x per
 * group times offset = zero - 128 * scale (in float32).
 *
 * NOTE: why channels in lanes. A first version kept inputs in lanes (one
 * dot product per channel and group, then a scale per channel and group):
 * on this Xeon a zmm FMA issues about every 0.5 ns and a vdpbf16ps every
 * 0.7, so that loop was bound by its arithmetic at ~7 GB/s a core, slower
 * than torch's int4pack. With channels in lanes the scale costs one FMA per
 * group for 16 channels.
 */
static inline int bl_min(int a, int b) { return a < b ? a : b; }

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define INT4_FAST 1
#define MB4 4
/* channels n..n+15 against mb rows of xb: acc[m] (16 lanes, one per channel) */
static inline __attribute__((always_inline)) void int4_tile_block(
        const uint16_t *xb, const float *xs, const uint8_t *wb, const uint16_t *sb, const uint16_t *zb,
        int mb, int K, int G, __m512 out[MB4]) {
    const int NG = K / G, per_group = G / 8;
    const __m512i low4 = _mm512_set1_epi16(0x000F), bias = _mm512_set1_epi16(0x4300);
    const char *pf = (const char *)wb + PREFETCH;
    __m512 acc[MB4];
    for (int m = 0; m < mb; m++) acc[m] = _mm512_setzero_ps();
    for (int g = 0; g < NG; g++) {
        __m512 part[MB4][4];  /* one chain per nibble: four dot products in flight */
        for (int m = 0; m < mb; m++)
            for (int i = 0; i < 4; i++) part[m][i] = _mm512_setzero_ps();
        for (int t = g * per_group; t < (g + 1) * per_group; t++) {
            _mm_prefetch(pf + (size_t)t * 64, _MM_HINT_T1);
            __m512i v = _mm512_loadu_si512((const void *)(wb + (size_t)t * 64));
            for (int i = 0; i < 4; i++) {
                /* (w >> 4i) & 0xF | 0x4300: q + 128 as bfloat16, 16 channels x (input 8t+2i, 8t+2i+1) */
                __m512bh wq = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4 * i), low4, bias, 0xEA);
                for (int m = 0; m < mb; m++) {
                    const uint32_t *pair = (const uint32_t *)(xb + (size_t)m * K + 8 * t + 2 * i);
                    __m512bh xv = (__m512bh)_mm512_set1_epi32((int)*pair);
                    part[m][i] = _mm512_dpbf16_ps(part[m][i], xv, wq);
                }
            }
        }
        __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                       _mm256_loadu_si256((const __m256i *)(sb + (size_t)g * 16))), 16));
        __m512 z = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                       _mm256_loadu_si256((const __m256i *)(zb + (size_t)g * 16))), 16));
        __m512 o = _mm512_fnmadd_ps(_mm512_set1_ps(128.f), s, z);  /* zero - 128 scale */
        for (int m = 0; m < mb; m++) {
            __m512 d = _mm512_add_ps(_mm512_add_ps(part[m][0], part[m][1]), _mm512_add_ps(part[m][2], part[m][3]));
            acc[m] = _mm512_fmadd_ps(d, s, acc[m]);
            acc[m] = _mm512_fmadd_ps(o, _mm512_set1_ps(xs[(size_t)m * NG + g]), acc[m]);
        }
    }
    for (int m = 0; m < mb; m++) out[m] = acc[m];
}

static void int4_tile_block_mb(const uint16_t *xb, const float *xs, const uint8_t *wb, const uint16_t *sb,
                               const uint16_t *zb, int mb, int K, int G, __m512 out[MB4]) {
    switch (mb) {  /* a constant mb per copy: see int8_block_mb */
    case 1: int4_tile_block(xb, xs, wb, sb, zb, 1, K, G, out); break;
    case 2: int4_tile_block(xb, xs, wb, sb, zb, 2, K, G, out); break;
    case 3: int4_tile_block(xb, xs, wb, sb, zb, 3, K, G, out); break;
    case 4: int4_tile_block(xb, xs, wb, sb, zb, 4, K, G, out); break;
    }
}
#else
#define INT4_FAST 0
#endif

int bl_int4_fast(void) { return INT4_FAST; }

void bl_int4_mm(const void *x_in, int x_bf16, const uint8_t *w, const uint16_t *scale, const uint16_t *zero,
                void *y, int y_bf16, int M, int N, int K, int G, int threads) {
    const int NG = K / G;
    uint16_t *xb = (uint16_t *)malloc((size_t)M * K * sizeof(uint16_t));
    float *xs = (float *)malloc((size_t)M * NG * sizeof(float));
    if (!xb || !xs) { free(xb); free(xs); return; }
    for (size_t i = 0; i < (size_t)M * K; i++)
        xb[i] = x_bf16 ? ((const uint16_t *)x_in)[i] : f32_to_bf16(((const float *)x_in)[i]);
    for (int m = 0; m < M; m++)
        for (int g = 0; g < NG; g++) {
            float sum = 0.f;
            for (int k = g * G; k < (g + 1) * G; k++) sum += bf16_to_f32(xb[(size_t)m * K + k]);
            xs[(size_t)m * NG + g] = sum;
        }
    int blocks = N / 16;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int b = 0; b < blocks; b++) {
        const uint8_t *wb = w + (size_t)b * (K / 8) * 64;
        (void)wb;  /* read by the AVX-512 BF16 loop only */
        const uint16_t *sb = scale + (size_t)b * NG * 16, *zb = zero + (size_t)b * NG * 16;
        for (int m0 = 0; m0 < M; m0 += 4) {
            int mb = bl_min(4, M - m0);
            float res[4][16];
#if INT4_FAST
            __m512 out[MB4];
            int4_tile_block_mb(xb + (size_t)m0 * K, xs + (size_t)m0 * NG, wb, sb, zb, mb, K, G, out);
            for (int m = 0; m < mb; m++) _mm512_storeu_ps(res[m], out[m]);
#else
            for (int m = 0; m < mb; m++)
                for (int r = 0; r < 16; r++) {
                    float acc1 = 0.f;
                    for (int g = 0; g < NG; g++) {
                        float d = 0.f;
                        for (int k = g * G; k < (g + 1) * G; k++)
                            d += bf16_to_f32(xb[(size_t)(m0 + m) * K + k]) * (float)int4_code(w, K, b * 16 + r, k);
                        acc1 += d * bf16_to_f32(sb[g * 16 + r]) + bf16_to_f32(zb[g * 16 + r]) * xs[(size_t)(m0 + m) * NG + g];
                    }
                    res[m][r] = acc1;
                }
#endif
            for (int m = 0; m < mb; m++)
                for (int r = 0; r < 16; r++) st(y, y_bf16, (size_t)(m0 + m) * N + b * 16 + r, res[m][r]);
        }
    }
    free(xb);
    free(xs);
}


/*   bl_int4_dequant_t(w, scale, zero, wt, wt_bf16, N, K, G, threads)
 *     The same weight dequantized and transposed, for a matmul of many rows
 *     (x @ wt in oneDNN's bf16 or float32 kernels, AMX where the CPU has it):
 *     wt[k, n] = scale[n, g] * q[n, k] + zero[n, g], g = k / G, wt [K, N]
 *     row-major, float32 or bfloat16 (rounded once, to nearest even).
 *     Transposed because a tile's 16 channels of one input are then one
 *     contiguous run of wt: 8 vector stores per 64-byte tile. */
void bl_int4_dequant_t(const uint8_t *w, const uint16_t *scale, const uint16_t *zero, void *wt, int wt_bf16,
                       int N, int K, int G, int threads) {
    const int NG = K / G, KT = K / 8, blocks = N / 16;
    #pragma omp parallel for schedule(static) num_threads(threads) collapse(2)
    for (int b = 0; b < blocks; b++)
        for (int t = 0; t < KT; t++) {
            int g = (8 * t) / G;
            const uint16_t *sb = scale + ((size_t)b * NG + g) * 16, *zb = zero + ((size_t)b * NG + g) * 16;
#if INT4_FAST
            /* lane r: word 2r (input pair member p = 0) in its low 16 bits, word 2r + 1 in the high */
            __m512i v = _mm512_loadu_si512((const void *)(w + ((size_t)b * KT + t) * 64));
            __m512 sv = vload_bf16(sb), zv = vload_bf16(zb);
            for (int p = 0; p < 2; p++)
                for (int i = 0; i < 4; i++) {
                    __m512i q = _mm512_and_si512(_mm512_srlv_epi32(v, _mm512_set1_epi32(16 * p + 4 * i)),
                                                 _mm512_set1_epi32(15));
                    __m512 val = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), sv, zv);
                    size_t at = (size_t)(8 * t + 2 * i + p) * N + (size_t)b * 16;
                    if (wt_bf16) _mm256_storeu_si256((__m256i *)((uint16_t *)wt + at), (__m256i)_mm512_cvtneps_pbh(val));
                    else _mm512_storeu_ps((float *)wt + at, val);
                }
#else
            for (int kk = 0; kk < 8; kk++)
                for (int r = 0; r < 16; r++) {
                    int k = 8 * t + kk;
                    float val = bf16_to_f32(sb[r]) * (float)int4_code(w, K, b * 16 + r, k) + bf16_to_f32(zb[r]);
                    st(wt, wt_bf16, (size_t)k * N + (size_t)b * 16 + r, val);
                }
#endif
        }
}
