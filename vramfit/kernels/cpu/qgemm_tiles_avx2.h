/* AVX2 batched product on interleaved 8-row tiles: the activation layout, the tile fill and the
 * micro-kernel. Included by qgemm_impl.h (QG_W == 256) after the scratch helpers and the unpackers;
 * the driver (irun_item) is there and shared with the AVX-512 tiles (qgemm_tiles.h).
 *
 * A tile holds IR = 8 weight rows with their 4-weight lanes interleaved: bytes [q][r][0..3] are
 * weights 4q..4q+3 of row r, so one maddubs multiplies a lane of all 8 rows with the same four
 * activation codes (a broadcast from memory: a load, no shuffle). The 8 int32 lanes of a register are
 * the 8 rows: the row scales apply as one vector per group, and no horizontal sums are needed.
 * maddubs adds its pairs into int16 with saturation, so:
 *   codes below 16 / 32 / 64 (4-, 5-, 6-bit types, offsets folded into the group offsets): the int16
 *     products of 8 / 4 / 2 lanes are summed in int16 (at most 8 * 2 * 15 * 127 = 30480), then one
 *     madd widens them: one multiply-port op per 32 weight-activation products instead of two;
 *   other codes below 128: one lane per madd;
 *   the signed types (code = value + 128, offset -128 * scale: unpack_small 0): the tile holds the
 *     values, multiplied as maddubs(|w|, sign(x, w)), exact as |w| <= 128 and |x| <= 127.
 * Per group: one conversion, one multiply by the row scales and one FMA with the activation block
 * scale, plus the offsets times the activation sums. */

#define IR 8 /* rows per tile: the int32 lanes of a ymm */
#define IY 4 /* activation rows per kernel call */

#include "qgemm_tile_layout.h"

/* the rounding of quantize_row (the fused decode path's), into this layout */
static void iquantize_row(const float *x, int64_t K, uint8_t *dst, const ilayout *L) {
    int8_t *q = (int8_t *)dst;
    float *dx = (float *)(dst + L->dx), *xs = (float *)(dst + L->xs), *xs32 = (float *)(dst + L->xs32);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t b = 0; b < K / 32; b++) {
        const float *xb = x + 32 * b;
        __m256 v[4], m = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) {
            v[i] = _mm256_loadu_ps(xb + 8 * i);
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[i]));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float amax = _mm_cvtss_f32(m4);
        const float d = amax / 127.0f, id = amax > 0 ? 127.0f / amax : 0.0f;
        __m256i qi[4];
        for (int i = 0; i < 4; i++) qi[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(id)));
        /* int32 -> int8 in order: packs work per 128-bit half, a dword permute restores the order */
        const __m256i p16a = _mm256_packs_epi32(qi[0], qi[1]), p16b = _mm256_packs_epi32(qi[2], qi[3]);
        const __m256i p8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p16a, p16b),
                                                       _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(q + 32 * b), p8);
        const __m256i s01 = _mm256_add_epi32(qi[0], qi[1]), s23 = _mm256_add_epi32(qi[2], qi[3]);
        int32_t t[8], sa = 0, sc = 0;
        _mm256_storeu_si256((__m256i *)t, s01);
        for (int l = 0; l < 8; l++) sa += t[l];
        _mm256_storeu_si256((__m256i *)t, s23);
        for (int l = 0; l < 8; l++) sc += t[l];
        dx[b] = d;
        xs[2 * b] = d * (float)sa;
        xs[2 * b + 1] = d * (float)sc;
        xs32[b] = d * (float)(sa + sc);
    }
}


/* 8 x 8 dwords transposed in registers: r[i][c] -> r[c][i] */
static inline __attribute__((always_inline)) void transpose8(__m256i r[8]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(_mm256_castsi256_ps(r[2 * i]), _mm256_castsi256_ps(r[2 * i + 1]));
        t[2 * i + 1] = _mm256_unpackhi_ps(_mm256_castsi256_ps(r[2 * i]), _mm256_castsi256_ps(r[2 * i + 1]));
    }
    for (int h = 0; h < 2; h++) { /* u[4h + c], half L: column c + 4L of rows 4h..4h+3 */
        u[4 * h] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0x44);
        u[4 * h + 1] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0xEE);
        u[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0x44);
        u[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0xEE);
    }
    for (int c = 0; c < 4; c++) {
        r[c] = _mm256_castps_si256(_mm256_permute2f128_ps(u[c], u[4 + c], 0x20));
        r[4 + c] = _mm256_castps_si256(_mm256_permute2f128_ps(u[c], u[4 + c], 0x31));
    }
}

