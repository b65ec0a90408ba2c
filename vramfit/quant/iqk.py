"""IQK super-block types of ik_llama.cpp: IQ2_K, IQ3_K, IQ4_K, IQ5_K, IQ6_K.

Each 256-weight super-block stores an fp16 scale `d`, a 16-bit `extra` word of grid-shift flags
(one per 16-weight sub-block) and 16 small integer sub-block scales. Layouts and dequantization
follow shared/docs/iqk-formats.md section 3 (ik_llama.cpp @ 8337e4cd, iqk_quantize.cpp); IQ6_K is
decoded with the integer table `iq6nl_values`, as the quantizer and GPU code use it (spec 0.8).
"""

from __future__ import annotations

import torch

from vramfit.quant import grids
from vramfit.quant.iqk_common import bits, dequant, f16_at, nibble_pairs, split_rows, u16_at
from vramfit.quant.registry import Codec, register


def _header(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, nb, bytes) -> (d (rows, nb, 1) float32, extra bits (rows, nb, 16) int32)."""
    d = f16_at(blocks[..., 0:2]).unsqueeze(-1)
    extra = bits(u16_at(blocks[..., 2:4]).squeeze(-1), 16)
    return d, extra


def _six_bit_scales(sh: torch.Tensor, sl: torch.Tensor) -> torch.Tensor:
    """scales_h[4], scales_l[8] -> (..., 16): L_k = (nibble k%2 of sl[k/2] | 2 bits of sh[k/4] << 4) - 32."""
    low = nibble_pairs(sl).transpose(-1, -2).flatten(-2)
    high = bits(sh, 4, 2).flatten(-2)
    return (low | (high << 4)) - 32


def _to_sub16(idx32: torch.Tensor) -> torch.Tensor:
    """(..., n32, 32) indices of 32-weight groups -> (..., 2*n32, 16) sub-blocks of 16."""
    return idx32.reshape(*idx32.shape[:-2], -1, 16)


def _two_bit_planes(qs: torch.Tensor) -> torch.Tensor:
    """(..., 64) bytes -> (..., 8, 32): group b = bits 2*(b%4) of qs[32*(b//4) + j] (Q2_K plane order)."""
    planes = bits(qs.reshape(*qs.shape[:-1], 2, 32), 4, 2)  # (..., b//4, j, b%4)
    return planes.transpose(-1, -2).reshape(*qs.shape[:-1], 8, 32)


def _finish(d, L, grid, idx, rows):
    return dequant(d, L, grid, idx).reshape(rows, -1)


@register
class IQ2_K(Codec):
    """2.375 bpw: d fp16 | extra u16 | 4-bit scales[8] (L = nibble - 8) | 2-bit qs[64]."""

    name = "iq2_k"

    def decode(self, data, n_per_row):
        _, blocks = split_rows(data, n_per_row, 0, 76)
        rows, nb = blocks.shape[:2]
        d, extra = _header(blocks)
        L = nibble_pairs(blocks[..., 4:12]).transpose(-1, -2).reshape(rows, nb, 16) - 8
        idx = _to_sub16(_two_bit_planes(blocks[..., 12:76])) + 4 * extra.unsqueeze(-1)
        return _finish(d, L, grids.IQ2NL_VALUES, idx, rows)


@register
class IQ3_K(Codec):
    """3.4375 bpw: d | extra | scales_h u16 (signs) | scales_l[8] (L = 2m+1) | qs[64] | qh[32]."""

    name = "iq3_k"

    def decode(self, data, n_per_row):
        _, blocks = split_rows(data, n_per_row, 0, 110)
        rows, nb = blocks.shape[:2]
        d, extra = _header(blocks)
        sign = bits(u16_at(blocks[..., 4:6]).squeeze(-1), 16)
        m = nibble_pairs(blocks[..., 6:14]).transpose(-1, -2).reshape(rows, nb, 16)
        L = (2 * m + 1) * (1 - 2 * sign)
        high = bits(blocks[..., 78:110], 8).transpose(-1, -2)  # (rows, nb, b, j) = bit b of qh[j]
        idx32 = _two_bit_planes(blocks[..., 14:78]) | (high << 2)
        idx = _to_sub16(idx32) + 8 * extra.unsqueeze(-1)
        return _finish(d, L, grids.IQ3NL_VALUES, idx, rows)


@register
class IQ4_K(Codec):
    """4.5 bpw: d | extra | scales_h[4] | scales_l[8] (6-bit L - 32) | qs[128] (4-bit, 16 per sub-block)."""

    name = "iq4_k"

    def decode(self, data, n_per_row):
        _, blocks = split_rows(data, n_per_row, 0, 144)
        rows, nb = blocks.shape[:2]
        d, extra = _header(blocks)
        L = _six_bit_scales(blocks[..., 4:8], blocks[..., 8:16])
        idx = nibble_pairs(blocks[..., 16:144].reshape(rows, nb, 8, 16)).reshape(rows, nb, 16, 16)
        return _finish(d, L, grids.IQ4K_VALUES, idx + 16 * extra.unsqueeze(-1), rows)


def _nibble_planes(qs: torch.Tensor) -> torch.Tensor:
    """(..., 128) bytes -> (..., 8, 32): group 2c+h = nibble h of qs[32c + j] (IQ5_K / IQ6_K order)."""
    return nibble_pairs(qs.reshape(*qs.shape[:-1], 4, 32)).reshape(*qs.shape[:-1], 8, 32)


@register
class IQ5_K(Codec):
    """5.5 bpw: d | extra | scales_h[4] | scales_l[8] | qs[128] | qh[32] (bit g of qh[j]: 5th bit)."""

    name = "iq5_k"

    def decode(self, data, n_per_row):
        _, blocks = split_rows(data, n_per_row, 0, 176)
        rows, nb = blocks.shape[:2]
        d, extra = _header(blocks)
        L = _six_bit_scales(blocks[..., 4:8], blocks[..., 8:16])
        high = bits(blocks[..., 144:176], 8).transpose(-1, -2)  # (rows, nb, g, j)
        idx = _to_sub16(_nibble_planes(blocks[..., 16:144]) | (high << 4))
        return _finish(d, L, grids.IQ5NL_VALUES, idx + 32 * extra.unsqueeze(-1), rows)


@register
class IQ6_K(Codec):
    """6.625 bpw: d | extra | int8 scales[16] | qs[128] | qh[64] (2 high bits); integer grid iq6nl."""

    name = "iq6_k"

    def decode(self, data, n_per_row):
        _, blocks = split_rows(data, n_per_row, 0, 212)
        rows, nb = blocks.shape[:2]
        d, extra = _header(blocks)
        L = blocks[..., 4:20].contiguous().view(torch.int8).to(torch.int32)
        qh = bits(blocks[..., 148:212].reshape(rows, nb, 2, 32), 4, 2)  # (rows, nb, g//4, j, g%4)
        high = qh.transpose(-1, -2).reshape(rows, nb, 8, 32)
        idx = _to_sub16(_nibble_planes(blocks[..., 20:148]) | (high << 4))
        return _finish(d, L, grids.IQ6NL_VALUES, idx + 64 * extra.unsqueeze(-1), rows)
