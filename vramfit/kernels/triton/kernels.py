"""Triton kernels: fused dequantize-and-multiply straight from packed GGUF rows.

One kernel, `_qmm_kernel`, computes `out[m, n] = sum_k x[m, k] * W[n, k]` where W's rows are the packed
rows of a GGUF tensor. Each program owns BLOCK_N output rows and BLOCK_M activation rows and walks K in
chunks of 256 weights (one super-block, or eight 32-weight legacy blocks). Per chunk a type-specific
decoder (`_dq_<type>`: dq_kquants.py, dq_iqk.py; helpers in common.py) reads the packed bytes of its
rows exactly once and returns the float32 weights [BLOCK_N, 256] in natural column order, so the
activation tile is one contiguous load. The first decoders read 32-bit (or, where the block size only
guarantees 2-byte alignment, 16-bit) words and split them with shifts broadcast over a small
multi-dimensional tile; the later ones gather bytes per weight. Non-linear grids are computed, not
looked up, where a low-degree polynomial rounded to the nearest integer reproduces the table exactly
(`_iq4_grid`, `_iq5_grid`, `_iq3_grid`, `_iq2_grid`); iq6_k's and iq2_kl's come from a small table.

Two ways of multiplying the decoded tile (constexpr MODE):

- MODE 0, one activation row (decode batch 1): float32 products accumulated element-wise in a
  [BLOCK_N, 256] register tile, reduced once at the end; UNROLL=2 decodes two chunks per iteration
  so that twice the bytes are in flight.
- MODE 2, several rows (decode batch 2..8 with the batch padded to a 16-row tile, and prefill): the
  tile is converted to fp16 (bf16 when the activations are bf16) and fed to `tl.dot` with float32
  accumulation. Each program still reads its weights once for all of its activation rows.

Byte layouts follow the reference decoders in vramfit/quant (legacy.py, kquants.py, iq4.py, iqk.py,
iqk_ks.py) and shared/docs/iqk-formats.md section 3; those decoders are the test oracle.
"""

from __future__ import annotations

import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------------
# type table: name -> (code, row_meta bytes, bytes per block, weights per block)

TYPES: dict[str, tuple[int, int, int, int]] = {
    "iq4_ks": (0, 4, 136, 256),
    "q4_k": (1, 0, 144, 256),
    "q6_k": (2, 0, 210, 256),
    "q8_0": (3, 0, 34, 32),
    "q5_0": (4, 0, 22, 32),
    "q4_1": (5, 0, 20, 32),
    "iq4_k": (6, 0, 144, 256),
    "iq5_ks": (7, 4, 168, 256),
    "iq4_xs": (8, 0, 136, 256),
    "q4_0": (9, 0, 18, 32),
    "q5_k": (10, 0, 176, 256),
    "q5_1": (11, 0, 24, 32),
    "iq4_nl": (12, 0, 18, 32),
    "iq3_k": (13, 0, 110, 256),
    "iq2_k": (14, 0, 76, 256),
    "iq5_k": (15, 0, 176, 256),
    "iq2_ks": (16, 2, 70, 256),
    "iq3_ks": (17, 2, 102, 256),
    "q2_k": (18, 0, 84, 256),
    "q3_k": (19, 0, 110, 256),
    "iq4_kss": (20, 4, 128, 256),
    "iq6_k": (21, 0, 212, 256),
    "iq2_kl": (22, 2, 86, 256),
    "q6_0": (23, 0, 26, 32),
}


from vramfit.kernels.triton.dq_iqk import (  # noqa: E402
    _dq_iq2_k,
    _dq_iq2_kl,
    _dq_iq2_ks,
    _dq_iq3_k,
    _dq_iq3_ks,
    _dq_iq4_k,
    _dq_iq4_ks,
    _dq_iq4_kss,
    _dq_iq4_xs,
    _dq_iq5_k,
    _dq_iq5_ks,
    _dq_iq6_k,
)  # fmt: skip
from vramfit.kernels.triton.dq_kquants import (  # noqa: E402
    _dq_iq4_nl,
    _dq_q2_k,
    _dq_q3_k,
    _dq_q4_0,
    _dq_q4_1,
    _dq_q4_k,
    _dq_q5_0,
    _dq_q5_1,
    _dq_q5_k,
    _dq_q6_0,
    _dq_q6_k,
    _dq_q8_0,
)  # fmt: skip


