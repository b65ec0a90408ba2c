/* AVX2 fused decode path (few activation rows, n <= 8): the weight codes of each 32-block go
 * straight from the packed bytes into maddubs, with no unpacked copy of the row. The counterpart of
 * qgemm_decode.h (AVX-512 VNNI), with the same interface (qgemm_fused.h) and the same driver.
 *
 * Activations are in the natural order (ORD_NATURAL): the bytes of 32-block b at q + 32 b. Per
 * block, the integer dot product of 32 codes with 32 activation bytes gives 8 int32 lanes (lane i:
 * weights 4i..4i+3, the grouping of dpbusd):
 *   codes below 128 (Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K): madd(maddubs(codes, x), ones), the
 *     codes' offset folded into a per-block float offset times dx * sum(q) (s32, or s16 per 16);
 *   signed weights (Q8_0 and the non-linear grids IQ4_NL, IQ4_XS, IQ4_KS, IQ4_K, IQ5_KS, looked up
 *     in signed int8 tables): madd(maddubs(|w|, sign(x, w)), ones), exact as |w|, |x| <= 127 (Q8_0's
 *     -128 gives 128 * 127 * 2 < 32768), with no offset.
 * Types with a scale per 16 weights (Q6_K, IQ4_K) fold the integer scales into the madd (an int16
 * vector [sc_a x8 | sc_b x8] instead of ones; no overflow: |maddubs| <= 32258, |sc| <= 128).
 * The int32 lanes are converted to float and accumulated with the block's float scale (weight scale
 * * dx), computed 8 blocks at a time per activation row in a small stack array and broadcast per
 * block. Codes are computed once per block for all NY <= 4 activation rows; the blocks take turns
 * on four accumulators (one activation row) or two per row (more), to hide the FMA latency.
 * No pdep/pext here: they are microcoded on Zen 1/2.
 */

#define DAI static inline __attribute__((always_inline))

/* signed grids: iq4nl / iq4k values (base, then shifted by +4) and iq5nl values (base, then +2) */
static const int8_t kv_iq4k_s8[32] = {
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
    -123, -100, -79, -61, -45, -31, -18, -6,  5, 17, 29, 42, 57, 73, 93, 117,
};
static const int8_t kv_iq5nl_s8[64] = {
    -126, -114, -103, -92, -83, -74, -65, -57, -50, -43, -36, -30, -24, -18, -12, -6,
    -1,   5,    11,   17,  23,  29,  36,  43,  51,  59,  68,  77,  87,  97,  109, 121,
    -124, -112, -101, -90, -81, -72, -63, -55, -48, -41, -34, -28, -22, -16, -10, -4,
    1,    7,    13,   19,  25,  31,  38,  45,  53,  61,  70,  79,  89,  99,  111, 123,
};

/* accumulator set of a block (slot: its index in the group or super-block, a constant, so that the
 * accumulators stay in registers): the FMA chains per activation row are split four ways for one
 * row, two ways for more */
#define NACC 4
#define AS(slot) ((slot) % (NY == 1 ? 4 : 2))

DAI float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

DAI int32_t ld32u(const uint8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

DAI short ld16s(const uint8_t *p) {
    short v;
    memcpy(&v, p, 2);
    return v;
}

/* the fp16 values at p + S*i (i < nblk) as 8 floats, zero beyond nblk */
DAI __m256 load8h(const uint8_t *p, int S, int nblk) {
    if (nblk == 8)
        return _mm256_cvtph_ps(_mm_setr_epi16(ld16s(p), ld16s(p + S), ld16s(p + 2 * S), ld16s(p + 3 * S), ld16s(p + 4 * S),
                                              ld16s(p + 5 * S), ld16s(p + 6 * S), ld16s(p + 7 * S)));
    short t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int i = 0; i < nblk; i++) t[i] = ld16s(p + S * i);
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)t));
}

/* 16 bytes of a legacy nibble run -> the 32 codes of the block in order (low nibbles 0..15, high 16..31) */
DAI __m256i nibbles(const uint8_t *p) {
    const __m128i q = _mm_loadu_si128((const __m128i *)p);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), _mm256_set1_epi8(15));
}

