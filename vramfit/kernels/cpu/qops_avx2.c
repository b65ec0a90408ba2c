/* AVX2 + FMA kernels for the Python path's attention and SwiGLU (any x86-64 with AVX2; the AVX-512
 * machine's prefill takes qattn_avx512.c's flash attention instead).
 *
 * Attention: every (query, head) pair is one `attend_head` of qmath_avx2.h over the keys it sees,
 * the very routine the one-token decode step (qlayer.c) runs, so a decode step on the Python path
 * and on the C path give the same floats. Scores live in a per-thread row of T floats (no n x T
 * matrix); work items go to the pool through an atomic counter, the longest rows first.
 * SwiGLU: silu_mul of qmath_avx2.h row by row, again the decode step's own arithmetic. */
#pragma GCC target("avx2,fma")
#include <stdlib.h>
#include <string.h>
#include "qgemm.h"
#include "qmath_avx2.h"

#define MAXTHREADS 64

static float *score_buf[MAXTHREADS];
static size_t score_cap[MAXTHREADS];

typedef struct {
    const qg_attn_args *a;
    int64_t items, next; /* (query, head) pairs, the next one to claim */
} ajob2;

static void attn2_task(void *arg, int tid) {
    ajob2 *j = (ajob2 *)arg;
    const qg_attn_args *a = j->a;
    const int64_t H = a->n_heads, D = a->head_dim, group = a->n_heads / a->n_kv_heads;
    for (;;) {
        const int64_t it = __atomic_fetch_add(&j->next, 1, __ATOMIC_RELAXED);
        if (it >= j->items) break;
        const int64_t i = a->n - 1 - it / H, h = it % H; /* the last queries see the most keys */
        const int64_t g = h / group, T = a->start + i + 1;
        attend_head(a->q + (i * H + h) * D, a->k + g * a->kv_head_stride, a->v + g * a->kv_head_stride, T, D,
                    a->scale, score_buf[tid], a->out + (i * H + h) * D);
    }
}

int qg_attention_avx2(const qg_attn_args *a) {
    if (a->head_dim <= 0 || a->head_dim % 8 || a->n_kv_heads <= 0 || a->n_heads % a->n_kv_heads) return 1;
    if (a->n <= 0) return 0;
    int nth = a->nthreads < 1 ? 1 : (a->nthreads > MAXTHREADS ? MAXTHREADS : a->nthreads);
    const int64_t T = a->start + a->n;
    if (T * a->n * a->n_heads * a->head_dim < (1 << 15)) nth = 1; /* too small to wake a thread */
    const size_t need = (size_t)(T + 8) * sizeof(float);
    for (int t = 0; t < nth; t++) {
        if (need > score_cap[t]) {
            free(score_buf[t]);
            score_buf[t] = malloc(need);
            score_cap[t] = score_buf[t] ? need : 0;
            if (!score_buf[t]) return 2;
        }
    }
    ajob2 j = {a, a->n * a->n_heads, 0};
    qg_parallel(attn2_task, &j, nth);
    return 0;
}

typedef struct {
    const float *gu;
    float *out;
    int64_t rows, n_ff, next;
} sjob2;

static void swiglu2_task(void *arg, int tid) {
    (void)tid;
    sjob2 *j = (sjob2 *)arg;
    for (;;) {
        const int64_t r = __atomic_fetch_add(&j->next, 1, __ATOMIC_RELAXED);
        if (r >= j->rows) break;
        float *o = j->out + r * j->n_ff;
        const float *g = j->gu + r * 2 * j->n_ff;
        if (o != g) memcpy(o, g, (size_t)j->n_ff * sizeof(float));
        silu_mul(o, g + j->n_ff, j->n_ff);
    }
}

void qg_swiglu_avx2(const float *gu, float *out, int64_t rows, int64_t n_ff, int nthreads) {
    sjob2 j = {gu, out, rows, n_ff, 0};
    qg_parallel(swiglu2_task, &j, rows * n_ff < (1 << 14) ? 1 : nthreads);
}

/* ------------------------------------------------------------------------------------------------
 * the Gated DeltaNet's causal depthwise conv + SiLU and one-token delta-rule step: the algorithms of
 * qops_avx512.c (see there) on 8-float vectors, masked loads and stores for a ragged last vector
 * ---------------------------------------------------------------------------------------------- */

typedef struct {
    const float *state, *x, *wt; /* (K-1, C), (T, C), (K, C) */
    float *out;                  /* (T, C) */
    int64_t T, C, ldx;
    int K;
    int64_t next;
} cjob2;

#define CONV_ROWS 8 /* rows per work item */

static inline __m256 silu8(__m256 v) {
    return _mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), v))));
}

