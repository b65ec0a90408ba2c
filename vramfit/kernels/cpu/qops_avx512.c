/* Element-wise ops of a layer that torch runs slowly (one thread, or several passes): SwiGLU, and the
 * Gated DeltaNet's causal depthwise conv + SiLU. AVX-512. */
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
#include <immintrin.h>
#include "qgemm.h"
#include "qmath_avx512.h"

typedef struct {
    const float *gu; /* (rows, 2 * n_ff): gate then up */
    float *out;      /* (rows, n_ff) */
    int64_t rows, n_ff;
    int64_t next;
} sjob;

#define SWIGLU_ROWS 4 /* rows per work item */

static void swiglu_task(void *arg, int tid) {
    (void)tid;
    sjob *j = (sjob *)arg;
    for (;;) {
        const int64_t r0 = __atomic_fetch_add(&j->next, SWIGLU_ROWS, __ATOMIC_RELAXED);
        if (r0 >= j->rows) break;
        const int64_t r1 = r0 + SWIGLU_ROWS < j->rows ? r0 + SWIGLU_ROWS : j->rows;
        for (int64_t r = r0; r < r1; r++) {
            const float *g = j->gu + r * 2 * j->n_ff, *u = g + j->n_ff;
            float *o = j->out + r * j->n_ff;
            int64_t i = 0;
            for (; i + 16 <= j->n_ff; i += 16)
                _mm512_storeu_ps(o + i, swiglu_ps(_mm512_loadu_ps(g + i), _mm512_loadu_ps(u + i)));
            if (i < j->n_ff) {
                const __mmask16 m = (__mmask16)((1u << (j->n_ff - i)) - 1);
                _mm512_mask_storeu_ps(o + i, m, swiglu_ps(_mm512_maskz_loadu_ps(m, g + i), _mm512_maskz_loadu_ps(m, u + i)));
            }
        }
    }
}

void qg_swiglu_avx512(const float *gu, float *out, int64_t rows, int64_t n_ff, int nthreads) {
    sjob j = {gu, out, rows, n_ff, 0};
    qg_parallel(swiglu_task, &j, rows * n_ff < 65536 ? 1 : nthreads);
}

/* ------------------------------------------------------------------------------------------------
 * causal depthwise conv + SiLU: out[t, c] = silu(sum_j wt[j, c] * xs[t + j, c]), where xs is the K-1
 * rows of `state` followed by the T rows of x (ldx floats apart: x may be columns of a wider product);
 * one pass instead of torch's K multiply-adds, cat and silu
 * ---------------------------------------------------------------------------------------------- */

typedef struct {
    const float *state, *x, *wt; /* (K-1, C), (T, C), (K, C) */
    float *out;                  /* (T, C) */
    int64_t T, C, ldx;
    int K;
    int64_t next;
} cjob;

#define CONV_ROWS 8 /* rows per work item */

static inline __m512 silu_ps(__m512 v) {
    const __m512 e = exp2_ps(_mm512_mul_ps(v, _mm512_set1_ps(-1.4426950408889634f)));
    return _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

static void conv_row(const cjob *j, int64_t t) {
    const float *src[QG_CONV_MAX_K];
    for (int k = 0; k < j->K; k++) {
        const int64_t r = t + k; /* row of xs */
        src[k] = r < j->K - 1 ? j->state + r * j->C : j->x + (r - (j->K - 1)) * j->ldx;
    }
    float *o = j->out + t * j->C;
    for (int64_t c = 0; c < j->C; c += 16) {
        const __mmask16 m = j->C - c >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (j->C - c)) - 1);
        __m512 acc = _mm512_setzero_ps();
        for (int k = 0; k < j->K; k++)
            acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, j->wt + k * j->C + c), _mm512_maskz_loadu_ps(m, src[k] + c), acc);
        _mm512_mask_storeu_ps(o + c, m, silu_ps(acc));
    }
}

static void conv_task(void *arg, int tid) {
    (void)tid;
    cjob *j = (cjob *)arg;
    for (;;) {
        const int64_t t0 = __atomic_fetch_add(&j->next, CONV_ROWS, __ATOMIC_RELAXED);
        if (t0 >= j->T) break;
        for (int64_t t = t0; t < t0 + CONV_ROWS && t < j->T; t++) conv_row(j, t);
    }
}

void qg_conv_silu_avx512(const float *state, const float *x, int64_t ldx, const float *wt, float *out, int64_t T,
                         int64_t C, int K, int nthreads) {
    cjob j = {state, x, wt, out, T, C, ldx, K, 0};
    qg_parallel(conv_task, &j, T * C < 65536 ? 1 : nthreads);
}
