/* One decode step (a single token) through the llama-family decoder layers (llama, qwen2, qwen3).
 *
 * Per layer, with x the residual stream (n_embd floats) and the token at position pos:
 *   h = rmsnorm(x); q, k, v = qkv(h) (+ biases); q, k = per-head rmsnorm (qwen3); q, k = rope(pos)
 *   cache[layer, :, pos] = k, v
 *   a = softmax(q k^T * head_dim^-0.5) v        (GQA: head h reads kv head h / (n_head / n_head_kv))
 *   x += wo(a); h = rmsnorm(x); x += down(silu(gate) * up) with gate, up = gate_up(h)
 * The quantized products are the extension's own matmul (for one row: the fused decode kernels);
 * what this file adds is the small ops between them, which cost the Python path 50-150 us per layer
 * in torch calls. That Python path (LlamaModel.forward in vramfit/model/llama.py) is the reference,
 * and tests/test_cpu_layer.py compares the two.
 *
 * The descriptors are filled by vramfit/kernels/cpu/fused_decode.py through ctypes mirrors of the
 * structs below; every field is 8 bytes wide, so both sides lay them out alike. Scratch buffers are
 * the caller's, allocated once per model.
 *
 * Exactness against the Python path: rmsnorm (double sum), rope (products rounded apart, as torch's
 * complex multiply), the bias and residual adds round alike; attention and silu use their own exp
 * polynomial and summation order, so they differ from torch's in the last bits.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <string.h>
#include "qgemm.h"
#include "qlayer.h"

/* A product's weight as the matmul reads it, and the bias added to its outputs (or NULL). */
typedef struct {
    const uint8_t *data; /* (rows, row_nbytes) packed rows */
    const float *bias;   /* rows floats, or NULL */
    int64_t rows, row_nbytes, type;
} ql_weight;

#define QL_MAX_PARTS 3

/* One linear map whose stacked weight has runs of different types (q+k in one type, v in another):
 * the parts' outputs are adjacent. */
typedef struct {
    ql_weight part[QL_MAX_PARTS];
    int64_t nparts;
} ql_linear;

typedef struct {
    const float *attn_norm, *ffn_norm;
    const float *q_norm, *k_norm; /* head_dim floats each (qwen3), or NULL */
    ql_linear qkv, wo, gate_up, down;
} ql_layer;

typedef struct {
    int64_t n_layer, n_embd, n_ff, n_head, n_head_kv, head_dim, rope_dim;
    int64_t max_ctx; /* positions the score buffer holds per head */
    int64_t neox;    /* rope pairs: 0 adjacent (x0, x1), 1 NeoX (x_j, x_{j + rope_dim/2}) */
    double eps, scale;
    const ql_layer *layers;
    /* scratch */
    float *xn;     /* n_embd: normed input of qkv / gate_up */
    float *qkv;    /* (n_head + 2 n_head_kv) * head_dim: q | k | v */
    float *att;    /* n_head * head_dim: attention output */
    float *y;      /* n_embd: output of wo / down, before the residual add */
    float *ffn;    /* 2 * n_ff: gate | up; silu(gate) * up goes to the first half */
    float *scores; /* n_head * max_ctx */
} ql_model;

typedef int (*matmul_fn)(const qg_args *);

/* what one call gets: the token's state, the cache, the threads */
typedef struct {
    float *x;          /* residual stream, n_embd floats, updated in place */
    int64_t pos;       /* the token's position */
    const float *rope; /* rope_dim / 2 (cos, sin) pairs for pos */
    float *k, *v;      /* KV cache: (n_layer, n_head_kv, cache_ctx, head_dim) float32 each */
    int64_t cache_ctx;
    int nth;
    int (*matmul_parts)(const qg_args *parts, int nparts);
    /* silu(gate) * up: the Python path's SwiGLU kernel of the same instruction set, so both round alike */
    void (*swiglu)(const float *gu, float *out, int64_t rows, int64_t n_ff, int nthreads);
} ql_step;

/* Attention with at least this many multiply-adds per score pass is shared by the thread pool (the
 * worker spins between the layer's products, so it joins at once: at 9 heads of 64, 128 positions
 * take 4.9 us on one thread and 2.6 us on two); below it, handing over costs what it saves. */
#define ATTN_PARALLEL_MIN (1 << 15)

/* ------------------------------------------------------------------------------------------------
 * ops whose rounding must follow the Python path: compiled for plain x86-64 (no FMA to contract) */

/* out = x / sqrt(mean(x^2) + eps) * w; the sum in double as qgemm_module.c's rmsnorm (the squares of
 * floats are exact in double, so only the order of the adds differs, far below float resolution).
 * out may be x. */