static void conv2_row(const cjob2 *j, int64_t t) {
    const float *src[QG_CONV_MAX_K];
    for (int k = 0; k < j->K; k++) {
        const int64_t r = t + k; /* row of xs */
        src[k] = r < j->K - 1 ? j->state + r * j->C : j->x + (r - (j->K - 1)) * j->ldx;
    }
    float *o = j->out + t * j->C;
    for (int64_t c = 0; c < j->C; c += 8) {
        const __m256i m = head_mask(j->C - c < 8 ? j->C - c : 8);
        __m256 acc = _mm256_setzero_ps();
        for (int k = 0; k < j->K; k++)
            acc = _mm256_fmadd_ps(_mm256_maskload_ps(j->wt + k * j->C + c, m), _mm256_maskload_ps(src[k] + c, m), acc);
        _mm256_maskstore_ps(o + c, m, silu8(acc));
    }
}

static void conv2_task(void *arg, int tid) {
    (void)tid;
    cjob2 *j = (cjob2 *)arg;
    for (;;) {
        const int64_t t0 = __atomic_fetch_add(&j->next, CONV_ROWS, __ATOMIC_RELAXED);
        if (t0 >= j->T) break;
        for (int64_t t = t0; t < t0 + CONV_ROWS && t < j->T; t++) conv2_row(j, t);
    }
}

void qg_conv_silu_avx2(const float *state, const float *x, int64_t ldx, const float *wt, float *out, int64_t T,
                       int64_t C, int K, int nthreads) {
    cjob2 j = {state, x, wt, out, T, C, ldx, K, 0};
    qg_parallel(conv2_task, &j, T * C < 65536 ? 1 : nthreads);
}

typedef struct {
    const float *q, *k, *v, *g, *beta; /* (n_k, d_k), (n_k, d_k), (H, d_v), (H,), (H,) */
    float *state, *out;                /* (H, d_k, d_v), (H, d_v) */
    int64_t H, nk, dk, dv;
    int64_t next;
} djob2;

static void delta2_head(const djob2 *j, int64_t h, float *u) {
    const int64_t dk = j->dk, dv = j->dv;
    const float *q = j->q + (h % j->nk) * dk, *k = j->k + (h % j->nk) * dk, *v = j->v + h * dv;
    float *S = j->state + h * dk * dv, *o = j->out + h * dv;
    const float decay = expf(j->g[h]), beta = j->beta[h];
    for (int64_t c = 0; c < dv; c += 8) { /* u = beta (v - e^g S^T k) */
        const __m256i m = head_mask(dv - c < 8 ? dv - c : 8);
        __m256 acc = _mm256_setzero_ps();
        for (int64_t i = 0; i < dk; i++)
            acc = _mm256_fmadd_ps(_mm256_set1_ps(k[i]), _mm256_maskload_ps(S + i * dv + c, m), acc);
        const __m256 mem = _mm256_mul_ps(acc, _mm256_set1_ps(decay));
        _mm256_maskstore_ps(u + c, m, _mm256_mul_ps(_mm256_set1_ps(beta), _mm256_sub_ps(_mm256_maskload_ps(v + c, m), mem)));
    }
    for (int64_t c = 0; c < dv; c += 8) { /* S = e^g S + k u^T, o = S^T q */
        const __m256i m = head_mask(dv - c < 8 ? dv - c : 8);
        const __m256 uc = _mm256_maskload_ps(u + c, m), dc = _mm256_set1_ps(decay);
        __m256 acc = _mm256_setzero_ps();
        for (int64_t i = 0; i < dk; i++) {
            float *row = S + i * dv + c;
            const __m256 s = _mm256_fmadd_ps(_mm256_set1_ps(k[i]), uc, _mm256_mul_ps(dc, _mm256_maskload_ps(row, m)));
            _mm256_maskstore_ps(row, m, s);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(q[i]), s, acc);
        }
        _mm256_maskstore_ps(o + c, m, acc);
    }
}

static void delta2_task(void *arg, int tid) {
    (void)tid;
    djob2 *j = (djob2 *)arg;
    float u[QG_DELTA_MAX_DV];
    for (;;) {
        const int64_t h = __atomic_fetch_add(&j->next, 1, __ATOMIC_RELAXED);
        if (h >= j->H) break;
        delta2_head(j, h, u);
    }
}

void qg_delta_step_avx2(const float *q, const float *k, const float *v, const float *g, const float *beta, float *state,
                        float *out, int64_t H, int64_t nk, int64_t dk, int64_t dv, int nthreads) {
    djob2 j = {q, k, v, g, beta, state, out, H, nk, dk, dv, 0};
    qg_parallel(delta2_task, &j, H * dk * dv < 65536 ? 1 : nthreads);
}
