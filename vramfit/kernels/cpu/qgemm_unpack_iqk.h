/* Unpackers of the IQK types with 256-weight super-blocks (IQ2_K..IQ6_K, IQ5_KS, IQ2_KS, IQ3_KS,
 * IQ2_KL), in the form of qgemm_unpack.h (which includes this file after its tables and helpers). */
static void unpack_iq4_k(const uint8_t *row, int64_t K, uint8_t *q, float *dwl, float *mw) {
    const __m128i lut[2] = {_mm_loadu_si128((const __m128i *)kv_iq4k_128),
                            _mm_loadu_si128((const __m128i *)(kv_iq4k_128 + 16))};
    for (int64_t b = 0; b < K / QKK; b++) {
        const uint8_t *p = row + 144 * b;
        float d = h2f(p);
        uint16_t extra;
        memcpy(&extra, p + 2, 2);
        const uint8_t *sh = p + 4, *sl = p + 8;
        for (int i = 0; i < 8; i++) { /* lane 0: sub-block 2i (low nibbles), lane 1: 2i+1 (high) */
            __m256i t = _mm256_set_m128i(lut[(extra >> (2 * i + 1)) & 1], lut[(extra >> (2 * i)) & 1]);
            store256(q + QKK * b + 32 * i, _mm256_shuffle_epi8(t, nib32(p + 16 + 16 * i)));
        }
        for (int k = 0; k < 16; k++) {
            float dl = d * (float)six_bit_scale(sh, sl, k);
            set16(dwl, mw, 16 * b + k, dl, -128.0f * dl);
        }
    }
}

/* IQ2_K: iq2nl values + 32 (all below 128), offset -32 * scale per 16 weights */
static void unpack_iq2_k(const uint8_t *row, int64_t K, uint8_t *q, float *dwl, float *mw) {
    const __m256i lut = table16(kv_iq2nl_32);
    for (int64_t b = 0; b < K / QKK; b++) {
        const uint8_t *p = row + 76 * b; /* d | extra | scales[8] | qs[64] */
        float d = h2f(p);
        unsigned extra = u16at(p + 2);
        for (int g = 0; g < 8; g++) {
            __m256i c = _mm256_shuffle_epi8(lut, crumbs(p + 12, g));
            store256(q + QKK * b + 32 * g, _mm256_add_epi8(c, lane_shift(extra, g, 5)));
        }
        for (int k = 0; k < 16; k++) {
            float dl = d * (float)(((p[4 + k / 2] >> (4 * (k % 2))) & 15) - 8);
            set16(dwl, mw, 16 * b + k, dl, -32.0f * dl);
        }
    }
}

/* IQ3_K: iq3nl values + 64 (all below 128), offset -64 * scale per 16 weights */
static void unpack_iq3_k(const uint8_t *row, int64_t K, uint8_t *q, float *dwl, float *mw) {
    const __m256i lut = table16(kv_iq3nl_64);
    for (int64_t b = 0; b < K / QKK; b++) {
        const uint8_t *p = row + 110 * b; /* d | extra | signs u16 | scales_l[8] | qs[64] | qh[32] */
        float d = h2f(p);
        unsigned extra = u16at(p + 2), sign = u16at(p + 4);
        __m256i qh = load256(p + 78); /* bit g of qh[j]: 3rd bit of weight 32 g + j */
        for (int g = 0; g < 8; g++) {
            __m256i idx = _mm256_or_si256(crumbs(p + 14, g), plane_bit(qh, g, 2));
            __m256i c = _mm256_shuffle_epi8(lut, idx);
            store256(q + QKK * b + 32 * g, _mm256_add_epi8(c, lane_shift(extra, g, 4)));
        }
        for (int k = 0; k < 16; k++) {
            int L = 2 * ((p[6 + k / 2] >> (4 * (k % 2))) & 15) + 1;
            float dl = d * (float)((sign >> k) & 1 ? -L : L);
            set16(dwl, mw, 16 * b + k, dl, -64.0f * dl);
        }
    }
}

