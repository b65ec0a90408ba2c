"""IQK super-block types of ik_llama.cpp: IQ2_K, IQ3_K, IQ4_K, IQ5_K, IQ6_K.

Each 256-weight super-block stores an fp16 scale `d`, a 16-bit `extra` word of grid-shift flags
(one per 16-weight sub-block) and 16 small integer sub-block scales. Layouts and dequantization
follow shared/docs/iqk-formats.md section 3 (ik_llama.cpp @ 8337e4cd, iqk_quantize.cpp); IQ6_K is
decoded with the integer table `iq6nl_values`, as the quantizer and GPU code use it (spec 0.8).
"""

from __future__ import annotations

import torch

from vramfit.quant import grids
from vramfit.quant import iqk_encode as enc
from vramfit.quant.iqk_common import QK_K, bits, dequant, f16_at, nibble_pairs, split_rows, u16_at
from vramfit.quant.registry import Codec, register

IQ6K_NTRY = 5
IQ3K_NTRY = 5
IQ2K_NTRY = 9
IQ2K_DF = (-8 / 7, 0.9, 0.8, 0.7, 1.1)
FP16_MAX = 65504.0


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

    def encode(self, x, imatrix=None):
        """Not the reference algorithm (none in the spec): IQ4_K-pattern search, L in [-8, 7], more d."""
        d, L, shift, idx = _encode_bs16(
            x,
            imatrix,
            grids.IQ2NL_VALUES,
            ntry=IQ2K_NTRY,
            lmax=8,
            polish=True,
            plain_sigma=0.0,
            d_factors=IQ2K_DF,
        )
        scales = (L + 8)[..., 0::2] | ((L + 8)[..., 1::2] << 4)
        return _finish_bytes([_header_bytes(d, shift), scales, _pack_two_bit_planes(idx & 3)])


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

    def encode(self, x, imatrix=None):
        """IQ4_K-pattern search (spec 4.0/4.5) with odd levels L = +-(2m+1); not byte-exact."""
        d, L, shift, idx = _encode_bs16(
            x,
            imatrix,
            grids.IQ3NL_VALUES,
            ntry=IQ3K_NTRY,
            lmax=31,
            plain_sigma=0.25,
            polish=True,
            levels=_odd_levels,
        )
        m = (L.abs() - 1) // 2
        sign = ((L < 0).to(torch.int32) << torch.arange(16, device=x.device, dtype=torch.int32)).sum(-1)
        scales_l = m[..., 0::2] | (m[..., 1::2] << 4)
        qh = ((idx & 7) >> 2).reshape(*idx.shape[:2], 8, 32)
        qh = (qh << torch.arange(8, device=x.device, dtype=torch.int32)[:, None]).sum(-2)
        head = torch.cat([_header_bytes(d, shift), _u16_bytes(sign.unsqueeze(-1))], dim=-1)
        return _finish_bytes([head, scales_l, _pack_two_bit_planes(idx & 3), qh])


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

    def encode(self, x, imatrix=None):
        d, L, shift, idx = _encode_bs16(x, imatrix, grids.IQ4K_VALUES, ntry=7, lmax=32)
        nib = (idx & 15).reshape(*idx.shape[:2], 8, 2, 16)  # (rows, nb, pair i, sub-block 2i+h, j)
        qs = (nib[..., 0, :] | (nib[..., 1, :] << 4)).flatten(-2)
        return _finish_bytes([_header_bytes(d, shift), _pack_six_bit_scales(L), qs])


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

    def encode(self, x, imatrix=None):
        d, L, shift, idx = _encode_bs16(
            x, imatrix, grids.IQ5NL_VALUES, ntry=5, lmax=32, plain_sigma=0.25, polish=True
        )
        g = (idx & 31).reshape(*idx.shape[:2], 8, 32)  # 32-weight groups
        qs, high = _pack_nibble_planes(g & 15), g >> 4
        qh = (high << torch.arange(8, device=x.device, dtype=torch.int32)[:, None]).sum(-2)  # (rows, nb, 32)
        return _finish_bytes([_header_bytes(d, shift), _pack_six_bit_scales(L), qs, qh])


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

    def encode(self, x, imatrix=None):
        d, L, shift, idx = _encode_bs16(
            x, imatrix, grids.IQ6NL_VALUES, ntry=IQ6K_NTRY, lmax=127, plain_sigma=0.25, polish=True
        )
        g = (idx & 63).reshape(*idx.shape[:2], 8, 32)
        qs = _pack_nibble_planes(g & 15)
        high = (g >> 4).reshape(*idx.shape[:2], 2, 4, 32)  # (rows, nb, g//4, g%4, j)
        qh = (high << (2 * torch.arange(4, device=x.device, dtype=torch.int32))[:, None]).sum(-2).flatten(-2)
        return _finish_bytes([_header_bytes(d, shift), L & 0xFF, qs, qh])


