/* The per-ISA body of the quantized matrix product. Included by qgemm_avx2.c (QG_W == 256) and
 * qgemm_avx512.c (QG_W == 512) after a `#pragma GCC target`; QG_SFX names the entry point.
 *
 * Algorithm (llama.cpp style):
 *   1. every activation row is quantized to int8 in blocks of 32 (scale d = max|x| / 127), with
 *      d * sum(q) per 16 and per 32 values for the weights' group offsets;
 *   2. weight rows are unpacked into unsigned 8-bit codes + group scales + group offsets
 *      (qgemm_unpack.h), so y[i] = dwl * q + mw;
 *   3. integer dot products per 4-weight lane (AVX-512 VNNI dpbusd, AVX2 maddubs), converted to
 *      float per scale group and scaled by weight scale * activation scale; the group offsets add
 *      sum_g mw[g] * xs[g].
 * Batches up to 8 use the fused kernels straight from the packed rows (qgemm_decode.h for AVX-512,
 * qgemm_decode_avx2.h for AVX2, sharing qgemm_fused.h and the driver `fused_matmul`). Larger
 * batches unpack IR rows at a time into an interleaved tile that the `ikern` micro-kernel multiplies
 * with IY activation rows at once: AVX-512 16 rows x 8 (qgemm_tiles.h), AVX2 8 rows x 4, activation
 * rows in chunks that fit the L2 (qgemm_tiles_avx2.h); one driver (`irun_item`) for both.
 * Unpacking costs O(K) per weight row and is shared by all activation rows of a chunk. Threads
 * (qg_parallel, qgemm_module.c) take one tile's rows per work item from an atomic counter.
 */
#include <stdlib.h>
#include "qgemm.h"
#include "qgemm_unpack.h"

#define NYMAX 4
#define ROWS_PER_ITEM 16
#define MAXTHREADS 64

#define CAT2(a, b) a##b
#define CAT(a, b) CAT2(a, b)

/* ---------------------------------------------------------------------------------------------
 * scratch buffers (one call at a time: the Python module serialises calls) */

static void *act_buf;
static size_t act_cap;
static void *unp_buf[MAXTHREADS];
static size_t unp_cap[MAXTHREADS];

static void *grow(void **buf, size_t *cap, size_t need) {
    if (need > *cap) {
        free(*buf);
        size_t sz = (need + 4095) & ~(size_t)4095;
        *buf = aligned_alloc(64, sz);
        *cap = *buf ? sz : 0;
    }
    return *buf;
}

static inline int64_t round64(int64_t v) { return (v + 63) & ~(int64_t)63; }

/* byte offsets inside a quantized activation row / unpacked weight row of length K */
typedef struct {
    int64_t dl, sm, stride;
} layout;

static layout make_layout(int64_t K) {
    layout L;
    const int64_t K128 = (K + 127) / 128 * 128;
    L.dl = round64(K128);         /* K codes (padded to 128), then K/4 lane scales */
    L.sm = L.dl + round64(K128);  /* then K/16 group sums / offsets */
    L.stride = L.sm + round64(K / 4);
    return L;
}


/* ---------------------------------------------------------------------------------------------
 * activation quantization */

static void quantize_row(const float *x, int64_t K, uint8_t *dst, const layout *L) {
    int8_t *q = (int8_t *)dst;
    float *dxl = (float *)(dst + L->dl), *xs = (float *)(dst + L->sm);
    for (int64_t b = 0; b < K / 32; b++) {
        const float *xb = x + 32 * b;
#if QG_W == 512
        __m512 a = _mm512_loadu_ps(xb), c = _mm512_loadu_ps(xb + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(c)));
        float d = amax / 127.0f, id = amax > 0 ? 127.0f / amax : 0.0f;
        __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, _mm512_set1_ps(id)));
        __m512i qc = _mm512_cvtps_epi32(_mm512_mul_ps(c, _mm512_set1_ps(id)));
        _mm_storeu_si128((__m128i *)(q + 32 * b), _mm512_cvtsepi32_epi8(qa));
        _mm_storeu_si128((__m128i *)(q + 32 * b + 16), _mm512_cvtsepi32_epi8(qc));
        _mm256_storeu_ps(dxl + 8 * b, _mm256_set1_ps(d));
        xs[2 * b] = d * (float)_mm512_reduce_add_epi32(qa);
        xs[2 * b + 1] = d * (float)_mm512_reduce_add_epi32(qc);
