/* batchlm native CPU kernels: int8- and int4-weight matmuls of many rows
 * (batched decode steps, prefill chunks) on bfloat16 activations.
 *
 * Contract (the Python side is kernels/cpu_native.py; the reference is
 * kernels/quant_matmul.py's dequantize-then-F.linear in float32):
 *
 *   bl_int8_gemm(x, w, scale, y, y_bf16, M, N, K, threads) -> 0, or -1 when
 *   out of memory (y then unwritten)
 *     x bfloat16 [M, K], w int8 [N, K], scale float32 [N]; y [M, N] float32,
 *     or bfloat16 where y_bf16 (rounded once, to nearest even):
 *     y[m, n] = scale[n] * sum_k x[m, k] * w[n, k]   (float32 sums)
 *   bl_int4_gemm(x, w, scale, zero, y, y_bf16, M, N, K, G, threads) -> 0 or -1
 *     x bfloat16 [M, K]; w, scale, zero: gemv.c's int4 tiles (16 channels x 8
 *     inputs per 64 bytes) and bfloat16 [ceil(N / 16), K / G, 16] scales and
 *     zeros, K a multiple of 8 and of G; y [M, N] as above:
 *     y[m, n] = sum_k x[m, k] * bf16(scale[n, g] * q[n, k] + zero[n, g]),
 *     g = k / G: the weight rounded to bfloat16 once, as gemv.c's
 *     bl_int4_dequant_t writes it (float32 fma, then to nearest even).
 *   bl_gemm_fast() -> 1 where these are the AVX-512 BF16 loops, 0 where they
 *     are the plain C ones (correct, slow; callers then keep torch's).
 *
 * Any M, N, K. The output channels are split into panels of NP; the threads
 * take panels in turn (OpenMP, `threads` of them).
 *
 * How: each thread widens one panel of the weight (NP channels, all of K) to
 * bfloat16 in a buffer that stays in its L2, laid out with the channels in
 * lanes and the inputs in pairs (P[k / 2][channel] = w[c, k], w[c, k + 1]),
 * then runs every row of x over it: per pair of inputs, two vector loads of
 * the panel and, for each of MR rows, one broadcast of x's pair and two
 * vdpbf16ps (16 channels x one pair each). An int8 is exact in bfloat16, so
 * an int8 panel loses nothing and its scale multiplies the float32 sums once;
 * an int4 panel holds the dequantized weight (a shift and a mask of a tile
 * give 16 channels x one pair of inputs, already in the panel's order).
 *
 * NOTE: why this exists. Dequantize-then-matmul writes the whole weight in
 * bfloat16 to memory each call and reads it back: for the default model's LM
 * head (49152x576) that is 56 MB and ~20 ms at 64 rows, where the matmul
 * itself is 12 ms. 2 threads, this Zen 4 (AVX-512 BF16, no AMX),
 * 2026-11-27, bf16 activations, ms per call, this kernel vs F.linear on a
 * bf16 weight vs dequantize-then-F.linear:
 *   49152x576 at 64 rows  12.2 vs 12.1 vs 34.5;  at 16 rows 4.9 vs 5.5 vs 26.0
 *   3072x576 at 64 rows   0.64 vs 0.65 vs 0.87;  at 1024 rows 8.8 vs 9.2 vs 15.6
 *   576x1536 at 64 rows   0.29 vs 0.32 vs 0.42
 * int4 (groups of 32) against int4_native_dequant_mm: the LM head at 64 rows 10.0 vs 46.9,
 * 3072x576 at 2048 rows 18.5 vs 22.7 (README, "Many-row kernels"). On a CPU with AMX,
 * oneDNN's AMX bf16 matmul of a dequantized weight can beat vdpbf16ps: the planner
 * (batchlm/quantization/plan.py) times both and keeps the faster per shape and row count.
 */
#include "common.h"

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define GEMM_FAST 1
#define NP 32  /* channels per panel: two vectors */
#define MR 12  /* rows per pass over a panel: 24 accumulators */

/* r[0..15]: 16 rows of 16 32-bit units -> transposed in place */
static inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 4; j++) {
            t[8 * i + j] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
            t[8 * i + 4 + j] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + 4 + j], 0xDD);
        }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0x88);
        r[8 + j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0xDD);
    }
}

