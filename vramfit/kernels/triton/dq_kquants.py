"""Triton decoders of the k-quants (q2_K ... q6_K) and the 32-weight legacy blocks (q4_0 ... q8_0,
q6_0, iq4_nl): one 256-weight chunk of BN rows -> float32 [BN, 256] (see kernels.py)."""

from __future__ import annotations

import triton
import triton.language as tl

from vramfit.kernels.triton.common import (
    _as_f16,
    _as_u16,
    _as_u32,
    _iq4_grid,
    _k4_words,
    _nib_shifts,
    _nib_shifts16,
    _shifts3,
    _sub16,
    _two_bit_planes,
)  # fmt: skip


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
