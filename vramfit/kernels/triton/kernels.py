"""Triton kernels: fused dequantize-and-multiply straight from packed GGUF rows.

One kernel, `_qmm_kernel`, computes `out[m, n] = sum_k x[m, k] * W[n, k]` where W's rows are the packed
rows of a GGUF tensor. Each program owns BLOCK_N output rows and BLOCK_M activation rows and walks K in
chunks of 256 weights (one super-block, or eight 32-weight legacy blocks). Per chunk a type-specific
decoder (`_dq_<type>`) reads the packed bytes of its rows exactly once, as 32-bit (or, where the block
size only guarantees 2-byte alignment, 16-bit) words, splits them into quants with shifts broadcast
over a small multi-dimensional tile, applies the block scales and returns the float32 weights
[BLOCK_N, 256] in natural column order, so the activation tile is one contiguous load. Non-linear
grids (IQ4/IQ5 values) are computed, not looked up: a low-degree polynomial rounded to the nearest
integer reproduces each table exactly (`_iq4_grid`, `_iq5_grid`).

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
# grids that are not a low-degree polynomial come from a float32 table in global memory (`tab_ptr`):
TAB_IQ6 = 0  # iq6nl_values[0:64] (the shifted half is + 1)
TAB_IQ2KL = 64  # iq2kl pairs: entry 2 * index + e, e = 0, 1


# ---------------------------------------------------------------------------------------------
# small helpers


@triton.jit
def _iq4_grid(q):
    """iq4k_values[q] for q in 0..15 (== kvalues_iq4nl) without a table: a quartic rounded to nearest.

    The float32 polynomial is within 0.434 of every grid value (checked for all 16 indices, with and
    without fused multiply-adds), so rounding recovers the table exactly. A table gather would cost a
    load per weight and, in the prefill loop, get software-pipelined through shared memory.
    """
    x = q.to(tl.float32)
    p = (((0.0015862766886129975 * x + 0.031077679246664047) * x - 1.3718183040618896) * x
         + 24.173368453979492) * x - 126.56681823730469  # fmt: skip
    return tl.floor(p + 0.5)


@triton.jit
def _iq5_grid(q):
    """iq5nl_values[q] for q in 0..31: a cubic within 0.394 of every value, rounded to nearest."""
    x = q.to(tl.float32)
    p = ((0.009517045691609383 * x - 0.4375) * x + 12.378267288208008) * x - 125.75
    return tl.floor(p + 0.5)


@triton.jit
def _iq3_grid(q):
    """iq3nl_values[q] for q in 0..7: a cubic within 0.34 of every value, rounded to nearest."""
    x = q.to(tl.float32)
    p = ((0.36616161465644836 * x - 4.136363506317139) * x + 26.742063522338867) * x - 62.969696044921875
    return tl.floor(p + 0.5)


@triton.jit
def _iq2_grid(q):
    """iq2nl_values[q] for q in 0..3: x^3 - 5x^2 + 22x - 31, exact in float32."""
    x = q.to(tl.float32)
    return ((x - 5.0) * x + 22.0) * x - 31.0


@triton.jit
def _as_u32(p):
    return p.to(tl.pointer_type(tl.int32))


@triton.jit
def _as_u16(p):
    return p.to(tl.pointer_type(tl.uint16))


@triton.jit
def _as_f16(p):
    return p.to(tl.pointer_type(tl.float16))


@triton.jit
def _shifts3(A: tl.constexpr, B: tl.constexpr, C: tl.constexpr, SA: tl.constexpr, SC: tl.constexpr):
    """int32 [1, A, B, 1, C] tensor with value SA*a + SC*c, to be broadcast over a word tile."""
    a = tl.arange(0, A)
    c = tl.arange(0, C)
    s = SA * a[:, None] + SC * c[None, :]  # [A, C]
    return tl.reshape(s, (1, A, 1, 1, C)) + tl.zeros((1, A, B, 1, C), tl.int32)


@triton.jit
def _nib_shifts():
    """[1, 1, 2, 1, 4]: 4*hi + 8*byte, the shift of nibble `hi` of byte `byte` within a 32-bit word."""
    h = tl.arange(0, 2)
    b = tl.arange(0, 4)
    s = 4 * h[:, None] + 8 * b[None, :]
    return tl.reshape(s, (1, 1, 2, 1, 4))


@triton.jit
def _nib_shifts16():
    """[1, 1, 2, 1, 2]: 4*hi + 8*byte within a 16-bit word."""
    h = tl.arange(0, 2)
    b = tl.arange(0, 2)
    s = 4 * h[:, None] + 8 * b[None, :]
    return tl.reshape(s, (1, 1, 2, 1, 2))


@triton.jit
def _iq4_words(blk, BN: tl.constexpr):
    """Nibbles of qs[128] at `blk` ([BN, 1] byte pointers, 4-byte aligned) in the IQ4/legacy order.

    Returns int32 [BN, 8, 2, 4, 4] holding nibble `hi` of byte 16*g + 4*w + b: for the IQ4_KS/IQ4_XS
    layout that is weight 32*g + 16*hi + 4*w + b, i.e. natural order after a reshape to [BN, 256].
    """
    ar = tl.arange(0, 32)
    words = tl.load(_as_u32(blk) + ar[None, :])  # [BN, 32]
    w5 = tl.reshape(words, (BN, 8, 1, 4, 1))
    return (w5 >> _nib_shifts()) & 15


@triton.jit
def _k4_words(blk, BN: tl.constexpr):
    """Nibbles of qs[128] in the Q4_K/IQ5_KS order: int32 [BN, 4, 2, 8, 4].

    Element (c, hi, w, b) is nibble `hi` of byte 32*c + 4*w + b: weight 64*c + 32*hi + 4*w + b.
    """
    ar = tl.arange(0, 32)
    words = tl.load(_as_u32(blk) + ar[None, :])  # [BN, 32]
    w5 = tl.reshape(words, (BN, 4, 1, 8, 1))
    return (w5 >> _nib_shifts()) & 15


# ---------------------------------------------------------------------------------------------
# decoders: each returns float32 [BN, 256] (natural column order) for chunk `c` of the rows `wrow`


@triton.jit
def _dq_iq4_ks(wrow, c, BN: tl.constexpr):
    # row: f32 d_row | blocks of 136: scales[8] | qs[128]
    drow = tl.load(wrow.to(tl.pointer_type(tl.float32)))  # [BN]
    blk = (wrow + 4 + c * 136)[:, None]  # [BN, 1]
    s = tl.load(blk + tl.arange(0, 8)[None, :]).to(tl.int32)  # [BN, 8]
    L = (s & 0xFE) - 127
    dl = drow[:, None] * L.to(tl.float32)  # f32(d_row * L)
    q = _iq4_words(blk + 8, BN)  # [BN, 8, 2, 4, 4]
    v = _iq4_grid(q) + tl.reshape((s & 1).to(tl.float32) * 4.0, (BN, 8, 1, 1, 1))  # shifted grid: +4
    y = tl.reshape(dl, (BN, 8, 1, 1, 1)) * v
    return tl.reshape(y, (BN, 256))


@triton.jit
def _dq_iq4_xs(wrow, c, BN: tl.constexpr):
    # block 136: d f16 | scales_h u16 | scales_l[4] | qs[128]
    blk = (wrow + c * 136)[:, None]
    d = tl.load(_as_f16(blk)).to(tl.float32)  # [BN, 1]
    ib = tl.arange(0, 8)
    sh = tl.load(_as_u16(blk + 2)).to(tl.int32)  # [BN, 1]
    sl = tl.load(blk + 4 + (ib // 2)[None, :]).to(tl.int32)  # [BN, 8]
    ls = ((sl >> (4 * (ib % 2))[None, :]) & 15) | (((sh >> (2 * ib)[None, :]) & 3) << 4)
    dl = d * (ls - 32).to(tl.float32)
    q = _iq4_words(blk + 8, BN)
    v = _iq4_grid(q)
    y = tl.reshape(dl, (BN, 8, 1, 1, 1)) * v
    return tl.reshape(y, (BN, 256))


@triton.jit
def _dq_iq4_k(wrow, c, BN: tl.constexpr):
    # block 144: d f16 | extra u16 | scales_h[4] | scales_l[8] | qs[128]; 16 sub-blocks of 16
    blk = (wrow + c * 144)[:, None]
    d = tl.load(_as_f16(blk)).to(tl.float32)  # [BN, 1]
    extra = tl.load(_as_u16(blk + 2)).to(tl.int32)  # [BN, 1]
    k = tl.arange(0, 16)
    hb = tl.load(blk + 4 + (k // 4)[None, :]).to(tl.int32)  # [BN, 16]
    lb = tl.load(blk + 8 + (k // 2)[None, :]).to(tl.int32)
    L = (((lb >> (4 * (k % 2))[None, :]) & 15) | (((hb >> (2 * (k % 4))[None, :]) & 3) << 4)) - 32
    dl = d * L.to(tl.float32)  # [BN, 16]
    shift = ((extra >> k[None, :]) & 1).to(tl.float32)
    q = _iq4_words(blk + 16, BN)  # sub-block 2*g + hi, position 4*w + b
    v = _iq4_grid(q) + tl.reshape(shift * 4.0, (BN, 8, 2, 1, 1))
    y = tl.reshape(dl, (BN, 8, 2, 1, 1)) * v
    return tl.reshape(y, (BN, 256))


@triton.jit
def _two_bit_planes(qs, BN: tl.constexpr):
    """2-bit quants of a 256-weight block in Q2_K plane order, [BN, 256] int32: weight 32 * b + j is
    bits 2 * (b % 4) of byte qs[32 * (b // 4) + j] (qs: [BN, 1] byte pointers to the 64 bytes)."""
    p = tl.arange(0, 256)
    b, j = p // 32, p % 32
    q = tl.load(qs + (32 * (b // 4) + j)[None, :]).to(tl.int32)
    return (q >> (2 * (b % 4))[None, :]) & 3


@triton.jit
def _sub16(dl, v, BN: tl.constexpr):
    """dl [BN, 16] sub-block scales times v [BN, 256] values (sub-block k = weights 16k..16k+15)."""
    y = tl.reshape(dl, (BN, 16, 1)) * tl.reshape(v, (BN, 16, 16))
    return tl.reshape(y, (BN, 256))


@triton.jit
def _dq_iq3_k(wrow, c, BN: tl.constexpr):
    # block 110: d f16 | extra u16 | scales_h u16 (sign bits) | scales_l[8] | qs[64] | qh[32]
    blk = (wrow + c * 110)[:, None]
    d = tl.load(_as_f16(blk)).to(tl.float32)
    extra = tl.load(_as_u16(blk + 2)).to(tl.int32)
    signs = tl.load(_as_u16(blk + 4)).to(tl.int32)
    k = tl.arange(0, 16)
    lb = tl.load(blk + 6 + (k // 2)[None, :]).to(tl.int32)
    m = (lb >> (4 * (k % 2))[None, :]) & 15
    L = (2 * m + 1) * (1 - 2 * ((signs >> k[None, :]) & 1))
    dl = d * L.to(tl.float32)  # [BN, 16]
    p = tl.arange(0, 256)
    hi = (tl.load(blk + 78 + (p % 32)[None, :]).to(tl.int32) >> (p // 32)[None, :]) & 1  # bit b of qh[j]
    v = _iq3_grid(_two_bit_planes(blk + 14, BN) | (hi << 2))
    shift = tl.reshape(((extra >> k[None, :]) & 1).to(tl.float32) * 4.0, (BN, 16, 1))
    v = tl.reshape(tl.reshape(v, (BN, 16, 16)) + shift, (BN, 256))
    return _sub16(dl, v, BN)


@triton.jit
def _dq_iq2_k(wrow, c, BN: tl.constexpr):
    # block 76: d f16 | extra u16 | scales[8] (4-bit, L = nibble - 8) | qs[64]
    blk = (wrow + c * 76)[:, None]
    d = tl.load(_as_f16(blk)).to(tl.float32)
    extra = tl.load(_as_u16(blk + 2)).to(tl.int32)
    k = tl.arange(0, 16)
    lb = tl.load(blk + 4 + (k // 2)[None, :]).to(tl.int32)
    dl = d * (((lb >> (4 * (k % 2))[None, :]) & 15) - 8).to(tl.float32)
    v = _iq2_grid(_two_bit_planes(blk + 12, BN))
    shift = tl.reshape(((extra >> k[None, :]) & 1).to(tl.float32) * 5.0, (BN, 16, 1))
    v = tl.reshape(tl.reshape(v, (BN, 16, 16)) + shift, (BN, 256))
    return _sub16(dl, v, BN)


@triton.jit
def _sub32(dl, v, BN: tl.constexpr):
    """dl [BN, 8] group scales times v [BN, 256] values (group i = weights 32i..32i+31)."""
    y = tl.reshape(dl, (BN, 8, 1)) * tl.reshape(v, (BN, 8, 32))
    return tl.reshape(y, (BN, 256))


@triton.jit
def _dq_iq5_k(wrow, c, BN: tl.constexpr):
    # block 176: d f16 | extra u16 | scales_h[4] | scales_l[8] | qs[128] (nibble planes) | qh[32]
    blk = (wrow + c * 176)[:, None]
    d = tl.load(_as_f16(blk)).to(tl.float32)
    extra = tl.load(_as_u16(blk + 2)).to(tl.int32)
    k = tl.arange(0, 16)
    hb = tl.load(blk + 4 + (k // 4)[None, :]).to(tl.int32)
    lb = tl.load(blk + 8 + (k // 2)[None, :]).to(tl.int32)
    L = (((lb >> (4 * (k % 2))[None, :]) & 15) | (((hb >> (2 * (k % 4))[None, :]) & 3) << 4)) - 32
    dl = d * L.to(tl.float32)
    p = tl.arange(0, 256)
    g, j = p // 32, p % 32  # weight 32g + j: nibble g % 2 of qs[32 (g // 2) + j], bit g of qh[j]
    nib = (tl.load(blk + 16 + (32 * (g // 2) + j)[None, :]).to(tl.int32) >> (4 * (g % 2))[None, :]) & 15
    hi = (tl.load(blk + 144 + j[None, :]).to(tl.int32) >> g[None, :]) & 1
    v = _iq5_grid(nib | (hi << 4))
    shift = tl.reshape(((extra >> k[None, :]) & 1).to(tl.float32) * 2.0, (BN, 16, 1))
    v = tl.reshape(tl.reshape(v, (BN, 16, 16)) + shift, (BN, 256))
    return _sub16(dl, v, BN)


@triton.jit
def _dq_iq2_ks(wrow, c, BN: tl.constexpr):
    # row: f16 d_row | blocks of 70: extra u16 (bits 0-7 shifts, 8-15 scale bit 4) | scales[4] | qs[64]
    drow = tl.load(_as_f16(wrow)).to(tl.float32)
    blk = (wrow + 2 + c * 70)[:, None]
    extra = tl.load(_as_u16(blk)).to(tl.int32)
    i = tl.arange(0, 8)
    lb = tl.load(blk + 2 + (i // 2)[None, :]).to(tl.int32)
    L = (((lb >> (4 * (i % 2))[None, :]) & 15) | (((extra >> (8 + i)[None, :]) & 1) << 4)) - 16
    dl = drow[:, None] * L.to(tl.float32)  # f32(d_row * L)
    shift = tl.reshape(((extra >> i[None, :]) & 1).to(tl.float32) * 5.0, (BN, 8, 1))
    v = tl.reshape(_iq2_grid(_two_bit_planes(blk + 6, BN)), (BN, 8, 32)) + shift
    return _sub32(dl, tl.reshape(v, (BN, 256)), BN)


@triton.jit
def _dq_iq3_ks(wrow, c, BN: tl.constexpr):
    # row: f16 d_row | blocks of 102: extra u16 (bits 0-7 scale bit 4, 8-15 shifts) | scales[4] | qs[64]
    # | qh[32]; group i's scale is nibble i // 4 of scales[i % 4]
    drow = tl.load(_as_f16(wrow)).to(tl.float32)
    blk = (wrow + 2 + c * 102)[:, None]
    extra = tl.load(_as_u16(blk)).to(tl.int32)
    i = tl.arange(0, 8)
    lb = tl.load(blk + 2 + (i % 4)[None, :]).to(tl.int32)
    L = (((lb >> (4 * (i // 4))[None, :]) & 15) | (((extra >> i[None, :]) & 1) << 4)) - 16
    dl = drow[:, None] * L.to(tl.float32)
    p = tl.arange(0, 256)
    hi = (tl.load(blk + 70 + (p % 32)[None, :]).to(tl.int32) >> (p // 32)[None, :]) & 1
    v = _iq3_grid(_two_bit_planes(blk + 6, BN) | (hi << 2))
    shift = tl.reshape(((extra >> (8 + i)[None, :]) & 1).to(tl.float32) * 4.0, (BN, 8, 1))
    v = tl.reshape(v, (BN, 8, 32)) + shift
    return _sub32(dl, tl.reshape(v, (BN, 256)), BN)


@triton.jit
def _dq_q2_k(wrow, c, BN: tl.constexpr):
    # block 84: scales[16] (low nibble scale, high nibble min) | qs[64] | d f16 | dmin f16
    blk = (wrow + c * 84)[:, None]
    d = tl.load(_as_f16(blk + 80)).to(tl.float32)
    dmin = tl.load(_as_f16(blk + 82)).to(tl.float32)
    sc = tl.load(blk + tl.arange(0, 16)[None, :]).to(tl.int32)  # [BN, 16]
    dl = tl.reshape(d * (sc & 15).to(tl.float32), (BN, 16, 1))
    ml = tl.reshape(dmin * (sc >> 4).to(tl.float32), (BN, 16, 1))
    q = tl.reshape(_two_bit_planes(blk + 16, BN).to(tl.float32), (BN, 16, 16))
    return tl.reshape(dl * q - ml, (BN, 256))


@triton.jit
def _dq_q3_k(wrow, c, BN: tl.constexpr):
    # block 110: hmask[32] | qs[64] | scales[12] (16 six-bit, minus 32) | d f16
    blk = (wrow + c * 110)[:, None]
    d = tl.load(_as_f16(blk + 108)).to(tl.float32)
    k = tl.arange(0, 16)
    lo = (tl.load(blk + 96 + (k % 8)[None, :]).to(tl.int32) >> (4 * (k // 8))[None, :]) & 15
    hi = (tl.load(blk + 104 + (k % 4)[None, :]).to(tl.int32) >> (2 * (k // 4))[None, :]) & 3
    dl = d * ((lo | (hi << 4)) - 32).to(tl.float32)  # [BN, 16]
    p = tl.arange(0, 256)
    hbit = (tl.load(blk + (p % 32)[None, :]).to(tl.int32) >> (p // 32)[None, :]) & 1  # bit k of hmask[l]
    q = _two_bit_planes(blk + 32, BN) - 4 + 4 * hbit
    return _sub16(dl, q.to(tl.float32), BN)


@triton.jit
def _dq_iq4_kss(wrow, c, BN: tl.constexpr):
    # row: f32 d_row | blocks of 64 u16 words, 8 per 32-weight group i: bit 0 of word k is bit k of the
    # group's IQ4_KS scale byte; a = word & ~1, a ^ (a >> 1) = IQ4_KS qs bytes 2k (low), 2k+1 (high)
    drow = tl.load(wrow.to(tl.pointer_type(tl.float32)))
    blk = (wrow + 4 + c * 128)[:, None]
    words = tl.load(_as_u16(blk) + tl.arange(0, 64)[None, :]).to(tl.int32)  # [BN, 64]
    kbit = tl.arange(0, 64) % 8
    ls = tl.sum(tl.reshape((words & 1) << kbit[None, :], (BN, 8, 8)), axis=2)  # [BN, 8]
    dl = drow[:, None] * ((ls & 0xFE) - 127).to(tl.float32)
    t = tl.arange(0, 256)
    i, b, h = t // 32, t % 16, (t % 32) // 16  # group, IQ4_KS byte, nibble
    a = tl.load(_as_u16(blk) + (8 * i + b // 2)[None, :]).to(tl.int32) & 0xFFFE
    v = a ^ (a >> 1)
    q = (v >> (8 * (b % 2) + 4 * h)[None, :]) & 15
    shift = tl.reshape((ls & 1).to(tl.float32) * 4.0, (BN, 8, 1))
    y = tl.reshape(_iq4_grid(q), (BN, 8, 32)) + shift
    return _sub32(dl, tl.reshape(y, (BN, 256)), BN)


@triton.jit
def _dq_iq6_k(wrow, c, tab, BN: tl.constexpr):
    # block 212: d f16 | extra u16 | int8 scales[16] | qs[128] (nibble planes) | qh[64] (2-bit planes)
    blk = (wrow + c * 212)[:, None]
    d = tl.load(_as_f16(blk)).to(tl.float32)
    extra = tl.load(_as_u16(blk + 2)).to(tl.int32)
    k = tl.arange(0, 16)
    L = tl.load((blk + 4 + k[None, :]).to(tl.pointer_type(tl.int8))).to(tl.float32)
    dl = d * L  # [BN, 16]
    p = tl.arange(0, 256)
    g, j = p // 32, p % 32  # nibble g % 2 of qs[32 (g // 2) + j], bits 2 (g % 4) of qh[32 (g // 4) + j]
    nib = (tl.load(blk + 20 + (32 * (g // 2) + j)[None, :]).to(tl.int32) >> (4 * (g % 2))[None, :]) & 15
    hi = (tl.load(blk + 148 + (32 * (g // 4) + j)[None, :]).to(tl.int32) >> (2 * (g % 4))[None, :]) & 3
    v = tl.load(tab + TAB_IQ6 + (nib | (hi << 4)))
    shift = tl.reshape(((extra >> k[None, :]) & 1).to(tl.float32), (BN, 16, 1))
    v = tl.reshape(tl.reshape(v, (BN, 16, 16)) + shift, (BN, 256))
    return _sub16(dl, v, BN)


@triton.jit
def _dq_iq2_kl(wrow, c, tab, BN: tl.constexpr):
    # row: f16 d_row | blocks of 86: scales_h u16 | scales_l[4] | qs[64] | qh[16]; group ib's scale is
    # (nibble ib // 4 of scales_l[ib % 4] | 2 bits ib of scales_h << 4) - 32; each 5-bit index (low
    # nibble ib % 2 of qs[16 (ib // 2) + jj], high bit ib of qh[jj]) gives weights 2 jj and 2 jj + 1
    drow = tl.load(_as_f16(wrow)).to(tl.float32)
    blk = (wrow + 2 + c * 86)[:, None]
    sh = tl.load(_as_u16(blk)).to(tl.int32)
    ib = tl.arange(0, 8)
    sl = (tl.load(blk + 2 + (ib % 4)[None, :]).to(tl.int32) >> (4 * (ib // 4))[None, :]) & 15
    dl = drow[:, None] * ((sl | (((sh >> (2 * ib)[None, :]) & 3) << 4)) - 32).to(tl.float32)
    t = tl.arange(0, 256)
    g, jj, e = t // 32, (t % 32) // 2, t % 2
    lo = (tl.load(blk + 6 + (16 * (g // 2) + jj)[None, :]).to(tl.int32) >> (4 * (g % 2))[None, :]) & 15
    hi = (tl.load(blk + 70 + jj[None, :]).to(tl.int32) >> g[None, :]) & 1
    v = tl.load(tab + TAB_IQ2KL + 2 * (lo | (hi << 4)) + e[None, :])
    return _sub32(dl, v, BN)


@triton.jit
def _dq_iq5_ks(wrow, c, BN: tl.constexpr):
    # row: f32 d_row | blocks of 168: scales[8] | qs[128] | qh[32]
    drow = tl.load(wrow.to(tl.pointer_type(tl.float32)))
    blk = (wrow + 4 + c * 168)[:, None]
    s = tl.load(blk + tl.arange(0, 8)[None, :]).to(tl.int32)  # [BN, 8], sub-block ib = 2*p + hi
    L = (s & 0xFE) - 127
    dl = drow[:, None] * L.to(tl.float32)
    low = _k4_words(blk + 8, BN)  # [BN, 4, 2, 8, 4]: (p, hi, w, b) -> weight 32*(2p+hi) + 4w + b
    qh = tl.load(_as_u32(blk + 136) + tl.arange(0, 8)[None, :])  # [BN, 8]: bytes j = 4w + b
    hs = _shifts3(4, 2, 4, 2, 8)  # [1, 4, 2, 1, 4] = 2p + 8b, then + hi below
    hi_idx = tl.reshape(tl.arange(0, 2), (1, 1, 2, 1, 1))
    high = (tl.reshape(qh, (BN, 1, 1, 8, 1)) >> (hs + hi_idx)) & 1  # bit ib of qh[j]
    shift = tl.reshape((s & 1).to(tl.float32) * 2.0, (BN, 4, 2, 1, 1))  # shifted grid: +2
    v = _iq5_grid(low | (high << 4)) + shift
    y = tl.reshape(dl, (BN, 4, 2, 1, 1)) * v
    return tl.reshape(y, (BN, 256))


@triton.jit
def _k4_scale_min(blk, BN: tl.constexpr):
    """ggml get_scale_min_k4 for the 8 sub-blocks: (sc, m) int32 [BN, 8] from scales[12] at blk + 4."""
    j = tl.arange(0, 8)
    sj = tl.load(blk + 4 + j[None, :]).to(tl.int32)
    sj4 = tl.load(blk + 4 + tl.minimum(j + 4, 11)[None, :]).to(tl.int32)
    sjm = tl.load(blk + 4 + tl.maximum(j - 4, 0)[None, :]).to(tl.int32)
    first = (j < 4)[None, :]
    sc = tl.where(first, sj & 63, (sj4 & 15) | ((sjm >> 6) << 4))
    m = tl.where(first, sj4 & 63, (sj4 >> 4) | ((sj >> 6) << 4))
    return sc, m


@triton.jit
def _dq_q4_k(wrow, c, BN: tl.constexpr):
    # block 144: d f16 | dmin f16 | scales[12] | qs[128]
    blk = (wrow + c * 144)[:, None]
    d = tl.load(_as_f16(blk)).to(tl.float32)
    dmin = tl.load(_as_f16(blk + 2)).to(tl.float32)
    sc, m = _k4_scale_min(blk, BN)
    dl = tl.reshape(d * sc.to(tl.float32), (BN, 4, 2, 1, 1))  # sub-block 2c + hi
    ml = tl.reshape(dmin * m.to(tl.float32), (BN, 4, 2, 1, 1))
    q = _k4_words(blk + 16, BN).to(tl.float32)
    y = dl * q - ml
    return tl.reshape(y, (BN, 256))


@triton.jit
def _dq_q5_k(wrow, c, BN: tl.constexpr):
    # block 176: d f16 | dmin f16 | scales[12] | qh[32] | qs[128]; bit (2c+hi) of qh[j] is the 5th bit
    blk = (wrow + c * 176)[:, None]
    d = tl.load(_as_f16(blk)).to(tl.float32)
    dmin = tl.load(_as_f16(blk + 2)).to(tl.float32)
    sc, m = _k4_scale_min(blk, BN)
    dl = tl.reshape(d * sc.to(tl.float32), (BN, 4, 2, 1, 1))
    ml = tl.reshape(dmin * m.to(tl.float32), (BN, 4, 2, 1, 1))
    low = _k4_words(blk + 48, BN)
    qh = tl.load(_as_u32(blk + 16) + tl.arange(0, 8)[None, :])  # [BN, 8]
    hs = _shifts3(4, 2, 4, 2, 8)
    hi_idx = tl.reshape(tl.arange(0, 2), (1, 1, 2, 1, 1))
    high = (tl.reshape(qh, (BN, 1, 1, 8, 1)) >> (hs + hi_idx)) & 1
    q = (low | (high << 4)).to(tl.float32)
    y = dl * q - ml
    return tl.reshape(y, (BN, 256))


@triton.jit
def _dq_q6_k(wrow, c, BN: tl.constexpr):
    # block 210: ql[128] | qh[64] | scales int8[16] | d f16 (2-byte aligned: 16-bit words)
    blk = (wrow + c * 210)[:, None]
    d = tl.load(_as_f16(blk + 208)).to(tl.float32)  # [BN, 1]
    ql = tl.load(_as_u16(blk) + tl.arange(0, 64)[None, :]).to(tl.int32)  # word 32h + 16t + w
    qh = tl.load(_as_u16(blk + 128) + tl.arange(0, 32)[None, :]).to(tl.int32)  # word 16h + w
    # tile (h, hi, t, w, b): weight 128h + 64hi + 32t + 2w + b
    hi = tl.reshape(tl.arange(0, 2), (1, 1, 2, 1, 1, 1))
    t = tl.reshape(tl.arange(0, 2), (1, 1, 1, 2, 1, 1))
    b = tl.reshape(tl.arange(0, 2), (1, 1, 1, 1, 1, 2))
    lo = (tl.reshape(ql, (BN, 2, 1, 2, 16, 1)) >> (4 * hi + 8 * b)) & 15
    hb = (tl.reshape(qh, (BN, 2, 1, 1, 16, 1)) >> (8 * b + 2 * t + 4 * hi)) & 3
    q = (lo | (hb << 4)) - 32
    sc = tl.load(blk.to(tl.pointer_type(tl.int8)) + 192 + tl.arange(0, 16)[None, :]).to(tl.float32)
    dl = d * sc  # [BN, 16]
    y = tl.reshape(dl, (BN, 16, 1)) * tl.reshape(q, (BN, 16, 16)).to(tl.float32)
    return tl.reshape(y, (BN, 256))


# legacy types: a chunk is 8 blocks of 32; blocks past the row end are masked


@triton.jit
def _legacy_blocks(wrow, c, nb, SIZE: tl.constexpr):
    ib = c * 8 + tl.arange(0, 8)
    valid = (ib < nb)[None, :]  # [1, 8]
    blk = wrow[:, None] + (tl.minimum(ib, nb - 1) * SIZE)[None, :]  # [BN, 8] (clamped: always in bounds)
    return blk, valid


@triton.jit
def _dq_q8_0(wrow, c, nb, BN: tl.constexpr):
    # block 34: d f16 | qs int8[32]
    blk, valid = _legacy_blocks(wrow, c, nb, 34)
    d = tl.where(valid, tl.load(_as_f16(blk)).to(tl.float32), 0.0)  # [BN, 8]
    words = tl.load(_as_u16(blk + 2)[:, :, None] + tl.arange(0, 16)[None, None, :]).to(tl.int32)
    b = tl.reshape(tl.arange(0, 2), (1, 1, 1, 2))
    v = (tl.reshape(words, (BN, 8, 16, 1)) >> (8 * b)) & 255
    v = v - ((v & 128) << 1)  # sign-extend int8
    y = tl.reshape(d, (BN, 8, 1, 1)) * v.to(tl.float32)
    return tl.reshape(y, (BN, 256))


@triton.jit
def _legacy_nibbles16(p, BN: tl.constexpr):
    """qs[16] at byte pointers p [BN, 8] (2-byte aligned): int32 [BN, 8, 2, 8, 2], weight 16*hi + 2w + b."""
    words = tl.load(_as_u16(p)[:, :, None] + tl.arange(0, 8)[None, None, :]).to(tl.int32)  # [BN, 8, 8]
    return (tl.reshape(words, (BN, 8, 1, 8, 1)) >> _nib_shifts16()) & 15


@triton.jit
def _legacy_nibbles32(p, BN: tl.constexpr):
    """qs[16] at byte pointers p [BN, 8] (4-byte aligned): int32 [BN, 8, 2, 4, 4], weight 16*hi + 4w + b."""
    words = tl.load(_as_u32(p)[:, :, None] + tl.arange(0, 4)[None, None, :])  # [BN, 8, 4]
    return (tl.reshape(words, (BN, 8, 1, 4, 1)) >> _nib_shifts()) & 15


@triton.jit
def _dq_q4_0(wrow, c, nb, BN: tl.constexpr):
    # block 18: d f16 | qs[16]; y = d * (q - 8)
    blk, valid = _legacy_blocks(wrow, c, nb, 18)
    d = tl.where(valid, tl.load(_as_f16(blk)).to(tl.float32), 0.0)
    q = _legacy_nibbles16(blk + 2, BN) - 8
    y = q.to(tl.float32) * tl.reshape(d, (BN, 8, 1, 1, 1))
    return tl.reshape(y, (BN, 256))


@triton.jit
def _dq_iq4_nl(wrow, c, nb, BN: tl.constexpr):
    # block 18: d f16 | qs[16]; y = d * kvalues_iq4nl[q]
    blk, valid = _legacy_blocks(wrow, c, nb, 18)
    d = tl.where(valid, tl.load(_as_f16(blk)).to(tl.float32), 0.0)
    v = _iq4_grid(_legacy_nibbles16(blk + 2, BN))
    y = tl.reshape(d, (BN, 8, 1, 1, 1)) * v
    return tl.reshape(y, (BN, 256))


@triton.jit
def _dq_q6_0(wrow, c, nb, BN: tl.constexpr):
    # block 26: d f16 | qh[8] | qs[16]; weight w: low nibble w // 16 of qs[w % 16], high 2 bits
    # (qh[w % 8] >> 2k) & 3 with k = 0, 2, 1, 3 for w // 8 = 0..3; y = d * (q - 32)
    blk, valid = _legacy_blocks(wrow, c, nb, 26)
    d = tl.where(valid, tl.load(_as_f16(blk)).to(tl.float32), 0.0)  # [BN, 8]
    w = tl.arange(0, 32)
    lo = (tl.load(blk[:, :, None] + 10 + (w % 16)[None, None, :]).to(tl.int32) >> (4 * (w // 16))) & 15
    k = (w // 8 % 2) * 2 + w // 16
    hi = (tl.load(blk[:, :, None] + 2 + (w % 8)[None, None, :]).to(tl.int32) >> (2 * k)) & 3
    y = tl.reshape(d, (BN, 8, 1)) * ((lo | (hi << 4)) - 32).to(tl.float32)  # [BN, 8, 32]
    return tl.reshape(y, (BN, 256))


@triton.jit
def _dq_q4_1(wrow, c, nb, BN: tl.constexpr):
    # block 20: d f16 | m f16 | qs[16]; y = d * q + m
    blk, valid = _legacy_blocks(wrow, c, nb, 20)
    d = tl.where(valid, tl.load(_as_f16(blk)).to(tl.float32), 0.0)
    m = tl.where(valid, tl.load(_as_f16(blk + 2)).to(tl.float32), 0.0)
    q = _legacy_nibbles32(blk + 4, BN).to(tl.float32)
    y = q * tl.reshape(d, (BN, 8, 1, 1, 1)) + tl.reshape(m, (BN, 8, 1, 1, 1))
    return tl.reshape(y, (BN, 256))


@triton.jit
def _q5_high(qh, BN: tl.constexpr, NW: tl.constexpr, NB: tl.constexpr):
    """Bit k of qh [BN, 8] for weight k = 16*hi + NB*w + b, as int32 [BN, 8, 2, NW, NB] (0 or 16)."""
    hi = tl.reshape(tl.arange(0, 2), (1, 1, 2, 1, 1))
    w = tl.reshape(tl.arange(0, NW), (1, 1, 1, NW, 1))
    b = tl.reshape(tl.arange(0, NB), (1, 1, 1, 1, NB))
    return ((tl.reshape(qh, (BN, 8, 1, 1, 1)) >> (16 * hi + NB * w + b)) & 1) << 4


@triton.jit
def _dq_q5_0(wrow, c, nb, BN: tl.constexpr):
    # block 22: d f16 | qh u32 (2-byte aligned) | qs[16]; y = d * (q - 16)
    blk, valid = _legacy_blocks(wrow, c, nb, 22)
    d = tl.where(valid, tl.load(_as_f16(blk)).to(tl.float32), 0.0)
    qh = tl.load(_as_u16(blk + 2)).to(tl.int32) | (tl.load(_as_u16(blk + 4)).to(tl.int32) << 16)
    q = (_legacy_nibbles16(blk + 6, BN) | _q5_high(qh, BN, 8, 2)) - 16
    y = q.to(tl.float32) * tl.reshape(d, (BN, 8, 1, 1, 1))
    return tl.reshape(y, (BN, 256))


@triton.jit
def _dq_q5_1(wrow, c, nb, BN: tl.constexpr):
    # block 24: d f16 | m f16 | qh u32 | qs[16]; y = d * q + m
    blk, valid = _legacy_blocks(wrow, c, nb, 24)
    d = tl.where(valid, tl.load(_as_f16(blk)).to(tl.float32), 0.0)
    m = tl.where(valid, tl.load(_as_f16(blk + 2)).to(tl.float32), 0.0)
    qh = tl.load(_as_u16(blk + 4)).to(tl.int32) | (tl.load(_as_u16(blk + 6)).to(tl.int32) << 16)
    q = (_legacy_nibbles32(blk + 8, BN) | _q5_high(qh, BN, 4, 4)).to(tl.float32)
    y = q * tl.reshape(d, (BN, 8, 1, 1, 1)) + tl.reshape(m, (BN, 8, 1, 1, 1))
    return tl.reshape(y, (BN, 256))


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
