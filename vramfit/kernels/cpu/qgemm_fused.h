/* The ISA-neutral part of the fused decode path (few activation rows, n <= 8): the activation row
 * layout the fused kernels read, its reordering, and the kernels' common signature. Included by
 * qgemm_impl.h for both widths, before the per-ISA kernels (qgemm_decode.h for AVX-512 VNNI,
 * qgemm_decode_avx2.h for AVX2), which define `pick_dec`.
 *
 * Activation orders (AVX-512 only; AVX2 reads every type in the natural order):
 *   SPLIT16 (Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL, IQ4_XS, IQ4_KS, IQ4_K): per 4 blocks, weights 0..15 of each block, then 16..31;
 *   Q4K (Q4_K, Q5_K, IQ5_KS): per 256, the 32-blocks in the order 0 2 1 3 4 6 5 7;
 *   NATURAL (Q8_0, Q6_K; every type on AVX2): activation bytes of 32-block b at q + 32 b.
 */

enum { ORD_NATURAL = 0, ORD_SPLIT16 = 1, ORD_Q4K = 2 };

static int fused_order(int type) {
#if QG_W == 256
    (void)type;
    return ORD_NATURAL;
#else
    switch (type) {
    case QG_Q4_0: case QG_Q4_1: case QG_Q5_0: case QG_Q5_1: case QG_IQ4_NL: return ORD_SPLIT16;
    case QG_IQ4_XS: case QG_IQ4_KS: return ORD_SPLIT16;
    case QG_Q4_K: case QG_Q5_K: case QG_IQ5_KS: return ORD_Q4K;
    case QG_IQ4_K: return ORD_SPLIT16;
    case QG_Q8_0: case QG_Q6_K: return ORD_NATURAL;
    default: return -1;
    }
#endif
}

/* compact activation row for the fused kernels */
typedef struct {
    const uint8_t *q; /* K (padded to 128) int8, reordered */
    const float *dx;  /* per 32-block scale, natural block order, zero padded to a multiple of 8 */
    const float *s32; /* dx * sum(q) per 32-block (zero padded likewise) */
    const float *s16; /* dx * sum(q) per 16 weights (zero padded likewise) */
} fact;

typedef struct {
    int64_t dx, s32, s16, stride;
} flayout;

/* the per-block arrays hold a multiple of 8 blocks, zero filled beyond K / 32: AVX2 loads 8 block
 * scales at a time (AVX-512 4) */
static flayout make_flayout(int64_t K) {
    flayout F;
    const int64_t nb8 = (K / 32 + 7) / 8 * 8;
    F.dx = round64(nb8 * 32);
    F.s32 = F.dx + round64(nb8 * 4);
    F.s16 = F.s32 + round64(nb8 * 4);
    F.stride = F.s16 + round64(nb8 * 8);
    return F;
}

/* natural quantized row (layout L) -> fused row (layout F) */
static void reorder_act(const uint8_t *src, const layout *L, int64_t K, int order, uint8_t *dst, const flayout *F) {
    const int64_t nb = K / 32;
    memset(dst, 0, (size_t)F->stride);
    const float *dxl = (const float *)(src + L->dl), *xs = (const float *)(src + L->sm);
    float *dx = (float *)(dst + F->dx), *s32 = (float *)(dst + F->s32), *s16 = (float *)(dst + F->s16);
    for (int64_t b = 0; b < nb; b++) {
        dx[b] = dxl[8 * b];
        s16[2 * b] = xs[2 * b];
        s16[2 * b + 1] = xs[2 * b + 1];
        s32[b] = xs[2 * b] + xs[2 * b + 1];
    }
    if (order == ORD_NATURAL) {
        memcpy(dst, src, (size_t)K);
    } else if (order == ORD_SPLIT16) {
        for (int64_t b = 0; b < nb; b++) {
            const int64_t g = b / 4, i = b % 4;
            memcpy(dst + 128 * g + 16 * i, src + 32 * b, 16);
            memcpy(dst + 128 * g + 64 + 16 * i, src + 32 * b + 16, 16);
        }
    } else {
        static const int pos[8] = {0, 2, 1, 3, 4, 6, 5, 7}; /* slot s holds 32-block pos[s] */
        for (int64_t b = 0; b < K / 256; b++)
            for (int s = 0; s < 8; s++) memcpy(dst + 256 * b + 32 * s, src + 256 * b + 32 * pos[s], 32);
    }
}

/* one packed weight row (nblocks 32-blocks for the legacy types, else super-blocks of 256) against
 * NY <= 4 activation rows A[0..NY): out[j * ldo] = row . activation j */
typedef void (*dec_fn)(const uint8_t *row, int64_t nblocks, const fact *A, float *out, int64_t ldo);
