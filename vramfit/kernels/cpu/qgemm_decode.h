/* AVX-512 VNNI fused decode path (few activation rows, n <= 8): the weight codes go straight from
 * the packed bytes into dpbusd, with no unpacked copy of the row.
 *
 * The activations are quantized as for the tiled path, then their bytes are reordered to follow
 * each format's natural nibble order, so the weights need no shuffles:
 *   SPLIT16 (Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL, IQ4_XS, IQ4_KS, IQ4_K): per 4 blocks, weights 0..15 of each block, then 16..31;
 *   Q4K (Q4_K, Q5_K, IQ5_KS): per 256, the 32-blocks in the order 0 2 1 3 4 6 5 7;
 *   NATURAL (Q8_0, Q6_K).
 * Scales are handled 4 blocks (legacy) or one super-block (K-quants) at a time in vector registers.
 * The activation layout (fact, reorder_act) and the driver are shared with AVX2 (qgemm_fused.h,
 * qgemm_impl.h).
 */

static inline __m512 lanes_of4(__m128 s) { /* [s0 x4, s1 x4, s2 x4, s3 x4] */
    const __m512i idx = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(s));
}

/* the 16-byte runs at p + off + S*i (i < nblk) into one register, zero beyond nblk */
static inline __m512i load4x16(const uint8_t *p, int S, int off, int nblk) {
    __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(p + off)));
    if (nblk == 4) {
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p + S + off)), 1);
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p + 2 * S + off)), 2);
        return _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p + 3 * S + off)), 3);
    }
    v = _mm512_maskz_mov_epi32(0x000F, v);
    if (nblk > 1) v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p + S + off)), 1);
    if (nblk > 2) v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p + 2 * S + off)), 2);
    return v;
}

