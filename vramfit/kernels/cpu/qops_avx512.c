/* Element-wise ops of a layer that torch runs on one thread at ~1 element/ns: SwiGLU. AVX-512. */
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