/* 8 int32 lanes of 32 unsigned codes (< 128) times 32 signed activations */
DAI __m256i dot_u(__m256i c, __m256i x) { return _mm256_madd_epi16(_mm256_maddubs_epi16(c, x), _mm256_set1_epi16(1)); }

/* the same for signed weights w with a = |w| */
DAI __m256i dot_s(__m256i a, __m256i w, __m256i x) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(a, _mm256_sign_epi8(x, w)), _mm256_set1_epi16(1));
}

/* [s_a x8 | s_b x8] int16 from bytes 2B, 2B + 1 of 16 int8 scales */
DAI __m256i scale_pair(__m128i sc8, int B) {
    const __m128i pat = _mm_or_si128(_mm_set1_epi8((char)(2 * B)),
                                     _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1));
    return _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc8, pat));
}

/* per activation row j: the block scales dl8 * dx[b0..b0+8) into sc[j] */
DAI void row_scales(const fact *A, const int NY, int64_t b0, __m256 dl8, float sc[][8]) {
    for (int j = 0; j < NY; j++) _mm256_storeu_ps(sc[j], _mm256_mul_ps(dl8, _mm256_loadu_ps(A[j].dx + b0)));
}

/* acc[slot][j] += t_j * sc[j][i], for the signed (SG) or unsigned codes c of 32-block b0 + i; slot
 * (a constant: the accumulators stay in registers) alternates between even and odd blocks */
DAI void block_dot(const fact *A, const int NY, int64_t b0, int i, const int slot, __m256i c, const int SG,
                   const float sc[][8], __m256 acc[NACC][NYMAX]) {
    const __m256i a = SG ? _mm256_abs_epi8(c) : c;
    for (int j = 0; j < NY; j++) {
        const __m256i x = _mm256_loadu_si256((const __m256i *)(A[j].q + 32 * (b0 + i)));
        const __m256i t = SG ? dot_s(a, c, x) : dot_u(c, x);
        acc[AS(slot)][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_broadcast_ss(&sc[j][i]), acc[AS(slot)][j]);
    }
}

/* the same with the integer scales [s_a x8 | s_b x8] of the block's two 16-weight halves in the madd */
DAI void block_dot16(const fact *A, const int NY, int64_t b0, int i, const int slot, __m256i c, const int SG,
                     __m256i scv, const float sc[][8], __m256 acc[NACC][NYMAX]) {
    const __m256i a = SG ? _mm256_abs_epi8(c) : c;
    for (int j = 0; j < NY; j++) {
        const __m256i x = _mm256_loadu_si256((const __m256i *)(A[j].q + 32 * (b0 + i)));
        const __m256i t = _mm256_madd_epi16(_mm256_maddubs_epi16(a, SG ? _mm256_sign_epi8(x, c) : x), scv);
        acc[AS(slot)][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_broadcast_ss(&sc[j][i]), acc[AS(slot)][j]);
    }
}

DAI void finish(const int NY, __m256 acc[NACC][NYMAX], float *out, int64_t ldo) {
    for (int j = 0; j < NY; j++) {
        __m256 a = _mm256_add_ps(acc[0][j], acc[1][j]);
        if (NY == 1) a = _mm256_add_ps(a, _mm256_add_ps(acc[2][j], acc[3][j]));
        out[j * ldo] = hsum8(a);
    }
}

/* ---------------------------------------------------------------------------------------------
 * legacy types: blocks of 32, 8 at a time */

DAI void legacy_block(int type, const uint8_t *p, int64_t g, int i, const int slot, const fact *A, const int NY,
                      const float sc[][8], __m256 acc[NACC][NYMAX]) {
    const int S = type == QG_Q4_0 || type == QG_IQ4_NL ? 18 : type == QG_Q4_1 ? 20 : type == QG_Q5_0 ? 22
                : type == QG_Q5_1 ? 24 : 34;
    const int qs_off = type == QG_Q4_0 || type == QG_IQ4_NL ? 2 : type == QG_Q4_1 ? 4 : type == QG_Q5_0 ? 6 : 8;
    const uint8_t *b = p + S * i;
    __m256i c;
    if (type == QG_Q8_0) {
        c = _mm256_loadu_si256((const __m256i *)(b + 2));
    } else {
        c = nibbles(b + qs_off);
        if (type == QG_Q5_0 || type == QG_Q5_1) /* bit j of qh: 5th bit of weight j */
            c = _mm256_or_si256(c, _mm256_and_si256(bits32((uint32_t)ld32u(b + (type == QG_Q5_0 ? 2 : 4))),
                                                    _mm256_set1_epi8(16)));
        if (type == QG_IQ4_NL) c = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)kv_iq4k_s8)), c);
    }
    block_dot(A, NY, g, i, slot, c, type == QG_Q8_0 || type == QG_IQ4_NL, sc, acc);
}