#else
        const __m256 sign = _mm256_set1_ps(-0.0f);
        __m256 v[4], m = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) {
            v[i] = _mm256_loadu_ps(xb + 8 * i);
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[i]));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        float amax = _mm_cvtss_f32(m4);
        float d = amax / 127.0f, id = amax > 0 ? 127.0f / amax : 0.0f;
        int32_t s[2] = {0, 0};
        for (int i = 0; i < 4; i++) {
            __m256i qi = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(id)));
            int32_t t[8];
            _mm256_storeu_si256((__m256i *)t, qi);
            for (int l = 0; l < 8; l++) {
                q[32 * b + 8 * i + l] = (int8_t)t[l];
                s[i / 2] += t[l];
            }
        }
        _mm256_storeu_ps(dxl + 8 * b, _mm256_set1_ps(d));
        xs[2 * b] = d * (float)s[0];
        xs[2 * b + 1] = d * (float)s[1];
#endif
    }
}


/* ---------------------------------------------------------------------------------------------
 * fused decode path (n <= 8), both widths: the per-ISA kernels read the packed rows directly */

#include "qgemm_fused.h"
#if QG_W == 512
#include "qgemm_decode.h"
#else
#include "qgemm_decode_avx2.h"
#endif

static void *fact_buf;
static size_t fact_cap;

typedef struct {
    const qg_args *a;
    const dec_fn *dec;
    fact A[8];
    int64_t nblocks, ntiles, rows; /* rows per tile */
} dplan;

static void run_dec_item(const dplan *p, int64_t tile) {
    const qg_args *a = p->a;
    const int64_t r_end = a->N < (tile + 1) * p->rows ? a->N : (tile + 1) * p->rows;
    /* software prefetch about 4 KiB ahead: a tile's run of short rows is too brief for the hardware
     * prefetchers to ramp up on (+15-20% decode speed on SmolLM2's 360-byte rows) */
    const int64_t ahead = a->row_nbytes <= 4096 ? (4096 + a->row_nbytes - 1) / a->row_nbytes : 0;
    for (int64_t r = tile * p->rows; r < r_end; r++) {
        if (ahead && r + ahead < r_end) {
            const uint8_t *nx = a->w + (r + ahead) * a->row_nbytes;
            for (int64_t o = 0; o < a->row_nbytes; o += 64) _mm_prefetch((const char *)nx + o, _MM_HINT_T0);
        }
        for (int64_t y = 0; y < a->n; y += NYMAX) {
            const int ny = a->n - y < NYMAX ? (int)(a->n - y) : NYMAX;
            p->dec[ny - 1](a->w + r * a->row_nbytes, p->nblocks, p->A + y, a->out + y * a->N + r, a->N);
        }
    }
}

typedef struct {
    const dplan *p;
    int64_t next; /* next tile to claim */
} djob;

static void dec_task(void *arg, int tid) {
    (void)tid;
    djob *job = (djob *)arg;
    for (;;) {
        const int64_t t = __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED);
        if (t >= job->p->ntiles) break;
        run_dec_item(job->p, t);
    }
}