@triton.jit
def _dequant(QT: tl.constexpr, wrow, c, nb, tab, BN: tl.constexpr):
    if QT == 0:
        w = _dq_iq4_ks(wrow, c, BN)
    elif QT == 1:
        w = _dq_q4_k(wrow, c, BN)
    elif QT == 2:
        w = _dq_q6_k(wrow, c, BN)
    elif QT == 3:
        w = _dq_q8_0(wrow, c, nb, BN)
    elif QT == 4:
        w = _dq_q5_0(wrow, c, nb, BN)
    elif QT == 5:
        w = _dq_q4_1(wrow, c, nb, BN)
    elif QT == 6:
        w = _dq_iq4_k(wrow, c, BN)
    elif QT == 7:
        w = _dq_iq5_ks(wrow, c, BN)
    elif QT == 8:
        w = _dq_iq4_xs(wrow, c, BN)
    elif QT == 9:
        w = _dq_q4_0(wrow, c, nb, BN)
    elif QT == 10:
        w = _dq_q5_k(wrow, c, BN)
    elif QT == 11:
        w = _dq_q5_1(wrow, c, nb, BN)
    elif QT == 13:
        w = _dq_iq3_k(wrow, c, BN)
    elif QT == 14:
        w = _dq_iq2_k(wrow, c, BN)
    elif QT == 15:
        w = _dq_iq5_k(wrow, c, BN)
    elif QT == 16:
        w = _dq_iq2_ks(wrow, c, BN)
    elif QT == 17:
        w = _dq_iq3_ks(wrow, c, BN)
    elif QT == 18:
        w = _dq_q2_k(wrow, c, BN)
    elif QT == 19:
        w = _dq_q3_k(wrow, c, BN)
    elif QT == 20:
        w = _dq_iq4_kss(wrow, c, BN)
    elif QT == 21:
        w = _dq_iq6_k(wrow, c, tab, BN)
    elif QT == 22:
        w = _dq_iq2_kl(wrow, c, tab, BN)
    elif QT == 23:
        w = _dq_q6_0(wrow, c, nb, BN)
    else:
        w = _dq_iq4_nl(wrow, c, nb, BN)
    return w


# ---------------------------------------------------------------------------------------------
# the product


@triton.jit
def _qmm_kernel(
    x_ptr,
    w_ptr,
    o_ptr,
    tab_ptr,  # float32 grid tables (TAB_*), read by the types whose grid is not a polynomial
    M,
    N,
    K,
    nb,  # blocks per row (of the type's block size)
    row_bytes,
    stride_xm,
    stride_om,
    QT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MODE: tl.constexpr,
    DOT_BF16: tl.constexpr,
    UNROLL: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(rn, N - 1)  # clamped: every load stays in bounds; the store is masked
    wrow = w_ptr + rows.to(tl.int64) * row_bytes  # [BLOCK_N] byte pointers
    kk = tl.arange(0, 256)
    n_chunks = tl.cdiv(K, 256)
    if MODE == 0:
        acc = tl.zeros((BLOCK_N, 256), tl.float32)
        for c0 in range(0, n_chunks, UNROLL):
            if UNROLL == 2:
                # both chunks' loads are issued before either is used; an odd last chunk re-reads the
                # final chunk (in bounds) against zero activations
                c1 = tl.minimum(c0 + 1, n_chunks - 1)
                w0 = _dequant(QT, wrow, c0, nb, tab_ptr, BLOCK_N)
                w1 = _dequant(QT, wrow, c1, nb, tab_ptr, BLOCK_N)
                k0 = c0 * 256 + kk
                k1 = (c0 + 1) * 256 + kk
                x0 = tl.load(x_ptr + k0, mask=k0 < K, other=0.0).to(tl.float32)
                x1 = tl.load(x_ptr + k1, mask=k1 < K, other=0.0).to(tl.float32)
                acc += w0 * x0[None, :] + w1 * x1[None, :]
            else:
                w = _dequant(QT, wrow, c0, nb, tab_ptr, BLOCK_N)
                k = c0 * 256 + kk
                xv = tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)
                acc += w * xv[None, :]
        out = tl.sum(acc, axis=1)
        tl.store(o_ptr + rn, out, mask=rn < N)
    else:
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mmask = rm < M
        xrow = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for c in range(n_chunks):
            w = _dequant(QT, wrow, c, nb, tab_ptr, BLOCK_N)
            k = c * 256 + kk
            xt = tl.load(xrow + k[None, :], mask=mmask[:, None] & (k < K)[None, :], other=0.0)
            if DOT_BF16:
                acc = tl.dot(xt.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)), acc)
            else:
                acc = tl.dot(xt.to(tl.float16), tl.trans(w.to(tl.float16)), acc)
        optr = o_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
        tl.store(optr, acc, mask=mmask[:, None] & (rn < N)[None, :])
