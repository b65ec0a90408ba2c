/* CPython binding of the quantized matrix-product kernels: `vramfit.kernels.cpu._qgemm`.
 *
 * Compiled without ISA flags; the AVX2 and AVX-512 bodies live in their own translation units and
 * are chosen here with __builtin_cpu_supports. Arguments are plain integers (tensor data pointers),
 * so a call costs well under a microsecond of binding overhead.
 *
 * Threads: a small pool of its own (not OpenMP). Between calls a worker spins for a short while,
 * then yields, then sleeps on a condition variable. The caller always works too, and a worker that
 * arrives after all the work is claimed just leaves: on a busy machine a descheduled worker costs
 * at most its own claimed share, never a barrier wait.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <time.h>
#include <xmmintrin.h>
#include "qgemm.h"
#include "qlayer.h"

static int detected = -1; /* 0 none, 1 AVX2, 2 AVX-512 VNNI */
static int level = -1;    /* the level in use (tests may lower it) */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static int detect(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) return 0;
    if (__builtin_cpu_supports("bmi2") && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vnni"))
        return 2;
    return 1;
#else
    return 0;
#endif
}

int64_t qg_row_nbytes(int type, int64_t K) {
    if (K <= 0 || K % 32) return 0;
    const int64_t b32 = K / 32, b256 = K / 256;
    const int k256 = K % 256 == 0;
    switch (type) {
    case QG_Q4_0: return 18 * b32;
    case QG_Q4_1: return 20 * b32;
    case QG_Q5_0: return 22 * b32;
    case QG_Q5_1: return 24 * b32;
    case QG_Q8_0: return 34 * b32;
    case QG_Q6_0: return 26 * b32;
    case QG_IQ4_NL: return 18 * b32;
    case QG_Q4_K: return k256 ? 144 * b256 : 0;
    case QG_Q5_K: return k256 ? 176 * b256 : 0;
    case QG_Q6_K: return k256 ? 210 * b256 : 0;
    case QG_IQ4_XS: return k256 ? 136 * b256 : 0;
    case QG_IQ4_K: return k256 ? 144 * b256 : 0;
    case QG_IQ4_KS: return k256 ? 4 + 136 * b256 : 0;
    case QG_IQ5_KS: return k256 ? 4 + 168 * b256 : 0;
    case QG_Q2_K: return k256 ? 84 * b256 : 0;
    case QG_Q3_K: return k256 ? 110 * b256 : 0;
    case QG_IQ2_K: return k256 ? 76 * b256 : 0;
    case QG_IQ3_K: return k256 ? 110 * b256 : 0;
    case QG_IQ5_K: return k256 ? 176 * b256 : 0;
    case QG_IQ6_K: return k256 ? 212 * b256 : 0;
    case QG_IQ2_KS: return k256 ? 2 + 70 * b256 : 0;
    case QG_IQ4_KSS: return k256 ? 4 + 128 * b256 : 0;
    case QG_IQ3_KS: return k256 ? 2 + 102 * b256 : 0;
    case QG_IQ2_KL: return k256 ? 2 + 86 * b256 : 0;
    default: return 0;
    }
}


/* ------------------------------------------------------------------------------------------------
 * thread pool */

#define POOL_MAX 64
#define SPIN_NS 30000   /* busy-wait this long for the next task (decode calls come every few us) */
#define YIELD_NS 200000 /* then yield the core (to other busy threads) until this long, then sleep */

static struct {
    pthread_t th[POOL_MAX];
    int nworkers;
    atomic_uint seq;     /* task number, bumped to publish a task */
    atomic_uint open;    /* the task number workers may still enter, 0 when closed */
    atomic_int active;   /* workers inside (or entering) the task */
    atomic_int sleepers; /* workers blocked on cv */
    qg_task task;
    void *arg;
    int want;
    pthread_mutex_t mu;
    pthread_cond_t cv;
} pool = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static unsigned wait_task(unsigned seen) {
    unsigned s;
    const int64_t t0 = now_ns();
    for (int i = 0;; i++) {
        if ((s = atomic_load(&pool.seq)) != seen) return s;
        if (i % 64) {
            _mm_pause();
            continue;
        }
        const int64_t dt = now_ns() - t0;
        if (dt < SPIN_NS) continue;
        if (dt < YIELD_NS) {
            sched_yield();
            continue;
        }
        pthread_mutex_lock(&pool.mu);
        atomic_fetch_add(&pool.sleepers, 1);
        while ((s = atomic_load(&pool.seq)) == seen) pthread_cond_wait(&pool.cv, &pool.mu);
        atomic_fetch_sub(&pool.sleepers, 1);
        pthread_mutex_unlock(&pool.mu);
        return s;
    }
}

