/* AVX2 + FMA + F16C build of the kernels (any x86-64 since Haswell / Zen 1). */
#pragma GCC target("avx2,fma,f16c")
#define QG_W 256
#define QG_SFX avx2
#include "qgemm_impl.h"