static void rmsnorm(const float *x, const float *w, float *out, int64_t K, double eps) {
    double s[4] = {0.0, 0.0, 0.0, 0.0};
    int64_t i = 0;
    for (; i + 4 <= K; i += 4)
        for (int l = 0; l < 4; l++) s[l] += (double)x[i + l] * (double)x[i + l];
    for (; i < K; i++) s[0] += (double)x[i] * (double)x[i];
    const double sum = (s[0] + s[1]) + (s[2] + s[3]);
    const float scale = (float)(1.0 / sqrt(sum / (double)K + eps));
    for (i = 0; i < K; i++) out[i] = x[i] * scale * w[i];
}

/* adjacent pairs (x0, x1) of the first rope_dim dims of each head times (cos + i sin), as torch's
 * complex multiply: each product rounded, then added (never inlined into the FMA code below, where
 * the compiler would fuse them) */
static __attribute__((noinline)) void rope(float *x, int64_t heads, int64_t D, int64_t rope_dim, const float *rot,
                                           int64_t neox) {
    const int64_t half = rope_dim / 2, gap = neox ? half : 1, step = neox ? 1 : 2;
    for (int64_t h = 0; h < heads; h++) {
        float *xh = x + h * D;
        for (int64_t j = 0; j < half; j++) {
            float *pa = xh + j * step, *pb = pa + gap;
            const float a = *pa, b = *pb, c = rot[2 * j], s = rot[2 * j + 1];
            const float ac = a * c, bs = b * s, as = a * s, bc = b * c;
            *pa = ac - bs;
            *pb = as + bc;
        }
    }
}

static void add_to(float *x, const float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] += y[i];
}

/* ------------------------------------------------------------------------------------------------
 * attention and silu: AVX2 + FMA (the extension runs only where the CPU has them) */

#pragma GCC push_options
#pragma GCC target("avx2,fma")

#include "qmath_avx2.h"

typedef struct {
    const ql_model *m;
    const float *k, *v; /* this layer's cache, (n_head_kv, cache_ctx, head_dim) */
    int64_t cache_ctx, T;
    int64_t next; /* the next head to claim */
} attn_job;

static void attn_task(void *arg, int tid) {
    (void)tid;
    attn_job *job = (attn_job *)arg;
    const ql_model *m = job->m;
    const int64_t D = m->head_dim, group = m->n_head / m->n_head_kv;
    for (;;) {
        const int64_t h = __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED);
        if (h >= m->n_head) break;
        const int64_t kv = (h / group) * job->cache_ctx * D;
        attend_head(m->qkv + h * D, job->k + kv, job->v + kv, job->T, D, (float)m->scale,
                    m->scores + h * m->max_ctx, m->att + h * D);
    }
}

/* ------------------------------------------------------------------------------------------------
 * the layer */

/* out = x @ W^T (+ bias), the parts' outputs adjacent, in one pass of the kernels; 0 or the matmul's
 * error code */
static int linear(const ql_linear *lin, const float *x, int64_t K, float *out, const ql_step *s) {
    qg_args a[QL_MAX_PARTS];
    float *o = out;
    for (int64_t i = 0; i < lin->nparts; i++) {
        const ql_weight *w = &lin->part[i];
        a[i] = (qg_args){.x = x, .n = 1, .K = K, .w = w->data, .N = w->rows, .row_nbytes = w->row_nbytes,
                         .type = (int)w->type, .out = o, .nthreads = s->nth};
        o += w->rows;
    }
    const int rc = s->matmul_parts(a, (int)lin->nparts);
    if (rc) return rc;
    for (int64_t i = 0; i < lin->nparts; i++) {
        const ql_weight *w = &lin->part[i];
        if (w->bias) add_to(a[i].out, w->bias, w->rows);
    }
    return 0;
}

/* the new k, v go to the cache, then attention over positions 0..pos into m->att */
static void attention(const ql_model *m, int64_t layer, const ql_step *s) {
    const int64_t KV = m->n_head_kv, D = m->head_dim;
    const int64_t off = layer * KV * s->cache_ctx * D;
    const float *k = m->qkv + m->n_head * D, *v = k + KV * D;
    for (int64_t h = 0; h < KV; h++) {
        memcpy(s->k + off + (h * s->cache_ctx + s->pos) * D, k + h * D, (size_t)D * sizeof(float));
        memcpy(s->v + off + (h * s->cache_ctx + s->pos) * D, v + h * D, (size_t)D * sizeof(float));
    }
    attn_job job = {m, s->k + off, s->v + off, s->cache_ctx, s->pos + 1, 0};
    if (s->nth > 1 && job.T * m->n_head * D >= ATTN_PARALLEL_MIN)
        qg_parallel(attn_task, &job, s->nth);
    else
        attn_task(&job, 0);
}