static void *worker_main(void *p) {
    const int tid = (int)(intptr_t)p;
    unsigned seen = atomic_load(&pool.seq);
    for (;;) {
        seen = wait_task(seen);
        atomic_fetch_add(&pool.active, 1);
        /* enter only while the caller has not closed this task (it then waits for `active`) */
        if (atomic_load(&pool.open) == seen && tid < pool.want) pool.task(pool.arg, tid);
        atomic_fetch_sub(&pool.active, 1);
    }
    return NULL;
}

void qg_parallel(qg_task task, void *arg, int nth) {
    if (nth > POOL_MAX) nth = POOL_MAX;
    while (pool.nworkers < nth - 1) { /* workers 1..nth-1, started on first use */
        pthread_attr_t at;
        pthread_attr_init(&at);
        pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
        const int ok = pthread_create(&pool.th[pool.nworkers], &at, worker_main, (void *)(intptr_t)(pool.nworkers + 1)) == 0;
        pthread_attr_destroy(&at);
        if (!ok) break;
        pool.nworkers++;
    }
    if (nth > pool.nworkers + 1) nth = pool.nworkers + 1;
    if (nth <= 1) {
        task(arg, 0);
        return;
    }
    pool.task = task;
    pool.arg = arg;
    pool.want = nth;
    unsigned s = atomic_load(&pool.seq) + 1;
    if (s == 0) s = 1; /* 0 means closed */
    atomic_store(&pool.open, s);
    atomic_store(&pool.seq, s);
    if (atomic_load(&pool.sleepers) > 0) {
        pthread_mutex_lock(&pool.mu);
        pthread_cond_broadcast(&pool.cv);
        pthread_mutex_unlock(&pool.mu);
    }
    task(arg, 0);
    atomic_store(&pool.open, 0);
    while (atomic_load(&pool.active) > 0) _mm_pause();
}

int qg_level(void) { return level; }
pthread_mutex_t *qg_lock(void) { return &lock; }

static PyObject *py_cpu_level(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    return PyLong_FromLong(level);
}

static PyObject *py_set_level(PyObject *self, PyObject *arg) {
    (void)self;
    long want = PyLong_AsLong(arg);
    if (want == -1 && PyErr_Occurred()) return NULL;
    level = want < 0 || want > detected ? detected : (int)want;
    return PyLong_FromLong(level);
}

static PyObject *py_row_nbytes(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "row_nbytes(type_id, K)");
        return NULL;
    }
    long type = PyLong_AsLong(args[0]);
    long long K = PyLong_AsLongLong(args[1]);
    if (PyErr_Occurred()) return NULL;
    return PyLong_FromLongLong(qg_row_nbytes((int)type, K));
}

