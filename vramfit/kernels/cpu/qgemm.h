/* vramfit fast CPU path: shared declarations of the quantized matrix-product kernels.
 *
 * y[j, r] = sum_k x[j, k] * W[r, k] for a packed GGUF weight W (N rows of row_nbytes bytes) and a
 * float32 activation x (n rows of K). Activations are quantized once per call to 8-bit blocks of 32
 * (as llama.cpp's Q8_0); weight rows are unpacked per tile into 8-bit codes plus per-group float
 * scales and offsets, and the products are integer dot products (AVX-512 VNNI dpbusd, or AVX2
 * maddubs) with float accumulation per block.
 */
#ifndef VRAMFIT_QGEMM_H
#define VRAMFIT_QGEMM_H

#include <stdint.h>

/* ggml type ids (the values stored in GGUF tensor-info records) */
enum {
    QG_Q4_0 = 2,
    QG_Q4_1 = 3,
    QG_Q5_0 = 6,
    QG_Q5_1 = 7,
    QG_Q8_0 = 8,
    QG_Q2_K = 10,
    QG_Q3_K = 11,
    QG_Q4_K = 12,
    QG_Q5_K = 13,
    QG_Q6_K = 14,
    QG_IQ4_NL = 20,
    QG_IQ4_XS = 23,
    QG_Q6_0 = 133,
    QG_IQ2_K = 137,
    QG_IQ3_K = 138,
    QG_IQ4_K = 139,
    QG_IQ5_K = 140,
    QG_IQ6_K = 141,
    QG_IQ4_KS = 144,
    QG_IQ2_KS = 145,
    QG_IQ4_KSS = 146,
    QG_IQ5_KS = 152,
    QG_IQ3_KS = 156,
    QG_IQ2_KL = 157,
};

typedef struct {
    const float *x;      /* (n, K) float32, row stride K */
    int64_t n, K;
    const uint8_t *w;    /* (N, row_nbytes) packed rows */
    int64_t N, row_nbytes;
    int type;
    float *out;          /* (n, N) float32, row stride N */
    int nthreads;
} qg_args;

/* 0 when the type/row length is not handled, else the bytes per row the kernel expects */
int64_t qg_row_nbytes(int type, int64_t K);

/* Run task(arg, tid) on nth threads, tid 0 being the caller; returns when every thread that
 * entered the task has left it. Workers that are slow to wake (descheduled, asleep) may skip the
 * task entirely, so tasks must share their work through atomic counters, not fixed slices. */
typedef void (*qg_task)(void *arg, int tid);
void qg_parallel(qg_task task, void *arg, int nth);

/* causal attention of n new queries (positions start..) over a float32 cache (qattn_avx512.c) */
typedef struct {
    const float *q;          /* (n, n_heads, head_dim) */
    const float *k, *v;      /* (n_kv_heads, >= start + n, head_dim), heads kv_head_stride floats apart */
    float *out;              /* (n, n_heads, head_dim) */
    int64_t n, start, n_heads, n_kv_heads, head_dim, kv_head_stride;
    float scale;
    int nthreads;
} qg_attn_args;

/* 0 on success, 1 on bad arguments (head_dim not a multiple of 16 or above 256, ...), 2 out of memory */
int qg_attention_avx512(const qg_attn_args *a);
/* the same on AVX2 (head_dim a multiple of 8), each query head by the decode step's own routine
 * (qops_avx2.c, qmath_avx2.h) */
int qg_attention_avx2(const qg_attn_args *a);

/* out[r] = silu(gu[r, :n_ff]) * gu[r, n_ff:] for rows r (qops_avx512.c) */
void qg_swiglu_avx512(const float *gu, float *out, int64_t rows, int64_t n_ff, int nthreads);
void qg_swiglu_avx2(const float *gu, float *out, int64_t rows, int64_t n_ff, int nthreads); /* out may be gu */
#define QG_CONV_MAX_K 16
#define QG_DELTA_MAX_DV 1024
void qg_delta_step_avx512(const float *q, const float *k, const float *v, const float *g, const float *beta, float *state,
                          float *out, int64_t H, int64_t nk, int64_t dk, int64_t dv, int nthreads);
void qg_conv_silu_avx512(const float *state, const float *x, int64_t ldx, const float *wt, float *out, int64_t T,
                         int64_t C, int K, int nthreads);
void qg_delta_step_avx2(const float *q, const float *k, const float *v, const float *g, const float *beta, float *state,
                        float *out, int64_t H, int64_t nk, int64_t dk, int64_t dv, int nthreads);
void qg_conv_silu_avx2(const float *state, const float *x, int64_t ldx, const float *wt, float *out, int64_t T,
                       int64_t C, int K, int nthreads);

/* per-ISA entry points; return 0 on success, nonzero on bad arguments/allocation failure */
int qg_matmul_avx2(const qg_args *a);
int qg_matmul_avx512(const qg_args *a);
/* several products at once (at most 4 parts; those sharing x, n <= 8 and K take one pass over the
 * thread pool, the others run one after the other) */
int qg_matmul_parts_avx2(const qg_args *parts, int nparts);
int qg_matmul_parts_avx512(const qg_args *parts, int nparts);

#endif
