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
IQ3K_NTRY = 3  # candidate offsets g0 + 2t, t = -3..3
IQ3K_SIGMA = 1.5
IQ3K_FUDGE = 1.01
IQ2K_SIGMA = 1.5
IQ2K_FUDGE = 1.030
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
        d, L, shift, idx = _encode_iq2k(x, imatrix)
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
        d, L, shift, idx = _encode_iq3k(x, imatrix)
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


def _encode_bs16(x, imatrix, grid, ntry, lmax, plain_sigma=0.0, polish=False):
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
    L, idx = _levels_and_indices(grid, shift, scale, d, xs, lmax)
    q = grid.to(device=x.device, dtype=torch.float32)[idx] * L.unsqueeze(-1)
    A, B = _superblock_refit(w, q, xs)
    d = torch.where(B > 0, A / torch.where(B > 0, B, torch.ones_like(B)), d.squeeze(-1))
    d = torch.where(nonzero.squeeze(-1), d, torch.zeros_like(d)).clamp(-FP16_MAX, FP16_MAX)  # no inf
    d = d.to(torch.float16).to(torch.float32)
    keep = nonzero.unsqueeze(-1)
    L = torch.where(nonzero, L, torch.zeros_like(L)).to(torch.int32)
    shift = torch.where(nonzero, shift, torch.zeros_like(shift))
    return d, L, shift, torch.where(keep, idx, torch.zeros_like(idx))


def _levels_and_indices(grid, shift, scale, d, xs, lmax):
    """Integer block scales for super-block scale d (rows, nb, 1) and the indices they give."""
    inv_d = 1 / torch.where(d != 0, d, torch.ones_like(d))
    hi = lmax if lmax == 127 else lmax - 1
    L = enc.rint(inv_d * scale).clamp(-lmax, hi)  # (rows, nb, 16) float
    return L, _indices(grid, shift, d * L, xs)


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


def _search_iq3k(xb, wb):
    """Pass 1 of quantize_row_iq3_k_impl for 16-blocks (N, 16) -> (scale (N,), shift (N,) int32).

    Candidates in the reference's order: -max/g[0] mapped onto g[0] (and mirrored), then offsets
    g0 + 2t (t = -3..3) on the base and the shifted grid, each also mirrored; a later candidate must
    fit strictly better. The winner's indices are then re-picked and its scale refit once.
    """
    grid = grids.IQ3NL_VALUES
    g0, s0 = float(grid[0]), float(grid[8])
    offs, flags, mirror = [-g0, -g0], [0, 0], [False, True]
    for t in range(-IQ3K_NTRY, IQ3K_NTRY + 1):
        for flag, base in ((0, g0), (1, s0)):
            offs += [2 * t + base] * 2
            flags += [flag, flag]
            mirror += [False, True]
    sumqx, sumq2, amax = enc.candidate_sums(xb, wb, grid, offs, flags, mirror)
    scale = torch.zeros_like(amax)
    shift = torch.zeros(amax.shape, dtype=torch.int32, device=xb.device)
    best = torch.zeros_like(amax)
    for c, flag in enumerate(flags):
        sqx, sq2 = sumqx[:, c], sumq2[:, c]
        ok = (sq2 > 0) if c == 0 else (sq2 > 0) & (sqx * sqx > best * sq2)
        d = sqx / torch.where(sq2 > 0, sq2, torch.ones_like(sq2))
        scale, best = torch.where(ok, d, scale), torch.where(ok, d * sqx, best)
        shift = torch.where(ok, torch.full_like(shift, flag), shift)
    dead = (amax < 1e-16) | (scale == 0)
    scale = torch.where(dead, torch.zeros_like(scale), scale)
    shift = torch.where(dead, torch.zeros_like(shift), shift)
    return enc._polish(xb, wb, grid, scale, shift), shift