/* matmul(x_ptr, n, K, w_ptr, N, row_nbytes, type_id, out_ptr, nthreads) */
static PyObject *py_matmul(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 9) {
        PyErr_SetString(PyExc_TypeError, "matmul expects 9 integer arguments");
        return NULL;
    }
    qg_args a;
    a.x = (const float *)PyLong_AsVoidPtr(args[0]);
    a.n = PyLong_AsLongLong(args[1]);
    a.K = PyLong_AsLongLong(args[2]);
    a.w = (const uint8_t *)PyLong_AsVoidPtr(args[3]);
    a.N = PyLong_AsLongLong(args[4]);
    a.row_nbytes = PyLong_AsLongLong(args[5]);
    a.type = (int)PyLong_AsLong(args[6]);
    a.out = (float *)PyLong_AsVoidPtr(args[7]);
    a.nthreads = (int)PyLong_AsLong(args[8]);
    if (PyErr_Occurred()) return NULL;
    if (level <= 0) {
        PyErr_SetString(PyExc_RuntimeError, "no supported CPU instruction set (needs AVX2 + FMA)");
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&lock);
    rc = level >= 2 ? qg_matmul_avx512(&a) : qg_matmul_avx2(&a);
    pthread_mutex_unlock(&lock);
    Py_END_ALLOW_THREADS
    if (rc) {
        PyErr_SetString(rc == 2 ? PyExc_MemoryError : PyExc_ValueError,
                        rc == 2 ? "qgemm: out of memory for scratch buffers"
                                : "qgemm: unsupported type or row size");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* matmul_parts(x_ptr, n, K, ((w_ptr, N, row_nbytes, type_id, out_ptr), ...), nthreads): several
 * products of the same activations in one pass of the kernels (at most 4 parts) */
static PyObject *py_matmul_parts(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 5 || !PyTuple_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "matmul_parts(x_ptr, n, K, parts tuple, nthreads)");
        return NULL;
    }
    const Py_ssize_t np = PyTuple_GET_SIZE(args[3]);
    if (np < 1 || np > 4) {
        PyErr_SetString(PyExc_ValueError, "matmul_parts takes 1 to 4 parts");
        return NULL;
    }
    qg_args a[4];
    for (Py_ssize_t i = 0; i < np; i++) {
        PyObject *t = PyTuple_GET_ITEM(args[3], i);
        if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 5) {
            PyErr_SetString(PyExc_TypeError, "a part is (w_ptr, N, row_nbytes, type_id, out_ptr)");
            return NULL;
        }
        a[i].x = (const float *)PyLong_AsVoidPtr(args[0]);
        a[i].n = PyLong_AsLongLong(args[1]);
        a[i].K = PyLong_AsLongLong(args[2]);
        a[i].w = (const uint8_t *)PyLong_AsVoidPtr(PyTuple_GET_ITEM(t, 0));
        a[i].N = PyLong_AsLongLong(PyTuple_GET_ITEM(t, 1));
        a[i].row_nbytes = PyLong_AsLongLong(PyTuple_GET_ITEM(t, 2));
        a[i].type = (int)PyLong_AsLong(PyTuple_GET_ITEM(t, 3));
        a[i].out = (float *)PyLong_AsVoidPtr(PyTuple_GET_ITEM(t, 4));
        a[i].nthreads = (int)PyLong_AsLong(args[4]);
    }
    if (PyErr_Occurred()) return NULL;
    if (level <= 0) {
        PyErr_SetString(PyExc_RuntimeError, "no supported CPU instruction set (needs AVX2 + FMA)");
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&lock);
    rc = level >= 2 ? qg_matmul_parts_avx512(a, (int)np) : qg_matmul_parts_avx2(a, (int)np);
    pthread_mutex_unlock(&lock);
    Py_END_ALLOW_THREADS
    if (rc) {
        PyErr_SetString(rc == 2 ? PyExc_MemoryError : PyExc_ValueError,
                        rc == 2 ? "qgemm: out of memory for scratch buffers"
                                : "qgemm: unsupported type or row size");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* rmsnorm(x_ptr, w_ptr, out_ptr, rows, K, eps): out = x / sqrt(mean(x^2) + eps) * w, row by row.
 * The sum of squares is accumulated in double, as ggml does. One call replaces torch's composite
 * rms_norm (several ops, ~10 us each decode step on these shapes). */
static PyObject *py_rmsnorm(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "rmsnorm expects 6 arguments");
        return NULL;
    }
    const float *x = (const float *)PyLong_AsVoidPtr(args[0]);
    const float *w = (const float *)PyLong_AsVoidPtr(args[1]);
    float *out = (float *)PyLong_AsVoidPtr(args[2]);
    long long rows = PyLong_AsLongLong(args[3]);
    long long K = PyLong_AsLongLong(args[4]);
    double eps = PyFloat_AsDouble(args[5]);
    if (PyErr_Occurred()) return NULL;
    for (long long r = 0; r < rows; r++) {
        const float *xr = x + r * K;
        float *yr = out + r * K;
        double sum = 0.0;
        for (long long i = 0; i < K; i++) sum += (double)xr[i] * (double)xr[i];
        const float scale = (float)(1.0 / sqrt(sum / (double)K + eps));
        for (long long i = 0; i < K; i++) yr[i] = xr[i] * scale * w[i];
    }
    Py_RETURN_NONE;
}

