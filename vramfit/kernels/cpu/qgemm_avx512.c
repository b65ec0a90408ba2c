/* AVX-512 (F, BW, VL, DQ) + VNNI build of the kernels, chosen at run time when the CPU has them. */
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c,bmi2")
#define QG_W 512
#define QG_SFX avx512
#include "qgemm_impl.h"
