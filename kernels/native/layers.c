/* batchlm native CPU kernels: a decode step's small per-layer operations.
 *
 * At batch 1 a decode step of the default model (30 layers) spends more time
 * in these than in its quantized matmuls: each is a few microseconds of work
 * behind ~20 us of torch dispatch, allocation and one-op-at-a-time passes
 * (2026-11-26, int4, 13.5 ms a token: attention 3.6 ms, norms 1.4, rotary
 * 0.44; see the README). Each function here is one call for what torch does
 * in several ops. Tensors are float32, or bfloat16 where the flag says so;
 * arithmetic is float32, rounded to bfloat16 on store (f32_to_bf16).
 * Contracts, and the PyTorch reference each is tested against:
 *
 *   bl_paged_attention(q, k, v, slots, kc, vc, ...)   kernels/attention.py
 *     One step of T query tokens from S sequences (token order: sequence
 *     by sequence, query_start[b] .. query_start[b + 1] - 1 for sequence b):
 *     first the new keys and values k, v [T, KVH, D] are written into the
 *     caches at slots[t] (unless k is NULL), then each token t of sequence b, at position p =
 *     seq_lens[b] - (query_start[b + 1] - t), attends to the positions
 *     (lo, p] of its sequence, lo = p - window when window > 0, else -1:
 *     out[t, h] = softmax(scale * q[t, h] . K^T) V. Caches [KVH, NB, bs, D]
 *     (head-major; slot s = block * bs + offset); position j of sequence b
 *     is slot tables[b * table_stride + j / bs] * bs + j % bs. Query head h
 *     reads kv head h / (H / KVH). q, k, v: rows of D with the given token
 *     strides and a head stride of D; out [T, H, D] contiguous, in q's
 *     dtype. The blocks are read where they are: nothing is gathered.
 *     NOTE: each query row is computed by the same code in the same order
 *     whatever the other rows of the call: a row's result does not depend on
 *     its batch. (The engine sends it decodes only: for prompt chunks a
 *     matmul is several times faster, kernels/cpu_layers.py.)
 *
 *   bl_add_rms_norm(x, res, w, out, ...)             models.llama.RMSNorm
 *     With res: res <- x + res (rounded to the dtype), then out = RMSNorm(res);
 *     without: out = RMSNorm(x). RMSNorm(r) = bf16(r * rsqrt(eps + sum(r^2) /
 *     dim)) * w, rounded, as transformers computes it.
 *
 *   bl_rotary(x, positions, cos, sin, out, ...)      models.rope.RotaryEmbedding.apply
 *     Per token t and head: out[i] = x[i] c[i] - x[i + half] s[i] and
 *     out[i + half] = x[i + half] c[i] + x[i] s[i] for i < half = rot / 2,
 *     c, s = cos/sin[positions[t]] (half-width tables); features past rot
 *     copied.
 *
 *   bl_silu_mul(gate_up, out, ...)                   models.llama.MLP
 *     out[n, i] = silu(gate_up[n, i]) * gate_up[n, I + i].
 *
 * Rows are split over `threads` OpenMP threads where there is enough work.
 */
#include <math.h>
#include <string.h>
#include "common.h"

/* a . b over D floats (a float32, b float32 or bfloat16) */
static inline float dot_row(const float *a, const void *b, int b_bf16, int D) {
    int d = 0;
    float acc = 0.f;
#if HAVE_VEC
    vf s = vzero();
    if (b_bf16)
        for (; d + VW <= D; d += VW) s = vfma(vload(a + d), vload_bf16((const uint16_t *)b + d), s);
    else
        for (; d + VW <= D; d += VW) s = vfma(vload(a + d), vload((const float *)b + d), s);
    acc = vsum(s);
#endif
    for (; d < D; d++) acc += a[d] * ld(b, b_bf16, d);
    return acc;
}

/* acc[0:D] += p * b[0:D] */
static inline void axpy_row(float *acc, float p, const void *b, int b_bf16, int D) {
    int d = 0;
#if HAVE_VEC
    vf pv = vset1(p);
    if (b_bf16)
        for (; d + VW <= D; d += VW) vstore(acc + d, vfma(pv, vload_bf16((const uint16_t *)b + d), vload(acc + d)));
    else
        for (; d + VW <= D; d += VW) vstore(acc + d, vfma(pv, vload((const float *)b + d), vload(acc + d)));
#endif
    for (; d < D; d++) acc[d] += p * ld(b, b_bf16, d);
}

static inline size_t elt(int bf16) { return bf16 ? 2 : 4; }

/* exp over VW lanes: 2^n * p(r), x = n ln2 + r, |r| <= ln2 / 2, p Cephes' expf polynomial (about
 * 2 float32 ulp); x clamped to [-87.3, 88.7]. NOTE: a decode's softmax calls exp once per head and
 * cached token; scalar expf took ~20 of the ~40 us of one layer's attention at 300 tokens. */
