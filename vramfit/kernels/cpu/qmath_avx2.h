/* AVX2 + FMA vector math shared by the one-token decode step (qlayer.c) and the AVX2 kernels the
 * Python path calls (qops_avx2.c): exp, SiLU, and one query head's attention over a float32 cache.
 * Both include this file after `#pragma GCC target("avx2,fma")`, so the decode step and the Python
 * path compute the same floats (tests/test_cpu_layer.py relies on it). */
#ifndef VRAMFIT_QMATH_AVX2_H
#define VRAMFIT_QMATH_AVX2_H
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* exp(x) to about 1 ulp (Cephes' expf: 2^n * e^r, |r| <= ln2 / 2, degree-5 polynomial); inputs are
 * clamped to [-87, 88], so far-negative arguments give ~1e-38 rather than 0 */
static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.0f)), _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* lanes i < n set (n < 8) */
static inline __m256i head_mask(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* gate[i] = gate[i] / (1 + exp(-gate[i])) * up[i] */
static __attribute__((unused)) void silu_mul(float *gate, const float *up, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
        const __m256 s = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
        _mm256_storeu_ps(gate + i, _mm256_mul_ps(s, _mm256_loadu_ps(up + i)));
    }
    for (; i < n; i++) gate[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

/* [sum(a[0]), ..., sum(a[7])] */
static inline __m256 hsum8x8(const __m256 a[8]) {
    const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
    const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3); /* per 128-bit half */
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* s[t] = scale * q . k[t] for t < T (D a multiple of 8): eight keys at a time, whose partial sums
 * are reduced together */
static void scores(const float *q, const float *k, int64_t T, int64_t D, float scale, float *s) {
    const __m256 sc = _mm256_set1_ps(scale);
    int64_t t = 0;
    for (; t + 8 <= T; t += 8) {
        __m256 acc[8];
        for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8) {
            const __m256 qv = _mm256_loadu_ps(q + d);
            for (int j = 0; j < 8; j++) acc[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + (t + j) * D + d), acc[j]);
        }
        _mm256_storeu_ps(s + t, _mm256_mul_ps(hsum8x8(acc), sc));
    }
    for (; t < T; t++) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(k + t * D + d), acc);
        s[t] = hsum8(acc) * scale;
    }
}

static float max_of(const float *s, int64_t T) {
    __m256 m = _mm256_set1_ps(-INFINITY);
    int64_t t = 0;
    for (; t + 8 <= T; t += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(s + t));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    float mx = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
    for (; t < T; t++) mx = s[t] > mx ? s[t] : mx;
    return mx;
}

/* s[t] = exp(s[t] - mx) for t < T; returns their sum */
static float exp_shifted(float *s, int64_t T, float mx) {
    const __m256 m = _mm256_set1_ps(mx);
    __m256 acc = _mm256_setzero_ps();
    int64_t t = 0;
    for (; t + 8 <= T; t += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), m));
        _mm256_storeu_ps(s + t, e);
        acc = _mm256_add_ps(acc, e);
    }
    if (t < T) {
        const __m256i mask = head_mask(T - t);
        const __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(_mm256_maskload_ps(s + t, mask), m)),
                                       _mm256_castsi256_ps(mask));
        _mm256_maskstore_ps(s + t, mask, e);
        acc = _mm256_add_ps(acc, e);
    }
    return hsum8(acc);
}

/* out[d] = c * sum_t p[t] v[t, d] (D a multiple of 8): 64 columns at a time in eight accumulators */
static void weighted_rows(const float *p, const float *v, int64_t T, int64_t D, float c, float *out) {
    for (int64_t d = 0; d < D; d += 64) {
        const int nv = D - d >= 64 ? 8 : (int)(D - d) / 8;
        __m256 acc[8];
        for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
        if (nv == 8) {
            for (int64_t t = 0; t < T; t++) {
                const __m256 pt = _mm256_broadcast_ss(p + t);
                for (int j = 0; j < 8; j++) acc[j] = _mm256_fmadd_ps(pt, _mm256_loadu_ps(v + t * D + d + 8 * j), acc[j]);
            }
        } else {
            for (int64_t t = 0; t < T; t++) {
                const __m256 pt = _mm256_broadcast_ss(p + t);
                for (int j = 0; j < nv; j++) acc[j] = _mm256_fmadd_ps(pt, _mm256_loadu_ps(v + t * D + d + 8 * j), acc[j]);
            }
        }
        for (int j = 0; j < nv; j++) _mm256_storeu_ps(out + d + 8 * j, _mm256_mul_ps(acc[j], _mm256_set1_ps(c)));
    }
}

/* one query head over keys / values k, v (T, D): out = softmax(scale * k q) v; s: T floats scratch */
static void attend_head(const float *q, const float *k, const float *v, int64_t T, int64_t D, float scale,
                        float *s, float *out) {
    scores(q, k, T, D, scale, s);
    const float sum = exp_shifted(s, T, max_of(s, T));
    weighted_rows(s, v, T, D, 1.0f / sum, out);
}

#endif
