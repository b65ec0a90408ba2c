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