DAI void legacy_group(int type, const uint8_t *p, int64_t g, const int nblk, const fact *A, const int NY,
                      __m256 acc[NACC][NYMAX]) {
    const int S = type == QG_Q4_0 || type == QG_IQ4_NL ? 18 : type == QG_Q4_1 ? 20 : type == QG_Q5_0 ? 22
                : type == QG_Q5_1 ? 24 : 34;
    const int has_m = type == QG_Q4_1 || type == QG_Q5_1;
    const int SG = type == QG_Q8_0 || type == QG_IQ4_NL; /* signed weights, no offset */
    const __m256 d = load8h(p, S, nblk);
    float sc[NYMAX][8];
    row_scales(A, NY, g, d, sc);
    if (!SG) {
        const __m256 m = has_m ? load8h(p + 2, S, nblk) : _mm256_mul_ps(d, _mm256_set1_ps(type == QG_Q4_0 ? -8.0f : -16.0f));
        for (int j = 0; j < NY; j++) acc[AS(3)][j] = _mm256_fmadd_ps(m, _mm256_loadu_ps(A[j].s32 + g), acc[AS(3)][j]);
    }
    int i = 0;
    for (; i + 4 <= nblk; i += 4) {
        legacy_block(type, p, g, i, 0, A, NY, sc, acc);
        legacy_block(type, p, g, i + 1, 1, A, NY, sc, acc);
        legacy_block(type, p, g, i + 2, 2, A, NY, sc, acc);
        legacy_block(type, p, g, i + 3, 3, A, NY, sc, acc);
    }
    for (; i < nblk; i++) legacy_block(type, p, g, i, 0, A, NY, sc, acc);
}

DAI void dec2_legacy(int type, const uint8_t *row, int64_t nb, const fact *A, const int NY, float *out, int64_t ldo) {
    const int S = type == QG_Q4_0 || type == QG_IQ4_NL ? 18 : type == QG_Q4_1 ? 20 : type == QG_Q5_0 ? 22
                : type == QG_Q5_1 ? 24 : 34;
    __m256 acc[NACC][NYMAX]; /* the offset terms go to acc[AS(3)] */
    for (int j = 0; j < NY; j++) acc[0][j] = acc[1][j] = acc[2][j] = acc[3][j] = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= nb; g += 8) legacy_group(type, row + S * g, g, 8, A, NY, acc);
    if (g < nb) legacy_group(type, row + S * g, g, (int)(nb - g), A, NY, acc);
    finish(NY, acc, out, ldo);
}

/* ---------------------------------------------------------------------------------------------
 * Q4_K / Q5_K / Q6_K: super-blocks of 256 */

/* Q5_K: the 5th bit of 32-block k (bit k of each qh byte), at bit 4 (16-bit shifts, masked per byte) */
DAI __m256i q5k_bit(__m256i qh, int k) {
    const __m256i b4 = _mm256_set1_epi8(16);
    if (k <= 4) return _mm256_and_si256(_mm256_slli_epi16(qh, 4 - k), b4);
    return _mm256_and_si256(_mm256_srli_epi16(qh, k - 4), b4);
}

