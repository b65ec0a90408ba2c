/* AVX-512 batched product on interleaved 16-row tiles: the activation layout, the tile fill and the
 * micro-kernel. Included by qgemm_impl.h (QG_W == 512) after the scratch helpers and the unpackers;
 * the driver (irun_item) is there. */
/* ---------------------------------------------------------------------------------------------
 * AVX-512 batched kernel on interleaved tiles (used for every batch above the fused decode sizes).
 *
 * A tile holds IR = 16 weight rows with their 4-weight lanes interleaved: bytes [q][r][0..3] are
 * weights 4q..4q+3 of row r, so one dpbusd multiplies a lane of all 16 rows with the same four
 * activation codes (broadcast from memory). Eight of them sum a 32-weight block of 16 rows in the
 * int32 lanes; one conversion and two FMAs per block then apply the row scales (a vector over the
 * rows) times the activation block scale, and the group offsets times the activation block sums.
 * That is 8 integer dot products per 3-4 float operations, against 2 per 3 in the per-row kernel,
 * and the 16 results of an activation row land in one register, with no horizontal sums. */

#define IR 16 /* rows per tile: the int32 lanes of a zmm */
#define IY 8  /* activation rows per kernel call */

#include "qgemm_tile_layout.h"

/* the same rounding as quantize_row */
static void iquantize_row(const float *x, int64_t K, uint8_t *dst, const ilayout *L) {
    int8_t *q = (int8_t *)dst;
    float *dx = (float *)(dst + L->dx), *xs = (float *)(dst + L->xs), *xs32 = (float *)(dst + L->xs32);
    for (int64_t b = 0; b < K / 32; b++) {
        const float *xb = x + 32 * b;
        __m512 a = _mm512_loadu_ps(xb), c = _mm512_loadu_ps(xb + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(c)));
        float d = amax / 127.0f, id = amax > 0 ? 127.0f / amax : 0.0f;
        __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, _mm512_set1_ps(id)));
        __m512i qc = _mm512_cvtps_epi32(_mm512_mul_ps(c, _mm512_set1_ps(id)));
        _mm_storeu_si128((__m128i *)(q + 32 * b), _mm512_cvtsepi32_epi8(qa));
        _mm_storeu_si128((__m128i *)(q + 32 * b + 16), _mm512_cvtsepi32_epi8(qc));
        const int32_t sa = _mm512_reduce_add_epi32(qa), sc = _mm512_reduce_add_epi32(qc);
        dx[b] = d;
        xs[2 * b] = d * (float)sa;
        xs[2 * b + 1] = d * (float)sc;
        xs32[b] = d * (float)(sa + sc);
    }
}


/* 16 x 16 dwords transposed in registers: r[i][c] -> r[c][i] (64 shuffles) */
static inline __attribute__((always_inline)) void transpose16(__m512i r[16]) {
    __m512i t[16], u[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int j = 0; j < 4; j++) { /* u[4j + k], lane L: column 4L + k of rows 4j..4j+3 */
        u[4 * j] = _mm512_unpacklo_epi64(t[4 * j], t[4 * j + 2]);
        u[4 * j + 1] = _mm512_unpackhi_epi64(t[4 * j], t[4 * j + 2]);
        u[4 * j + 2] = _mm512_unpacklo_epi64(t[4 * j + 1], t[4 * j + 3]);
        u[4 * j + 3] = _mm512_unpackhi_epi64(t[4 * j + 1], t[4 * j + 3]);
    }
    for (int k = 0; k < 4; k++) {
        const __m512i p01 = _mm512_shuffle_i32x4(u[k], u[4 + k], _MM_SHUFFLE(1, 0, 1, 0));
        const __m512i q01 = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], _MM_SHUFFLE(1, 0, 1, 0));
        const __m512i p23 = _mm512_shuffle_i32x4(u[k], u[4 + k], _MM_SHUFFLE(3, 2, 3, 2));
        const __m512i q23 = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], _MM_SHUFFLE(3, 2, 3, 2));
        r[k] = _mm512_shuffle_i32x4(p01, q01, _MM_SHUFFLE(2, 0, 2, 0));
        r[4 + k] = _mm512_shuffle_i32x4(p01, q01, _MM_SHUFFLE(3, 1, 3, 1));
        r[8 + k] = _mm512_shuffle_i32x4(p23, q23, _MM_SHUFFLE(2, 0, 2, 0));
        r[12 + k] = _mm512_shuffle_i32x4(p23, q23, _MM_SHUFFLE(3, 1, 3, 1));
    }
}

/* rows[0..nr) unpacked into 16 linear rows `lin` (layout L, stride L->stride), then moved into the
 * tile: codes by 16 x 16 dword transposes, the per-group scales and offsets by gathers across rows.
 * Rows nr..15 get zero codes and scales; their lanes are never stored. */