def _superblock_refit(w, q, x):
    """Super-block refit sums, sequential over its 256 weights: (rows, nb, 16, 16) -> A, B (rows, nb)."""
    wf, qf, xf = (t.flatten(-2).double() for t in (w, q, x))
    A = torch.zeros(wf.shape[:-1], dtype=torch.float32, device=w.device)
    B = torch.zeros_like(A)
    for j in range(wf.shape[-1]):
        wq = (wf[..., j] * qf[..., j]).float().double()
        A = (wq * xf[..., j] + A).float()
        B = (wq * qf[..., j] + B).float()
    return A, B


def _encode_bs16(x, imatrix, grid, ntry, lmax, plain_sigma=0.0, polish=False, levels=None, d_factors=()):
    """Sections 4.2 / 4.5: IQ4_K-pattern two-pass search with 16-weight sub-blocks and an fp16 d.

    x: (rows, n) -> d (rows, nb) float32 (fp16-representable), L (rows, nb, 16) int32 in
    [-lmax, lmax-1] (IQ6_K: [-lmax, lmax]), shift (rows, nb, 16) int32, idx (rows, nb, 16, 16) into grid.
    """
    rows, n = x.shape
    nb = n // QK_K
    xs = x.reshape(rows, nb, 16, 16)
    w = enc.importance(x.reshape(rows, nb, QK_K), imatrix, 16, plain_sigma).reshape(xs.shape)
    # pass 1: free float scale and grid shift per 16-block
    scale, shift = enc.search_scales(xs.reshape(-1, 16), w.reshape(-1, 16), grid, ntry, polish=polish)
    scale, shift = scale.reshape(rows, nb, 16), shift.reshape(rows, nb, 16)
    # pass 2: the largest block maps to -lmax; integer block scales; final indices; refit d
    kmax = scale.abs().argmax(-1, keepdim=True)
    d = -scale.gather(-1, kmax) / lmax  # (rows, nb, 1)
    nonzero = d != 0
    L, idx = _levels_and_indices(grid, shift, scale, d, xs, lmax, levels)
    for f in d_factors:  # not in the reference: other super-block scales, kept where the error drops
        L2, idx2 = _levels_and_indices(grid, shift, scale, d * f, xs, lmax, levels)
        better = _sb_error(grid, d * f, L2, idx2, xs, w) < _sb_error(grid, d, L, idx, xs, w)
        d = torch.where(better, d * f, d)
        L = torch.where(better, L2, L)
        idx = torch.where(better.unsqueeze(-1), idx2, idx)
    q = grid.to(device=x.device, dtype=torch.float32)[idx] * L.unsqueeze(-1)
    A, B = _superblock_refit(w, q, xs)
    d = torch.where(B > 0, A / torch.where(B > 0, B, torch.ones_like(B)), d.squeeze(-1))
    d = torch.where(nonzero.squeeze(-1), d, torch.zeros_like(d)).clamp(-FP16_MAX, FP16_MAX)  # no inf
    d = d.to(torch.float16).to(torch.float32)
    keep = nonzero.unsqueeze(-1)
    L = torch.where(nonzero, L, torch.zeros_like(L)).to(torch.int32)
    shift = torch.where(nonzero, shift, torch.zeros_like(shift))
    return d, L, shift, torch.where(keep, idx, torch.zeros_like(idx))