DAI void dec2_kquant(int type, const uint8_t *row, int64_t nsb, const fact *A, const int NY, float *out, int64_t ldo) {
    const __m256i m15 = _mm256_set1_epi8(15);
    __m256 acc[NACC][NYMAX]; /* the offset terms go to acc[AS(3)] */
    for (int j = 0; j < NY; j++) acc[0][j] = acc[1][j] = acc[2][j] = acc[3][j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nsb; b++) {
        float sc[NYMAX][8];
        if (type == QG_Q6_K) {
            const uint8_t *p = row + 210 * b;
            const __m128i sc8 = _mm_loadu_si128((const __m128i *)(p + 192)); /* int8 scale per 16 */
            const float d = h2f(p + 208);
            row_scales(A, NY, 8 * b, _mm256_set1_ps(d), sc);
            /* codes 0..63 stand for q - 32: offset -32 d sc per 16 weights */
            const __m256 md = _mm256_set1_ps(-32.0f * d);
            const __m256 m0 = _mm256_mul_ps(md, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc8)));
            const __m256 m1 = _mm256_mul_ps(md, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc8, 8))));
            for (int j = 0; j < NY; j++) {
                acc[AS(2)][j] = _mm256_fmadd_ps(m0, _mm256_loadu_ps(A[j].s16 + 16 * b), acc[AS(2)][j]);
                acc[AS(3)][j] = _mm256_fmadd_ps(m1, _mm256_loadu_ps(A[j].s16 + 16 * b + 8), acc[AS(3)][j]);
            }
            const __m256i m30 = _mm256_set1_epi8(0x30);
            #pragma GCC unroll 8
            for (int h = 0; h < 2; h++) {
                const __m256i l0 = _mm256_loadu_si256((const __m256i *)(p + 64 * h));
                const __m256i l1 = _mm256_loadu_si256((const __m256i *)(p + 64 * h + 32));
                const __m256i qh = _mm256_loadu_si256((const __m256i *)(p + 128 + 32 * h));
                const __m256i c[4] = {
                    _mm256_or_si256(_mm256_and_si256(l0, m15), _mm256_and_si256(_mm256_slli_epi16(qh, 4), m30)),
                    _mm256_or_si256(_mm256_and_si256(l1, m15), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30)),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m15), _mm256_and_si256(qh, m30)),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m15),
                                    _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30)),
                };
                #pragma GCC unroll 8
                for (int k = 0; k < 4; k++)
                    block_dot16(A, NY, 8 * b, 4 * h + k, k, c[k], 0, scale_pair(sc8, 4 * h + k), sc, acc);
            }
        } else {
            const int S = type == QG_Q4_K ? 144 : 176;
            const uint8_t *p = row + S * b;
            const uint8_t *qs = p + (type == QG_Q4_K ? 16 : 48);
            uint32_t u[3], t[4];
            memcpy(u, p + 4, 12);
            t[0] = u[0] & 0x3f3f3f3f;                                              /* sc 0..3 */
            t[1] = (u[2] & 0x0f0f0f0f) | (((u[0] >> 6) & 0x03030303) << 4);      /* sc 4..7 */
            t[2] = u[1] & 0x3f3f3f3f;                                              /* m 0..3 */
            t[3] = ((u[2] >> 4) & 0x0f0f0f0f) | (((u[1] >> 6) & 0x03030303) << 4); /* m 4..7 */
            const __m128i sm = _mm_setr_epi32((int)t[0], (int)t[1], (int)t[2], (int)t[3]);
            const __m256 dl = _mm256_mul_ps(_mm256_set1_ps(h2f(p)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(sm)));
            const __m256 ml = _mm256_mul_ps(_mm256_set1_ps(-h2f(p + 2)),
                                            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(sm, 8))));
            row_scales(A, NY, 8 * b, dl, sc);
            for (int j = 0; j < NY; j++) acc[AS(3)][j] = _mm256_fmadd_ps(ml, _mm256_loadu_ps(A[j].s32 + 8 * b), acc[AS(3)][j]);
            const __m256i qh = type == QG_Q5_K ? _mm256_loadu_si256((const __m256i *)(p + 16)) : _mm256_setzero_si256();
            #pragma GCC unroll 8
            for (int i = 0; i < 4; i++) { /* run i: 32-block 2i in the low nibbles, 2i + 1 in the high */
                const __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * i));
                __m256i c0 = _mm256_and_si256(v, m15), c1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), m15);
                if (type == QG_Q5_K) {
                    c0 = _mm256_or_si256(c0, q5k_bit(qh, 2 * i));
                    c1 = _mm256_or_si256(c1, q5k_bit(qh, 2 * i + 1));
                }
                block_dot(A, NY, 8 * b, 2 * i, 2 * i, c0, 0, sc, acc);
                block_dot(A, NY, 8 * b, 2 * i + 1, 2 * i + 1, c1, 0, sc, acc);
            }
        }
    }
    finish(NY, acc, out, ldo);
}

