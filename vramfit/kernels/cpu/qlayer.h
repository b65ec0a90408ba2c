/* vramfit fast CPU path: one decode step (one token) through every llama-family decoder layer, in C.
 * The Python entry points live in qlayer.c; qgemm_module.c puts them in the module's method table. */
#ifndef VRAMFIT_QLAYER_H
#define VRAMFIT_QLAYER_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>

/* from qgemm_module.c: the instruction-set level in use (0 none, 1 AVX2, 2 AVX-512 VNNI) and the
 * lock that serialises calls into the kernels (their scratch buffers are shared) */
int qg_level(void);
pthread_mutex_t *qg_lock(void);

/* decode_layers(model_ptr, x_ptr, pos, rope_ptr, k_ptr, v_ptr, cache_ctx, first, stop, nthreads) */
PyObject *ql_py_decode_layers(PyObject *self, PyObject *const *args, Py_ssize_t nargs);
/* layer_struct_sizes() -> (sizeof weight, linear, layer, model): the Python mirror checks its own */
PyObject *ql_py_struct_sizes(PyObject *self, PyObject *args);

#endif
