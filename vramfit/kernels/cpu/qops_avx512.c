/* Element-wise ops of a layer that torch runs slowly (one thread, or several passes): SwiGLU, and the
 * Gated DeltaNet's causal depthwise conv + SiLU and one-token delta-rule step. AVX-512. */
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
#include <immintrin.h>
#include <math.h>
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

/* ------------------------------------------------------------------------------------------------
 * one token of the gated delta rule, per value head h (S = state[h], d_k x d_v, row-major; q and k of
 * key head h % n_k, the tiling of qwen35's heads):
 *   S <- e^g S;  u = beta (v - S^T k);  S <- S + k u^T;  o = S^T q
 * in two passes over S instead of torch's four plus a temporary: m = S^T k on the old S (the decayed
 * state's product is e^g m), then each row updated and folded into o while it is loaded
 * ---------------------------------------------------------------------------------------------- */

typedef struct {
    const float *q, *k, *v, *g, *beta; /* (n_k, d_k), (n_k, d_k), (H, d_v), (H,), (H,) */
    float *state, *out;                /* (H, d_k, d_v), (H, d_v) */
    int64_t H, nk, dk, dv;
    int64_t next;
} djob;

static void delta_head(const djob *j, int64_t h, float *scratch) {
    const int64_t dk = j->dk, dv = j->dv;
    const float *q = j->q + (h % j->nk) * dk, *k = j->k + (h % j->nk) * dk, *v = j->v + h * dv;
    float *S = j->state + h * dk * dv, *o = j->out + h * dv, *u = scratch;
    const float decay = expf(j->g[h]), beta = j->beta[h];
    for (int64_t c = 0; c < dv; c += 16) { /* u = beta (v - e^g S^T k) */
        const __mmask16 m = dv - c >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (dv - c)) - 1);
        __m512 acc = _mm512_setzero_ps();
        for (int64_t i = 0; i < dk; i++)
            acc = _mm512_fmadd_ps(_mm512_set1_ps(k[i]), _mm512_maskz_loadu_ps(m, S + i * dv + c), acc);
        const __m512 mem = _mm512_mul_ps(acc, _mm512_set1_ps(decay));
        _mm512_mask_storeu_ps(u + c, m, _mm512_mul_ps(_mm512_set1_ps(beta), _mm512_sub_ps(_mm512_maskz_loadu_ps(m, v + c), mem)));
    }
    for (int64_t c = 0; c < dv; c += 16) { /* S = e^g S + k u^T, o = S^T q */
        const __mmask16 m = dv - c >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (dv - c)) - 1);
        const __m512 uc = _mm512_maskz_loadu_ps(m, u + c), dc = _mm512_set1_ps(decay);
        __m512 acc = _mm512_setzero_ps();
        for (int64_t i = 0; i < dk; i++) {
            float *row = S + i * dv + c;
            const __m512 s = _mm512_fmadd_ps(_mm512_set1_ps(k[i]), uc, _mm512_mul_ps(dc, _mm512_maskz_loadu_ps(m, row)));
            _mm512_mask_storeu_ps(row, m, s);
            acc = _mm512_fmadd_ps(_mm512_set1_ps(q[i]), s, acc);
        }
        _mm512_mask_storeu_ps(o + c, m, acc);
    }
}

static void delta_task(void *arg, int tid) {
    (void)tid;
    djob *j = (djob *)arg;
    float scratch[QG_DELTA_MAX_DV];
    for (;;) {
        const int64_t h = __atomic_fetch_add(&j->next, 1, __ATOMIC_RELAXED);
        if (h >= j->H) break;
        delta_head(j, h, scratch);
    }
}

void qg_delta_step_avx512(const float *q, const float *k, const float *v, const float *g, const float *beta, float *state,
                          float *out, int64_t H, int64_t nk, int64_t dk, int64_t dv, int nthreads) {
    djob j = {q, k, v, g, beta, state, out, H, nk, dk, dv, 0};
    qg_parallel(delta_task, &j, H * dk * dv < 65536 ? 1 : nthreads);
}