#if HAVE_VEC
#if defined(__AVX512F__)
static inline vf v_mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf v_clamp(vf x, float lo, float hi) { return _mm512_min_ps(_mm512_max_ps(x, vset1(lo)), vset1(hi)); }
static inline vf v_round(vf x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vf v_pow2(vf n) {  /* 2^n for integral n in the normal range */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
static inline vf v_add(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf v_sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
static inline vf v_div(vf a, vf b) { return _mm512_div_ps(a, b); }
static inline vf v_round_bf16(vf x) {  /* to the nearest bfloat16, ties to even, as f32_to_bf16 (finite x) */
    __m512i u = _mm512_castps_si512(x);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb);
    return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xffff0000u)));
}
#else
static inline vf v_mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf v_clamp(vf x, float lo, float hi) { return _mm256_min_ps(_mm256_max_ps(x, vset1(lo)), vset1(hi)); }
static inline vf v_round(vf x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vf v_pow2(vf n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
static inline vf v_add(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf v_sub(vf a, vf b) { return _mm256_sub_ps(a, b); }
static inline vf v_div(vf a, vf b) { return _mm256_div_ps(a, b); }
static inline vf v_round_bf16(vf x) {
    __m256i u = _mm256_castps_si256(x);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb);
    return _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32((int)0xffff0000u)));
}
#endif
static inline vf vexp(vf x) {
    x = v_clamp(x, -87.3f, 88.7f);
    vf n = v_round(v_mul(x, vset1(1.44269504088896341f)));
    vf r = vfma(n, vset1(-0.693359375f), x);          /* ln2 in two parts: exact n * hi */
    r = vfma(n, vset1(2.12194440e-4f), r);
    vf p = vset1(1.9875691500e-4f);
    p = vfma(p, r, vset1(1.3981999507e-3f));
    p = vfma(p, r, vset1(8.3334519073e-3f));
    p = vfma(p, r, vset1(4.1665795894e-2f));
    p = vfma(p, r, vset1(1.6666665459e-1f));
    p = vfma(p, r, vset1(5.0000001201e-1f));
    vf y = vfma(v_mul(p, r), r, r);                    /* p r^2 + r */
    y = v_add(y, vset1(1.f));
    return v_mul(y, v_pow2(n));
}
#endif

/* s[0:n] <- exp(s - mx); returns their sum */
static inline float softmax_exp(float *s, int n, float mx) {
    int j = 0;
    float sum = 0.f;
#if HAVE_VEC
    vf acc = vzero(), m = vset1(mx);
    for (; j + VW <= n; j += VW) {
        vf e = vexp(v_sub(vload(s + j), m));
        vstore(s + j, e);
        acc = v_add(acc, e);
    }
    sum = vsum(acc);
#endif
    for (; j < n; j++) {
        s[j] = expf(s[j] - mx);
        sum += s[j];
    }
    return sum;
}

void bl_paged_attention(const void *q, int q_bf16, long q_stride,
                        const void *k, long k_stride, const void *v, long v_stride, const int64_t *slots,
                        void *kc, void *vc, int kv_bf16, long NB, int bs,
                        const int64_t *tables, long table_stride, const int64_t *seq_lens,
                        const int64_t *query_start, void *out, int T, int S, int H, int KVH, int D,
                        float scale, int window, int threads) {
    const size_t head_slots = (size_t)NB * bs;  /* slots per kv head in the cache */
    const int G = H / KVH;
    int *seq_of = (int *)malloc((size_t)(T > 0 ? T : 1) * sizeof(int));
    if (!seq_of) return;  /* out of memory: out stays unwritten (callers allocate it fresh) */
    int max_len = 1;
    for (int b = 0; b < S; b++) {
        for (int64_t t = query_start[b]; t < query_start[b + 1]; t++) seq_of[t] = b;
        max_len = seq_lens[b] > max_len ? (int)seq_lens[b] : max_len;
    }
    #pragma omp parallel num_threads(threads)
    {
        /* the new keys and values into their slots (the loop's barrier: before any thread reads them) */
        #pragma omp for schedule(static)
        for (int i = 0; i < (k ? T * KVH : 0); i++) {
            int t = i / KVH, h = i % KVH;
            size_t dst = ((size_t)h * head_slots + (size_t)slots[t]) * D;
            for (int d = 0; d < D; d++) {
                st(kc, kv_bf16, dst + d, ld(k, q_bf16, (size_t)t * k_stride + (size_t)h * D + d));
                st(vc, kv_bf16, dst + d, ld(v, q_bf16, (size_t)t * v_stride + (size_t)h * D + d));
            }
        }
        /* per thread: the query in float32, the output row, the scores */
        float *buf = (float *)malloc(((size_t)2 * D + max_len) * sizeof(float));
        #pragma omp for schedule(static)
        for (int i = 0; i < T * H; i++) {
            if (!buf) continue;
            int t = i / H, h = i % H, kvh = h / G, b = seq_of[t];
            float *qf = buf, *acc = buf + D, *s = buf + 2 * D;
            int L = (int)(seq_lens[b] - (query_start[b + 1] - t)) + 1;  /* positions [0, L) visible */
            int lo = window > 0 && L > window ? L - window : 0;
            for (int d = 0; d < D; d++) qf[d] = ld(q, q_bf16, (size_t)t * q_stride + (size_t)h * D + d) * scale;
            const int64_t *table = tables + (size_t)b * table_stride;
            const char *kh = (const char *)kc + (size_t)kvh * head_slots * D * elt(kv_bf16);
            const char *vh = (const char *)vc + (size_t)kvh * head_slots * D * elt(kv_bf16);
            float mx = -INFINITY;
            for (int j = lo; j < L; j++) {
                size_t slot = (size_t)table[j / bs] * bs + j % bs;
                float sc = dot_row(qf, kh + slot * D * elt(kv_bf16), kv_bf16, D);
                s[j - lo] = sc;
                mx = sc > mx ? sc : mx;
            }
            float sum = softmax_exp(s, L - lo, mx);
            memset(acc, 0, D * sizeof(float));
            for (int j = lo; j < L; j++) {
                size_t slot = (size_t)table[j / bs] * bs + j % bs;
                axpy_row(acc, s[j - lo], vh + slot * D * elt(kv_bf16), kv_bf16, D);
            }
            float inv = sum > 0.f ? 1.f / sum : 0.f;
            for (int d = 0; d < D; d++) st(out, q_bf16, (size_t)i * D + d, acc[d] * inv);
        }
        free(buf);
    }
    free(seq_of);
}