/* rows[0..nr) unpacked into 8 linear rows `lin` (layout L, stride L->stride), then moved into the
 * tile: codes by 8 x 8 dword transposes (as signed values for the sign-trick types), the per-group
 * scales and offsets row by row. Rows nr..7 get zero codes and scales; their lanes are never stored. */
static void fill_tile(const uint8_t *const *rows, int nr, int64_t klen, unpack_fn unpack, const layout *L,
                      int group, int small, uint8_t *lin, uint8_t *tile) {
    const int64_t S = L->stride, ng = klen / group;
    for (int r = 0; r < nr; r++)
        unpack(rows[r], klen, lin + r * S, (float *)(lin + r * S + L->dl), (float *)(lin + r * S + L->sm));
    const __m256i flip = small ? _mm256_setzero_si256() : _mm256_set1_epi8((char)0x80);
    for (int64_t c0 = 0; c0 < klen; c0 += 32) { /* 32 weights = 8 lanes of every row */
        __m256i v[8];
        for (int r = 0; r < 8; r++)
            v[r] = r < nr ? _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(lin + r * S + c0)), flip)
                          : _mm256_setzero_si256();
        transpose8(v);
        for (int q = 0; q < 8; q++) _mm256_storeu_si256((__m256i *)(tile + (c0 / 4 + q) * 32), v[q]);
    }
    float *tdw = (float *)(tile + tile_dw(klen)), *tmw = (float *)(tile + tile_mw(klen, group));
    for (int r = 0; r < 8; r++) {
        const float *dwl = (const float *)(lin + r * S + L->dl), *mw = (const float *)(lin + r * S + L->sm);
        for (int64_t g = 0; g < ng; g++) {
            tdw[IR * g + r] = r < nr ? dwl[g * group / 4] : 0.0f;
            tmw[IR * g + r] = r < nr ? mw[g * group / 16] : 0.0f;
        }
    }
}