/* n <= 8: fused kernels straight from the packed rows */
static int fused_matmul(const qg_args *a, int nth) {
    const int64_t n = a->n, K = a->K;
    const layout L = make_layout(K);
    const flayout F = make_flayout(K);
    uint8_t *act = grow(&act_buf, &act_cap, (size_t)(n * L.stride));
    uint8_t *fa = grow(&fact_buf, &fact_cap, (size_t)(n * F.stride));
    if (!act || !fa) return 2;
    dplan p;
    p.a = a;
    p.dec = pick_dec(a->type);
    p.nblocks = qg_row_nbytes(a->type, 32) ? K / 32 : K / 256; /* legacy: 32-blocks; else super-blocks */
    /* Few large tiles: each thread streams long contiguous runs of rows (the prefetchers' best case)
     * and the shared tile counter is touched a handful of times instead of every 16 rows. Eight
     * tiles per thread still let an early thread take over a late one's share. */
    int64_t rows = (a->N + 8 * nth - 1) / (8 * nth);
    rows = (rows + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM * ROWS_PER_ITEM;
    p.rows = rows < ROWS_PER_ITEM ? ROWS_PER_ITEM : rows;
    p.ntiles = (a->N + p.rows - 1) / p.rows;
    for (int64_t j = 0; j < n; j++) {
        quantize_row(a->x + j * K, K, act + j * L.stride, &L);
        uint8_t *dst = fa + j * F.stride;
        reorder_act(act + j * L.stride, &L, K, fused_order(a->type), dst, &F);
        p.A[j].q = dst;
        p.A[j].dx = (const float *)(dst + F.dx);
        p.A[j].s32 = (const float *)(dst + F.s32);
        p.A[j].s16 = (const float *)(dst + F.s16);
    }
    djob job = {&p, 0};
    qg_parallel(dec_task, &job, nth);
    return 0;
}


#if QG_W == 512
#include "qgemm_tiles.h"
#else
#include "qgemm_tiles_avx2.h"
#endif

/* ---------------------------------------------------------------------------------------------
 * driver */

typedef struct {
    const qg_args *a;
    unpack_fn unpack;
    const layout *L;
    const uint8_t *act;
    int64_t nc, ntiles;
    int small; /* unpack_small: codes below 128, offsets in the groups (else signed values + 128) */
    int64_t kc, nkc;     /* K is walked in nkc chunks of kc weights (the last may be shorter) */
    int64_t bsize, bbytes; /* weights and bytes per block, to find a chunk inside a packed row */
    int row_meta;          /* bytes of row scale in front of the blocks (IQ4_KS, IQ5_KS) */
    int group;             /* weights per scale/offset group of the type (16 or 32) */
    ilayout IL;
    const ikern_fn *ik;    /* the tile micro-kernels for 1..IY activation rows */
} plan;

/* a work item on interleaved tiles: scratch = IR linear rows, packed-chunk copies, tile, output block */
static void irun_item(const plan *p, int64_t item, uint8_t *ubuf) {
    const qg_args *a = p->a;
    const int64_t chunk = item / p->ntiles, tile = item % p->ntiles;
    const int64_t r0 = tile * IR, r_end = a->N < r0 + IR ? a->N : r0 + IR;
    const int nr = (int)(r_end - r0);
    const int64_t y0 = chunk * p->nc, y_end = a->n < y0 + p->nc ? a->n : y0 + p->nc;
    const int64_t stride = p->L->stride, istride = p->IL.stride;
    uint8_t *lin = ubuf, *packed = ubuf + IR * stride, *tbuf = packed + packed_bytes(p->kc);
    float *obuf = (float *)(tbuf + round64(tile_bytes(p->kc)));
    for (int64_t kk = 0; kk < p->nkc; kk++) {
        const int64_t k0 = kk * p->kc, klen = a->K - k0 < p->kc ? a->K - k0 : p->kc;
        const int64_t woff = p->nkc > 1 ? k0 / p->bsize * p->bbytes : 0;
        const uint8_t *rows[IR];
        for (int r = 0; r < nr; r++) {
            rows[r] = a->w + (r0 + r) * a->row_nbytes + woff;
            if (p->row_meta && woff) { /* the chunk's blocks behind a copy of the row scale */
                uint8_t *dst = packed + r * (p->row_meta + klen / p->bsize * p->bbytes);
                memcpy(dst, a->w + (r0 + r) * a->row_nbytes, (size_t)p->row_meta);
                memcpy(dst + p->row_meta, rows[r] + p->row_meta, (size_t)(klen / p->bsize * p->bbytes));
                rows[r] = dst;
            }
        }
        fill_tile(rows, nr, klen, p->unpack, p->L, p->group, p->small, lin, tbuf);
        const uint8_t *act = p->act + kk * a->n * istride;
        for (int64_t y = y0; y < y_end; y += IY) {
            const int ny = y_end - y < IY ? (int)(y_end - y) : IY;
            const uint8_t *xr[IY];
            for (int j = 0; j < ny; j++) xr[j] = act + (y + j) * istride;
            p->ik[ny - 1](tbuf, xr, &p->IL, klen, obuf + (y - y0) * IR, kk > 0);
        }
    }
    for (int64_t y = y0; y < y_end; y++) memcpy(a->out + y * a->N + r0, obuf + (y - y0) * IR, (size_t)nr * 4);
}

/* activation row j into the plan's layout, one K chunk after the other */
static void quantize_act(const plan *p, int64_t j) {
    const int64_t K = p->a->K;
    for (int64_t kk = 0; kk < p->nkc; kk++) {
        const int64_t k0 = kk * p->kc, klen = K - k0 < p->kc ? K - k0 : p->kc;
        iquantize_row(p->a->x + j * K + k0, klen, (uint8_t *)p->act + (kk * p->a->n + j) * p->IL.stride, &p->IL);
    }
}

typedef struct {
    const plan *p;
    int64_t total;              /* work items */
    int64_t next, q_next, q_done; /* next item to claim; activation rows claimed / quantized */
    int quant_inside;
} gjob;

/* one thread's share: quantize activation rows, wait until all are, then take work items. A thread
 * that starts late finds the work taken and returns: nobody waits for a descheduled thread except
 * for rows it has claimed. */
static void gemm_task(void *arg, int tid) {
    gjob *job = (gjob *)arg;
    if (job->quant_inside) {
        int64_t j;
        while ((j = __atomic_fetch_add(&job->q_next, 1, __ATOMIC_RELAXED)) < job->p->a->n) {
            quantize_act(job->p, j);
            __atomic_fetch_add(&job->q_done, 1, __ATOMIC_RELEASE);
        }
        while (__atomic_load_n(&job->q_done, __ATOMIC_ACQUIRE) < job->p->a->n) _mm_pause();
    }
    for (;;) {
        const int64_t it = __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED);
        if (it >= job->total) break;
        irun_item(job->p, it, unp_buf[tid]);
    }
}

