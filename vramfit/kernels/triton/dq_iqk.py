"""Triton decoders of ik_llama.cpp's IQK types (iq2_k ... iq6_k, iq4_xs, and the row-scale
iq2_ks ... iq5_ks, iq2_kl): one 256-weight chunk of BN rows -> float32 [BN, 256] (see kernels.py)."""

from __future__ import annotations

import triton
import triton.language as tl

from vramfit.kernels.triton.common import (
    TAB_IQ2KL,
    TAB_IQ6,
    _as_f16,
    _as_u16,
    _as_u32,
    _iq2_grid,
    _iq3_grid,
    _iq4_grid,
    _iq4_words,
    _iq5_grid,
    _k4_words,
    _nibble_planes,
    _shifted_sub16,
    _shifts3,
    _sub32,
    _two_bit_planes,
)  # fmt: skip


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
def _six_bit_scales(blk):
    """IQ4_K/IQ5_K sub-block scales [BN, 16]: (nibble k % 2 of scales_l[k // 2] | 2 bits k % 4 of
    scales_h[k // 4] << 4) - 32, with scales_h at byte 4 and scales_l at byte 8 of the block."""
    k = tl.arange(0, 16)
    hb = tl.load(blk + 4 + (k // 4)[None, :]).to(tl.int32)
    lb = tl.load(blk + 8 + (k // 2)[None, :]).to(tl.int32)
    return (((lb >> (4 * (k % 2))[None, :]) & 15) | (((hb >> (2 * (k % 4))[None, :]) & 3) << 4)) - 32


@triton.jit
def _dq_iq4_k(wrow, c, BN: tl.constexpr):
    # block 144: d f16 | extra u16 | scales_h[4] | scales_l[8] | qs[128]; 16 sub-blocks of 16
    blk = (wrow + c * 144)[:, None]
    d = tl.load(_as_f16(blk)).to(tl.float32)  # [BN, 1]
    extra = tl.load(_as_u16(blk + 2)).to(tl.int32)  # [BN, 1]
    k = tl.arange(0, 16)
    dl = d * _six_bit_scales(blk).to(tl.float32)  # [BN, 16]
    shift = ((extra >> k[None, :]) & 1).to(tl.float32)
    q = _iq4_words(blk + 16, BN)  # sub-block 2*g + hi, position 4*w + b
    v = _iq4_grid(q) + tl.reshape(shift * 4.0, (BN, 8, 2, 1, 1))
    y = tl.reshape(dl, (BN, 8, 2, 1, 1)) * v
    return tl.reshape(y, (BN, 256))


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
    return _shifted_sub16(dl, v, extra, 4.0, BN)


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
    return _shifted_sub16(dl, v, extra, 5.0, BN)


@triton.jit
def _dq_iq5_k(wrow, c, BN: tl.constexpr):
    # block 176: d f16 | extra u16 | scales_h[4] | scales_l[8] | qs[128] (nibble planes) | qh[32]
    blk = (wrow + c * 176)[:, None]
    d = tl.load(_as_f16(blk)).to(tl.float32)
    extra = tl.load(_as_u16(blk + 2)).to(tl.int32)
    L = _six_bit_scales(blk)
    dl = d * L.to(tl.float32)
    p = tl.arange(0, 256)
    g, j = p // 32, p % 32  # weight 32g + j: nibble g % 2 of qs[32 (g // 2) + j], bit g of qh[j]
    nib = _nibble_planes(blk + 16)
    hi = (tl.load(blk + 144 + j[None, :]).to(tl.int32) >> g[None, :]) & 1
    v = _iq5_grid(nib | (hi << 4))
    return _shifted_sub16(dl, v, extra, 2.0, BN)


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
    nib = _nibble_planes(blk + 20)
    hi = (tl.load(blk + 148 + (32 * (g // 4) + j)[None, :]).to(tl.int32) >> (2 * (g % 4))[None, :]) & 3
    v = tl.load(tab + TAB_IQ6 + (nib | (hi << 4)))
    return _shifted_sub16(dl, v, extra, 1.0, BN)


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
