"""Helpers of the Triton decoders (kernels.py): grids computed from polynomials, pointer casts, shift
tiles for word loads, bit-plane gathers and per-sub-block scaling."""

from __future__ import annotations

import triton
import triton.language as tl

# grids that are not a low-degree polynomial come from a float32 table in global memory (`tab_ptr`);
# compiled kernels may only read globals that are constexpr
TAB_IQ6 = tl.constexpr(0)  # iq6nl_values[0:64] (the shifted half is + 1)
TAB_IQ2KL = tl.constexpr(64)  # iq2kl pairs: entry 2 * index + e, e = 0, 1


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
def _sub32(dl, v, BN: tl.constexpr):
    """dl [BN, 8] group scales times v [BN, 256] values (group i = weights 32i..32i+31)."""
    y = tl.reshape(dl, (BN, 8, 1)) * tl.reshape(v, (BN, 8, 32))
    return tl.reshape(y, (BN, 256))


@triton.jit
def _nibble_planes(qs):
    """4-bit quants of a 256-weight block in IQ5_K/IQ6_K plane order, [BN, 256] int32: weight 32 * g + j
    is nibble g % 2 of byte qs[32 * (g // 2) + j] (qs: [BN, 1] byte pointers to the 128 bytes)."""
    p = tl.arange(0, 256)
    g, j = p // 32, p % 32
    return (tl.load(qs + (32 * (g // 2) + j)[None, :]).to(tl.int32) >> (4 * (g % 2))[None, :]) & 15


@triton.jit
def _shifted_sub16(dl, v, extra, step, BN: tl.constexpr):
    """IQK super-blocks: grid values v [BN, 256] plus `step` where bit k of extra [BN, 1] flags the
    shifted grid of sub-block k, times the sub-block scales dl [BN, 16]."""
    k = tl.arange(0, 16)
    shift = tl.reshape(((extra >> k[None, :]) & 1).to(tl.float32) * step, (BN, 16, 1))
    return _sub16(dl, tl.reshape(tl.reshape(v, (BN, 16, 16)) + shift, (BN, 256)), BN)