/* attention(q, k, v, out, n, start, n_heads, n_kv_heads, head_dim, kv_head_stride, scale, nthreads) */
static PyObject *py_attention(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 12) {
        PyErr_SetString(PyExc_TypeError, "attention expects 12 arguments");
        return NULL;
    }
    qg_attn_args a;
    a.q = (const float *)PyLong_AsVoidPtr(args[0]);
    a.k = (const float *)PyLong_AsVoidPtr(args[1]);
    a.v = (const float *)PyLong_AsVoidPtr(args[2]);
    a.out = (float *)PyLong_AsVoidPtr(args[3]);
    a.n = PyLong_AsLongLong(args[4]);
    a.start = PyLong_AsLongLong(args[5]);
    a.n_heads = PyLong_AsLongLong(args[6]);
    a.n_kv_heads = PyLong_AsLongLong(args[7]);
    a.head_dim = PyLong_AsLongLong(args[8]);
    a.kv_head_stride = PyLong_AsLongLong(args[9]);
    a.scale = (float)PyFloat_AsDouble(args[10]);
    a.nthreads = (int)PyLong_AsLong(args[11]);
    if (PyErr_Occurred()) return NULL;
    if (level < 1) {
        PyErr_SetString(PyExc_RuntimeError, "the attention kernel needs AVX2");
        return NULL;
    }
    /* one query: the decode step's own routine on every ISA; a batch: flash attention on AVX-512 */
    const int wide = level >= 2 && a.n > 1 && a.head_dim % 16 == 0 && a.head_dim <= 256;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&lock);
    rc = wide ? qg_attention_avx512(&a) : qg_attention_avx2(&a);
    pthread_mutex_unlock(&lock);
    Py_END_ALLOW_THREADS
    if (rc) {
        PyErr_SetString(rc == 2 ? PyExc_MemoryError : PyExc_ValueError,
                        rc == 2 ? "attention: out of memory" : "attention: unsupported shape");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* swiglu(gu_ptr, out_ptr, rows, n_ff, nthreads) */
static PyObject *py_swiglu(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "swiglu expects 5 arguments");
        return NULL;
    }
    const float *gu = (const float *)PyLong_AsVoidPtr(args[0]);
    float *out = (float *)PyLong_AsVoidPtr(args[1]);
    long long rows = PyLong_AsLongLong(args[2]), n_ff = PyLong_AsLongLong(args[3]);
    int nth = (int)PyLong_AsLong(args[4]);
    if (PyErr_Occurred()) return NULL;
    if (level < 1) {
        PyErr_SetString(PyExc_RuntimeError, "swiglu needs AVX2");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&lock);
    (level >= 2 ? qg_swiglu_avx512 : qg_swiglu_avx2)(gu, out, rows, n_ff, nth);
    pthread_mutex_unlock(&lock);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* conv_silu(state_ptr, x_ptr, ldx, wt_ptr, out_ptr, T, C, K, nthreads) */
static PyObject *py_conv_silu(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 9) {
        PyErr_SetString(PyExc_TypeError, "conv_silu expects 9 arguments");
        return NULL;
    }
    const float *state = (const float *)PyLong_AsVoidPtr(args[0]), *x = (const float *)PyLong_AsVoidPtr(args[1]);
    long long ldx = PyLong_AsLongLong(args[2]);
    const float *wt = (const float *)PyLong_AsVoidPtr(args[3]);
    float *out = (float *)PyLong_AsVoidPtr(args[4]);
    long long T = PyLong_AsLongLong(args[5]), C = PyLong_AsLongLong(args[6]);
    int K = (int)PyLong_AsLong(args[7]), nth = (int)PyLong_AsLong(args[8]);
    if (PyErr_Occurred()) return NULL;
    if (level < 1 || K < 1 || K > QG_CONV_MAX_K || T < 0 || C < 1 || ldx < C) {
        PyErr_SetString(PyExc_RuntimeError, "conv_silu needs AVX2 and 1 <= K <= 16");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&lock);
    (level >= 2 ? qg_conv_silu_avx512 : qg_conv_silu_avx2)(state, x, ldx, wt, out, T, C, K, nth);
    pthread_mutex_unlock(&lock);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* delta_step(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, state_ptr, out_ptr, H, n_k, d_k, d_v, nthreads) */