/* the 32-bit words at p + off + S*i (i < nblk), zero beyond */
static inline int32_t ld32(const uint8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

static inline __m128i load4x32(const uint8_t *p, int S, int off, int nblk) {
    p += off;
    if (nblk == 4) return _mm_setr_epi32(ld32(p), ld32(p + S), ld32(p + 2 * S), ld32(p + 3 * S));
    return _mm_setr_epi32(ld32(p), nblk > 1 ? ld32(p + S) : 0, nblk > 2 ? ld32(p + 2 * S) : 0, 0);
}

/* one row of a legacy type against NY activation rows */
static inline __attribute__((always_inline)) void dec_legacy(int type, const uint8_t *row, int64_t nb, const fact *A,
                                                             const int NY, float *out, int64_t ldo) {
    const int S = type == QG_Q4_0 || type == QG_IQ4_NL ? 18 : type == QG_Q4_1 ? 20 : type == QG_Q5_0 ? 22
                : type == QG_Q5_1 ? 24 : 34;
    const int has_m = type == QG_Q4_1 || type == QG_Q5_1;
    const int qs_off = type == QG_Q4_0 || type == QG_IQ4_NL ? 2 : type == QG_Q4_1 ? 4 : type == QG_Q5_0 ? 6 : 8;
    const __m512i m15 = _mm512_set1_epi8(15), zero = _mm512_setzero_si512();
    const __m512i lut = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)kv_iq4nl_128));
    const __m128i half_lo = _mm_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1);
    __m512 acc[NYMAX];
    __m128 cacc[NYMAX];
    for (int j = 0; j < NY; j++) {
        acc[j] = _mm512_setzero_ps();
        cacc[j] = _mm_setzero_ps();
    }
    for (int64_t g = 0; g < nb; g += 4) {
        const int nblk = nb - g < 4 ? (int)(nb - g) : 4;
        const uint8_t *p = row + S * g;
        __m512i lo, hi;
        __m128 d, m;
        const __m128i hd = load4x32(p, S, 0, nblk); /* d (and m) of each block */
        if (has_m) {
            __m256 dm = _mm256_cvtph_ps(hd);
            dm = _mm256_permutevar8x32_ps(dm, _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7));
            d = _mm256_castps256_ps128(dm);
            m = _mm256_extractf128_ps(dm, 1);
        } else {
            d = _mm_cvtph_ps(_mm_shuffle_epi8(hd, half_lo));
        }
        if (type == QG_Q8_0) {
            __m512i v0 = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(p + 2)));
            __m512i v1 = _mm512_setzero_si512();
            if (nblk > 1) v0 = _mm512_inserti64x4(v0, _mm256_loadu_si256((const __m256i *)(p + S + 2)), 1);
            if (nblk > 2) v1 = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(p + 2 * S + 2)));
            if (nblk > 3) v1 = _mm512_inserti64x4(v1, _mm256_loadu_si256((const __m256i *)(p + 3 * S + 2)), 1);
            const __m512i bias = _mm512_set1_epi8((char)0x80);
            lo = _mm512_xor_si512(v0, bias);
            hi = _mm512_xor_si512(v1, bias);
            m = _mm_mul_ps(d, _mm_set1_ps(-128.0f));
        } else {
            const __m512i v = load4x16(p, S, qs_off, nblk);
            lo = _mm512_and_si512(v, m15);
            hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m15);
            if (type == QG_Q5_0 || type == QG_Q5_1) {
                /* bit j of qh: weight j; lo holds weights 0..15 of each block, hi 16..31 */
                const __m128i qh = load4x32(p, S, type == QG_Q5_0 ? 2 : 4, nblk);
                const __m128i sp = _mm_shuffle_epi8(qh, _mm_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15));
                const __m512i b16 = _mm512_set1_epi8(16);
                lo = _mm512_mask_add_epi8(lo, _cvtu64_mask64((uint64_t)_mm_cvtsi128_si64(sp)), lo, b16);
                hi = _mm512_mask_add_epi8(hi, _cvtu64_mask64((uint64_t)_mm_extract_epi64(sp, 1)), hi, b16);
            }
            if (type == QG_IQ4_NL) {
                lo = _mm512_shuffle_epi8(lut, lo);
                hi = _mm512_shuffle_epi8(lut, hi);
            }
            if (!has_m) m = _mm_mul_ps(d, _mm_set1_ps(type == QG_Q4_0 ? -8.0f : type == QG_Q5_0 ? -16.0f : -128.0f));
        }
        for (int j = 0; j < NY; j++) {
            const __m512i x0 = _mm512_loadu_si512(A[j].q + 32 * g), x1 = _mm512_loadu_si512(A[j].q + 32 * g + 64);
            const __m128 s = _mm_mul_ps(d, _mm_loadu_ps(A[j].dx + g));
            if (type == QG_Q8_0) {
                const __m512 s16 = _mm512_castps128_ps512(s);
                const __m512i i01 = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
                const __m512i i23 = _mm512_setr_epi32(2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
                acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, lo, x0)),
                                         _mm512_permutexvar_ps(i01, s16), acc[j]);
                acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, hi, x1)),
                                         _mm512_permutexvar_ps(i23, s16), acc[j]);
            } else {
                const __m512i t = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo, x0), hi, x1);
                acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), lanes_of4(s), acc[j]);
            }
            cacc[j] = _mm_fmadd_ps(m, _mm_loadu_ps(A[j].s32 + g), cacc[j]);
        }
    }
    for (int j = 0; j < NY; j++) {
        __m128 c = _mm_add_ps(cacc[j], _mm_movehl_ps(cacc[j], cacc[j]));
        c = _mm_add_ss(c, _mm_movehdup_ps(c));
        out[j * ldo] = _mm512_reduce_add_ps(acc[j]) + _mm_cvtss_f32(c);
    }
}