/* IQ5_K: iq5nl values + 128, 16-weight scales as IQ4_K */
static void unpack_iq5_k(const uint8_t *row, int64_t K, uint8_t *q, float *dwl, float *mw) {
    for (int64_t b = 0; b < K / QKK; b++) {
        const uint8_t *p = row + 176 * b; /* d | extra | scales_h[4] | scales_l[8] | qs[128] | qh[32] */
        float d = h2f(p);
        unsigned extra = u16at(p + 2);
        __m256i qh = load256(p + 144); /* bit g of qh[j]: 5th bit of weight 32 g + j */
        for (int g = 0; g < 8; g++) { /* group g: nibble g % 2 of qs[32 (g / 2) + j] */
            __m256i v = load256(p + 16 + 32 * (g / 2));
            __m256i idx = _mm256_or_si256(g % 2 ? hi4(v) : lo4(v), plane_bit(qh, g, 4));
            store256(q + QKK * b + 32 * g, _mm256_add_epi8(lookup32(kv_iq5nl_128, idx), lane_shift(extra, g, 2)));
        }
        for (int k = 0; k < 16; k++) {
            float dl = d * (float)six_bit_scale(p + 4, p + 8, k);
            set16(dwl, mw, 16 * b + k, dl, -128.0f * dl);
        }
    }
}

/* IQ6_K: iq6nl values + 128 (the integer table, spec 0.8), int8 scale per 16 weights */
static void unpack_iq6_k(const uint8_t *row, int64_t K, uint8_t *q, float *dwl, float *mw) {
    for (int64_t b = 0; b < K / QKK; b++) {
        const uint8_t *p = row + 212 * b; /* d | extra | int8 scales[16] | qs[128] | qh[64] */
        const int8_t *sc = (const int8_t *)(p + 4);
        float d = h2f(p);
        unsigned extra = u16at(p + 2);
        for (int g = 0; g < 8; g++) { /* low nibble as IQ5_K; high crumb g % 4 of qh[32 (g / 4) + j] */
            __m256i v = load256(p + 20 + 32 * (g / 2));
            __m256i idx = _mm256_or_si256(g % 2 ? hi4(v) : lo4(v), _mm256_slli_epi16(crumbs(p + 148, g), 4));
            store256(q + QKK * b + 32 * g, _mm256_add_epi8(lookup64(kv_iq6nl_128, idx), lane_shift(extra, g, 1)));
        }
        for (int k = 0; k < 16; k++) {
            float dl = d * (float)sc[k];
            set16(dwl, mw, 16 * b + k, dl, -128.0f * dl);
        }
    }
}

static void unpack_iq5_ks(const uint8_t *row, int64_t K, uint8_t *q, float *dwl, float *mw) {
    const __m256i one = _mm256_set1_epi8(1);
    float d_row = f32at(row);
    for (int64_t b = 0; b < K / QKK; b++) {
        const uint8_t *p = row + 4 + 168 * b;
        __m256i hb = load256(p + 136); /* bit ib of qh[j]: 5th bit of weight 32 ib + j */
        for (int ib = 0; ib < 8; ib++) {
            int s = p[ib];
            float dl = d_row * (float)((s & 0xFE) - 127);
            const uint8_t *lut = kv_iq5nl_128 + 32 * (s & 1);
            __m256i v = load256(p + 8 + 32 * (ib / 2));
            __m256i idx = ib % 2 ? hi4(v) : lo4(v);
            __m256i top = _mm256_cmpeq_epi8(_mm256_and_si256(hb, one), one);
            __m256i c = _mm256_blendv_epi8(_mm256_shuffle_epi8(table16(lut), idx),
                                           _mm256_shuffle_epi8(table16(lut + 16), idx), top);
            store256(q + QKK * b + 32 * ib, c);
            set32(dwl, mw, 8 * b + ib, dl, -128.0f * dl);
            hb = _mm256_srli_epi16(hb, 1);
        }
    }
}