static int decode_layer(const ql_model *m, int64_t layer, const ql_step *s) {
    const ql_layer *L = &m->layers[layer];
    const int64_t E = m->n_embd, H = m->n_head, KV = m->n_head_kv, D = m->head_dim, F = m->n_ff;
    float *q = m->qkv, *k = q + H * D;
    int rc;
    rmsnorm(s->x, L->attn_norm, m->xn, E, m->eps);
    if ((rc = linear(&L->qkv, m->xn, E, m->qkv, s))) return rc;
    if (L->q_norm) {
        for (int64_t h = 0; h < H; h++) rmsnorm(q + h * D, L->q_norm, q + h * D, D, m->eps);
        for (int64_t h = 0; h < KV; h++) rmsnorm(k + h * D, L->k_norm, k + h * D, D, m->eps);
    }
    rope(q, H, D, m->rope_dim, s->rope, m->neox);
    rope(k, KV, D, m->rope_dim, s->rope, m->neox);
    attention(m, layer, s);
    if ((rc = linear(&L->wo, m->att, H * D, m->y, s))) return rc;
    add_to(s->x, m->y, E);
    rmsnorm(s->x, L->ffn_norm, m->xn, E, m->eps);
    if ((rc = linear(&L->gate_up, m->xn, E, m->ffn, s))) return rc;
    s->swiglu(m->ffn, m->ffn, 1, F, 1);
    if ((rc = linear(&L->down, m->ffn, F, m->y, s))) return rc;
    add_to(s->x, m->y, E);
    return 0;
}

static int decode_layers(const ql_model *m, int64_t first, int64_t stop, const ql_step *s) {
    for (int64_t i = first; i < stop; i++) {
        const int rc = decode_layer(m, i, s);
        if (rc) return rc;
    }
    return 0;
}

#pragma GCC pop_options

/* ------------------------------------------------------------------------------------------------
 * Python entry points */

PyObject *ql_py_decode_layers(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError, "decode_layers(model_ptr, x_ptr, pos, rope_ptr, k_ptr, v_ptr, cache_ctx, "
                                         "first, stop, nthreads)");
        return NULL;
    }
    const ql_model *m = (const ql_model *)PyLong_AsVoidPtr(args[0]);
    ql_step s;
    s.x = (float *)PyLong_AsVoidPtr(args[1]);
    s.pos = PyLong_AsLongLong(args[2]);
    s.rope = (const float *)PyLong_AsVoidPtr(args[3]);
    s.k = (float *)PyLong_AsVoidPtr(args[4]);
    s.v = (float *)PyLong_AsVoidPtr(args[5]);
    s.cache_ctx = PyLong_AsLongLong(args[6]);
    const int64_t first = PyLong_AsLongLong(args[7]), stop = PyLong_AsLongLong(args[8]);
    s.nth = (int)PyLong_AsLong(args[9]);
    if (PyErr_Occurred()) return NULL;
    const int level = qg_level();
    if (level <= 0) {
        PyErr_SetString(PyExc_RuntimeError, "no supported CPU instruction set (needs AVX2 + FMA)");
        return NULL;
    }
    if (s.pos < 0 || s.pos >= s.cache_ctx || s.pos >= m->max_ctx) {
        PyErr_SetString(PyExc_ValueError, "decode_layers: position outside the cache");
        return NULL;
    }
    if (first < 0 || stop > m->n_layer || first > stop) {
        PyErr_SetString(PyExc_ValueError, "decode_layers: layers outside the model");
        return NULL;
    }
    s.matmul_parts = level >= 2 ? qg_matmul_parts_avx512 : qg_matmul_parts_avx2;
    s.swiglu = level >= 2 ? qg_swiglu_avx512 : qg_swiglu_avx2;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(qg_lock());
    rc = decode_layers(m, first, stop, &s);
    pthread_mutex_unlock(qg_lock());
    Py_END_ALLOW_THREADS
    if (rc) {
        PyErr_SetString(rc == 2 ? PyExc_MemoryError : PyExc_ValueError,
                        rc == 2 ? "qgemm: out of memory for scratch buffers" : "qgemm: unsupported type or row size");
        return NULL;
    }
    Py_RETURN_NONE;
}

PyObject *ql_py_struct_sizes(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    return Py_BuildValue("(nnnn)", (Py_ssize_t)sizeof(ql_weight), (Py_ssize_t)sizeof(ql_linear),
                         (Py_ssize_t)sizeof(ql_layer), (Py_ssize_t)sizeof(ql_model));
}
