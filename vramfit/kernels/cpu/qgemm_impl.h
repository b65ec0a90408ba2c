/* The per-ISA body of the quantized matrix product. Included by qgemm_avx2.c (QG_W == 256) and
 * qgemm_avx512.c (QG_W == 512) after a `#pragma GCC target`; QG_SFX names the entry point.
 *
 * Algorithm (llama.cpp style):
 *   1. every activation row is quantized to int8 in blocks of 32 (scale d = max|x| / 127); per block
 *      the scale is kept once per 4-value lane (dxl) and d * sum(q) per 16 values (xs);
 *   2. weight rows are unpacked NW at a time into unsigned 8-bit codes + lane scales + group offsets
 *      (qgemm_unpack.h), so y[i] = dwl * q + mw;
 *   3. a register-blocked micro-kernel computes NW x NY outputs at once: per 64 (AVX-512) or 32
 *      (AVX2) weights an integer dot product per 4-weight lane, converted to float and scaled by
 *      dwl * dxl; the group offsets add sum_g mw[g] * xs[g].
 * Unpacking costs O(K) per weight row and is shared by all activation rows of a tile, which are
 * walked in chunks that fit the L2 cache. Threads (qg_parallel, qgemm_module.c) take 16-row work
 * items from an atomic counter.
 */
#include <stdlib.h>
#include "qgemm.h"
#include "qgemm_unpack.h"

#define NWMAX 4
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

/* Split order (AVX-512, types with one scale per 32 weights): per 128 weights, weights 0..15 of the
 * four 32-blocks, then weights 16..31, so the two halves of a block share dot-product lanes and are
 * summed as integers before one conversion; the lane scales become one float per block and lane
 * quad (K/8 floats). The same reordering is applied to weights and activations; the group offsets
 * (K/16) keep their order. Zero padding up to a multiple of 128. */
static void to_split(const uint8_t *src, uint8_t *dst, int64_t K, const layout *L) {
    const int64_t nb = K / 32, nb4 = (nb + 3) / 4 * 4;
    const float *dl = (const float *)(src + L->dl);
    float *ds = (float *)(dst + L->dl);
    for (int64_t b = 0; b < nb4; b++) {
        const int64_t g = b / 4, i = b % 4;
        if (b < nb) {
            memcpy(dst + 128 * g + 16 * i, src + 32 * b, 16);
            memcpy(dst + 128 * g + 64 + 16 * i, src + 32 * b + 16, 16);
        } else {
            memset(dst + 128 * g + 16 * i, 0, 16);
            memset(dst + 128 * g + 64 + 16 * i, 0, 16);
        }
        for (int l = 0; l < 4; l++) ds[16 * g + 4 * i + l] = b < nb ? dl[8 * b] : 0.0f;
    }
    memcpy(dst + L->sm, src + L->sm, (size_t)(K / 16) * sizeof(float));
}

/* The kernel variant (`variant` of the plan, SPLIT of `kern`):
 *   AVX-512: 1 = split order, for every type with 32-weight scales;
 *   AVX2:    1 = codes below 128 (4/5/6-bit types), multiplied as they are, without the sign trick. */
static int variant(int type) {
#if QG_W == 512
    return unpack_group(type) == 32;
#else
    return unpack_small(type);
#endif
}

#define SPLIT_LAYOUT (QG_W == 512) /* whether variant 1 reorders rows into the split order */

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
 * micro-kernel: out[j * ldo + r] = row r . activation j, r < NW, j < NY */

typedef struct {
    const uint8_t *w[NWMAX]; /* unpacked weight rows */
    const uint8_t *x[NYMAX]; /* quantized activation rows */
    float *out;
    int64_t ldo, K;
    const layout *L;
    int accum; /* add to out (later K chunks) instead of storing */
} kargs;



#if QG_W == 512
static inline __attribute__((always_inline)) float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

/* [sum(a), sum(b), sum(c), sum(d)] */
static inline __attribute__((always_inline)) __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
    const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b)); /* a0 b0 a1 b1 per lane */
    const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    const __m512 abcd = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xEE));
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm512_extractf32x8_ps(abcd, 1));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
#else
static inline __attribute__((always_inline)) float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

