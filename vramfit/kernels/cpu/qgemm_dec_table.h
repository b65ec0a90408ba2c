/* The fused decode kernels per type and batch size (1..4 activation rows), from the ISA's kernel
 * families (DEC_FAMILY: the prefix of their names), and `pick_dec`. Included at the end of
 * qgemm_decode.h and qgemm_decode_avx2.h. */

#define DDEF(T, KIND, ny) \
    static void dec_##T##_##ny(const uint8_t *row, int64_t nb, const fact *A, float *out, int64_t ldo) { \
        CAT(DEC_FAMILY, KIND)(QG_##T, row, nb, A, ny, out, ldo); \
    }
#define DDEF4(T, KIND) DDEF(T, KIND, 1) DDEF(T, KIND, 2) DDEF(T, KIND, 3) DDEF(T, KIND, 4)
DDEF4(Q4_0, legacy)
DDEF4(Q4_1, legacy)
DDEF4(Q5_0, legacy)
DDEF4(Q5_1, legacy)
DDEF4(IQ4_NL, legacy)
DDEF4(Q8_0, legacy)
DDEF4(Q4_K, kquant)
DDEF4(Q5_K, kquant)
DDEF4(Q6_K, kquant)
DDEF4(IQ4_XS, iq4)
DDEF4(IQ4_KS, iq4)
DDEF4(IQ5_KS, iq5ks)
DDEF4(IQ4_K, iq4k)
#define DROW(T) {dec_##T##_1, dec_##T##_2, dec_##T##_3, dec_##T##_4}

static const dec_fn *pick_dec(int type) {
    static const dec_fn q4_0[4] = DROW(Q4_0), q4_1[4] = DROW(Q4_1), q5_0[4] = DROW(Q5_0), q5_1[4] = DROW(Q5_1),
                        iq4_nl[4] = DROW(IQ4_NL), q8_0[4] = DROW(Q8_0), q4_K[4] = DROW(Q4_K),
                        q5_K[4] = DROW(Q5_K), q6_K[4] = DROW(Q6_K), iq4_xs[4] = DROW(IQ4_XS),
                        iq4_ks[4] = DROW(IQ4_KS), iq5_ks[4] = DROW(IQ5_KS), iq4_k[4] = DROW(IQ4_K);
    switch (type) {
    case QG_Q4_0: return q4_0;
    case QG_Q4_1: return q4_1;
    case QG_Q5_0: return q5_0;
    case QG_Q5_1: return q5_1;
    case QG_IQ4_NL: return iq4_nl;
    case QG_Q8_0: return q8_0;
    case QG_Q4_K: return q4_K;
    case QG_Q5_K: return q5_K;
    case QG_Q6_K: return q6_K;
    case QG_IQ4_XS: return iq4_xs;
    case QG_IQ4_KS: return iq4_ks;
    case QG_IQ5_KS: return iq5_ks;
    case QG_IQ4_K: return iq4_k;
    default: return 0;
    }
}
