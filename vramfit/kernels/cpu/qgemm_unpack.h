/* Weight unpacking: one packed GGUF row -> 8-bit codes and per-group scale/offset.
 *
 * For every type the decoded weight i of the row is
 *     y[i] = dwl[i / 4] * q[i] + mw[i / 16]
 * with q an unsigned 8-bit code, dwl the group scale repeated for each 4-weight lane (the lane of an
 * integer dot product) and mw the group offset per 16 weights. Symmetric types store value + 128 (or
 * the natural unsigned code with its bias; the 2- and 3-bit IQK grids value + 32 or + 64, to stay
 * below 128) and fold the bias into mw, so every kernel multiplies unsigned codes with signed 8-bit
 * activations. Biases are powers of two, so mw = -bias * scale is exact. The layouts follow the modules of vramfit/quant (the bit-exact
 * Python decoders) and shared/docs/iqk-formats.md.
 *
 * Included by each per-ISA translation unit after its `#pragma GCC target`, so the plain loops here
 * are vectorised for that ISA.
 */
#include <stdint.h>
#include <string.h>
#include <immintrin.h>

#define QK 32
#define QKK 256

static const uint8_t kv_iq4nl_128[16] = {
    1, 24, 45, 63, 79, 93, 106, 118, 129, 141, 153, 166, 181, 197, 217, 241,
};
/* iq4k_values + 128: base 16 then shifted (+4) 16 */
static const uint8_t kv_iq4k_128[32] = {
    1,   24,  45,  63,  79,  93,  106, 118, 129, 141, 153, 166, 181, 197, 217, 241,
    5,   28,  49,  67,  83,  97,  110, 122, 133, 145, 157, 170, 185, 201, 221, 245,
};
/* iq5nl_values + 128: base 32 then shifted (+2) 32 */
static const uint8_t kv_iq5nl_128[64] = {
    2,   14,  25,  36,  45,  54,  63,  71,  78,  85,  92,  98,  104, 110, 116, 122,
    127, 133, 139, 145, 151, 157, 164, 171, 179, 187, 196, 205, 215, 225, 237, 249,
    4,   16,  27,  38,  47,  56,  65,  73,  80,  87,  94,  100, 106, 112, 118, 124,
    129, 135, 141, 147, 153, 159, 166, 173, 181, 189, 198, 207, 217, 227, 239, 251,
};

/* iq2nl_values + 32 and iq3nl_values + 64 (base grids; the shifted grids are base + 5 and + 4):
 * the 2- and 3-bit grids fit below 128 with a power-of-two offset */
static const uint8_t kv_iq2nl_32[16] = {1, 19, 33, 49};
static const uint8_t kv_iq3nl_64[16] = {1, 24, 41, 54, 65, 77, 92, 111};
/* iq6nl_values + 128 (base; shifted = base + 1) */
static const uint8_t kv_iq6nl_128[64] = {
    1,   7,   13,  19,  24,  30,  35,  40,  44,  49,  54,  58,  62,  66,  70,  74,
    77,  81,  84,  88,  91,  94,  97,  100, 103, 106, 109, 112, 115, 117, 120, 123,
    126, 128, 131, 134, 137, 140, 142, 145, 148, 151, 155, 158, 161, 164, 168, 172,
    175, 179, 183, 187, 191, 196, 200, 205, 210, 215, 220, 226, 231, 237, 243, 249,
};
/* iq2kl pair values + 64: the first weight of each of the 32 pairs, then the second */
static const uint8_t kv_iq2kl_64[64] = {
    1,  1,  24, 24, 24, 24,  41, 41, 41, 41, 41, 54, 54, 54, 54,  65,
    65, 65, 65, 65, 77, 77,  77, 77, 77, 92, 92, 92, 92, 92, 111, 111,
    41, 77, 1,  54, 77, 111, 24, 41, 65, 77, 92, 1,  65, 77, 111, 41,
    54, 65, 77, 92, 24, 41,  54, 65, 77, 1,  41, 65, 92, 111, 41, 77,
};