static PyObject *py_delta_step(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 12) {
        PyErr_SetString(PyExc_TypeError, "delta_step expects 12 arguments");
        return NULL;
    }
    const float *p[5];
    for (int i = 0; i < 5; i++) p[i] = (const float *)PyLong_AsVoidPtr(args[i]);
    float *state = (float *)PyLong_AsVoidPtr(args[5]), *out = (float *)PyLong_AsVoidPtr(args[6]);
    long long H = PyLong_AsLongLong(args[7]), nk = PyLong_AsLongLong(args[8]);
    long long dk = PyLong_AsLongLong(args[9]), dv = PyLong_AsLongLong(args[10]);
    int nth = (int)PyLong_AsLong(args[11]);
    if (PyErr_Occurred()) return NULL;
    if (level < 1 || H < 1 || nk < 1 || H % nk || dk < 1 || dv < 1 || dv > QG_DELTA_MAX_DV) {
        PyErr_SetString(PyExc_RuntimeError, "delta_step needs AVX2, H a multiple of n_k and d_v <= 1024");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&lock);
    (level >= 2 ? qg_delta_step_avx512 : qg_delta_step_avx2)(p[0], p[1], p[2], p[3], p[4], state, out, H, nk, dk, dv, nth);
    pthread_mutex_unlock(&lock);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"rmsnorm", (PyCFunction)(void (*)(void))py_rmsnorm, METH_FASTCALL,
     "rmsnorm(x_ptr, w_ptr, out_ptr, rows, K, eps)"},
    {"cpu_level", py_cpu_level, METH_NOARGS, "0 none, 1 AVX2, 2 AVX-512 VNNI (the level in use)"},
    {"set_level", py_set_level, METH_O, "use at most this level (tests); returns the level in use"},
    {"row_nbytes", (PyCFunction)(void (*)(void))py_row_nbytes, METH_FASTCALL,
     "bytes per packed row for (type_id, K); 0 when unsupported"},
    {"matmul", (PyCFunction)(void (*)(void))py_matmul, METH_FASTCALL,
     "matmul(x_ptr, n, K, w_ptr, N, row_nbytes, type_id, out_ptr, nthreads)"},
    {"matmul_parts", (PyCFunction)(void (*)(void))py_matmul_parts, METH_FASTCALL,
     "matmul_parts(x_ptr, n, K, ((w_ptr, N, row_nbytes, type_id, out_ptr), ...), nthreads)"},
    {"swiglu", (PyCFunction)(void (*)(void))py_swiglu, METH_FASTCALL, "swiglu(gu_ptr, out_ptr, rows, n_ff, nthreads)"},
    {"delta_step", (PyCFunction)(void (*)(void))py_delta_step, METH_FASTCALL,
     "delta_step(q, k, v, g, beta, state, out, H, n_k, d_k, d_v, nthreads): one token of the delta rule"},
    {"conv_silu", (PyCFunction)(void (*)(void))py_conv_silu, METH_FASTCALL,
     "conv_silu(state_ptr, x_ptr, ldx, wt_ptr, out_ptr, T, C, K, nthreads): causal depthwise conv + SiLU"},
    {"attention", (PyCFunction)(void (*)(void))py_attention, METH_FASTCALL,
     "attention(q, k, v, out, n, start, n_heads, n_kv_heads, head_dim, kv_head_stride, scale, nthreads)"},
    {"decode_layers", (PyCFunction)(void (*)(void))ql_py_decode_layers, METH_FASTCALL,
     "decode_layers(model_ptr, x_ptr, pos, rope_ptr, k_ptr, v_ptr, cache_ctx, first, stop, nthreads)"},
    {"layer_struct_sizes", ql_py_struct_sizes, METH_NOARGS, "sizes of the decode_layers descriptors"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "_qgemm", NULL, -1, methods};

PyMODINIT_FUNC PyInit__qgemm(void) {
    detected = detect();
    level = detected;
    return PyModule_Create(&moduledef);
}