/* ---------------------------------------------------------------------------------------------
 * IQ4_XS / IQ4_KS: super-blocks of 8 blocks of 32 with the legacy nibble order, non-linear grid */

DAI void dec2_iq4(int type, const uint8_t *row, int64_t nsb, const fact *A, const int NY, float *out, int64_t ldo) {
    __m256 acc[NACC][NYMAX]; /* the offset terms go to acc[AS(3)] */
    for (int j = 0; j < NY; j++) acc[0][j] = acc[1][j] = acc[2][j] = acc[3][j] = _mm256_setzero_ps();
    const float d_row = type == QG_IQ4_KS ? f32at(row) : 0.0f;
    const __m256i lut0 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)kv_iq4k_s8));
    for (int64_t b = 0; b < nsb; b++) {
        const uint8_t *p = type == QG_IQ4_KS ? row + 4 + 136 * b : row + 136 * b;
        __m256 dl;
        if (type == QG_IQ4_KS) { /* scale byte ib: (s & 0xFE) - 127, bit 0 the grid shift */
            const __m256i s8 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
            dl = _mm256_mul_ps(_mm256_set1_ps(d_row),
                               _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(s8, _mm256_set1_epi32(0xFE)),
                                                                   _mm256_set1_epi32(127))));
        } else { /* 6-bit scale ib: nibble ib of scales_l | crumb ib of scales_h << 4, minus 32 */
            const __m256i sl = _mm256_srlv_epi32(_mm256_set1_epi32(ld32u(p + 4)), _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28));
            const __m256i sh = _mm256_srlv_epi32(_mm256_set1_epi32(ld16s(p + 2) & 0xFFFF),
                                                 _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14));
            const __m256i ls = _mm256_or_si256(_mm256_and_si256(sl, _mm256_set1_epi32(15)),
                                               _mm256_slli_epi32(_mm256_and_si256(sh, _mm256_set1_epi32(3)), 4));
            dl = _mm256_mul_ps(_mm256_set1_ps(h2f(p)), _mm256_cvtepi32_ps(_mm256_sub_epi32(ls, _mm256_set1_epi32(32))));
        }
        float sc[NYMAX][8];
        row_scales(A, NY, 8 * b, dl, sc);
        #pragma GCC unroll 8
        for (int i = 0; i < 8; i++) {
            const __m256i lut = type == QG_IQ4_KS
                                    ? _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(kv_iq4k_s8 + 16 * (p[i] & 1))))
                                    : lut0;
            block_dot(A, NY, 8 * b, i, i, _mm256_shuffle_epi8(lut, nibbles(p + 8 + 16 * i)), 1, sc, acc);
        }
    }
    finish(NY, acc, out, ldo);
}