static inline float h2f(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

static inline float f32at(const uint8_t *p) {
    float f;
    memcpy(&f, p, 4);
    return f;
}

/* scale d and offset m for the 32-weight group b */
static inline void set32(float *dwl, float *mw, int64_t b, float d, float m) {
    _mm256_storeu_ps(dwl + 8 * b, _mm256_set1_ps(d));
    mw[2 * b] = m;
    mw[2 * b + 1] = m;
}

/* scale d and offset m for the 16-weight group g */
static inline void set16(float *dwl, float *mw, int64_t g, float d, float m) {
    _mm_storeu_ps(dwl + 4 * g, _mm_set1_ps(d));
    mw[g] = m;
}

static inline __m256i load256(const uint8_t *p) { return _mm256_loadu_si256((const __m256i *)p); }
static inline void store256(uint8_t *p, __m256i v) { _mm256_storeu_si256((__m256i *)p, v); }
static inline __m256i lo4(__m256i v) { return _mm256_and_si256(v, _mm256_set1_epi8(15)); }
static inline __m256i hi4(__m256i v) { return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(15)); }
static inline __m256i table16(const uint8_t *lut) {
    return _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)lut));
}

static inline unsigned u16at(const uint8_t *p) { return (unsigned)p[0] | (unsigned)p[1] << 8; }

/* 16 bytes -> 32 codes: low nibble of byte j is weight j, high nibble weight j + 16 */
static inline __m256i nib32v(__m128i v) {
    const __m128i m = _mm_set1_epi8(15);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m));
}
static inline __m256i nib32(const uint8_t *qs) { return nib32v(_mm_loadu_si128((const __m128i *)qs)); }

static inline __m256i srl16(__m256i v, int n) { return _mm256_srl_epi16(v, _mm_cvtsi32_si128(n)); }

/* 2-bit codes of the 32-weight group g in Q2_K plane order: weight j is (qs[32 (g / 4) + j] >> 2 (g % 4)) & 3 */
static inline __m256i crumbs(const uint8_t *qs, int g) {
    return _mm256_and_si256(srl16(load256(qs + 32 * (g / 4)), 2 * (g % 4)), _mm256_set1_epi8(3));
}

/* bit g of each byte of the bit-plane qh, moved to bit pos */
static inline __m256i plane_bit(__m256i qh, int g, int pos) {
    return _mm256_sll_epi16(_mm256_and_si256(srl16(qh, g), _mm256_set1_epi8(1)), _mm_cvtsi32_si128(pos));
}

/* byte i = 0xFF where bit `mask` of idx byte i is set */
static inline __m256i has_bit(__m256i idx, char mask) {
    const __m256i m = _mm256_set1_epi8(mask);
    return _mm256_cmpeq_epi8(_mm256_and_si256(idx, m), m);
}

/* lut[idx] for 5-bit and 6-bit indices (pshufb reads the low 4 bits; bits 4 and 5 pick the table) */
static inline __m256i lookup32(const uint8_t *lut, __m256i idx) {
    return _mm256_blendv_epi8(_mm256_shuffle_epi8(table16(lut), idx), _mm256_shuffle_epi8(table16(lut + 16), idx),
                              has_bit(idx, 16));
}
static inline __m256i lookup64(const uint8_t *lut, __m256i idx) {
    return _mm256_blendv_epi8(lookup32(lut, idx), lookup32(lut + 32, idx), has_bit(idx, 32));
}

/* grid shift of the 16-weight sub-blocks 2g (low lane) and 2g + 1 (high lane): delta where the
 * sub-block's `extra` bit is set (every shifted grid is its base grid plus a constant) */
static inline __m256i lane_shift(unsigned extra, int g, int delta) {
    return _mm256_set_m128i(_mm_set1_epi8((char)(delta * ((extra >> (2 * g + 1)) & 1))),
                            _mm_set1_epi8((char)(delta * ((extra >> (2 * g)) & 1))));
}

