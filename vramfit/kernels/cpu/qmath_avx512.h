/* Vector math for the AVX-512 kernels (included after their `#pragma GCC target`). */
#ifndef VRAMFIT_QMATH_AVX512_H
#define VRAMFIT_QMATH_AVX512_H
#include <immintrin.h>

/* 2^x, for x clamped to [-126, 126]: a degree-7 polynomial on the fraction in [-0.5, 0.5] (Taylor
 * series of e^(f ln 2), relative error ~2e-7) and vscalefps for the integer part */
static inline __m512 exp2_ps(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-126.0f)), _mm512_set1_ps(126.0f));
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(x, n);
    __m512 p = _mm512_set1_ps(1.5252734e-05f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530e-04f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558e-03f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-03f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-02f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-01f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-01f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* silu(g) * u = g * u / (1 + e^-g) */
static inline __m512 swiglu_ps(__m512 g, __m512 u) {
    const __m512 e = exp2_ps(_mm512_mul_ps(g, _mm512_set1_ps(-1.4426950408889634f)));
    return _mm512_div_ps(_mm512_mul_ps(g, u), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

#endif