static inline __attribute__((always_inline)) void kern(const kargs *ka, const int NW, const int NY, const int SPLIT) {
    const int64_t K = ka->K, dl = ka->L->dl;
#if QG_W == 512
    __m512 acc[NWMAX][NYMAX];
    for (int r = 0; r < NW; r++)
        for (int j = 0; j < NY; j++) acc[r][j] = _mm512_setzero_ps();
    const __m512i zero = _mm512_setzero_si512();
    int64_t k = 0;
    if (SPLIT) {
        for (; k < K; k += 128) { /* padded to 128 with zero codes and scales */
            __m512i wa[NWMAX], wb[NWMAX];
            __m512 s[NWMAX];
            for (int r = 0; r < NW; r++) {
                wa[r] = _mm512_loadu_si512(ka->w[r] + k);
                wb[r] = _mm512_loadu_si512(ka->w[r] + k + 64);
                s[r] = _mm512_loadu_ps((const float *)(ka->w[r] + dl) + k / 8);
            }
            for (int j = 0; j < NY; j++) {
                const __m512i xa = _mm512_loadu_si512(ka->x[j] + k), xb = _mm512_loadu_si512(ka->x[j] + k + 64);
                const __m512 dv = _mm512_loadu_ps((const float *)(ka->x[j] + dl) + k / 8);
                for (int r = 0; r < NW; r++) {
                    __m512i t = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, wa[r], xa), wb[r], xb);
                    acc[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_mul_ps(s[r], dv), acc[r][j]);
                }
            }
        }
        k = K;
    }
    for (; k < K; k += 64) {
        const __mmask64 mb = K - k >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (K - k)) - 1);
        const __mmask16 mf = K - k >= 64 ? (__mmask16)0xFFFF : (__mmask16)(((unsigned)1 << ((K - k) / 4)) - 1);
        __m512i w[NWMAX];
        __m512 s[NWMAX];
        for (int r = 0; r < NW; r++) {
            w[r] = _mm512_maskz_loadu_epi8(mb, ka->w[r] + k);
            s[r] = _mm512_maskz_loadu_ps(mf, (const float *)(ka->w[r] + dl) + k / 4);
        }
        for (int j = 0; j < NY; j++) {
            const __m512i xv = _mm512_maskz_loadu_epi8(mb, ka->x[j] + k);
            const __m512 dv = _mm512_maskz_loadu_ps(mf, (const float *)(ka->x[j] + dl) + k / 4);
            for (int r = 0; r < NW; r++) {
                __m512i t = _mm512_dpbusd_epi32(zero, w[r], xv);
                acc[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_mul_ps(s[r], dv), acc[r][j]);
            }
        }
    }
#else
    __m256 acc[NWMAX][NYMAX];
    for (int r = 0; r < NW; r++)
        for (int j = 0; j < NY; j++) acc[r][j] = _mm256_setzero_ps();
    const __m256i bias = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
    if (SPLIT) { /* codes < 128: maddubs cannot saturate (2 * 127 * 127 < 32768) */
        for (int64_t k = 0; k < K; k += 32) {
            __m256i w[NWMAX];
            __m256 s[NWMAX];
            for (int r = 0; r < NW; r++) {
                w[r] = _mm256_loadu_si256((const __m256i *)(ka->w[r] + k));
                s[r] = _mm256_loadu_ps((const float *)(ka->w[r] + dl) + k / 4);
            }
            for (int j = 0; j < NY; j++) {
                const __m256i xv = _mm256_loadu_si256((const __m256i *)(ka->x[j] + k));
                const __m256 dv = _mm256_loadu_ps((const float *)(ka->x[j] + dl) + k / 4);
                for (int r = 0; r < NW; r++) {
                    __m256i t = _mm256_madd_epi16(_mm256_maddubs_epi16(w[r], xv), ones);
                    acc[r][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_mul_ps(s[r], dv), acc[r][j]);
                }
            }
        }
    }
    for (int64_t k = 0; !SPLIT && k < K; k += 32) {
        __m256i a[NWMAX], sg[NWMAX];
        __m256 s[NWMAX];
        for (int r = 0; r < NW; r++) {
            sg[r] = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(ka->w[r] + k)), bias);
            a[r] = _mm256_abs_epi8(sg[r]);
            s[r] = _mm256_loadu_ps((const float *)(ka->w[r] + dl) + k / 4);
        }
        for (int j = 0; j < NY; j++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(ka->x[j] + k));
            const __m256 dv = _mm256_loadu_ps((const float *)(ka->x[j] + dl) + k / 4);
            for (int r = 0; r < NW; r++) {
                __m256i p = _mm256_maddubs_epi16(a[r], _mm256_sign_epi8(xv, sg[r]));
                __m256i t = _mm256_madd_epi16(p, ones);
                acc[r][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_mul_ps(s[r], dv), acc[r][j]);
            }
        }
    }