/* IQ4_K / IQ5_K 6-bit scale of sub-block k: nibble k % 2 of sl[k / 2] | crumb k % 4 of sh[k / 4] << 4, minus 32 */
static inline int six_bit_scale(const uint8_t *sh, const uint8_t *sl, int k) {
    return (((sl[k / 2] >> (4 * (k % 2))) & 15) | (((sh[k / 4] >> (2 * (k % 4))) & 3) << 4)) - 32;
}

/* byte i = 0xFF where bit i of x is set */
static inline __m256i bits32(uint32_t x) {
    const __m256i shuf = _mm256_setr_epi64x(0, 0x0101010101010101LL, 0x0202020202020202LL, 0x0303030303030303LL);
    const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)x), shuf);
    return _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
}

typedef void (*unpack_fn)(const uint8_t *row, int64_t K, uint8_t *q, float *dwl, float *mw);

static void unpack_q4_0(const uint8_t *row, int64_t K, uint8_t *q, float *dwl, float *mw) {
    for (int64_t b = 0; b < K / QK; b++) {
        const uint8_t *p = row + 18 * b;
        float d = h2f(p);
        store256(q + QK * b, nib32(p + 2));
        set32(dwl, mw, b, d, -8.0f * d);
    }
}

static void unpack_q4_1(const uint8_t *row, int64_t K, uint8_t *q, float *dwl, float *mw) {
    for (int64_t b = 0; b < K / QK; b++) {
        const uint8_t *p = row + 20 * b;
        store256(q + QK * b, nib32(p + 4));
        set32(dwl, mw, b, h2f(p), h2f(p + 2));
    }
}

static inline __m256i q5_codes(const uint8_t *qh4, const uint8_t *qs) {
    uint32_t qh;
    memcpy(&qh, qh4, 4);
    return _mm256_or_si256(nib32(qs), _mm256_and_si256(bits32(qh), _mm256_set1_epi8(16)));
}

static void unpack_q5_0(const uint8_t *row, int64_t K, uint8_t *q, float *dwl, float *mw) {
    for (int64_t b = 0; b < K / QK; b++) {
        const uint8_t *p = row + 22 * b;
        float d = h2f(p);
        store256(q + QK * b, q5_codes(p + 2, p + 6));
        set32(dwl, mw, b, d, -16.0f * d);
    }
}

static void unpack_q5_1(const uint8_t *row, int64_t K, uint8_t *q, float *dwl, float *mw) {
    for (int64_t b = 0; b < K / QK; b++) {
        const uint8_t *p = row + 24 * b;
        store256(q + QK * b, q5_codes(p + 4, p + 8));
        set32(dwl, mw, b, h2f(p), h2f(p + 2));
    }
}

static void unpack_q8_0(const uint8_t *row, int64_t K, uint8_t *q, float *dwl, float *mw) {
    const __m256i bias = _mm256_set1_epi8((char)0x80);
    for (int64_t b = 0; b < K / QK; b++) {
        const uint8_t *p = row + 34 * b;
        float d = h2f(p);
        store256(q + QK * b, _mm256_xor_si256(load256(p + 2), bias));
        set32(dwl, mw, b, d, -128.0f * d);
    }
}

static void unpack_q6_0(const uint8_t *row, int64_t K, uint8_t *q, float *dwl, float *mw) {
    /* weight w takes crumb (0, 2, 1, 3)[w / 8] of qh[w % 8]: a per-64-bit-lane shift of 0, 4, 2, 6 */
    const __m256i shifts = _mm256_setr_epi64x(0, 4, 2, 6);
    for (int64_t b = 0; b < K / QK; b++) {
        const uint8_t *p = row + 26 * b;
        float d = h2f(p);
        int64_t qh8;
        memcpy(&qh8, p + 2, 8);
        __m256i hi = _mm256_and_si256(_mm256_srlv_epi64(_mm256_set1_epi64x(qh8), shifts), _mm256_set1_epi8(3));
        store256(q + QK * b, _mm256_or_si256(nib32(p + 10), _mm256_slli_epi16(hi, 4)));
        set32(dwl, mw, b, d, -32.0f * d);
    }
}

