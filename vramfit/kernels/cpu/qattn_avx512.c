/* Causal GQA attention for a batch of new tokens (prefill) over a float32 KV cache, AVX-512.
 *
 * out[i, h] = softmax_t(q[i, h] . k[g, t] * scale) . v[g, t] over t <= start + i, with g the kv head
 * of query head h. Flash-attention order: queries in blocks of QB rows of one head walk the keys in
 * blocks of KB, with an online softmax (running max and sum per row, output rescaled when the max
 * grows), so no (n x T) score matrix exists. Scores are q . k^T from a transposed copy of the keys
 * (16 keys per vector, so the dot products need no horizontal sums); probabilities times values add
 * rows of v into the output rows. exp is exp2 of a pre-scaled score, a degree-6 polynomial on the
 * fraction and vscalefps for the exponent (relative error ~2e-7).
 *
 * Work items (head, query block) go to the pool's threads through an atomic counter, the longest
 * (last query blocks, most keys) first. The keys of the batch are transposed first, by all threads.
 */
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <immintrin.h>
#include "qgemm.h"
#include "qmath_avx512.h"

#define QB 8   /* query rows per item */
#define KB 64  /* keys per online-softmax step */
#define DMAX 256

static float *kt_buf;
static size_t kt_cap;

typedef struct {
    const qg_attn_args *a;
    int64_t ntb;             /* 16-key blocks of the transposed keys */
    int64_t nqb, items;      /* query blocks per head, work items */
    int64_t t_next, t_done;  /* transpose jobs (kv head, 16-key block) claimed / finished */
    int64_t next;            /* next work item */
} ajob;

/* Kt[g][tb][d][16]: keys tb*16.. of kv head g, transposed; zero past the end */
static void transpose_block(const ajob *j, int64_t job) {
    const qg_attn_args *a = j->a;
    const int64_t g = job / j->ntb, tb = job % j->ntb, D = a->head_dim, end = a->start + a->n;
    float *dst = kt_buf + (g * j->ntb + tb) * D * 16;
    const float *src = a->k + g * a->kv_head_stride;
    for (int t = 0; t < 16; t++) {
        const int64_t pos = tb * 16 + t;
        if (pos < end)
            for (int64_t d = 0; d < D; d++) dst[d * 16 + t] = src[pos * D + d];
        else
            for (int64_t d = 0; d < D; d++) dst[d * 16 + t] = 0.0f;
    }
}

/* s[r][0..32) = qs[r] . keys t0..t0+32 (two 16-key blocks of Kt) */
static inline void scores32(const float *qs, const float *kt0, const float *kt1, int64_t D, float *s) {
    __m512 a0[QB], a1[QB];
    for (int r = 0; r < QB; r++) a0[r] = a1[r] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d++) {
        const __m512 k0 = _mm512_loadu_ps(kt0 + d * 16), k1 = _mm512_loadu_ps(kt1 + d * 16);
        for (int r = 0; r < QB; r++) {
            const __m512 qv = _mm512_set1_ps(qs[r * DMAX + d]);
            a0[r] = _mm512_fmadd_ps(qv, k0, a0[r]);
            a1[r] = _mm512_fmadd_ps(qv, k1, a1[r]);
        }
    }
    for (int r = 0; r < QB; r++) {
        _mm512_storeu_ps(s + r * KB, a0[r]);
        _mm512_storeu_ps(s + r * KB + 16, a1[r]);
    }
}

/* o[r][dc..dc+64) += sum_t p[r][t] * v[t][dc..dc+64) for 4 rows from r0, nt keys */
static inline void pv4(const float *p, const float *v, int64_t D, int64_t nt, int64_t dc, float *o, int r0) {
    __m512 acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_loadu_ps(o + (r0 + r) * DMAX + dc + 16 * c);
    for (int64_t t = 0; t < nt; t++) {
        __m512 vv[4];
        for (int c = 0; c < 4; c++) vv[c] = _mm512_loadu_ps(v + t * D + dc + 16 * c);
        for (int r = 0; r < 4; r++) {
            const __m512 pr = _mm512_set1_ps(p[(r0 + r) * KB + t]);
            for (int c = 0; c < 4; c++) acc[r][c] = _mm512_fmadd_ps(pr, vv[c], acc[r][c]);
        }
    }
    for (int r = 0; r < 4; r++)
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(o + (r0 + r) * DMAX + dc + 16 * c, acc[r][c]);
}

/* the same for a 16-wide column block (head dims that are not a multiple of 64) */
static inline void pv4_16(const float *p, const float *v, int64_t D, int64_t nt, int64_t dc, float *o, int r0) {
    __m512 acc[4];
    for (int r = 0; r < 4; r++) acc[r] = _mm512_loadu_ps(o + (r0 + r) * DMAX + dc);
    for (int64_t t = 0; t < nt; t++) {
        const __m512 vv = _mm512_loadu_ps(v + t * D + dc);
        for (int r = 0; r < 4; r++) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(p[(r0 + r) * KB + t]), vv, acc[r]);
    }
    for (int r = 0; r < 4; r++) _mm512_storeu_ps(o + (r0 + r) * DMAX + dc, acc[r]);
}