/* the first `n` (<= 32) int8 at p as 32 bfloat16 (zeros past n): 16 pairs */
static inline __m512i widen32(const int8_t *p, int n) {
    __m256i b = _mm256_maskz_loadu_epi8(n >= 32 ? 0xFFFFFFFFu : (1u << n) - 1, p);
    __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
    __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

/* mr rows of x (row stride ldx, pairs of bfloat16) against the panel: acc[m][0..1] */
static inline __attribute__((always_inline)) void panel_rows(const uint16_t *x, size_t ldx, int KP,
                                                             const uint32_t *P, int mr, __m512 acc[MR][2]) {
    for (int m = 0; m < mr; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    for (int kp = 0; kp < KP; kp++) {
        __m512bh w0 = (__m512bh)_mm512_loadu_si512(P + (size_t)kp * NP);
        __m512bh w1 = (__m512bh)_mm512_loadu_si512(P + (size_t)kp * NP + 16);
        for (int m = 0; m < mr; m++) {
            __m512bh xv = (__m512bh)_mm512_set1_epi32(*(const int32_t *)(x + (size_t)m * ldx + 2 * kp));
            acc[m][0] = _mm512_dpbf16_ps(acc[m][0], xv, w0);
            acc[m][1] = _mm512_dpbf16_ps(acc[m][1], xv, w1);
        }
    }
}

/* NOTE: a constant mr per copy, so that the accumulators stay in registers (see gemv.c's
 * int8_block_mb) */
static void panel_rows_mr(const uint16_t *x, size_t ldx, int KP, const uint32_t *P, int mr,
                          __m512 acc[MR][2]) {
    switch (mr) {
#define ROWS(i) case i: panel_rows(x, ldx, KP, P, i, acc); break;
    ROWS(1) ROWS(2) ROWS(3) ROWS(4) ROWS(5) ROWS(6) ROWS(7) ROWS(8) ROWS(9) ROWS(10) ROWS(11) ROWS(12)
#undef ROWS
    }
}

static void store16(void *y, int y_bf16, size_t at, __m512 v, __mmask16 mask) {
    if (y_bf16) _mm256_mask_storeu_epi16((uint16_t *)y + at, mask, (__m256i)_mm512_cvtneps_pbh(v));
    else _mm512_mask_storeu_ps((float *)y + at, mask, v);
}

static inline __mmask16 lanes(int n) { return n >= 16 ? 0xFFFF : n <= 0 ? 0 : (__mmask16)((1u << n) - 1); }

/* the weight of a call and the panel builder reading it: P[kp][NP] (32-bit pairs of bfloat16)
 * for channels n0 .. n0 + NP - 1; channels past N and the input past an odd K are zeros */
typedef struct {
    const void *w;
    const uint16_t *scale, *zero;  /* int4: per 16 channels and group; int8: unused */
    int N, K, G;
} weight_t;

static void build_panel_int8(const weight_t *wt, int n0, uint32_t *P) {
    const int8_t *w = (const int8_t *)wt->w;
    const int N = wt->N, K = wt->K;
    for (int g = 0; g < NP / 16; g++)
        for (int k0 = 0; k0 < K; k0 += 32) {
            int kk = K - k0 < 32 ? K - k0 : 32;
            __m512i r[16];
            for (int c = 0; c < 16; c++) {
                int n = n0 + 16 * g + c;
                r[c] = n < N ? widen32(w + (size_t)n * K + k0, kk) : _mm512_setzero_si512();
            }
            transpose16(r);  /* r[j]: the 16 channels' pair j of this run of 32 inputs */
            for (int j = 0; j < (kk + 1) / 2; j++)
                _mm512_storeu_si512(P + (size_t)(k0 / 2 + j) * NP + 16 * g, r[j]);
        }
}

static void build_panel_int4(const weight_t *wt, int n0, uint32_t *P) {
    const int K = wt->K, G = wt->G, KT = K / 8, NG = K / G, blocks = (wt->N + 15) / 16;
    const __m512i low4 = _mm512_set1_epi32(0x000F000F), low16 = _mm512_set1_epi32(0xFFFF);
    /* words 0..15 the first member of each pair, 16..31 the second -> interleaved */
    const __m512i pairs = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                           23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (int g = 0; g < NP / 16; g++) {
        const int b = n0 / 16 + g;
        uint32_t *out = P + 16 * g;
        if (b >= blocks) {
            for (int kp = 0; kp < K / 2; kp++) _mm512_storeu_si512(out + (size_t)kp * NP, _mm512_setzero_si512());
            continue;
        }
        const uint8_t *wb = (const uint8_t *)wt->w + (size_t)b * KT * 64;
        const uint16_t *sb = wt->scale + (size_t)b * NG * 16, *zb = wt->zero + (size_t)b * NG * 16;
        for (int t = 0; t < KT; t++) {
            const int grp = 8 * t / G;
            const __m512 s = vload_bf16(sb + (size_t)grp * 16), z = vload_bf16(zb + (size_t)grp * 16);
            const __m512i v = _mm512_loadu_si512((const void *)(wb + (size_t)t * 64));
            for (int i = 0; i < 4; i++) {
                /* lane r: the codes of channel r for inputs 8t + 2i (low half) and 8t + 2i + 1 */
                __m512i q = _mm512_and_si512(_mm512_srli_epi32(v, 4 * i), low4);
                __m512 w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(q, low16)), s, z);
                __m512 w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(q, 16)), s, z);
                __m512i pr = _mm512_permutexvar_epi16(pairs, (__m512i)_mm512_cvtne2ps_pbh(w1, w0));
                _mm512_storeu_si512(out + (size_t)(4 * t + i) * NP, pr);
            }
        }
    }
}