def _levels_and_indices(grid, shift, scale, d, xs, lmax, levels):
    """Integer block scales for super-block scale d (rows, nb, 1) and the indices they give."""
    inv_d = 1 / torch.where(d != 0, d, torch.ones_like(d))
    if levels is None:
        hi = lmax if lmax == 127 else lmax - 1
        L = enc.rint(inv_d * scale).clamp(-lmax, hi)  # (rows, nb, 16) float
    else:
        L = levels(inv_d * scale)
    return L, _indices(grid, shift, d * L, xs)


def _sb_error(grid, d, L, idx, xs, w):
    """Weighted squared error per super-block (rows, nb, 1)."""
    y = (d * L).unsqueeze(-1) * grid.to(device=xs.device, dtype=torch.float32)[idx]
    return (w * (xs - y) ** 2).sum((-1, -2)).unsqueeze(-1)


def _indices(grid, shift, dl, xs):
    """Nearest grid indices for targets xs / dl (dl (..., 16), xs (..., 16, 16)); dl == 0 gives x = 0."""
    idl = torch.where(dl != 0, 1 / torch.where(dl != 0, dl, torch.ones_like(dl)), torch.zeros_like(dl))
    return enc.nearest_in_shifted(grid, shift, idl.unsqueeze(-1) * xs)


def _header_bytes(d: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """d (rows, nb) float32, shift (rows, nb, 16) -> (rows, nb, 4) uint8: fp16 d | extra u16."""
    dh = d.to(torch.float16).contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    extra = (shift << torch.arange(16, device=d.device, dtype=torch.int32)).sum(-1)
    return _u16_bytes(torch.stack([dh, extra], dim=-1))


def _u16_bytes(words: torch.Tensor) -> torch.Tensor:
    """(..., k) int32 16-bit words -> (..., 2k) int32 bytes, little-endian."""
    return torch.stack([words & 0xFF, (words >> 8) & 0xFF], dim=-1).flatten(-2)


def _pack_six_bit_scales(L: torch.Tensor) -> torch.Tensor:
    """(..., 16) L in [-32, 31] -> (..., 12) bytes: scales_h[4] | scales_l[8] (inverse of _six_bit_scales)."""
    u = L + 32
    low = u & 15
    sl = low[..., 0::2] | (low[..., 1::2] << 4)
    high = (u >> 4).reshape(*u.shape[:-1], 4, 4) << (2 * torch.arange(4, device=L.device, dtype=torch.int32))
    return torch.cat([high.sum(-1), sl], dim=-1)


def _odd_levels(v: torch.Tensor) -> torch.Tensor:
    """Nearest odd level in [-31, 31] to v (IQ3_K's L = +-(2m+1), m in 0..15)."""
    m = enc.rint((v.abs() - 1) * 0.5).clamp(0, 15)
    return torch.where(v < 0, -(2 * m + 1), 2 * m + 1)


def _pack_two_bit_planes(idx: torch.Tensor) -> torch.Tensor:
    """(rows, nb, 16, 16) 2-bit values -> (rows, nb, 64): group b into bits 2*(b%4) of qs[32*(b//4) + j]."""
    g = idx.reshape(*idx.shape[:2], 2, 4, 32)  # (rows, nb, b//4, b%4, j)
    sh = (2 * torch.arange(4, device=idx.device, dtype=torch.int32))[:, None]
    return (g << sh).sum(-2).flatten(-2)


def _pack_nibble_planes(low: torch.Tensor) -> torch.Tensor:
    """(rows, nb, 8, 32) 4-bit values -> (rows, nb, 128): group 2c+h into nibble h of qs[32c + j]."""
    pairs = low.reshape(*low.shape[:-2], 4, 2, 32)
    return (pairs[..., 0, :] | (pairs[..., 1, :] << 4)).flatten(-2)


def _finish_bytes(parts: list[torch.Tensor]) -> torch.Tensor:
    blocks = torch.cat(parts, dim=-1).to(torch.uint8)  # (rows, nb, block_bytes)
    return blocks.reshape(blocks.shape[0], -1)