/* IQ5_KS: Q5_K's bit layout, a 32-entry grid per 32-block (shifted or not), f32 row scale */
DAI void dec2_iq5ks(int type, const uint8_t *row, int64_t nsb, const fact *A, const int NY, float *out, int64_t ldo) {
    (void)type;
    const __m256i m15 = _mm256_set1_epi8(15);
    __m256 acc[NACC][NYMAX]; /* the offset terms go to acc[AS(3)] */
    for (int j = 0; j < NY; j++) acc[0][j] = acc[1][j] = acc[2][j] = acc[3][j] = _mm256_setzero_ps();
    const float d_row = f32at(row);
    for (int64_t b = 0; b < nsb; b++) {
        const uint8_t *p = row + 4 + 168 * b;
        const __m256i s8 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
        const __m256 dl = _mm256_mul_ps(_mm256_set1_ps(d_row),
                                        _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(s8, _mm256_set1_epi32(0xFE)),
                                                                            _mm256_set1_epi32(127))));
        float sc[NYMAX][8];
        row_scales(A, NY, 8 * b, dl, sc);
        const __m256i qh = _mm256_loadu_si256((const __m256i *)(p + 136)); /* bit ib of qh[j]: weight 32 ib + j */
        #pragma GCC unroll 8
        for (int i = 0; i < 4; i++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(p + 8 + 32 * i));
            #pragma GCC unroll 8
            for (int h = 0; h < 2; h++) {
                const int ib = 2 * i + h;
                const __m256i idx = _mm256_and_si256(h ? _mm256_srli_epi16(v, 4) : v, m15);
                const __m256i bit = _mm256_set1_epi8((char)(1 << ib));
                const __m256i top = _mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit);
                const int8_t *lut = kv_iq5nl_s8 + 32 * (p[ib] & 1);
                const __m256i lo = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)lut));
                const __m256i hi = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(lut + 16)));
                const __m256i c = _mm256_blendv_epi8(_mm256_shuffle_epi8(lo, idx), _mm256_shuffle_epi8(hi, idx), top);
                block_dot(A, NY, 8 * b, ib, ib, c, 1, sc, acc);
            }
        }
    }
    finish(NY, acc, out, ldo);
}

/* IQ4_K: IQ4_XS's nibble order with 16-weight sub-blocks: the low nibbles of a 32-block are one
 * sub-block, the high nibbles the next, each with its own 6-bit scale and grid shift */
DAI void dec2_iq4k(int type, const uint8_t *row, int64_t nsb, const fact *A, const int NY, float *out, int64_t ldo) {
    (void)type;
    __m256 acc[NACC][NYMAX]; /* the offset terms go to acc[AS(3)] */
    for (int j = 0; j < NY; j++) acc[0][j] = acc[1][j] = acc[2][j] = acc[3][j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nsb; b++) {
        const uint8_t *p = row + 144 * b;
        const unsigned extra = (unsigned)ld16s(p + 2) & 0xFFFF;
        /* scale k: nibble k % 2 of scales_l[k / 2] | crumb k of the 32-bit scales_h << 4, minus 32 */
        const __m256i sh = _mm256_set1_epi32(ld32u(p + 4));
        const __m256i nsh = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
        const __m256i m15 = _mm256_set1_epi32(15), m3 = _mm256_set1_epi32(3), b32 = _mm256_set1_epi32(32);
        const __m256i s_lo = _mm256_sub_epi32(
            _mm256_or_si256(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(ld32u(p + 8)), nsh), m15),
                            _mm256_slli_epi32(_mm256_and_si256(_mm256_srlv_epi32(sh, _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)), m3), 4)),
            b32); /* scales 0..7 */
        const __m256i s_hi = _mm256_sub_epi32(
            _mm256_or_si256(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(ld32u(p + 12)), nsh), m15),
                            _mm256_slli_epi32(_mm256_and_si256(_mm256_srlv_epi32(sh, _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30)), m3), 4)),
            b32); /* scales 8..15 */
        /* packs interleaves the 128-bit lanes: [lo 0..3, hi 0..3 | lo 4..7, hi 4..7] */
        const __m256i s16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(s_lo, s_hi), 0xD8);
        const __m128i sc8 = _mm_packs_epi16(_mm256_castsi256_si128(s16), _mm256_extracti128_si256(s16, 1));
        float sc[NYMAX][8];
        row_scales(A, NY, 8 * b, _mm256_set1_ps(h2f(p)), sc);
        #pragma GCC unroll 8
        for (int i = 0; i < 8; i++) {
            const __m128i *lo = (const __m128i *)(kv_iq4k_s8 + 16 * ((extra >> (2 * i)) & 1));
            const __m128i *hi = (const __m128i *)(kv_iq4k_s8 + 16 * ((extra >> (2 * i + 1)) & 1));
            const __m256i lut = _mm256_loadu2_m128i(hi, lo);
            const __m256i c = _mm256_shuffle_epi8(lut, nibbles(p + 16 + 16 * i));
            block_dot16(A, NY, 8 * b, i, i, c, 1, scale_pair(sc8, i), sc, acc);
        }
    }
    finish(NY, acc, out, ldo);
}

#define DEC_FAMILY dec2_
#include "qgemm_dec_table.h"