/* Q4_K / Q5_K / Q6_K: one row against NY activation rows, a super-block at a time */
static inline __attribute__((always_inline)) void dec_kquant(int type, const uint8_t *row, int64_t nsb, const fact *A,
                                                             const int NY, float *out, int64_t ldo) {
    const __m512i m15 = _mm512_set1_epi8(15), zero = _mm512_setzero_si512();
    __m512 acc[NYMAX], cacc[NYMAX];
    for (int j = 0; j < NY; j++) {
        acc[j] = _mm512_setzero_ps();
        cacc[j] = _mm512_setzero_ps();
    }
    for (int64_t b = 0; b < nsb; b++) {
        __m512i c[4];
        __m512i idx[4];
        __m512 dw, mw; /* per 32-block (Q4_K/Q5_K, 8 used) or per 16 (Q6_K) */
        if (type == QG_Q6_K) {
            const uint8_t *p = row + 210 * b;
            for (int h = 0; h < 2; h++) {
                const __m512i L = _mm512_loadu_si512(p + 64 * h);
                const __m256i Q = _mm256_loadu_si256((const __m256i *)(p + 128 + 32 * h));
                const __m512i QQ = _mm512_inserti64x4(_mm512_castsi256_si512(Q), _mm256_srli_epi16(Q, 2), 1);
                const __m512i three = _mm512_set1_epi8(3);
                const __m512i h0 = _mm512_slli_epi16(_mm512_and_si512(QQ, three), 4);
                const __m512i h1 = _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(QQ, 4), three), 4);
                c[2 * h] = _mm512_or_si512(_mm512_and_si512(L, m15), h0);
                c[2 * h + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(L, 4), m15), h1);
            }
            const __m128i sc = _mm_loadu_si128((const __m128i *)(p + 192));
            dw = _mm512_mul_ps(_mm512_set1_ps(h2f(p + 208)), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(sc)));
            mw = _mm512_mul_ps(dw, _mm512_set1_ps(-32.0f));
            for (int i = 0; i < 4; i++)
                idx[i] = _mm512_setr_epi32(4 * i, 4 * i, 4 * i, 4 * i, 4 * i + 1, 4 * i + 1, 4 * i + 1, 4 * i + 1,
                                           4 * i + 2, 4 * i + 2, 4 * i + 2, 4 * i + 2, 4 * i + 3, 4 * i + 3,
                                           4 * i + 3, 4 * i + 3);
        } else {
            const int S = type == QG_Q4_K ? 144 : 176;
            const uint8_t *p = row + S * b;
            const uint8_t *qs = p + (type == QG_Q4_K ? 16 : 48);
            const __m512i v0 = _mm512_loadu_si512(qs), v1 = _mm512_loadu_si512(qs + 64);
            c[0] = _mm512_and_si512(v0, m15);                        /* 32-blocks 0, 2 */
            c[1] = _mm512_and_si512(_mm512_srli_epi16(v0, 4), m15); /* 1, 3 */
            c[2] = _mm512_and_si512(v1, m15);                        /* 4, 6 */
            c[3] = _mm512_and_si512(_mm512_srli_epi16(v1, 4), m15); /* 5, 7 */
            if (type == QG_Q5_K) { /* bit k of qh[l]: 5th bit of weight 32k + l */
                const __m256i Q = _mm256_loadu_si256((const __m256i *)(p + 16));
                const __m512i one = _mm512_set1_epi8(1);
                static const int sh[4][2] = {{0, 2}, {1, 3}, {4, 6}, {5, 7}};
                for (int i = 0; i < 4; i++) {
                    __m512i QQ = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_srli_epi16(Q, sh[i][0])),
                                                    _mm256_srli_epi16(Q, sh[i][1]), 1);
                    c[i] = _mm512_or_si512(c[i], _mm512_slli_epi16(_mm512_and_si512(QQ, one), 4));
                }
            }
            uint32_t u[3], t[4];
            memcpy(u, p + 4, 12);
            t[0] = u[0] & 0x3f3f3f3f;                                              /* sc 0..3 */
            t[1] = (u[2] & 0x0f0f0f0f) | (((u[0] >> 6) & 0x03030303) << 4);      /* sc 4..7 */
            t[2] = u[1] & 0x3f3f3f3f;                                              /* m 0..3 */
            t[3] = ((u[2] >> 4) & 0x0f0f0f0f) | (((u[1] >> 6) & 0x03030303) << 4); /* m 4..7 */
            const __m512 scm = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_setr_epi32((int)t[0], (int)t[1], (int)t[2], (int)t[3])));
            const float d = h2f(p), dmin = h2f(p + 2);
            const __m512 sel = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(d), _mm512_set1_ps(-dmin));
            const __m512 both = _mm512_mul_ps(scm, sel); /* [d sc 0..7, -dmin m 0..7] */
            dw = both;
            mw = _mm512_permutexvar_ps(_mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15), both);
            static const int pr[4][2] = {{0, 2}, {1, 3}, {4, 6}, {5, 7}};
            for (int i = 0; i < 4; i++) {
                const int a0 = pr[i][0], a1 = pr[i][1];
                idx[i] = _mm512_setr_epi32(a0, a0, a0, a0, a0, a0, a0, a0, a1, a1, a1, a1, a1, a1, a1, a1);
            }
        }
        for (int j = 0; j < NY; j++) {
            const uint8_t *xq = A[j].q + 256 * b;
            __m512 s;
            if (type == QG_Q6_K) {
                const __m512 dx16 = _mm512_permutexvar_ps(
                    _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7),
                    _mm512_castps256_ps512(_mm256_loadu_ps(A[j].dx + 8 * b)));
                s = _mm512_mul_ps(dw, dx16);
                cacc[j] = _mm512_fmadd_ps(mw, _mm512_loadu_ps(A[j].s16 + 16 * b), cacc[j]);
            } else {
                s = _mm512_mul_ps(dw, _mm512_castps256_ps512(_mm256_loadu_ps(A[j].dx + 8 * b)));
                cacc[j] = _mm512_mask3_fmadd_ps(mw, _mm512_castps256_ps512(_mm256_loadu_ps(A[j].s32 + 8 * b)),
                                                cacc[j], 0x00FF);
            }
            for (int i = 0; i < 4; i++) {
                const __m512i t = _mm512_dpbusd_epi32(zero, c[i], _mm512_loadu_si512(xq + 64 * i));
                acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_permutexvar_ps(idx[i], s), acc[j]);
            }
        }
    }
    for (int j = 0; j < NY; j++) out[j * ldo] = _mm512_reduce_add_ps(_mm512_add_ps(acc[j], cacc[j]));
}

