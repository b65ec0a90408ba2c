/* CPython binding of the C quantization encoders: `vramfit.quant._cenc`.
 *
 * encode(name, x_ptr, rows, n, imatrix_ptr (0: none), out_ptr, nthreads) encodes float32 rows
 * (rows, n), contiguous, into packed rows; rows are split over OpenMP threads. Arguments are plain
 * integers (tensor data pointers); vramfit/quant/fast.py checks shapes and dtypes.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#include "cenc.h"
#include "cenc_int.h"

int ce_use_avx2 = 0;

static const ce_type TYPES[] = {
    {"iq4_ks", 256, 4, 136, ce_iq4_ks_row},
    {"iq5_ks", 256, 4, 168, ce_iq5_ks_row},
    {"iq4_k", 256, 0, 144, ce_iq4_k_row},
    {"iq5_k", 256, 0, 176, ce_iq5_k_row},
    {"q8_0", 32, 0, 34, ce_q8_0_row},
    {"q4_0", 32, 0, 18, ce_q4_0_row},
    {"q5_0", 32, 0, 22, ce_q5_0_row},
    {"q6_0", 32, 0, 26, ce_q6_0_row},
    {"iq4_nl", 32, 0, 18, ce_iq4_nl_row},
    {"iq4_xs", 256, 0, 136, ce_iq4_xs_row},
    {"q6_k", 256, 0, 210, ce_q6_k_row},
};
#define NTYPES ((int)(sizeof(TYPES) / sizeof(TYPES[0])))

static const ce_type *find_type(const char *name) {
    for (int i = 0; i < NTYPES; i++)
        if (!strcmp(TYPES[i].name, name)) return &TYPES[i];
    return NULL;
}

static int64_t row_nbytes(const ce_type *t, int64_t n) {
    if (n <= 0 || n % t->block) return 0;
    return t->row_meta + (n / t->block) * t->block_bytes;
}

static PyObject *py_types(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    PyObject *out = PyList_New(NTYPES);
    if (!out) return NULL;
    for (int i = 0; i < NTYPES; i++) PyList_SET_ITEM(out, i, PyUnicode_FromString(TYPES[i].name));
    return out;
}

static PyObject *py_row_nbytes(PyObject *self, PyObject *args) {
    (void)self;
    const char *name;
    long long n;
    if (!PyArg_ParseTuple(args, "sL", &name, &n)) return NULL;
    const ce_type *t = find_type(name);
    return PyLong_FromLongLong(t ? row_nbytes(t, n) : 0);
}

static int set_simd(long want) {
    int have = 0;
#if defined(__x86_64__)
    __builtin_cpu_init();
    have = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    ce_use_avx2 = want && have;
    return ce_use_avx2;
}

static PyObject *py_set_simd(PyObject *self, PyObject *arg) {
    (void)self;
    long want = PyLong_AsLong(arg);
    if (want == -1 && PyErr_Occurred()) return NULL;
    return PyLong_FromLong(set_simd(want));
}

static PyObject *py_simd(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    return PyLong_FromLong(ce_use_avx2);
}

static PyObject *py_encode(PyObject *self, PyObject *args) {
    (void)self;
    const char *name;
    PyObject *xo, *io, *oo;
    long long rows, n;
    int nthreads;
    if (!PyArg_ParseTuple(args, "sOLLOOi", &name, &xo, &rows, &n, &io, &oo, &nthreads)) return NULL;
    const float *x = (const float *)PyLong_AsVoidPtr(xo);
    const float *imat = (const float *)PyLong_AsVoidPtr(io);
    uint8_t *out = (uint8_t *)PyLong_AsVoidPtr(oo);
    if (PyErr_Occurred()) return NULL;
    const ce_type *t = find_type(name);
    if (!t) {
        PyErr_Format(PyExc_ValueError, "_cenc: no C encoder for %s", name);
        return NULL;
    }
    const int64_t nbytes = row_nbytes(t, n);
    if (!nbytes || rows < 0) {
        PyErr_Format(PyExc_ValueError, "_cenc: bad row length %lld for %s", n, name);
        return NULL;
    }
    if (nthreads < 1) nthreads = 1;
    if (nthreads > rows) nthreads = rows > 0 ? (int)rows : 1;
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (long long r = 0; r < rows; r++) t->fn(x + r * n, n, imat, out + r * nbytes);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"types", py_types, METH_NOARGS, "names of the types with a C encoder"},
    {"row_nbytes", py_row_nbytes, METH_VARARGS, "row_nbytes(name, n): bytes per packed row (0: unsupported)"},
    {"set_simd", py_set_simd, METH_O, "set_simd(flag): use the AVX2 search where the CPU has it; returns it"},
    {"simd", py_simd, METH_NOARGS, "1 when the AVX2 search is in use"},
    {"encode", py_encode, METH_VARARGS, "encode(name, x_ptr, rows, n, imatrix_ptr, out_ptr, nthreads)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "_cenc", NULL, -1, methods};

PyMODINIT_FUNC PyInit__cenc(void) {
    ce_iqk_init();
    ce_legacy_init();
    set_simd(1);
    return PyModule_Create(&moduledef);
}