int CAT(qg_matmul_, QG_SFX)(const qg_args *a) {
    const int64_t n = a->n, K = a->K, N = a->N;
    unpack_fn unpack = pick_unpack(a->type);
    if (!unpack || K <= 0 || K % 32 || qg_row_nbytes(a->type, K) != a->row_nbytes) return 1;
    if (n <= 0 || N <= 0) return 0;
    int nth = a->nthreads < 1 ? 1 : (a->nthreads > MAXTHREADS ? MAXTHREADS : a->nthreads);
    if ((double)n * N * K < 200000.0) nth = 1; /* too small to pay for waking a thread */
    if (n <= 8 && pick_dec(a->type)) return fused_matmul(a, nth);
    /* long rows are walked in chunks of 2048 weights, so that many activation rows fit the L2 and
     * each unpacked weight chunk serves them all */
#if QG_W == 512 /* interleaved tiles stream activations from L3 at ease: chunk only very long rows */
    const int64_t kc = K > 16384 ? 8192 : K, nkc = (K + kc - 1) / kc;
#else
    const int64_t kc = K > 3072 ? 2048 : K, nkc = (K + kc - 1) / kc;
#endif
    const int64_t bsize = qg_row_nbytes(a->type, 32) ? 32 : 256;
    const int row_meta = (int)(2 * qg_row_nbytes(a->type, bsize) - qg_row_nbytes(a->type, 2 * bsize));
    const layout L = make_layout(kc);
    const ilayout IL = make_ilayout(kc);
    const int64_t astride = IL.stride;
#if QG_W == 512
    const int64_t nc = n < 512 ? n : 512; /* the tile is unpacked once per nc rows */
#else
    /* activation rows per chunk: 512 KiB of quantized rows, half of a 1 MiB L2 (Zen 4/5) */
    int64_t nc = (1 << 19) / astride;
    nc = nc < IY ? IY : (nc > 512 ? 512 : nc - nc % IY);
#endif
    uint8_t *act = grow(&act_buf, &act_cap, (size_t)(nkc * n * astride));
    if (!act) return 2;
    /* linear rows, packed chunks, tile, output */
    const size_t scratch = (size_t)(IR * L.stride + packed_bytes(kc) + round64(tile_bytes(kc)) + IR * nc * 4);
    for (int t = 0; t < nth; t++)
        if (!grow(&unp_buf[t], &unp_cap[t], scratch)) return 2;
    const int group = unpack_group(a->type);
    plan p = {a,     unpack, &L,    act,  nc, (N + IR - 1) / IR, unpack_small(a->type), kc, nkc, bsize,
              qg_row_nbytes(a->type, bsize) - row_meta, row_meta, group, IL, pick_ikern(a->type, group)};
    /* few rows: quantize here, so that the threads start without waiting for each other */
    gjob job = {&p, ((n + nc - 1) / nc) * p.ntiles, 0, 0, 0, nth > 1 && n > 8};
    if (!job.quant_inside)
        for (int64_t j = 0; j < n; j++) quantize_act(&p, j);
    qg_parallel(gemm_task, &job, nth);
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * several products of the same few activation rows (q, k, v; gate, up): the activations are
 * quantized once and the parts' tiles go to the threads through one counter, so the pool wakes
 * once instead of once per part. Parts the fused kernels do not take, or batches above 8, run one
 * after the other. */

#define MAXPARTS 4

typedef struct {
    dplan p[MAXPARTS];
    int64_t first[MAXPARTS + 1]; /* the parts' first tiles in the shared numbering */
    int np;
    int64_t next;
} mjob;

static void multi_task(void *arg, int tid) {
    (void)tid;
    mjob *job = (mjob *)arg;
    for (;;) {
        const int64_t t = __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED);
        if (t >= job->first[job->np]) break;
        int i = 0;
        while (t >= job->first[i + 1]) i++;
        run_dec_item(&job->p[i], t - job->first[i]);
    }
}