/* IQ4_XS / IQ4_KS: super-blocks of 8 blocks of 32 with the legacy nibble order, non-linear grid */
static inline __attribute__((always_inline)) void dec_iq4(int type, const uint8_t *row, int64_t nsb, const fact *A,
                                                          const int NY, float *out, int64_t ldo) {
    const __m512i m15 = _mm512_set1_epi8(15), zero = _mm512_setzero_si512();
    const __m512i lut0 = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)kv_iq4k_128));
    const __m512i lut1 = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(kv_iq4k_128 + 16)));
    __m512 acc[NYMAX];
    __m128 cacc[NYMAX];
    for (int j = 0; j < NY; j++) {
        acc[j] = _mm512_setzero_ps();
        cacc[j] = _mm_setzero_ps();
    }
    const float d_row = type == QG_IQ4_KS ? f32at(row) : 0.0f;
    for (int64_t b = 0; b < nsb; b++) {
        const uint8_t *p = type == QG_IQ4_KS ? row + 4 + 136 * b : row + 136 * b;
        unsigned shift = 0;
        float d;
        __m256i L8;
        if (type == QG_IQ4_KS) {
            d = d_row;
            uint64_t sc;
            memcpy(&sc, p, 8);
            shift = (unsigned)_pext_u64(sc, 0x0101010101010101ULL);
            L8 = _mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((int64_t)(sc & 0xFEFEFEFEFEFEFEFEULL))),
                                  _mm256_set1_epi32(127));
        } else {
            d = h2f(p);
            uint16_t sh;
            uint32_t sl;
            memcpy(&sh, p + 2, 2);
            memcpy(&sl, p + 4, 4);
            /* byte ib: nibble ib of scales_l | 2-bit field ib of scales_h << 4 */
            const uint64_t ls = _pdep_u64(sl, 0x0F0F0F0F0F0F0F0FULL) | (_pdep_u64(sh, 0x0303030303030303ULL) << 4);
            L8 = _mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((int64_t)ls)), _mm256_set1_epi32(32));
        }
        const __m256 dl8 = _mm256_mul_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(L8));
        for (int h = 0; h < 2; h++) {
            const __m512i v = _mm512_loadu_si512(p + 8 + 64 * h);
            /* the grid of each 128-bit lane (one 32-block) follows its shift bit */
            const __mmask16 km = (__mmask16)(_pdep_u32((shift >> (4 * h)) & 15, 0x1111) * 15);
            const __m512i lut = _mm512_mask_blend_epi32(km, lut0, lut1);
            const __m512i lo = _mm512_shuffle_epi8(lut, _mm512_and_si512(v, m15));
            const __m512i hi = _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(v, 4), m15));
            const __m128 dl4 = h ? _mm256_extractf128_ps(dl8, 1) : _mm256_castps256_ps128(dl8);
            const __m128 m4 = _mm_mul_ps(dl4, _mm_set1_ps(-128.0f));
            const int64_t g = 8 * b + 4 * h;
            for (int j = 0; j < NY; j++) {
                const __m512i x0 = _mm512_loadu_si512(A[j].q + 32 * g), x1 = _mm512_loadu_si512(A[j].q + 32 * g + 64);
                const __m512i t = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo, x0), hi, x1);
                acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), lanes_of4(_mm_mul_ps(dl4, _mm_loadu_ps(A[j].dx + g))),
                                         acc[j]);
                cacc[j] = _mm_fmadd_ps(m4, _mm_loadu_ps(A[j].s32 + g), cacc[j]);
            }
        }
    }
    for (int j = 0; j < NY; j++) {
        __m128 c = _mm_add_ps(cacc[j], _mm_movehl_ps(cacc[j], cacc[j]));
        c = _mm_add_ss(c, _mm_movehdup_ps(c));
        out[j * ldo] = _mm512_reduce_add_ps(acc[j]) + _mm_cvtss_f32(c);
    }
}