def _encode_iq3k(x, imatrix):
    """quantize_row_iq3_k_impl -> d (rows, nb) fp16-valued, L (rows, nb, 16) odd, shift, idx (into grid).

    Per super-block: d = max|scale|/31, L = +-(2m+1) with m = nearest((|scale|/d - 1)/2) in 0..15,
    nearest indices, refit of d over the super-block times 1.01. All-zero super-blocks stay zero.
    """
    rows, n = x.shape
    nb = n // QK_K
    grid = grids.IQ3NL_VALUES
    xs = x.reshape(rows, nb, 16, 16)
    w = enc.importance(x.reshape(rows, nb, QK_K), imatrix, 16, plain_sigma=0.25, sigma_factor=IQ3K_SIGMA)
    w = w.reshape(xs.shape)
    per_chunk = max(1, enc.CHUNK // (16 * 32))
    xf, wf = xs.reshape(-1, 16), w.reshape(-1, 16)
    parts = [
        _search_iq3k(xf[i : i + per_chunk], wf[i : i + per_chunk]) for i in range(0, xf.shape[0], per_chunk)
    ]
    scale = torch.cat([p[0] for p in parts]).reshape(rows, nb, 16)
    shift = torch.cat([p[1] for p in parts]).reshape(rows, nb, 16)
    amax = scale.abs().amax(-1, keepdim=True)  # (rows, nb, 1)
    nonzero = amax > 0
    d = amax / 31
    inv_d = 1 / torch.where(nonzero, d, torch.ones_like(d))
    m = enc.rint(0.5 * enc.fma(inv_d.expand_as(scale), scale.abs(), torch.full_like(scale, -1.0))).clamp(
        0, 15
    )
    L = torch.where(scale < 0, -(2 * m + 1), 2 * m + 1)
    idx = _indices(grid, shift, d * L, xs)
    q = grid.to(device=x.device, dtype=torch.float32)[idx] * L.unsqueeze(-1)
    A, B = _superblock_refit(w, q, xs)
    d = IQ3K_FUDGE * torch.where(B > 0, A / torch.where(B > 0, B, torch.ones_like(B)), d.squeeze(-1))
    d = torch.where(nonzero.squeeze(-1), d, torch.zeros_like(d)).clamp(-FP16_MAX, FP16_MAX)  # no inf
    keep = nonzero.unsqueeze(-1)
    L = torch.where(nonzero, L, torch.ones_like(L)).to(torch.int32)  # zero bytes decode as L = +1
    shift = torch.where(nonzero, shift, torch.zeros_like(shift))
    return d.to(torch.float16).to(torch.float32), L, shift, torch.where(keep, idx, torch.zeros_like(idx))


def _iq2k_partitions(device):
    """Boundaries (i1, i2, i3) of the reference's exhaustive search over a sorted 16-block, in its
    loop order: runs [0, i1), [i1, i2), [i2, i3), [i3, 16) take the 4 grid values in turn."""
    combos = [(a, b, c) for a in range(16) for b in range(a, 16) for c in range(b, 16)]
    return torch.tensor(combos, dtype=torch.int64, device=device).T


def _search_iq2k(xb, wb):
    """Pass 1 of quantize_row_iq2_k_impl for 16-blocks (N, 16) -> (scale (N,), shift (N,) int32).

    Every monotone assignment of the sorted weights to the 4 values (base or shifted grid, either
    orientation) is scored by (sum wqx)^2 / sum wq^2 (float32 sums as the reference forms them,
    compared in float64); the first best wins and its scale is sum wqx / sum wq^2.
    """
    dev = xb.device
    amax = xb.abs().amax(-1)
    order = torch.sort(xb, dim=-1, stable=True).indices  # ties in index order, like std::sort of pairs
    xs, ws = xb.gather(-1, order), wb.gather(-1, order)
    cx, cw = [torch.zeros_like(amax)], [torch.zeros_like(amax)]
    for j in range(16):  # cumulative sums in sorted order
        cx.append(enc.fma(ws[:, j], xs[:, j], cx[-1]))
        cw.append(cw[-1] + ws[:, j])
    cx, cw = torch.stack(cx, -1), torch.stack(cw, -1)  # (N, 17)
    i1, i2, i3 = _iq2k_partitions(dev)
    sx = [cx[:, i1] - cx[:, :1], cx[:, i2] - cx[:, i1], cx[:, i3] - cx[:, i2], cx[:, 16:] - cx[:, i3]]
    sw = [cw[:, i1] - cw[:, :1], cw[:, i2] - cw[:, i1], cw[:, i3] - cw[:, i2], cw[:, 16:] - cw[:, i3]]
    g = grids.IQ2NL_VALUES.to(device=dev, dtype=torch.float32)
    sqx, sq2 = [], []
    for v in (g[:4], g[4:], g[:4].flip(0), g[4:].flip(0)):  # the reference's order per partition
        # a*v0 + b*v1 + c*v2 + e*v3 as the reference build contracts it (left to right)
        sqx.append(enc.fma(sx[3], v[3], enc.fma(sx[2], v[2], enc.fma(sx[0], v[0], sx[1] * v[1]))))
        q2 = enc.fma(sw[0] * v[0], v[0], (sw[1] * v[1]) * v[1])
        sq2.append(enc.fma(sw[3] * v[3], v[3], enc.fma(sw[2] * v[2], v[2], q2)))
    sqx, sq2 = torch.stack(sqx, -1).flatten(1), torch.stack(sq2, -1).flatten(1)  # (N, 4K)
    pos = sq2 > 0
    score = torch.where(pos, sqx.double() ** 2 / torch.where(pos, sq2, 1).double(), 0)
    best = score.argmax(-1, keepdim=True)  # first maximum
    found = (score.gather(-1, best).squeeze(-1) > 0) & (amax >= 1e-16)
    den = sq2.gather(-1, best).squeeze(-1)
    d = sqx.gather(-1, best).squeeze(-1) / torch.where(found, den, torch.ones_like(den))
    shift = (best.squeeze(-1) % 2).to(torch.int32)
    return torch.where(found, d, torch.zeros_like(d)), torch.where(found, shift, torch.zeros_like(shift))


def _encode_iq2k(x, imatrix):
    """quantize_row_iq2_k_impl -> d (rows, nb) fp16-valued, L (rows, nb, 16) in [-8, 7], shift, idx.

    Per super-block: make_qx_quants gives d; L = nearest(scale/d) in [-8, 7]; nearest indices;
    refit of d over the super-block times 1.03. Super-blocks where d is 0 stay zero.
    """
    rows, n = x.shape
    nb = n // QK_K
    grid = grids.IQ2NL_VALUES
    xs = x.reshape(rows, nb, 16, 16)
    w = enc.importance(x.reshape(rows, nb, QK_K), imatrix, 16, plain_sigma=0.25, sigma_factor=IQ2K_SIGMA)
    w = w.reshape(xs.shape)
    xf, wf = xs.reshape(-1, 16), w.reshape(-1, 16)
    per_chunk = max(1, enc.CHUNK // (4 * _iq2k_partitions("cpu").shape[1] * 4))
    parts = [
        _search_iq2k(xf[i : i + per_chunk], wf[i : i + per_chunk]) for i in range(0, xf.shape[0], per_chunk)
    ]
    scale = torch.cat([p[0] for p in parts]).reshape(rows, nb, 16)
    shift = torch.cat([p[1] for p in parts]).reshape(rows, nb, 16)
    sw = w[..., 0]
    for j in range(1, 16):
        sw = sw + w[..., j]
    d, _ = enc.make_qx_quants(scale, sw, 8)
    d = d.unsqueeze(-1)  # (rows, nb, 1)
    nonzero = d != 0
    inv_d = 1 / torch.where(nonzero, d, torch.ones_like(d))
    L = enc.rint(inv_d * scale).clamp(-8, 7)
    idx = _indices(grid, shift, d * L, xs)
    used = (d * L != 0).unsqueeze(-1)
    q = grid.to(device=x.device, dtype=torch.float32)[idx] * L.unsqueeze(-1)
    A, B = _superblock_refit(torch.where(used, w, torch.zeros_like(w)), q, xs)
    d = IQ2K_FUDGE * torch.where(B > 0, A / torch.where(B > 0, B, torch.ones_like(B)), d.squeeze(-1))
    d = torch.where(nonzero.squeeze(-1), d, torch.zeros_like(d)).clamp(-FP16_MAX, FP16_MAX)  # no inf
    keep = nonzero.unsqueeze(-1) & used
    L = torch.where(nonzero, L, torch.zeros_like(L)).to(torch.int32)
    shift = torch.where(nonzero, shift, torch.zeros_like(shift))
    return d.to(torch.float16).to(torch.float32), L, shift, torch.where(keep, idx, torch.zeros_like(idx))