static void unpack_iq4_nl(const uint8_t *row, int64_t K, uint8_t *q, float *dwl, float *mw) {
    const __m256i lut = table16(kv_iq4nl_128);
    for (int64_t b = 0; b < K / QK; b++) {
        const uint8_t *p = row + 18 * b;
        float d = h2f(p);
        store256(q + QK * b, _mm256_shuffle_epi8(lut, nib32(p + 2)));
        set32(dwl, mw, b, d, -128.0f * d);
    }
}

/* ggml get_scale_min_k4 for the 8 sub-blocks of a Q4_K/Q5_K super-block */
static inline void k4_scales(const uint8_t *s, uint8_t *sc, uint8_t *m) {
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 63;
        m[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 15) | ((s[j] >> 6) << 4);
        m[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
}

static inline void k4_groups(const uint8_t *p, int64_t b, float *dwl, float *mw) {
    float d = h2f(p), dmin = h2f(p + 2);
    uint8_t sc[8], m[8];
    k4_scales(p + 4, sc, m);
    for (int j = 0; j < 8; j++) set32(dwl, mw, 8 * b + j, d * sc[j], -(dmin * m[j]));
}

static void unpack_q4_K(const uint8_t *row, int64_t K, uint8_t *q, float *dwl, float *mw) {
    for (int64_t b = 0; b < K / QKK; b++) {
        const uint8_t *p = row + 144 * b;
        uint8_t *o = q + QKK * b;
        for (int c = 0; c < 4; c++) { /* 32 bytes: low nibbles weights 64c.., high nibbles 64c+32.. */
            __m256i v = load256(p + 16 + 32 * c);
            store256(o + 64 * c, lo4(v));
            store256(o + 64 * c + 32, hi4(v));
        }
        k4_groups(p, b, dwl, mw);
    }
}

static void unpack_q5_K(const uint8_t *row, int64_t K, uint8_t *q, float *dwl, float *mw) {
    const __m256i one = _mm256_set1_epi8(1);
    for (int64_t b = 0; b < K / QKK; b++) {
        const uint8_t *p = row + 176 * b;
        uint8_t *o = q + QKK * b;
        __m256i hb = load256(p + 16); /* bit j of qh[l]: 5th bit of weight 32 j + l */
        for (int c = 0; c < 4; c++) {
            __m256i v = load256(p + 48 + 32 * c);
            __m256i h0 = _mm256_slli_epi16(_mm256_and_si256(hb, one), 4);
            __m256i h1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 1), one), 4);
            store256(o + 64 * c, _mm256_or_si256(lo4(v), h0));
            store256(o + 64 * c + 32, _mm256_or_si256(hi4(v), h1));
            hb = _mm256_srli_epi16(hb, 2);
        }
        k4_groups(p, b, dwl, mw);
    }
}

static void unpack_q6_K(const uint8_t *row, int64_t K, uint8_t *q, float *dwl, float *mw) {
    const __m256i three = _mm256_set1_epi8(3);
    for (int64_t b = 0; b < K / QKK; b++) {
        const uint8_t *p = row + 210 * b;
        const int8_t *sc = (const int8_t *)(p + 192);
        float d = h2f(p + 208);
        uint8_t *o = q + QKK * b;
        for (int h = 0; h < 2; h++) {
            /* half h: ql[64h..]: low nibbles -> weights 0..63, high -> 64..127; qh crumb k -> 32k + l */
            __m256i l0 = load256(p + 64 * h), l1 = load256(p + 64 * h + 32), qh = load256(p + 128 + 32 * h);
            __m256i lo[4] = {lo4(l0), lo4(l1), hi4(l0), hi4(l1)};
            for (int k = 0; k < 4; k++) {
                __m256i hi = _mm256_slli_epi16(_mm256_and_si256(qh, three), 4);
                store256(o + 128 * h + 32 * k, _mm256_or_si256(lo[k], hi));
                qh = _mm256_srli_epi16(qh, 2);
            }
        }
        for (int g = 0; g < 16; g++) {
            float dl = d * (float)sc[g];
            set16(dwl, mw, 16 * b + g, dl, -32.0f * dl);
        }
    }
}