/* IQ5_KS: Q5_K's bit layout, a 32-entry grid per 32-block (shifted or not), f32 row scale */
static inline __attribute__((always_inline)) void dec_iq5ks(int type, const uint8_t *row, int64_t nsb, const fact *A,
                                                            const int NY, float *out, int64_t ldo) {
    (void)type;
    const __m512i m15 = _mm512_set1_epi8(15), zero = _mm512_setzero_si512(), one = _mm512_set1_epi8(1);

    __m512i lut[2][2]; /* [shift][entries 0..15 / 16..31] */
    for (int sft = 0; sft < 2; sft++)
        for (int h = 0; h < 2; h++)
            lut[sft][h] = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(kv_iq5nl_128 + 32 * sft + 16 * h)));
    static const int pr[4][2] = {{0, 2}, {1, 3}, {4, 6}, {5, 7}};
    __m512i idx[4];
    for (int i = 0; i < 4; i++) {
        const int a0 = pr[i][0], a1 = pr[i][1];
        idx[i] = _mm512_setr_epi32(a0, a0, a0, a0, a0, a0, a0, a0, a1, a1, a1, a1, a1, a1, a1, a1);
    }
    __m512 acc[NYMAX];
    __m256 cacc[NYMAX];
    for (int j = 0; j < NY; j++) {
        acc[j] = _mm512_setzero_ps();
        cacc[j] = _mm256_setzero_ps();
    }
    const float d_row = f32at(row);
    for (int64_t b = 0; b < nsb; b++) {
        const uint8_t *p = row + 4 + 168 * b;
        uint64_t sc;
        memcpy(&sc, p, 8);
        const unsigned shift = (unsigned)_pext_u64(sc, 0x0101010101010101ULL);
        const __m256i L8 = _mm256_sub_epi32(
            _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((int64_t)(sc & 0xFEFEFEFEFEFEFEFEULL))), _mm256_set1_epi32(127));
        const __m256 dl8 = _mm256_mul_ps(_mm256_set1_ps(d_row), _mm256_cvtepi32_ps(L8));
        const __m256 mw8 = _mm256_mul_ps(dl8, _mm256_set1_ps(-128.0f));
        const __m512i v0 = _mm512_loadu_si512(p + 8), v1 = _mm512_loadu_si512(p + 72);
        __m512i c[4] = {_mm512_and_si512(v0, m15), _mm512_and_si512(_mm512_srli_epi16(v0, 4), m15),
                        _mm512_and_si512(v1, m15), _mm512_and_si512(_mm512_srli_epi16(v1, 4), m15)};
        const __m256i Q = _mm256_loadu_si256((const __m256i *)(p + 136)); /* bit ib of qh[j] */
        for (int i = 0; i < 4; i++) {
            const int a0 = pr[i][0], a1 = pr[i][1];
            const __m512i QQ = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_srli_epi16(Q, a0)),
                                                  _mm256_srli_epi16(Q, a1), 1);
            const __mmask64 top = _mm512_test_epi8_mask(QQ, one); /* 5th bit: entries 16..31 */
            /* each 256-bit half is one 32-block with its own grid shift */
            const __mmask8 ks = (__mmask8)((((shift >> a0) & 1) ? 0x0F : 0) | (((shift >> a1) & 1) ? 0xF0 : 0));
            const __m512i t_lo = _mm512_mask_blend_epi64(ks, lut[0][0], lut[1][0]);
            const __m512i t_hi = _mm512_mask_blend_epi64(ks, lut[0][1], lut[1][1]);
            c[i] = _mm512_mask_blend_epi8(top, _mm512_shuffle_epi8(t_lo, c[i]), _mm512_shuffle_epi8(t_hi, c[i]));
        }
        for (int j = 0; j < NY; j++) {
            const uint8_t *xq = A[j].q + 256 * b;
            const __m256 dx8 = _mm256_loadu_ps(A[j].dx + 8 * b);
            const __m512 s = _mm512_castps256_ps512(_mm256_mul_ps(dl8, dx8));
            cacc[j] = _mm256_fmadd_ps(mw8, _mm256_loadu_ps(A[j].s32 + 8 * b), cacc[j]);
            for (int i = 0; i < 4; i++) {
                const __m512i t = _mm512_dpbusd_epi32(zero, c[i], _mm512_loadu_si512(xq + 64 * i));
                acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_permutexvar_ps(idx[i], s), acc[j]);
            }
        }
    }
    for (int j = 0; j < NY; j++)
        out[j * ldo] = _mm512_reduce_add_ps(_mm512_add_ps(acc[j], _mm512_castps256_ps512(cacc[j])));
}