/* y = x @ panel(w).T (times scale[n] where scale is not NULL), panel by panel over the threads */
static int panel_gemm(const uint16_t *x_in, const weight_t *wt, void (*build)(const weight_t *, int, uint32_t *),
                      const float *scale, void *y, int y_bf16, int M, int threads) {
    const int N = wt->N, K = wt->K;
    /* an odd K: x padded with a zero input, so that every row is whole pairs */
    const int KP = (K + 1) / 2;
    const size_t ldx = (size_t)2 * KP;
    const uint16_t *x = x_in;
    uint16_t *xpad = NULL;
    if (K % 2) {
        if (!(xpad = (uint16_t *)calloc((size_t)M * ldx, sizeof(uint16_t)))) return -1;
        for (int m = 0; m < M; m++)
            for (int k = 0; k < K; k++) xpad[(size_t)m * ldx + k] = x_in[(size_t)m * K + k];
        x = xpad;
    }
    const int panels = (N + NP - 1) / NP;
    int failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        uint32_t *P = (uint32_t *)malloc((size_t)KP * NP * sizeof(uint32_t));
        if (!P) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int b = 0; b < panels; b++) {
            if (!P) continue;
            const int n0 = b * NP;
            build(wt, n0, P);
            const __mmask16 k0 = lanes(N - n0), k1 = lanes(N - n0 - 16);
            /* no scale (int4: in the panel): times 1, exact */
            const __m512 s0 = scale ? _mm512_maskz_loadu_ps(k0, scale + n0) : _mm512_set1_ps(1.f);
            const __m512 s1 = scale ? _mm512_maskz_loadu_ps(k1, scale + n0 + 16) : _mm512_set1_ps(1.f);
            for (int m0 = 0; m0 < M; m0 += MR) {
                const int mr = M - m0 < MR ? M - m0 : MR;
                __m512 acc[MR][2];
                panel_rows_mr(x + (size_t)m0 * ldx, ldx, KP, P, mr, acc);
                for (int m = 0; m < mr; m++) {
                    size_t at = (size_t)(m0 + m) * N + n0;
                    store16(y, y_bf16, at, _mm512_mul_ps(acc[m][0], s0), k0);
                    store16(y, y_bf16, at + 16, _mm512_mul_ps(acc[m][1], s1), k1);
                }
            }
        }
        free(P);
    }
    free(xpad);
    return failed ? -1 : 0;
}

int bl_int8_gemm(const uint16_t *x, const int8_t *w, const float *scale, void *y, int y_bf16,
                 int M, int N, int K, int threads) {
    const weight_t wt = {w, NULL, NULL, N, K, 0};
    return panel_gemm(x, &wt, build_panel_int8, scale, y, y_bf16, M, threads);
}

int bl_int4_gemm(const uint16_t *x, const uint8_t *w, const uint16_t *scale, const uint16_t *zero, void *y,
                 int y_bf16, int M, int N, int K, int G, int threads) {
    const weight_t wt = {w, scale, zero, N, K, G};
    return panel_gemm(x, &wt, build_panel_int4, NULL, y, y_bf16, M, threads);
}
#else
#define GEMM_FAST 0
/* the plain C loop: the same sums, one at a time (for builds without AVX-512 BF16) */
int bl_int8_gemm(const uint16_t *x, const int8_t *w, const float *scale, void *y, int y_bf16,
                 int M, int N, int K, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int n = 0; n < N; n++)
        for (int m = 0; m < M; m++) {
            float acc = 0.f;
            for (int k = 0; k < K; k++) acc += bf16_to_f32(x[(size_t)m * K + k]) * (float)w[(size_t)n * K + k];
            st(y, y_bf16, (size_t)m * N + n, acc * scale[n]);
        }
    return 0;
}

int bl_int4_gemm(const uint16_t *x, const uint8_t *w, const uint16_t *scale, const uint16_t *zero, void *y,
                 int y_bf16, int M, int N, int K, int G, int threads) {
    const int NG = K / G;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int n = 0; n < N; n++)
        for (int m = 0; m < M; m++) {
            float acc = 0.f;
            for (int k = 0; k < K; k++) {
                size_t sz = ((size_t)(n / 16) * NG + k / G) * 16 + n % 16;
                float wv = bf16_to_f32(f32_to_bf16(bf16_to_f32(scale[sz]) * (float)int4_code(w, K, n, k)
                                                   + bf16_to_f32(zero[sz])));
                acc += bf16_to_f32(x[(size_t)m * K + k]) * wv;
            }
            st(y, y_bf16, (size_t)m * N + n, acc);
        }
    return 0;
}
#endif

int bl_gemm_fast(void) { return GEMM_FAST; }