int CAT(qg_matmul_parts_, QG_SFX)(const qg_args *parts, int nparts) {
    const qg_args *a0 = &parts[0];
    int fused = nparts >= 1 && nparts <= MAXPARTS && a0->n >= 1 && a0->n <= 8 && a0->K > 0 && a0->K % 32 == 0;
    double work = 0;
    for (int i = 0; fused && i < nparts; i++) {
        const qg_args *a = &parts[i];
        fused = a->x == a0->x && a->n == a0->n && a->K == a0->K && a->N > 0 && pick_dec(a->type) &&
                fused_order(a->type) == fused_order(a0->type) && qg_row_nbytes(a->type, a->K) == a->row_nbytes;
        work += (double)a->n * a->N * a->K;
    }
    if (!fused) {
        for (int i = 0; i < nparts; i++) {
            const int rc = CAT(qg_matmul_, QG_SFX)(&parts[i]);
            if (rc) return rc;
        }
        return 0;
    }
    const int64_t n = a0->n, K = a0->K;
    int nth = a0->nthreads < 1 ? 1 : (a0->nthreads > MAXTHREADS ? MAXTHREADS : a0->nthreads);
    if (work < 200000.0) nth = 1;
    const layout L = make_layout(K);
    const flayout F = make_flayout(K);
    uint8_t *act = grow(&act_buf, &act_cap, (size_t)(n * L.stride));
    uint8_t *fa = grow(&fact_buf, &fact_cap, (size_t)(n * F.stride));
    if (!act || !fa) return 2;
    mjob job;
    job.np = nparts;
    job.next = 0;
    job.first[0] = 0;
    for (int64_t j = 0; j < n; j++) {
        quantize_row(a0->x + j * K, K, act + j * L.stride, &L);
        uint8_t *dst = fa + j * F.stride;
        reorder_act(act + j * L.stride, &L, K, fused_order(a0->type), dst, &F);
        job.p[0].A[j].q = dst;
        job.p[0].A[j].dx = (const float *)(dst + F.dx);
        job.p[0].A[j].s32 = (const float *)(dst + F.s32);
        job.p[0].A[j].s16 = (const float *)(dst + F.s16);
    }
    for (int i = 0; i < nparts; i++) {
        dplan *p = &job.p[i];
        const qg_args *a = &parts[i];
        if (i) memcpy(p->A, job.p[0].A, sizeof(p->A));
        p->a = a;
        p->dec = pick_dec(a->type);
        p->nblocks = qg_row_nbytes(a->type, 32) ? K / 32 : K / 256;
        int64_t rows = (a->N + 8 * nth - 1) / (8 * nth); /* as fused_matmul's tiles */
        rows = (rows + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM * ROWS_PER_ITEM;
        p->rows = rows < ROWS_PER_ITEM ? ROWS_PER_ITEM : rows;
        p->ntiles = (a->N + p->rows - 1) / p->rows;
        job.first[i + 1] = job.first[i] + p->ntiles;
    }
    qg_parallel(multi_task, &job, nth);
    return 0;
}