/* IQ4_K: IQ4_XS's nibble order with 16-weight sub-blocks: the low nibbles of a 32-block are one
 * sub-block, the high nibbles the next, each with its own scale and grid shift */
static inline __attribute__((always_inline)) void dec_iq4k(int type, const uint8_t *row, int64_t nsb, const fact *A,
                                                           const int NY, float *out, int64_t ldo) {
    (void)type;
    const __m512i m15 = _mm512_set1_epi8(15), zero = _mm512_setzero_si512();
    const __m512i lut0 = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)kv_iq4k_128));
    const __m512i lut1 = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(kv_iq4k_128 + 16)));
    __m512 acc[NYMAX], cacc[NYMAX];
    for (int j = 0; j < NY; j++) {
        acc[j] = _mm512_setzero_ps();
        cacc[j] = _mm512_setzero_ps();
    }
    for (int64_t b = 0; b < nsb; b++) {
        const uint8_t *p = row + 144 * b;
        uint16_t extra;
        memcpy(&extra, p + 2, 2);
        uint32_t sh;
        uint64_t sl;
        memcpy(&sh, p + 4, 4);
        memcpy(&sl, p + 8, 8);
        /* byte k: nibble k of scales_l | 2-bit field k of scales_h << 4 */
        const __m128i v = _mm_cvtsi64_si128((int64_t)sl);
        const __m128i nib = _mm_unpacklo_epi8(_mm_and_si128(v, _mm_set1_epi8(15)),
                                              _mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(15)));
        const __m128i top = _mm_set_epi64x((int64_t)_pdep_u64(sh >> 16, 0x0303030303030303ULL),
                                           (int64_t)_pdep_u64(sh & 0xFFFF, 0x0303030303030303ULL));
        const __m512i L16 = _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_or_si128(nib, _mm_slli_epi16(top, 4))),
                                             _mm512_set1_epi32(32));
        const __m512 dl = _mm512_mul_ps(_mm512_set1_ps(h2f(p)), _mm512_cvtepi32_ps(L16));
        const __m512 mw = _mm512_mul_ps(dl, _mm512_set1_ps(-128.0f));
        /* sub-block scales split by parity: even (low nibbles) and odd (high nibbles), 8 each */
        const __m512i ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 0, 0, 0, 0, 0, 0, 0, 0);
        const __m512i od = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 0, 0, 0, 0, 0, 0, 0, 0);
        const __m256 dl_lo = _mm512_castps512_ps256(_mm512_permutexvar_ps(ev, dl));
        const __m256 dl_hi = _mm512_castps512_ps256(_mm512_permutexvar_ps(od, dl));
        const unsigned e_lo = _pext_u32(extra, 0x5555), e_hi = _pext_u32(extra, 0xAAAA); /* per 32-block */
        for (int h = 0; h < 2; h++) {
            const __m512i v = _mm512_loadu_si512(p + 16 + 64 * h);
            const __mmask16 k_lo = (__mmask16)(_pdep_u32((e_lo >> (4 * h)) & 15, 0x1111) * 15);
            const __mmask16 k_hi = (__mmask16)(_pdep_u32((e_hi >> (4 * h)) & 15, 0x1111) * 15);
            const __m512i lo = _mm512_shuffle_epi8(_mm512_mask_blend_epi32(k_lo, lut0, lut1), _mm512_and_si512(v, m15));
            const __m512i hi = _mm512_shuffle_epi8(_mm512_mask_blend_epi32(k_hi, lut0, lut1),
                                                   _mm512_and_si512(_mm512_srli_epi16(v, 4), m15));
            const __m128 d_lo = h ? _mm256_extractf128_ps(dl_lo, 1) : _mm256_castps256_ps128(dl_lo);
            const __m128 d_hi = h ? _mm256_extractf128_ps(dl_hi, 1) : _mm256_castps256_ps128(dl_hi);
            const int64_t g = 8 * b + 4 * h;
            for (int j = 0; j < NY; j++) {
                const __m128 dx4 = _mm_loadu_ps(A[j].dx + g);
                const __m512i t0 = _mm512_dpbusd_epi32(zero, lo, _mm512_loadu_si512(A[j].q + 32 * g));
                const __m512i t1 = _mm512_dpbusd_epi32(zero, hi, _mm512_loadu_si512(A[j].q + 32 * g + 64));
                acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t0), lanes_of4(_mm_mul_ps(d_lo, dx4)), acc[j]);
                acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t1), lanes_of4(_mm_mul_ps(d_hi, dx4)), acc[j]);
            }
        }
        for (int j = 0; j < NY; j++) cacc[j] = _mm512_fmadd_ps(mw, _mm512_loadu_ps(A[j].s16 + 16 * b), cacc[j]);
    }
    for (int j = 0; j < NY; j++) out[j * ldo] = _mm512_reduce_add_ps(_mm512_add_ps(acc[j], cacc[j]));
}

#define DEC_FAMILY dec_
#include "qgemm_dec_table.h"
