/* Shared helpers of the C quantization encoders (`vramfit.quant._cenc`).
 *
 * Every encoder reproduces the torch encoder of the same type (the vramfit/quant modules) byte for byte:
 * float32 operations in the same order, the torch code's float64 "fma" helper as
 * (float)((double)a * b + c), and the same tie rules. The whole extension is compiled with
 * -ffp-contract=off so the compiler never fuses a multiply and an add on its own.
 */
#ifndef VRAMFIT_CENC_H
#define VRAMFIT_CENC_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#define QK_K 256

/* encode one row: x (n floats), imatrix (n floats) or NULL, out (row_nbytes bytes) */
typedef void (*ce_row_fn)(const float *x, int64_t n, const float *imat, uint8_t *out);

typedef struct {
    const char *name;
    int block;           /* n must be a multiple of this */
    int row_meta;        /* bytes before the first block */
    int block_bytes;     /* bytes per block of `block` weights */
    ce_row_fn fn;
} ce_type;

/* (float)(a*b + c) with the product and the sum in float64, as the torch helper `fma` does */
static inline float ce_fma(float a, float b, float c) { return (float)((double)a * (double)b + (double)c); }

static inline uint32_t ce_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
static inline float ce_float(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* IEEE float32 -> binary16, round to nearest even (as torch's Half conversion) */
static inline uint16_t ce_f16(float f) {
    const float scale_to_inf = 0x1.0p+112f, scale_to_zero = 0x1.0p-110f;
    float base = (fabsf(f) * scale_to_inf) * scale_to_zero;
    const uint32_t w = ce_bits(f), shl1_w = w + w, sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = ce_float((bias >> 1) + 0x07800000u) + base;
    const uint32_t b = ce_bits(base);
    const uint32_t nonsign = ((b >> 13) & 0x00007C00u) + (b & 0x00000FFFu);
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

static inline float ce_f16_to_f32(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16, sign = w & 0x80000000u, two_w = w + w;
    const uint32_t exp_offset = 0xE0u << 23;
    const float exp_scale = 0x1.0p-112f;
    const float normalized = ce_float((two_w >> 4) + exp_offset) * exp_scale;
    const uint32_t magic_mask = 126u << 23;
    const float magic_bias = 0.5f;
    const float denormalized = ce_float((two_w >> 17) | magic_mask) - magic_bias;
    const uint32_t denormalized_cutoff = 1u << 27;
    const uint32_t result = sign | (two_w < denormalized_cutoff ? ce_bits(denormalized) : ce_bits(normalized));
    return ce_float(result);
}

/* fp16 round trip */
static inline float ce_half(float f) { return ce_f16_to_f32(ce_f16(f)); }

static inline void ce_put_f16(uint8_t *p, float f) {
    uint16_t h = ce_f16(f);
    p[0] = (uint8_t)h;
    p[1] = (uint8_t)(h >> 8);
}
static inline void ce_put_f32(uint8_t *p, float f) { memcpy(p, &f, 4); }

/* torch.round: round half to even */
static inline float ce_rint(float v) { return __builtin_rintf(v); }

/* torch.searchsorted(g, x, right=True) on a sorted grid: count of g[i] with !(g[i] > x) (NaN -> n),
 * then the nearer neighbour, exact ties going up (iqk_encode.nearest_index) */
static inline int ce_nearest(const float *g, int n, float x) {
    int k = 0;
    for (int i = 0; i < n; i++) k += !(g[i] > x);
    const int lo = k - 1 < 0 ? 0 : k - 1, hi = k > n - 1 ? n - 1 : k;
    return (x - g[lo]) < (g[hi] - x) ? lo : hi;
}

/* first index of the largest |x[i]| (torch argmax) */
static inline int ce_argmax_abs(const float *x, int n) {
    int k = 0;
    float a = fabsf(x[0]);
    for (int i = 1; i < n; i++)
        if (fabsf(x[i]) > a) {
            a = fabsf(x[i]);
            k = i;
        }
    return k;
}

#endif