/* IQ2_KS: fp16 row scale; iq2nl values + 32, offset -32 * scale per 32 weights */
static void unpack_iq2_ks(const uint8_t *row, int64_t K, uint8_t *q, float *dwl, float *mw) {
    const __m256i lut = table16(kv_iq2nl_32);
    float d_row = h2f(row);
    for (int64_t b = 0; b < K / QKK; b++) {
        const uint8_t *p = row + 2 + 70 * b; /* extra | scales[4] | qs[64] */
        unsigned extra = u16at(p); /* bits 0..7: grid shifts, 8..15: 5th scale bits */
        for (int ib = 0; ib < 8; ib++) {
            int L = (((p[2 + ib / 2] >> (4 * (ib % 2))) & 15) | (((extra >> (8 + ib)) & 1) << 4)) - 16;
            float dl = d_row * (float)L;
            __m256i c = _mm256_shuffle_epi8(lut, crumbs(p + 6, ib));
            store256(q + QKK * b + 32 * ib, _mm256_add_epi8(c, _mm256_set1_epi8((char)(5 * ((extra >> ib) & 1)))));
            set32(dwl, mw, 8 * b + ib, dl, -32.0f * dl);
        }
    }
}

/* IQ3_KS: fp16 row scale; iq3nl values + 64, offset -64 * scale per 32 weights */
static void unpack_iq3_ks(const uint8_t *row, int64_t K, uint8_t *q, float *dwl, float *mw) {
    const __m256i lut = table16(kv_iq3nl_64);
    float d_row = h2f(row);
    for (int64_t b = 0; b < K / QKK; b++) {
        const uint8_t *p = row + 2 + 102 * b; /* extra | scales[4] | qs[64] | qh[32] */
        unsigned extra = u16at(p); /* bits 0..7: 5th scale bits, 8..15: grid shifts */
        __m256i qh = load256(p + 70);
        for (int ib = 0; ib < 8; ib++) {
            int L = (((p[2 + ib % 4] >> (4 * (ib / 4))) & 15) | (((extra >> ib) & 1) << 4)) - 16;
            float dl = d_row * (float)L;
            __m256i c = _mm256_shuffle_epi8(lut, _mm256_or_si256(crumbs(p + 6, ib), plane_bit(qh, ib, 2)));
            store256(q + QKK * b + 32 * ib, _mm256_add_epi8(c, _mm256_set1_epi8((char)(4 * ((extra >> (8 + ib)) & 1)))));
            set32(dwl, mw, 8 * b + ib, dl, -64.0f * dl);
        }
    }
}

/* IQ2_KL: fp16 row scale; a 5-bit index per pair of weights into a table of value pairs (+ 64) */
static void unpack_iq2_kl(const uint8_t *row, int64_t K, uint8_t *q, float *dwl, float *mw) {
    float d_row = h2f(row);
    for (int64_t b = 0; b < K / QKK; b++) {
        const uint8_t *p = row + 2 + 86 * b; /* scales_h u16 | scales_l[4] | qs[64] | qh[16] */
        unsigned sh = u16at(p);
        __m128i qh = _mm_loadu_si128((const __m128i *)(p + 70)); /* bit ib of qh[j]: 5th bit of pair j */
        uint8_t *o = q + QKK * b;
        for (int c = 0; c < 4; c++) { /* sub-blocks 2c (low lane: low nibbles) and 2c + 1 (high nibbles) */
            __m256i hb = _mm256_set_m128i(_mm_srl_epi16(qh, _mm_cvtsi32_si128(2 * c + 1)),
                                          _mm_srl_epi16(qh, _mm_cvtsi32_si128(2 * c)));
            __m256i idx = _mm256_or_si256(nib32(p + 6 + 16 * c), _mm256_slli_epi16(_mm256_and_si256(hb, _mm256_set1_epi8(1)), 4));
            __m256i first = lookup32(kv_iq2kl_64, idx), second = lookup32(kv_iq2kl_64 + 32, idx);
            __m256i lo = _mm256_unpacklo_epi8(first, second), hi = _mm256_unpackhi_epi8(first, second);
            store256(o + 64 * c, _mm256_permute2x128_si256(lo, hi, 0x20));
            store256(o + 64 * c + 32, _mm256_permute2x128_si256(lo, hi, 0x31));
        }
        for (int ib = 0; ib < 8; ib++) {
            int L = (((p[2 + ib % 4] >> (4 * (ib / 4))) & 15) | (((sh >> (2 * ib)) & 3) << 4)) - 32;
            float dl = d_row * (float)L;
            set32(dwl, mw, 8 * b + ib, dl, -64.0f * dl);
        }
    }
}