/* Q2_K: codes 0..3, offset -dmin * m per 16 weights */
static void unpack_q2_K(const uint8_t *row, int64_t K, uint8_t *q, float *dwl, float *mw) {
    for (int64_t b = 0; b < K / QKK; b++) {
        const uint8_t *p = row + 84 * b; /* scales[16] | qs[64] | d | dmin */
        float d = h2f(p + 80), dmin = h2f(p + 82);
        for (int g = 0; g < 8; g++) store256(q + QKK * b + 32 * g, crumbs(p + 16, g));
        for (int k = 0; k < 16; k++) set16(dwl, mw, 16 * b + k, d * (float)(p[k] & 15), -(dmin * (float)(p[k] >> 4)));
    }
}

/* Q3_K 6-bit scale k: low nibble from scales[k % 8] (nibble k / 8), crumb k / 4 of scales[8 + k % 4] */
static inline int q3_scale(const uint8_t *s, int k) {
    return (((s[k % 8] >> (4 * (k / 8))) & 15) | (((s[8 + k % 4] >> (2 * (k / 4))) & 3) << 4)) - 32;
}

/* Q3_K: value = 2-bit code + 4 * hmask bit - 4, stored as the code 0..7 with offset -4 * scale */
static void unpack_q3_K(const uint8_t *row, int64_t K, uint8_t *q, float *dwl, float *mw) {
    for (int64_t b = 0; b < K / QKK; b++) {
        const uint8_t *p = row + 110 * b; /* hmask[32] | qs[64] | scales[12] | d */
        float d = h2f(p + 108);
        __m256i hm = load256(p); /* bit g of hmask[j]: high bit of weight 32 g + j */
        for (int g = 0; g < 8; g++)
            store256(q + QKK * b + 32 * g, _mm256_or_si256(crumbs(p + 32, g), plane_bit(hm, g, 2)));
        for (int k = 0; k < 16; k++) {
            float dl = d * (float)q3_scale(p + 96, k);
            set16(dwl, mw, 16 * b + k, dl, -4.0f * dl);
        }
    }
}

static void unpack_iq4_xs(const uint8_t *row, int64_t K, uint8_t *q, float *dwl, float *mw) {
    const __m256i lut = table16(kv_iq4nl_128);
    for (int64_t b = 0; b < K / QKK; b++) {
        const uint8_t *p = row + 136 * b;
        float d = h2f(p);
        uint16_t sh;
        memcpy(&sh, p + 2, 2);
        for (int ib = 0; ib < 8; ib++) {
            int ls = ((p[4 + ib / 2] >> (4 * (ib % 2))) & 15) | (((sh >> (2 * ib)) & 3) << 4);
            float dl = d * (float)(ls - 32);
            store256(q + QKK * b + 32 * ib, _mm256_shuffle_epi8(lut, nib32(p + 8 + 16 * ib)));
            set32(dwl, mw, 8 * b + ib, dl, -128.0f * dl);
        }
    }
}

static void unpack_iq4_ks(const uint8_t *row, int64_t K, uint8_t *q, float *dwl, float *mw) {
    const __m256i lut[2] = {table16(kv_iq4k_128), table16(kv_iq4k_128 + 16)};
    float d_row = f32at(row);
    for (int64_t b = 0; b < K / QKK; b++) {
        const uint8_t *p = row + 4 + 136 * b;
        for (int ib = 0; ib < 8; ib++) {
            int s = p[ib];
            float dl = d_row * (float)((s & 0xFE) - 127);
            store256(q + QKK * b + 32 * ib, _mm256_shuffle_epi8(lut[s & 1], nib32(p + 8 + 16 * ib)));
            set32(dwl, mw, 8 * b + ib, dl, -128.0f * dl);
        }
    }
}

/* IQ4_KSS: IQ4_KS packed in 16-bit words: bit 0 of word k is bit k of the scale byte, and
 * a ^ (a >> 1) with a = word & ~1 gives IQ4_KS qs bytes 2k, 2k + 1 */