void bl_add_rms_norm(const void *x, long x_stride, void *res, long r_stride, const void *w, void *out,
                     long o_stride, int bf16, int N, int dim, float eps, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads) if (N >= 16)
    for (int n = 0; n < N; n++) {
        size_t xo = (size_t)n * x_stride, ro = (size_t)n * r_stride, oo = (size_t)n * o_stride;
        float ss = 0.f;
        for (int d = 0; d < dim; d++) {
            float v = ld(x, bf16, xo + d);
            if (res) {
                st(res, bf16, ro + d, v + ld(res, bf16, ro + d));  /* h = x + h, in the dtype */
                v = ld(res, bf16, ro + d);
            }
            ss += v * v;
        }
        float inv = 1.f / sqrtf(eps + ss / (float)dim);
        const void *src = res ? res : x;
        size_t so = res ? ro : xo;
        for (int d = 0; d < dim; d++) {
            float normed = ld(src, bf16, so + d) * inv;
            if (bf16) normed = bf16_to_f32(f32_to_bf16(normed));  /* cast back, then scale (as HF) */
            st(out, bf16, oo + d, normed * ld(w, bf16, d));
        }
    }
}

void bl_rotary(const void *x, long x_stride, const int64_t *positions, const void *cos, const void *sin,
               void *out, int bf16, int T, int heads, int D, int rot, int threads) {
    const int half = rot / 2;
    #pragma omp parallel for schedule(static) num_threads(threads) if (T >= 16)
    for (int t = 0; t < T; t++) {
        size_t c0 = (size_t)positions[t] * half;
        for (int h = 0; h < heads; h++) {
            size_t xo = (size_t)t * x_stride + (size_t)h * D, oo = ((size_t)t * heads + h) * D;
            for (int i = 0; i < half; i++) {
                float c = ld(cos, bf16, c0 + i), s = ld(sin, bf16, c0 + i);
                float a = ld(x, bf16, xo + i), b = ld(x, bf16, xo + i + half);
                st(out, bf16, oo + i, a * c - b * s);
                st(out, bf16, oo + i + half, b * c + a * s);
            }
            for (int i = rot; i < D; i++) st(out, bf16, oo + i, ld(x, bf16, xo + i));
        }
    }
}

void bl_silu_mul(const void *gate_up, long g_stride, void *out, int bf16, int N, int I, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads) if (N >= 16)
    for (int n = 0; n < N; n++) {
        size_t go = (size_t)n * g_stride, oo = (size_t)n * I;
        int i = 0;
#if HAVE_VEC
        float tmp[VW];
        for (; i + VW <= I; i += VW) {
            const void *gp = (const char *)gate_up + (go + i) * elt(bf16), *up = (const char *)gate_up + (go + I + i) * elt(bf16);
            vf g = bf16 ? vload_bf16((const uint16_t *)gp) : vload((const float *)gp);
            vf u = bf16 ? vload_bf16((const uint16_t *)up) : vload((const float *)up);
            vf silu = v_div(g, v_add(vset1(1.f), vexp(v_sub(vzero(), g))));
            if (bf16) silu = v_round_bf16(silu);  /* torch rounds silu, then the product */
            vf prod = v_mul(silu, u);
            if (!bf16) {
                vstore((float *)out + oo + i, prod);
            } else {
                vstore(tmp, prod);
                for (int j = 0; j < VW; j++) ((uint16_t *)out)[oo + i + j] = f32_to_bf16(tmp[j]);
            }
        }
#endif
        for (; i < I; i++) {
            float g = ld(gate_up, bf16, go + i), u = ld(gate_up, bf16, go + I + i);
            float silu = g / (1.f + expf(-g));
            if (bf16) silu = bf16_to_f32(f32_to_bf16(silu));
            st(out, bf16, oo + i, silu * u);
        }
    }
}