static inline __attribute__((always_inline)) __m256i bcast4(const uint8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* out[j][0..8) (+)= tile rows . activation j, j < NY. G: weights per scale group (16 or 32); CH:
 * lanes whose int16 products are summed before widening (1, 2, 4, 8), 0 for the sign trick */
static inline __attribute__((always_inline)) void ikern(const uint8_t *tile, const uint8_t *const *xr,
                                                       const ilayout *L, int64_t klen, const int G, const int CH,
                                                       const int NY, float *out, int accum) {
    const float *tdw = (const float *)(tile + tile_dw(klen)), *tmw = (const float *)(tile + tile_mw(klen, G));
    const __m256i ones = _mm256_set1_epi16(1);
    const int nq = G / 4, ch = CH < nq ? CH : nq;
    __m256 acc[IY];
    for (int j = 0; j < NY; j++) acc[j] = accum ? _mm256_loadu_ps(out + IR * j) : _mm256_setzero_ps();
    for (int64_t b = 0; b < klen / 32; b++) {
        const uint8_t *w = tile + (size_t)b * 32 * IR;
        for (int h = 0; h < 32 / G; h++) { /* one or two scale groups per 32-block */
            __m256i s[IY];
            const int q0 = h * nq;
            if (CH == 0) {
                for (int q = q0; q < q0 + nq; q++) {
                    const __m256i wq = _mm256_loadu_si256((const __m256i *)(w + 4 * IR * q));
                    const __m256i aw = _mm256_abs_epi8(wq);
                    for (int j = 0; j < NY; j++) {
                        const __m256i xv = _mm256_sign_epi8(bcast4(xr[j] + 32 * b + 4 * q), wq);
                        const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, xv), ones);
                        s[j] = q == q0 ? p : _mm256_add_epi32(s[j], p);
                    }
                }
            } else {
                for (int qc = q0; qc < q0 + nq; qc += ch) {
                    __m256i p[IY];
                    for (int q = qc; q < qc + ch; q++) {
                        const __m256i wq = _mm256_loadu_si256((const __m256i *)(w + 4 * IR * q));
                        for (int j = 0; j < NY; j++) {
                            const __m256i t = _mm256_maddubs_epi16(wq, bcast4(xr[j] + 32 * b + 4 * q));
                            p[j] = q == qc ? t : _mm256_add_epi16(p[j], t);
                        }
                    }
                    for (int j = 0; j < NY; j++) {
                        const __m256i m = _mm256_madd_epi16(p[j], ones);
                        s[j] = qc == q0 ? m : _mm256_add_epi32(s[j], m);
                    }
                }
            }
            const int64_t g = b * (32 / G) + h;
            const __m256 dw = _mm256_loadu_ps(tdw + IR * g);
            for (int j = 0; j < NY; j++) {
                const float dx = ((const float *)(xr[j] + L->dx))[b];
                acc[j] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(s[j]), dw), _mm256_set1_ps(dx), acc[j]);
            }
            if (CH) { /* the group offsets (the sign-trick types have none: their values are exact) */
                const __m256 mw = _mm256_loadu_ps(tmw + IR * g);
                for (int j = 0; j < NY; j++) {
                    const float sx = G == 32 ? ((const float *)(xr[j] + L->xs32))[b] : ((const float *)(xr[j] + L->xs))[g];
                    acc[j] = _mm256_fmadd_ps(mw, _mm256_set1_ps(sx), acc[j]);
                }
            }
        }
    }
    for (int j = 0; j < NY; j++) _mm256_storeu_ps(out + IR * j, acc[j]);
}

typedef void (*ikern_fn)(const uint8_t *, const uint8_t *const *, const ilayout *, int64_t, float *, int);
#define IKDEF(g, c, ny) \
    static void ikern_##g##_##c##_##ny(const uint8_t *t, const uint8_t *const *x, const ilayout *L, int64_t k, float *o, \
                                       int a) { \
        ikern(t, x, L, k, g, c, ny, o, a); \
    }
#define IKDEF4(g, c) IKDEF(g, c, 1) IKDEF(g, c, 2) IKDEF(g, c, 3) IKDEF(g, c, 4)
#define IKROW(g, c) {ikern_##g##_##c##_1, ikern_##g##_##c##_2, ikern_##g##_##c##_3, ikern_##g##_##c##_4}
IKDEF4(16, 0) IKDEF4(16, 1) IKDEF4(16, 2) IKDEF4(16, 4)
IKDEF4(32, 0) IKDEF4(32, 1) IKDEF4(32, 2) IKDEF4(32, 4) IKDEF4(32, 8)

/* the largest code of a type's unpacked form decides how many lanes' int16 products may be summed */
static int code_chunk(int type) {
    switch (type) {
    case QG_Q4_0: case QG_Q4_1: case QG_Q4_K: case QG_Q2_K: case QG_Q3_K: return 8; /* codes < 16 */
    case QG_Q5_0: case QG_Q5_1: case QG_Q5_K: return 4;                          /* < 32 */
    case QG_Q6_0: case QG_Q6_K: case QG_IQ2_K: case QG_IQ2_KS: return 2;         /* < 64 */
    default: return unpack_small(type) ? 1 : 0;                                   /* < 128, or signed */
    }
}

static const ikern_fn *pick_ikern(int type, int group) {
    static const ikern_fn k16[5][IY] = {IKROW(16, 0), IKROW(16, 1), IKROW(16, 2), IKROW(16, 4), IKROW(16, 4)};
    static const ikern_fn k32[5][IY] = {IKROW(32, 0), IKROW(32, 1), IKROW(32, 2), IKROW(32, 4), IKROW(32, 8)};
    const int c = code_chunk(type), i = c == 8 ? 4 : c == 4 ? 3 : c; /* 0 1 2 -> rows 0 1 2 */
    return group == 32 ? k32[i] : k16[i];
}