static void unpack_iq4_kss(const uint8_t *row, int64_t K, uint8_t *q, float *dwl, float *mw) {
    const __m256i lut[2] = {table16(kv_iq4k_128), table16(kv_iq4k_128 + 16)};
    const __m128i even = _mm_set1_epi16((short)0xFFFE);
    float d_row = f32at(row);
    for (int64_t b = 0; b < K / QKK; b++) {
        const uint8_t *p = row + 4 + 128 * b;
        for (int ib = 0; ib < 8; ib++) {
            const uint8_t *w = p + 16 * ib;
            int s = 0;
            for (int k = 0; k < 8; k++) s |= (w[2 * k] & 1) << k;
            __m128i a = _mm_and_si128(_mm_loadu_si128((const __m128i *)w), even);
            __m128i qs = _mm_xor_si128(a, _mm_srli_epi16(a, 1));
            float dl = d_row * (float)((s & 0xFE) - 127);
            store256(q + QKK * b + 32 * ib, _mm256_shuffle_epi8(lut[s & 1], nib32v(qs)));
            set32(dwl, mw, 8 * b + ib, dl, -128.0f * dl);
        }
    }
}

#include "qgemm_unpack_iqk.h"

static unpack_fn pick_unpack(int type) {
    switch (type) {
    case QG_Q4_0: return unpack_q4_0;
    case QG_Q4_1: return unpack_q4_1;
    case QG_Q5_0: return unpack_q5_0;
    case QG_Q5_1: return unpack_q5_1;
    case QG_Q8_0: return unpack_q8_0;
    case QG_Q6_0: return unpack_q6_0;
    case QG_IQ4_NL: return unpack_iq4_nl;
    case QG_Q4_K: return unpack_q4_K;
    case QG_Q5_K: return unpack_q5_K;
    case QG_Q6_K: return unpack_q6_K;
    case QG_IQ4_XS: return unpack_iq4_xs;
    case QG_IQ4_KS: return unpack_iq4_ks;
    case QG_IQ4_K: return unpack_iq4_k;
    case QG_IQ5_KS: return unpack_iq5_ks;
    case QG_Q2_K: return unpack_q2_K;
    case QG_Q3_K: return unpack_q3_K;
    case QG_IQ2_K: return unpack_iq2_k;
    case QG_IQ3_K: return unpack_iq3_k;
    case QG_IQ5_K: return unpack_iq5_k;
    case QG_IQ6_K: return unpack_iq6_k;
    case QG_IQ2_KS: return unpack_iq2_ks;
    case QG_IQ4_KSS: return unpack_iq4_kss;
    case QG_IQ3_KS: return unpack_iq3_ks;
    case QG_IQ2_KL: return unpack_iq2_kl;
    default: return 0;
    }
}

/* Properties of a type's unpacked form that the kernels rely on:
 * unpack_group: 32 when every 32-weight block has one scale and one offset (set32), 16 when scales
 *   or offsets change every 16 weights (set16);
 * unpack_small: 1 when every code is below 128 (any offsets), 0 when the code is the signed value
 *   + 128 and the offset is exactly -128 * scale (the AVX2 sign-trick kernel multiplies the signed
 *   values and adds no offsets). */
static __attribute__((unused)) int unpack_group(int type) {
    switch (type) {
    case QG_Q2_K: case QG_Q3_K: case QG_Q6_K: case QG_IQ2_K: case QG_IQ3_K: case QG_IQ4_K: case QG_IQ5_K: case QG_IQ6_K:
        return 16;
    default: return 32;
    }
}

static __attribute__((unused)) int unpack_small(int type) {
    switch (type) {
    case QG_Q4_0: case QG_Q4_1: case QG_Q5_0: case QG_Q5_1: case QG_Q6_0: case QG_Q4_K: case QG_Q5_K: case QG_Q6_K:
    case QG_Q2_K: case QG_Q3_K: case QG_IQ2_K: case QG_IQ3_K: case QG_IQ2_KS: case QG_IQ3_KS: case QG_IQ2_KL:
        return 1;
    default: return 0;
    }
}