static void run_item(const ajob *j, int64_t item) {
    const qg_attn_args *a = j->a;
    const int64_t D = a->head_dim, H = a->n_heads, G = a->n_heads / a->n_kv_heads;
    /* longest first: the last query blocks see the most keys */
    const int64_t qb = j->nqb - 1 - item / H, h = item % H, g = h / G;
    const int64_t i0 = qb * QB, nr = a->n - i0 < QB ? a->n - i0 : QB;
    const int64_t kend = a->start + i0 + nr; /* keys this block needs: 0..kend-1 */
    const float *v = a->v + g * a->kv_head_stride;
    const float *kt = kt_buf + g * j->ntb * D * 16;
    float qs[QB * DMAX], o[QB * DMAX], s[QB * KB], m[QB], l[QB];
    const float qscale = a->scale * 1.4426950408889634f; /* log2(e): scores in base 2 */
    for (int r = 0; r < QB; r++) {
        const float *qr = a->q + ((i0 + (r < nr ? r : 0)) * H + h) * D;
        for (int64_t d = 0; d < D; d++) qs[r * DMAX + d] = qr[d] * qscale;
        memset(o + r * DMAX, 0, (size_t)D * 4);
        m[r] = -INFINITY;
        l[r] = 0.0f;
    }
    for (int64_t t0 = 0; t0 < kend; t0 += KB) {
        const int64_t nt = kend - t0 < KB ? kend - t0 : KB;
        for (int64_t c = 0; c < nt; c += 32)
            scores32(qs, kt + (t0 + c) * D, kt + (t0 + c + 16) * D, D, s + c); /* ntb is even */
        for (int r = 0; r < QB; r++) {
            const int64_t last = a->start + i0 + r; /* the row's last visible key */
            float *sr = s + r * KB;
            __m512 mx = _mm512_set1_ps(m[r]);
            for (int64_t c = 0; c < KB; c += 16) {
                const int64_t valid = last - (t0 + c) + 1; /* visible keys in this 16 */
                const __mmask16 mk = valid >= 16 ? 0xFFFF : (valid <= 0 ? 0 : (__mmask16)((1u << valid) - 1));
                const __mmask16 in = c + 16 <= nt ? mk : mk & (__mmask16)((1u << (nt > c ? nt - c : 0)) - 1);
                const __m512 sv = _mm512_mask_blend_ps(in, _mm512_set1_ps(-INFINITY), _mm512_loadu_ps(sr + c));
                _mm512_storeu_ps(sr + c, sv);
                mx = _mm512_max_ps(mx, sv);
            }
            const float mnew = _mm512_reduce_max_ps(mx);
            if (mnew == -INFINITY) { /* nothing visible yet (cannot happen for t0 == 0) */
                memset(sr, 0, KB * 4);
                continue;
            }
            const float alpha = m[r] == -INFINITY ? 0.0f : exp2f(m[r] - mnew);
            __m512 sum = _mm512_setzero_ps();
            const __m512 mv = _mm512_set1_ps(mnew);
            for (int64_t c = 0; c < KB; c += 16) {
                const __m512 sv = _mm512_loadu_ps(sr + c);
                const __mmask16 fin = _mm512_cmp_ps_mask(sv, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
                const __m512 p = _mm512_maskz_mov_ps(fin, exp2_ps(_mm512_sub_ps(sv, mv)));
                _mm512_storeu_ps(sr + c, p);
                sum = _mm512_add_ps(sum, p);
            }
            l[r] = l[r] * alpha + _mm512_reduce_add_ps(sum);
            m[r] = mnew;
            if (alpha != 1.0f) {
                const __m512 av = _mm512_set1_ps(alpha);
                for (int64_t d = 0; d < D; d += 16)
                    _mm512_storeu_ps(o + r * DMAX + d, _mm512_mul_ps(av, _mm512_loadu_ps(o + r * DMAX + d)));
            }
        }
        const float *vb = v + t0 * D;
        for (int r0 = 0; r0 < QB; r0 += 4) {
            int64_t dc = 0;
            for (; dc + 64 <= D; dc += 64) pv4(s, vb, D, nt, dc, o, r0);
            for (; dc < D; dc += 16) pv4_16(s, vb, D, nt, dc, o, r0);
        }
    }
    for (int64_t r = 0; r < nr; r++) {
        const __m512 inv = _mm512_set1_ps(1.0f / l[r]);
        float *dst = a->out + ((i0 + r) * H + h) * D;
        for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(dst + d, _mm512_mul_ps(inv, _mm512_loadu_ps(o + r * DMAX + d)));
    }
}

static void attn_task(void *arg, int tid) {
    (void)tid;
    ajob *j = (ajob *)arg;
    const int64_t nt = j->a->n_kv_heads * j->ntb;
    int64_t t;
    while ((t = __atomic_fetch_add(&j->t_next, 1, __ATOMIC_RELAXED)) < nt) {
        transpose_block(j, t);
        __atomic_fetch_add(&j->t_done, 1, __ATOMIC_RELEASE);
    }
    while (__atomic_load_n(&j->t_done, __ATOMIC_ACQUIRE) < nt) _mm_pause();
    for (;;) {
        const int64_t it = __atomic_fetch_add(&j->next, 1, __ATOMIC_RELAXED);
        if (it >= j->items) break;
        run_item(j, it);
    }
}

int qg_attention_avx512(const qg_attn_args *a) {
    const int64_t D = a->head_dim;
    if (D <= 0 || D % 16 || D > DMAX || a->n_kv_heads <= 0 || a->n_heads % a->n_kv_heads || a->n <= 0) return 1;
    const int64_t end = a->start + a->n;
    ajob j = {a, (end + 31) / 32 * 2, (a->n + QB - 1) / QB, 0, 0, 0, 0};
    j.items = j.nqb * a->n_heads;
    const size_t need = (size_t)(a->n_kv_heads * j.ntb * D * 16) * sizeof(float);
    if (need > kt_cap) {
        free(kt_buf);
        kt_buf = aligned_alloc(64, (need + 4095) & ~(size_t)4095);
        kt_cap = kt_buf ? need : 0;
        if (!kt_buf) return 2;
    }
    qg_parallel(attn_task, &j, a->nthreads);
    return 0;
}