#endif
    const int64_t sm = ka->L->sm;
#if QG_W == 512
    /* group offsets: sum_g mw[g] * xs[g], folded into the same accumulators */
    for (int64_t g = 0; g < K / 16; g += 16) {
        const __mmask16 mg = K / 16 - g >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K / 16 - g)) - 1);
        __m512 mwv[NWMAX];
        for (int r = 0; r < NW; r++) mwv[r] = _mm512_maskz_loadu_ps(mg, (const float *)(ka->w[r] + sm) + g);
        for (int j = 0; j < NY; j++) {
            const __m512 xsv = _mm512_maskz_loadu_ps(mg, (const float *)(ka->x[j] + sm) + g);
            for (int r = 0; r < NW; r++) acc[r][j] = _mm512_fmadd_ps(mwv[r], xsv, acc[r][j]);
        }
    }
    for (int r = 0; r < NW; r++) {
        if (NY == 4) { /* four horizontal sums at once */
            const __m128 v = hsum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
            for (int j = 0; j < 4; j++) ka->out[j * ka->ldo + r] = v[j] + (ka->accum ? ka->out[j * ka->ldo + r] : 0.0f);
        } else {
            for (int j = 0; j < NY; j++)
                ka->out[j * ka->ldo + r] = hsum(acc[r][j]) + (ka->accum ? ka->out[j * ka->ldo + r] : 0.0f);
        }
    }
#else
    /* group offsets: the sign-trick kernel (SPLIT == 0) multiplies the true signed values, and those
     * types' offsets are exactly -128 * scale, so only the small-code kernel has any to add */
    for (int64_t g = 0; SPLIT && g < K / 16; g += 8) {
        const __m256i mg = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(K / 16 - g)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        __m256 mwv[NWMAX];
        for (int r = 0; r < NW; r++) mwv[r] = _mm256_maskload_ps((const float *)(ka->w[r] + sm) + g, mg);
        for (int j = 0; j < NY; j++) {
            const __m256 xsv = _mm256_maskload_ps((const float *)(ka->x[j] + sm) + g, mg);
            for (int r = 0; r < NW; r++) acc[r][j] = _mm256_fmadd_ps(mwv[r], xsv, acc[r][j]);
        }
    }
    for (int r = 0; r < NW; r++)
        for (int j = 0; j < NY; j++)
            ka->out[j * ka->ldo + r] = hsum(acc[r][j]) + (ka->accum ? ka->out[j * ka->ldo + r] : 0.0f);
#endif
}