static void fill_tile(const uint8_t *const *rows, int nr, int64_t klen, unpack_fn unpack, const layout *L,
                      int group, int small, uint8_t *lin, uint8_t *tile) {
    (void)small; /* dpbusd takes unsigned codes of any size: no signed form needed */
    const int64_t S = L->stride, ng = klen / group;
    for (int r = 0; r < nr; r++)
        unpack(rows[r], klen, lin + r * S, (float *)(lin + r * S + L->dl), (float *)(lin + r * S + L->sm));
    for (int64_t c0 = 0; c0 < klen; c0 += 64) { /* 64 weights = 16 lanes of every row */
        const int nq = klen - c0 >= 64 ? 16 : (int)(klen - c0) / 4;
        const __mmask16 m = nq == 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nq) - 1);
        __m512i v[16];
        for (int r = 0; r < 16; r++) v[r] = r < nr ? _mm512_maskz_loadu_epi32(m, lin + r * S + c0) : _mm512_setzero_si512();
        transpose16(v);
        for (int q = 0; q < nq; q++) _mm512_storeu_si512(tile + (c0 / 4 + q) * 64, v[q]);
    }
    const __mmask16 live = nr >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nr) - 1);
    const __m512i rowf = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32((int)(S / 4))); /* row starts, in floats */
    const float *dwl = (const float *)(lin + L->dl), *mw = (const float *)(lin + L->sm);
    float *tdw = (float *)(tile + tile_dw(klen)), *tmw = (float *)(tile + tile_mw(klen, group));
    for (int64_t g = 0; g < ng; g++) {
        const __m512 z = _mm512_setzero_ps();
        _mm512_storeu_ps(tdw + IR * g, _mm512_mask_i32gather_ps(z, live, _mm512_add_epi32(rowf, _mm512_set1_epi32((int)(g * group / 4))), dwl, 4));
        _mm512_storeu_ps(tmw + IR * g, _mm512_mask_i32gather_ps(z, live, _mm512_add_epi32(rowf, _mm512_set1_epi32((int)(g * group / 16))), mw, 4));
    }
}

static inline __attribute__((always_inline)) __m512i bcast4(const uint8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

/* out[j][0..16) (+)= tile rows . activation j, j < NY */
static inline __attribute__((always_inline)) void ikern(const uint8_t *tile, const uint8_t *const *xr,
                                                       const ilayout *L, int64_t klen, const int G, const int NY,
                                                       float *out, int accum) {
    const float *tdw = (const float *)(tile + tile_dw(klen)), *tmw = (const float *)(tile + tile_mw(klen, G));
    const __m512i zero = _mm512_setzero_si512();
    __m512 acc[IY];
    for (int j = 0; j < NY; j++) acc[j] = accum ? _mm512_loadu_ps(out + IR * j) : _mm512_setzero_ps();
    for (int64_t b = 0; b < klen / 32; b++) {
        const uint8_t *w = tile + (size_t)b * 32 * IR;
        for (int h = 0; h < 32 / G; h++) { /* one or two scale groups per 32-block */
            __m512i s[IY];
            const int q0 = h * G / 4, nq = G / 4;
            {
                const __m512i wq = _mm512_loadu_si512(w + 4 * IR * q0);
                for (int j = 0; j < NY; j++) s[j] = _mm512_dpbusd_epi32(zero, wq, bcast4(xr[j] + 32 * b + 4 * q0));
            }
            for (int q = q0 + 1; q < q0 + nq; q++) {
                const __m512i wq = _mm512_loadu_si512(w + 4 * IR * q);
                for (int j = 0; j < NY; j++) s[j] = _mm512_dpbusd_epi32(s[j], wq, bcast4(xr[j] + 32 * b + 4 * q));
            }
            const int64_t g = b * (32 / G) + h;
            const __m512 dw = _mm512_loadu_ps(tdw + IR * g), mw = _mm512_loadu_ps(tmw + IR * g);
            for (int j = 0; j < NY; j++) {
                const float dx = ((const float *)(xr[j] + L->dx))[b];
                const float sx = G == 32 ? ((const float *)(xr[j] + L->xs32))[b] : ((const float *)(xr[j] + L->xs))[g];
                acc[j] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(s[j]), dw), _mm512_set1_ps(dx), acc[j]);
                acc[j] = _mm512_fmadd_ps(mw, _mm512_set1_ps(sx), acc[j]);
            }
        }
    }
    for (int j = 0; j < NY; j++) _mm512_storeu_ps(out + IR * j, acc[j]);
}

typedef void (*ikern_fn)(const uint8_t *, const uint8_t *const *, const ilayout *, int64_t, float *, int);
#define IKDEF(g, ny) \
    static void ikern_##g##_##ny(const uint8_t *t, const uint8_t *const *x, const ilayout *L, int64_t k, float *o, int a) { \
        ikern(t, x, L, k, g, ny, o, a); \
    }
IKDEF(16, 1) IKDEF(16, 2) IKDEF(16, 3) IKDEF(16, 4) IKDEF(16, 5) IKDEF(16, 6) IKDEF(16, 7) IKDEF(16, 8)
IKDEF(32, 1) IKDEF(32, 2) IKDEF(32, 3) IKDEF(32, 4) IKDEF(32, 5) IKDEF(32, 6) IKDEF(32, 7) IKDEF(32, 8)
static const ikern_fn ikernels[2][IY] = {
    {ikern_16_1, ikern_16_2, ikern_16_3, ikern_16_4, ikern_16_5, ikern_16_6, ikern_16_7, ikern_16_8},
    {ikern_32_1, ikern_32_2, ikern_32_3, ikern_32_4, ikern_32_5, ikern_32_6, ikern_32_7, ikern_32_8},
};

static const ikern_fn *pick_ikern(int type, int group) {
    (void)type;
    return ikernels[group == 32];
}
