/* AVX2 pass-1 scale search of the IQK encoders (iqk_encode.search_scales), 8 candidates at a time.
 *
 * Lanes are candidates, so every lane keeps the scalar code's sequential per-block sums: each step
 * is (float)((double)(w*q) * x + sum), done as a float64 FMA (the product of two floats is exact in
 * float64, so the FMA rounds exactly like the separate multiply and add) and rounded back to float.
 * The nearest-value rule is the scalar one: k = #{g_i : !(g_i > v)}, then the float compare
 * (v - g[k-1]) < (g[k] - v). Results are identical to ce_search_block_scalar.
 */
#pragma GCC target("avx2,fma")
#include <immintrin.h>

#include "cenc.h"
#include "cenc_int.h"

#define MAXC 64 /* candidates, padded to a multiple of 8 */

/* base-grid value at per-lane index i (0..n-1), n = 16 or 32, from tables t[0..n/8) */
static inline __m256 lookup(const __m256 *t, int n, __m256i i) {
    const __m256 b3 = _mm256_castsi256_ps(_mm256_slli_epi32(i, 28));
    const __m256 v01 = _mm256_blendv_ps(_mm256_permutevar8x32_ps(t[0], i), _mm256_permutevar8x32_ps(t[1], i), b3);
    if (n == 16) return v01;
    const __m256 v23 = _mm256_blendv_ps(_mm256_permutevar8x32_ps(t[2], i), _mm256_permutevar8x32_ps(t[3], i), b3);
    return _mm256_blendv_ps(v01, v23, _mm256_castsi256_ps(_mm256_slli_epi32(i, 27)));
}

int ce_search_block_avx2(const float *xb, const float *wb, int B, const float *g, int n, int ntry, int initial,
                         float *out_scale, int *out_shift) {
    if (n != 16 && n != 32) return 0;
    const float s = g[n] - g[0]; /* the shifted half is the base half plus s, for these grids */
    for (int i = 1; i < n; i++)
        if (g[n + i] - g[i] != s) return 0;
    const int C = (initial ? 2 : 0) + (2 * ntry + 1) * 4;
    if (C > MAXC) return 0;

    const int k = ce_argmax_abs(xb, B);
    const float m = xb[k], amax = fabsf(m);
    if (amax < 1e-16f) {
        *out_scale = 0.0f;
        *out_shift = 0;
        return 1;
    }
    float off[MAXC], sgn[MAXC], shv[MAXC];
    int flag[MAXC];
    for (int c = 0; c < MAXC; c++) {
        if (c >= C) {
            off[c] = off[0], sgn[c] = 1.0f, shv[c] = 0.0f, flag[c] = 0;
        } else if (initial && c < 2) {
            off[c] = -g[0], sgn[c] = c ? -1.0f : 1.0f, shv[c] = 0.0f, flag[c] = 0;
        } else {
            const int cc = c - (initial ? 2 : 0), t = cc / 4 - ntry;
            flag[c] = (cc / 2) & 1;
            sgn[c] = (cc & 1) ? -1.0f : 1.0f;
            off[c] = (float)t + g[flag[c] * n];
            shv[c] = flag[c] ? s : 0.0f;
        }
    }
    __m256 tb[4];
    for (int i = 0; i < n / 8; i++) tb[i] = _mm256_loadu_ps(g + 8 * i);
    float sqx_all[MAXC], sq2_all[MAXC];
    const __m256 mv = _mm256_set1_ps(m);
    const __m256i one = _mm256_set1_epi32(1), zero = _mm256_setzero_si256(), top = _mm256_set1_epi32(n - 1);
    for (int c0 = 0; c0 < C; c0 += 8) {
        const __m256 inv = _mm256_div_ps(_mm256_loadu_ps(off + c0), mv);
        const __m256 sg = _mm256_loadu_ps(sgn + c0), sh = _mm256_loadu_ps(shv + c0);
        __m256 gl[32];
        for (int i = 0; i < n; i++) gl[i] = _mm256_add_ps(_mm256_set1_ps(g[i]), sh);
        __m256d ax0 = _mm256_setzero_pd(), ax1 = ax0, aq0 = ax0, aq1 = ax0;
        for (int j = 0; j < B; j++) {
            const __m256 xv = _mm256_set1_ps(xb[j]);
            const __m256 al = _mm256_mul_ps(_mm256_mul_ps(inv, xv), sg);
            __m256i kk = zero;
            for (int i = 0; i < n; i++)
                kk = _mm256_sub_epi32(kk, _mm256_castps_si256(_mm256_cmp_ps(gl[i], al, _CMP_NGT_UQ)));
            const __m256i lo = _mm256_max_epi32(_mm256_sub_epi32(kk, one), zero);
            const __m256i hi = _mm256_min_epi32(kk, top);
            const __m256 glo = _mm256_add_ps(lookup(tb, n, lo), sh);
            const __m256 ghi = _mm256_add_ps(lookup(tb, n, hi), sh);
            const __m256 take_lo = _mm256_cmp_ps(_mm256_sub_ps(al, glo), _mm256_sub_ps(ghi, al), _CMP_LT_OQ);
            const __m256 q = _mm256_blendv_ps(ghi, glo, take_lo);
            const __m256 wq = _mm256_mul_ps(_mm256_set1_ps(wb[j]), q);
            const __m256d wq0 = _mm256_cvtps_pd(_mm256_castps256_ps128(wq));
            const __m256d wq1 = _mm256_cvtps_pd(_mm256_extractf128_ps(wq, 1));
            const __m256d q0 = _mm256_cvtps_pd(_mm256_castps256_ps128(q));
            const __m256d q1 = _mm256_cvtps_pd(_mm256_extractf128_ps(q, 1));
            const __m256d xd = _mm256_set1_pd((double)xb[j]);
            ax0 = _mm256_cvtps_pd(_mm256_cvtpd_ps(_mm256_fmadd_pd(wq0, xd, ax0)));
            ax1 = _mm256_cvtps_pd(_mm256_cvtpd_ps(_mm256_fmadd_pd(wq1, xd, ax1)));
            aq0 = _mm256_cvtps_pd(_mm256_cvtpd_ps(_mm256_fmadd_pd(wq0, q0, aq0)));
            aq1 = _mm256_cvtps_pd(_mm256_cvtpd_ps(_mm256_fmadd_pd(wq1, q1, aq1)));
        }
        _mm_storeu_ps(sqx_all + c0, _mm256_cvtpd_ps(ax0));
        _mm_storeu_ps(sqx_all + c0 + 4, _mm256_cvtpd_ps(ax1));
        _mm_storeu_ps(sq2_all + c0, _mm256_cvtpd_ps(aq0));
        _mm_storeu_ps(sq2_all + c0 + 4, _mm256_cvtpd_ps(aq1));
    }
    float scale = 0.0f, best = 0.0f;
    int shift = 0;
    for (int c = 0; c < C; c++) {
        const float sqx = sqx_all[c], sq2 = sq2_all[c];
        int ok = sq2 > 0;
        if (!(initial && c == 0)) ok = ok && sqx * sqx > best * sq2;
        if (ok) {
            const float d = sqx / sq2;
            scale = d;
            best = d * sqx;
            shift = flag[c];
        }
    }
    *out_scale = scale;
    *out_shift = shift;
    return 1;
}