typedef void (*kern_fn)(const kargs *);
#define KDEF(nw, ny) \
    static void CAT(kern_##nw##_##ny, QG_SFX)(const kargs *ka) { kern(ka, nw, ny, 0); } \
    static void CAT(kerns_##nw##_##ny, QG_SFX)(const kargs *ka) { kern(ka, nw, ny, 1); }
KDEF(1, 1) KDEF(1, 2) KDEF(1, 3) KDEF(1, 4)
KDEF(2, 1) KDEF(2, 2) KDEF(2, 3) KDEF(2, 4)
KDEF(3, 1) KDEF(3, 2) KDEF(3, 3) KDEF(3, 4)
KDEF(4, 1) KDEF(4, 2) KDEF(4, 3) KDEF(4, 4)
#define KROW(nw) \
    { CAT(kern_##nw##_1, QG_SFX), CAT(kern_##nw##_2, QG_SFX), CAT(kern_##nw##_3, QG_SFX), CAT(kern_##nw##_4, QG_SFX) }
#define KROWS(nw) \
    { CAT(kerns_##nw##_1, QG_SFX), CAT(kerns_##nw##_2, QG_SFX), CAT(kerns_##nw##_3, QG_SFX), CAT(kerns_##nw##_4, QG_SFX) }
static const kern_fn kernels_split[NWMAX][NYMAX] = {KROWS(1), KROWS(2), KROWS(3), KROWS(4)};
static const kern_fn kernels[NWMAX][NYMAX] = {KROW(1), KROW(2), KROW(3), KROW(4)};

#if QG_W == 512
#include "qgemm_decode.h"

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
    for (int64_t r = tile * p->rows; r < r_end; r++)
        for (int64_t y = 0; y < a->n; y += NYMAX) {
            const int ny = a->n - y < NYMAX ? (int)(a->n - y) : NYMAX;
            p->dec[ny - 1](a->w + r * a->row_nbytes, p->nblocks, p->A + y, a->out + y * a->N + r, a->N);
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
#endif

/* ---------------------------------------------------------------------------------------------
 * driver */

typedef struct {
    const qg_args *a;
    unpack_fn unpack;
    const layout *L;
    const uint8_t *act;
    int64_t nc, ntiles;
    int split;
    int64_t kc, nkc;     /* K is walked in nkc chunks of kc weights (the last may be shorter) */
    int64_t bsize, bbytes; /* weights and bytes per block, to find a chunk inside a packed row */
    int row_meta;          /* bytes of row scale in front of the blocks (IQ4_KS, IQ5_KS) */
} plan;

static void run_item(const plan *p, int64_t item, uint8_t *ubuf) {
    const qg_args *a = p->a;
    const int64_t chunk = item / p->ntiles, tile = item % p->ntiles;
    const int64_t r_end = a->N < (tile + 1) * ROWS_PER_ITEM ? a->N : (tile + 1) * ROWS_PER_ITEM;
    const int64_t y0 = chunk * p->nc, y_end = a->n < y0 + p->nc ? a->n : y0 + p->nc;
    const int64_t stride = p->L->stride;
    /* results go to a [y][16] scratch first and then to `out` a line at a time: the kernel's 4-wide
     * column writes at a stride of N floats would thrash the L1 sets for large N */
    float *obuf = (float *)(ubuf + (NWMAX + 2) * stride);
    kargs ka;
    ka.ldo = ROWS_PER_ITEM;
    ka.L = p->L;
    for (int64_t kk = 0; kk < p->nkc; kk++) {
        const int64_t k0 = kk * p->kc, klen = a->K - k0 < p->kc ? a->K - k0 : p->kc;
        const int64_t woff = p->nkc > 1 ? k0 / p->bsize * p->bbytes : 0;
        const uint8_t *act = p->act + kk * a->n * stride;
        ka.K = klen;
        ka.accum = kk > 0;
        for (int64_t r0 = tile * ROWS_PER_ITEM; r0 < r_end; r0 += NWMAX) {
            const int nw = r_end - r0 < NWMAX ? (int)(r_end - r0) : NWMAX;
            for (int r = 0; r < nw; r++) {
                uint8_t *u = ubuf + r * stride, *tmp = SPLIT_LAYOUT && p->split ? ubuf + NWMAX * stride : u;
                const uint8_t *src = a->w + (r0 + r) * a->row_nbytes + woff;
                if (p->row_meta && woff) { /* the chunk's blocks behind a copy of the row scale */
                    uint8_t *packed = ubuf + (NWMAX + 1) * stride;
                    memcpy(packed, a->w + (r0 + r) * a->row_nbytes, (size_t)p->row_meta);
                    memcpy(packed + p->row_meta, src + p->row_meta, (size_t)(klen / p->bsize * p->bbytes));
                    src = packed;
                }
                p->unpack(src, klen, tmp, (float *)(tmp + p->L->dl), (float *)(tmp + p->L->sm));
                if (SPLIT_LAYOUT && p->split) to_split(tmp, u, klen, p->L);
                ka.w[r] = u;
            }
            for (int64_t y = y0; y < y_end; y += NYMAX) {
                const int ny = y_end - y < NYMAX ? (int)(y_end - y) : NYMAX;
                for (int j = 0; j < ny; j++) ka.x[j] = act + (y + j) * stride;
                ka.out = obuf + (y - y0) * ROWS_PER_ITEM + (r0 - tile * ROWS_PER_ITEM);
                (p->split ? kernels_split : kernels)[nw - 1][ny - 1](&ka);
            }
        }
    }
    const int64_t r0 = tile * ROWS_PER_ITEM, nr = r_end - r0;
    for (int64_t y = y0; y < y_end; y++)
        memcpy(a->out + y * a->N + r0, obuf + (y - y0) * ROWS_PER_ITEM, (size_t)nr * 4);
}

/* activation row j into the plan's layout, one K chunk after the other (split order through the
 * thread's scratch row) */
static void quantize_act(const plan *p, int64_t j, uint8_t *ubuf) {
    const int64_t K = p->a->K, stride = p->L->stride;
    for (int64_t kk = 0; kk < p->nkc; kk++) {
        const int64_t k0 = kk * p->kc, klen = K - k0 < p->kc ? K - k0 : p->kc;
        uint8_t *dst = (uint8_t *)p->act + (kk * p->a->n + j) * stride;
        uint8_t *tmp = SPLIT_LAYOUT && p->split ? ubuf + NWMAX * stride : dst;
        quantize_row(p->a->x + j * K + k0, klen, tmp, p->L);
        if (SPLIT_LAYOUT && p->split) to_split(tmp, dst, klen, p->L);
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
            quantize_act(job->p, j, unp_buf[tid]);
            __atomic_fetch_add(&job->q_done, 1, __ATOMIC_RELEASE);
        }
        while (__atomic_load_n(&job->q_done, __ATOMIC_ACQUIRE) < job->p->a->n) _mm_pause();
    }
    for (;;) {
        const int64_t it = __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED);
        if (it >= job->total) break;
        run_item(job->p, it, unp_buf[tid]);
    }
}

int CAT(qg_matmul_, QG_SFX)(const qg_args *a) {
    const int64_t n = a->n, K = a->K, N = a->N;
    unpack_fn unpack = pick_unpack(a->type);
    if (!unpack || K <= 0 || K % 32 || qg_row_nbytes(a->type, K) != a->row_nbytes) return 1;
    if (n <= 0 || N <= 0) return 0;
    int nth = a->nthreads < 1 ? 1 : (a->nthreads > MAXTHREADS ? MAXTHREADS : a->nthreads);
    if ((double)n * N * K < 200000.0) nth = 1; /* too small to pay for waking a thread */
#if QG_W == 512
    if (n <= 8 && pick_dec(a->type)) return fused_matmul(a, nth);
#endif
    /* long rows are walked in chunks of 2048 weights, so that many activation rows fit the L2 and
     * each unpacked weight chunk serves them all */
    const int64_t kc = K > 3072 ? 2048 : K, nkc = (K + kc - 1) / kc;
    const int64_t bsize = qg_row_nbytes(a->type, 32) ? 32 : 256;
    const int row_meta = (int)(2 * qg_row_nbytes(a->type, bsize) - qg_row_nbytes(a->type, 2 * bsize));
    const layout L = make_layout(kc);
    uint8_t *act = grow(&act_buf, &act_cap, (size_t)(nkc * n * L.stride));
    if (!act) return 2;
    /* activation rows per chunk: 512 KiB of quantized rows, half of a 1 MiB L2 (Zen 4/5) */
    int64_t nc = (1 << 19) / L.stride;
    nc = nc < NYMAX ? NYMAX : (nc > 512 ? 512 : nc - nc % NYMAX);
    for (int t = 0; t < nth; t++) /* NWMAX unpacked rows, two scratch rows, the output block */
        if (!grow(&unp_buf[t], &unp_cap[t], (size_t)((NWMAX + 2) * L.stride + ROWS_PER_ITEM * nc * 4))) return 2;
    plan p = {a,   unpack, &L,    act,   nc, (N + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM, variant(a->type),
              kc,  nkc,    bsize, qg_row_nbytes(a->type, bsize) - row_meta, row_meta};
    /* few rows: quantize here, so that the threads start without waiting for each other */
    gjob job = {&p, ((n + nc - 1) / nc) * p.ntiles, 0, 0, 0, nth > 1 && n > 8};
    if (!job.quant_inside)
        for (int64_t j = 0; j < n; j++) quantize_act(&p, j, unp_buf[0]);
    qg_parallel(gemm_task, &job, nth);
    return 0;
}
