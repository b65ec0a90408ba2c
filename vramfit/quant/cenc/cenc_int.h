/* Internal declarations of the C encoders (one translation unit per family). */
#ifndef VRAMFIT_CENC_INT_H
#define VRAMFIT_CENC_INT_H
#include <stdint.h>

void ce_iqk_init(void);
void ce_iqk_importance(const float *x, int64_t n, const float *imat, int block, float plain_sigma,
                       float sigma_factor, float *w);
void ce_search_block_scalar(const float *xb, const float *wb, int B, const float *g, int n, int ntry, int initial,
                            float *out_scale, int *out_shift);
/* AVX2 version of the pass-1 search (same results); returns 0 when it cannot handle the grid */
int ce_search_block_avx2(const float *xb, const float *wb, int B, const float *g, int n, int ntry, int initial,
                         float *out_scale, int *out_shift);
extern int ce_use_avx2;

static inline void ce_search_block(const float *xb, const float *wb, int B, const float *g, int n, int ntry,
                                   int initial, float *out_scale, int *out_shift) {
    if (ce_use_avx2 && ce_search_block_avx2(xb, wb, B, g, n, ntry, initial, out_scale, out_shift)) return;
    ce_search_block_scalar(xb, wb, B, g, n, ntry, initial, out_scale, out_shift);
}

void ce_iq4_ks_row(const float *x, int64_t n, const float *imat, uint8_t *out);
void ce_iq5_ks_row(const float *x, int64_t n, const float *imat, uint8_t *out);
void ce_iq4_k_row(const float *x, int64_t n, const float *imat, uint8_t *out);
void ce_iq5_k_row(const float *x, int64_t n, const float *imat, uint8_t *out);
void ce_legacy_init(void);
void ce_q8_0_row(const float *x, int64_t n, const float *imat, uint8_t *out);
void ce_q4_0_row(const float *x, int64_t n, const float *imat, uint8_t *out);
void ce_q5_0_row(const float *x, int64_t n, const float *imat, uint8_t *out);
void ce_q6_0_row(const float *x, int64_t n, const float *imat, uint8_t *out);
void ce_iq4_nl_row(const float *x, int64_t n, const float *imat, uint8_t *out);
void ce_iq4_xs_row(const float *x, int64_t n, const float *imat, uint8_t *out);
void ce_q6_k_row(const float *x, int64_t n, const float *imat, uint8_t *out);
#endif
