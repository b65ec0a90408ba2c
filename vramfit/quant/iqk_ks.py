"""IQK row-scale types of ik_llama.cpp: IQ4_KS, IQ4_KSS, IQ5_KS (float32 row scale) and IQ2_KS,
IQ3_KS, IQ2_KL (fp16 row scale).

Every row starts with its scale `d_row`, followed by 256-weight super-blocks whose 32-weight
sub-blocks carry small integer scales. Layouts and dequantization follow
shared/docs/iqk-formats.md section 3 (ik_llama.cpp @ 8337e4cd, iqk_quantize.cpp); the encoders
follow section 4 (see iqk_encode.py).
"""

from __future__ import annotations

import torch

from vramfit.quant import grids
from vramfit.quant import iqk_encode as enc
from vramfit.quant.iqk_common import QK_K, bits, dequant, f16_at, f32_at, nibble_pairs, split_rows, u16_at
from vramfit.quant.registry import Codec, register


def _odd_scale(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IQ4_KS/IQ5_KS scale byte -> (L odd in [-127, 127], shift flag)."""
    s = s.to(torch.int32)
    return (s & 0xFE) - 127, s & 1


def _iq4ks_indices(qs: torch.Tensor) -> torch.Tensor:
    """(..., 8, 16) qs bytes per sub-block -> (..., 8, 32) 4-bit indices (byte j: weights j, j+16)."""
    return nibble_pairs(qs).flatten(-2)


def _decode_iq4ks_blocks(d_row, scales, qs):
    """d_row (rows,); scales (rows, nb, 8) uint8; qs (rows, nb, 8, 16) -> (rows, nb*256)."""
    L, shift = _odd_scale(scales)
    idx = _iq4ks_indices(qs) + 16 * shift.unsqueeze(-1)  # (rows, nb, 8, 32)
    y = dequant(d_row[:, None, None], L, grids.IQ4K_VALUES, idx)
    return y.reshape(d_row.shape[0], -1)


@register
class IQ4_KS(Codec):
    """4.25 bpw: f32 row scale; per 32 weights one byte (7-bit odd scale + grid shift) and 16 nibble bytes."""

    name = "iq4_ks"

    def decode(self, data, n_per_row):
        meta, blocks = split_rows(data, n_per_row, 4, 136)  # blocks: (rows, nb, 136)
        qs = blocks[..., 8:].reshape(*blocks.shape[:2], 8, 16)
        return _decode_iq4ks_blocks(f32_at(meta), blocks[..., :8], qs)

    def encode(self, x, imatrix=None):
        return _pack_iq4ks(*_encode_odd_scales(x, imatrix, grids.IQ4K_VALUES, ntry=7, pair=16))


def iq4kss_unpack(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, nb, 128) IQ4_KSS blocks -> (scale bytes (rows, nb, 8), IQ4_KS-style qs (rows, nb, 8, 16))."""
    w = u16_at(blocks).reshape(*blocks.shape[:2], 8, 8)  # (rows, nb, sub-block, word k)
    ls = ((w & 1) << torch.arange(8, device=w.device, dtype=torch.int32)).sum(-1)
    a = w & 0xFFFE
    v = a ^ (a >> 1)  # even-parity nibble word: IQ4_KS qs bytes 2k (low) and 2k+1 (high)
    qs = torch.stack([v & 0xFF, v >> 8], dim=-1).reshape(*blocks.shape[:2], 8, 16)
    return ls, qs


@register
class IQ4_KSS(Codec):
    """4.0 bpw: IQ4_KS with the scale bits and 15-bit parity-coded nibble quads packed in 16-bit words."""

    name = "iq4_kss"

    def decode(self, data, n_per_row):
        meta, blocks = split_rows(data, n_per_row, 4, 128)
        ls, qs = iq4kss_unpack(blocks)
        return _decode_iq4ks_blocks(f32_at(meta), ls, qs)

    def encode(self, x, imatrix=None):
        return _pack_iq4kss(*_encode_kss(x, imatrix))


@register
class IQ5_KS(Codec):
    """5.25 bpw: f32 row scale; scales[8] as IQ4_KS, qs[128] (32-weight nibble planes), qh[32] 5th bits."""

    name = "iq5_ks"

    def decode(self, data, n_per_row):
        meta, blocks = split_rows(data, n_per_row, 4, 168)
        rows, nb = blocks.shape[:2]
        L, shift = _odd_scale(blocks[..., :8])
        low = nibble_pairs(blocks[..., 8:136].reshape(rows, nb, 4, 32)).reshape(rows, nb, 8, 32)
        high = bits(blocks[..., 136:168], 8).transpose(-1, -2)  # (rows, nb, ib, j) = bit ib of qh[j]
        idx = low | (high << 4) | (32 * shift).unsqueeze(-1)
        return dequant(f32_at(meta)[:, None, None], L, grids.IQ5NL_VALUES, idx).reshape(rows, -1)

    def encode(self, x, imatrix=None):
        d_row, scale_bytes, idx = _encode_odd_scales(x, imatrix, grids.IQ5NL_VALUES, ntry=5, pair=0)
        rows = x.shape[0]
        g = (idx & 31).reshape(rows, -1, 8, 32)  # (rows, nb, ib, j)
        pairs = (g & 15).reshape(rows, -1, 4, 2, 32)
        qs = (pairs[..., 0, :] | (pairs[..., 1, :] << 4)).flatten(-2)  # (rows, nb, 128)
        ib = torch.arange(8, device=x.device, dtype=torch.int32)[:, None]
        qh = ((g >> 4) << ib).sum(-2)  # (rows, nb, 32)
        blocks = torch.cat([scale_bytes.reshape(rows, -1, 8), qs, qh], dim=-1).to(torch.uint8)
        return torch.cat([_f32_bytes(d_row), blocks.reshape(rows, -1)], dim=-1)


def _two_bit_planes(qs: torch.Tensor, n_groups: int) -> torch.Tensor:
    """(..., 32*(n_groups//4)) bytes -> (..., n_groups, 32): group g = bits 2*(g%4) of qs[32*(g//4) + j]."""
    planes = bits(qs.reshape(*qs.shape[:-1], n_groups // 4, 32), 4, 2)  # (..., g//4, j, g%4)
    return planes.transpose(-1, -2).reshape(*qs.shape[:-1], n_groups, 32)


@register
class IQ2_KS(Codec):
    """2.1875 bpw: fp16 row scale; extra u16 (shifts, scale bit 4), 4-bit scales[4], 2-bit qs[64]."""

    name = "iq2_ks"

    def decode(self, data, n_per_row):
        meta, blocks = split_rows(data, n_per_row, 2, 70)
        rows, nb = blocks.shape[:2]
        extra = bits(u16_at(blocks[..., 0:2]).squeeze(-1), 16)  # (rows, nb, 16)
        low = nibble_pairs(blocks[..., 2:6]).transpose(-1, -2).reshape(rows, nb, 8)  # sub-block i: nib i%2
        L = (low | (extra[..., 8:] << 4)) - 16
        idx = _two_bit_planes(blocks[..., 6:70], 8) + 4 * extra[..., :8].unsqueeze(-1)
        return dequant(f16_at(meta)[:, None, None], L, grids.IQ2NL_VALUES, idx).reshape(rows, -1)

    def encode(self, x, imatrix=None):
        return _encode_iq2ks(x, imatrix)


@register
class IQ3_KS(Codec):
    """3.1875 bpw: fp16 row scale; extra u16, scales[4] (nibbles), 2-bit qs[64], qh[32] 3rd bits."""

    name = "iq3_ks"

    def decode(self, data, n_per_row):
        meta, blocks = split_rows(data, n_per_row, 2, 102)
        rows, nb = blocks.shape[:2]
        extra = bits(u16_at(blocks[..., 0:2]).squeeze(-1), 16)
        low = nibble_pairs(blocks[..., 2:6]).reshape(rows, nb, 8)  # sub-block i<4: low nibble of scales[i]
        L = (low | (extra[..., :8] << 4)) - 16
        high = bits(blocks[..., 70:102], 8).transpose(-1, -2)  # (rows, nb, ib, j)
        idx = _two_bit_planes(blocks[..., 6:70], 8) | (high << 2) | (8 * extra[..., 8:]).unsqueeze(-1)
        return dequant(f16_at(meta)[:, None, None], L, grids.IQ3NL_VALUES, idx).reshape(rows, -1)

    def encode(self, x, imatrix=None):
        return _encode_iq3ks(x, imatrix)


@register
class IQ2_KL(Codec):
    """2.6875 bpw: fp16 row scale; 6-bit scales (scales_h u16, scales_l[4]); 5-bit pair indices (qs, qh)."""

    name = "iq2_kl"

    def decode(self, data, n_per_row):
        meta, blocks = split_rows(data, n_per_row, 2, 86)
        rows, nb = blocks.shape[:2]
        sh = bits(u16_at(blocks[..., 0:2]).squeeze(-1), 8, 2)  # (rows, nb, ib)
        sl = nibble_pairs(blocks[..., 2:6]).reshape(rows, nb, 8)  # ib: nibble ib//4 of scales_l[ib%4]
        L = (sl | (sh << 4)) - 32
        low = nibble_pairs(blocks[..., 6:70].reshape(rows, nb, 4, 16)).reshape(rows, nb, 8, 16)
        high = bits(blocks[..., 70:86], 8).transpose(-1, -2)  # (rows, nb, ib, j) = bit ib of qh[j]
        pair = (low | (high << 4)).long()  # (rows, nb, 8, 16): one pair index per 2 weights
        values = grids.IQ2KL_PAIRS.to(device=data.device, dtype=torch.float32)[pair].flatten(-2)
        dl = f16_at(meta)[:, None, None] * L.to(torch.float32)
        return (dl.unsqueeze(-1) * values).reshape(rows, -1)

    def encode(self, x, imatrix=None):
        return _encode_iq2kl(x, imatrix)


def _encode_odd_scales(x, imatrix, grid, ntry, pair):
    """Sections 4.1 / 4.3: two-pass search for the f32-row-scale types with odd 7-bit block scales.

    x: (rows, n) -> (d_row (rows,), scale bytes (rows, nb*8) int32, indices (rows, nb*8, 32) into grid).
    """
    rows, n = x.shape
    n_sub = n // 32
    w = enc.importance(x.reshape(rows, -1, QK_K), imatrix, 32).reshape(rows, n_sub, 32)
    xb = x.reshape(rows, n_sub, 32)
    # pass 1: free float scale and grid shift per 32-block
    scale, shift = enc.search_scales(xb.reshape(-1, 32), w.reshape(-1, 32), grid, ntry)
    scale, shift = scale.reshape(rows, n_sub), shift.reshape(rows, n_sub)
    # pass 2: row scale, odd block scales, final indices, row refit
    d_row = scale.abs().amax(-1) / 127  # (rows,)
    nonzero = d_row > 0
    inv_d = 1 / torch.where(nonzero, d_row, torch.ones_like(d_row))
    lev = enc.rint(0.5 * enc.fma(inv_d.unsqueeze(-1), scale, torch.full_like(scale, 127.0)))
    lev = lev.clamp(0, 127).to(torch.int32)
    L = (2 * lev - 127).to(torch.float32)
    dl = d_row.unsqueeze(-1) * L
    idx = enc.nearest_in_shifted(grid, shift, (1 / dl).unsqueeze(-1) * xb)
    q = grid.to(device=x.device, dtype=torch.float32)[idx] * L.unsqueeze(-1)
    A, B = enc.row_refit(w, q, xb, pair)
    d_row = torch.where(B > 0, A / torch.where(B > 0, B, torch.ones_like(B)), d_row)
    scale_bytes = (lev << 1) | shift
    keep = nonzero.unsqueeze(-1)
    return (
        torch.where(nonzero, d_row, torch.zeros_like(d_row)),
        torch.where(keep, scale_bytes, torch.zeros_like(scale_bytes)),
        torch.where(keep.unsqueeze(-1), idx, torch.zeros_like(idx)),
    )


def _f32_bytes(d: torch.Tensor) -> torch.Tensor:
    """(rows,) float32 -> (rows, 4) uint8."""
    return d.to(torch.float32).contiguous().view(torch.uint8).reshape(-1, 4)


def _pack_iq4ks(d_row, scale_bytes, idx):
    """-> (rows, 4 + nb*136) uint8. idx (rows, nb*8, 32) indices into the 32-entry grid."""
    rows = d_row.shape[0]
    nib = (idx & 15).reshape(rows, -1, 8, 2, 16)  # (rows, nb, ib, half, j)
    qs = (nib[..., 0, :] | (nib[..., 1, :] << 4)).reshape(rows, -1, 128)
    blocks = torch.cat([scale_bytes.reshape(rows, -1, 8), qs], dim=-1).to(torch.uint8)
    return torch.cat([_f32_bytes(d_row), blocks.reshape(rows, -1)], dim=-1)


# --- IQ4_KSS: IQ4_KS with even-parity nibble quads (section 4.4) ---------------------------------

_QUAD = [p for k in range(8) for p in (2 * k, 2 * k + 16, 2 * k + 1, 2 * k + 17)]  # word k's 4 weights
_POPCOUNT16 = torch.tensor([bin(i).count("1") & 1 for i in range(16)], dtype=torch.int32)


def _prune(al, idx, w, goff):
    """Make every quad of 4-bit indices even-parity by moving one index to a neighbour within +-2.

    al (..., 32) targets in grid units; idx (..., 32) indices 0..15 into the 16 values of
    iq4k_values starting at goff (0 or 16; a tensor broadcastable to al[..., :1]); w (..., 32).
    The move with the smallest weighted error increase wins; the "before" error uses the base grid.
    """
    dev = idx.device
    grid = grids.IQ4K_VALUES.to(device=dev, dtype=torch.float32)
    perm = torch.tensor(_QUAD, device=dev)
    pc = _POPCOUNT16.to(dev)
    lead = al.shape[:-1]
    a, i, ww = (t.expand(*lead, 32)[..., perm].reshape(*lead, 8, 4) for t in (al, idx, w))
    goff = goff[..., None, None, None]  # broadcast over (quad, position, offset)
    odd = pc[i].sum(-1) % 2 == 1  # (..., 8)
    before = ww * (a - grid[i]) ** 2
    cand = i.unsqueeze(-1) + torch.tensor([-2, -1, 1, 2], device=dev)  # (..., 8, 4 positions, 4 offsets)
    cand_c = cand.clamp(0, 15)
    valid = (cand == cand_c) & (pc[cand_c] != pc[i].unsqueeze(-1))
    cost = ww.unsqueeze(-1) * (a.unsqueeze(-1) - grid[cand_c + goff]) ** 2 - before.unsqueeze(-1)
    cost = torch.where(valid, cost, torch.full_like(cost, float("inf"))).flatten(-2)  # (..., 8, 16)
    pick = cost.argmin(-1, keepdim=True)  # first minimum: position-major, then offset order
    new = cand_c.flatten(-2).gather(-1, pick)
    moved = torch.nn.functional.one_hot(pick.squeeze(-1) // 4, 4).bool() & odd.unsqueeze(-1)
    i = torch.where(moved, new, i)
    out = torch.empty_like(idx.expand(*lead, 32))
    out[..., perm] = i.reshape(*lead, 32)
    return out


def _kss_candidate_sums(xb, wb, ntry):
    """Pass 1 of 4.4 for blocks (N, 32): (sum wqx, sum wq^2) (N, C) with pruned indices."""
    dev = xb.device
    grid = grids.IQ4K_VALUES.to(device=dev, dtype=torch.float32)
    offs, flags, mirror = enc.candidate_table(grids.IQ4K_VALUES, ntry, initial=False)
    amax, m = enc.block_max(xb)
    safe_m = torch.where(amax < 1e-16, torch.ones_like(m), m)
    inv = torch.tensor(offs, device=dev) / safe_m.unsqueeze(-1)  # (N, C)
    sign = torch.tensor([-1.0 if mi else 1.0 for mi in mirror], device=dev)[:, None]
    al = inv.unsqueeze(-1) * xb.unsqueeze(1) * sign  # (N, C, 32)
    goff = 16 * torch.tensor(flags, device=dev)  # (C,)
    near = torch.where(goff[:, None] > 0, enc.nearest_index(grid[16:], al), enc.nearest_index(grid[:16], al))
    idx = _prune(al, near, wb.unsqueeze(1), goff.expand(al.shape[:-1]))
    q = grid[idx + goff[:, None]]
    sumqx, sumq2 = enc.weighted_sums(wb.unsqueeze(1) * q, q, xb.unsqueeze(1).expand_as(q))
    return sumqx, sumq2, amax


def _kss_scales(xb, wb, ntry):
    """Best signed float scale per 32-block (N,); best starts at 0 (no initial candidate)."""
    sumqx, sumq2, amax = _kss_candidate_sums(xb, wb, ntry)
    scale = torch.zeros_like(amax)
    best = torch.zeros_like(amax)
    for c in range(sumqx.shape[-1]):
        sqx, sq2 = sumqx[:, c], sumq2[:, c]
        ok = (sq2 > 0) & (sqx * sqx > best * sq2)
        d = sqx / torch.where(sq2 > 0, sq2, torch.ones_like(sq2))
        scale = torch.where(ok, d, scale)
        best = torch.where(ok, d * sqx, best)
    return torch.where(amax < 1e-16, torch.zeros_like(scale), scale)


def _encode_kss(x, imatrix, ntry=7, fudge=1.01):
    """Section 4.4 -> (d_row (rows,), scale bytes (rows, n_sub), indices (rows, n_sub, 32) into 32-grid)."""
    rows, n = x.shape
    n_sub = n // 32
    w = enc.importance(x.reshape(rows, -1, QK_K), imatrix, 32).reshape(rows, n_sub, 32)
    xb = x.reshape(rows, n_sub, 32)
    scale = _kss_scales(xb.reshape(-1, 32), w.reshape(-1, 32), ntry).reshape(rows, n_sub)
    d_row = scale.abs().amax(-1) / 127
    nonzero = d_row > 0
    inv_d = 1 / torch.where(nonzero, d_row, torch.ones_like(d_row))
    lev = enc.rint(0.5 * enc.fma(inv_d.unsqueeze(-1), scale, torch.full_like(scale, 127.0)))
    lev = lev.clamp(0, 127).to(torch.int32)
    L = (2 * lev - 127).to(torch.float32)
    dl = (d_row.unsqueeze(-1) * L).unsqueeze(-1)  # (rows, n_sub, 1)
    al = (1 / dl) * xb
    grid = grids.IQ4K_VALUES.to(device=x.device, dtype=torch.float32)
    best_idx, best_err, shift = None, None, None
    for flag in (0, 1):  # pass 2 re-decides the grid shift: lower weighted error wins
        g = grid[16 * flag : 16 * flag + 16]
        idx = _prune(al, enc.nearest_index(g, al), w, torch.full(al.shape[:-1], 16 * flag, device=x.device))
        err = (w * (xb - dl * g[idx]) ** 2).sum(-1)
        if flag == 0:
            best_idx, best_err, shift = idx, err, torch.zeros_like(lev)
        else:
            better = err < best_err
            best_idx = torch.where(better.unsqueeze(-1), idx + 16, best_idx)
            shift = better.to(torch.int32)
    q = grid[best_idx] * L.unsqueeze(-1)
    A, B = enc.row_refit(w, q, xb, 16)
    d_row = torch.where(B > 0, fudge * (A / torch.where(B > 0, B, torch.ones_like(B))), d_row)
    keep = nonzero.unsqueeze(-1)
    scale_bytes = torch.where(keep, (lev << 1) | shift, torch.zeros_like(lev))
    idx = torch.where(keep.unsqueeze(-1), best_idx, torch.zeros_like(best_idx))
    return torch.where(nonzero, d_row, torch.zeros_like(d_row)), scale_bytes, idx


def _pack_iq4kss(d_row, scale_bytes, idx):
    """-> (rows, 4 + nb*128) uint8. Word k of a sub-block: prefix-XOR(nibble quad) << 1 | scale bit k."""
    rows = d_row.shape[0]
    nib = (idx & 15)[..., _QUAD].reshape(rows, -1, 8, 4)  # (rows, n_sub, k, 4)
    sh = torch.tensor([0, 4, 8, 12], device=idx.device, dtype=torch.int32)
    v = (nib << sh).sum(-1)  # even-parity 16-bit word
    for s in (1, 2, 4, 8):
        v = v ^ (v << s)
    j = v & 0x7FFF
    k = torch.arange(8, device=idx.device, dtype=torch.int32)
    words = (j << 1) | ((scale_bytes.unsqueeze(-1) >> k) & 1)  # (rows, n_sub, 8)
    blocks = torch.stack([words & 0xFF, words >> 8], dim=-1).reshape(rows, -1).to(torch.uint8)
    return torch.cat([_f32_bytes(d_row), blocks], dim=-1)


# --- fp16-row-scale types: IQ3_KS, IQ2_KS, IQ2_KL ------------------------------------------------


def _f16_bytes(d: torch.Tensor) -> torch.Tensor:
    """(rows,) float32 -> (rows, 2) uint8 (round to nearest even, as GGML_FP32_TO_FP16)."""
    return d.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def _u16_bytes(words: torch.Tensor) -> torch.Tensor:
    """(...,) int -> (..., 2) little-endian bytes (int32)."""
    return torch.stack([words & 0xFF, (words >> 8) & 0xFF], dim=-1)


def _pack_two_bit(idx: torch.Tensor) -> torch.Tensor:
    """(rows, nb, 8, 32) 2-bit values -> (rows, nb, 64): qs[32*(i//4) + j] |= v[i, j] << 2*(i%4)."""
    g = idx.reshape(*idx.shape[:2], 2, 4, 32)
    sh = (2 * torch.arange(4, device=idx.device, dtype=torch.int32))[:, None]
    return (g << sh).sum(-2).flatten(-2)


def _safe_inv(v: torch.Tensor) -> torch.Tensor:
    """1/v where v != 0, else 0."""
    nz = v != 0
    return torch.where(nz, 1 / torch.where(nz, v, torch.ones_like(v)), torch.zeros_like(v))


def _encode_iq3ks(x, imatrix, ntry=5):
    """quantize_row_iq3_ks_impl: 4.1-style search per 32-block (IQ3 grids, shifts), then 5-bit
    scales L = nearest(scale / d) in [-16, 15] with d = -max_scale/16, indices, and a row refit."""
    rows, n = x.shape
    nb = n // QK_K
    grid = grids.IQ3NL_VALUES
    w = enc.importance(x.reshape(rows, nb, QK_K), imatrix, 32).reshape(rows, nb * 8, 32)
    xb = x.reshape(rows, nb * 8, 32)
    scale, shift = enc.search_scales(xb.reshape(-1, 32), w.reshape(-1, 32), grid, ntry)
    scale, shift = scale.reshape(rows, -1), shift.reshape(rows, -1)
    d = -enc.max_abs_signed(scale) / 16
    lev = enc.rint(_safe_inv(d).unsqueeze(-1) * scale).clamp(-16, 15).to(torch.int32)
    dl = d.unsqueeze(-1) * lev.to(torch.float32)
    idx = enc.nearest_in_shifted(grid, shift, _safe_inv(dl).unsqueeze(-1) * xb)
    q = grid.to(device=x.device, dtype=torch.float32)[idx] * lev.unsqueeze(-1).to(torch.float32)
    A, B = enc.row_refit(w, q, xb, 0)
    d = torch.where(B > 0, A / torch.where(B > 0, B, torch.ones_like(B)), d)
    ok = (d != 0).unsqueeze(-1)  # d == 0: only the row scale and the shift bits are written
    ul = torch.where(ok, lev + 16, torch.zeros_like(lev)).reshape(rows, nb, 8)
    idx = torch.where(ok.unsqueeze(-1), idx & 7, torch.zeros_like(idx)).reshape(rows, nb, 8, 32)
    i8 = torch.arange(8, device=x.device, dtype=torch.int32)
    extra = (((ul >> 4) << i8) + (shift.reshape(rows, nb, 8) << (i8 + 8))).sum(-1)
    scales = (ul[..., :4] & 15) | ((ul[..., 4:] & 15) << 4)
    qs = _pack_two_bit(idx & 3)
    qh = ((idx >> 2) << i8[:, None]).sum(-2)  # (rows, nb, 32)
    blocks = torch.cat([_u16_bytes(extra), scales, qs, qh], dim=-1).to(torch.uint8)
    return torch.cat([_f16_bytes(d), blocks.reshape(rows, -1)], dim=-1)


def _pair_terms(a1, b1, c1, a2, b2, c2):
    """a1*b1*c1 + a2*b2*c2 as the reference build contracts `w1*q1*x1 + w2*q2*x2`:
    fma(w1*q1, x1, (w2*q2)*x2)."""
    return enc.fma(a1 * b1, c1, (a2 * b2) * c2)


def _seq_sum(terms: torch.Tensor) -> torch.Tensor:
    """Sequential float32 sum over the last dim."""
    total = torch.zeros(terms.shape[:-1], dtype=torch.float32, device=terms.device)
    for j in range(terms.shape[-1]):
        total = total + terms[..., j]
    return total


# --- IQ2_KL: 2-D codebook of 32 value pairs drawn from the 8 base IQ3 values ---------------------

# Neighbour lists (ik_llama.cpp quantize_row_iq2_kl_impl, k_neighbours): for the m-th (in row-major
# order of (l1, l2)) pair of base IQ3 indices that is not in the codebook, the 8 codebook entries
# searched for the nearest one under the weighted distance.
_IQ2KL_NEIGHBOURS = [
    [2, 0, 6, 11, 7, 3, 8, 15], [0, 2, 3, 6, 7, 1, 8, 4], [0, 1, 3, 4, 8, 7, 9, 6],
    [1, 0, 3, 4, 8, 9, 7, 10], [1, 4, 5, 10, 9, 3, 8, 0], [5, 1, 4, 10, 9, 14, 8, 3],
    [6, 2, 7, 0, 3, 11, 8, 15], [3, 7, 0, 6, 8, 4, 12, 9], [3, 4, 8, 9, 1, 7, 12, 10],
    [4, 10, 5, 9, 1, 8, 13, 14], [11, 2, 6, 7, 20, 15, 25, 21], [8, 7, 3, 12, 9, 16, 17, 13],
    [14, 5, 10, 19, 9, 13, 4, 18], [6, 15, 7, 11, 20, 21, 16, 2], [15, 7, 16, 6, 21, 12, 17, 22],
    [12, 16, 17, 8, 15, 7, 13, 22], [19, 10, 13, 18, 14, 9, 12, 24], [11, 20, 25, 6, 15, 2, 21, 7],
    [20, 15, 21, 6, 11, 7, 16, 26], [14, 19, 29, 10, 28, 18, 13, 24], [25, 11, 20, 21, 15, 6, 26, 30],
    [19, 24, 28, 18, 29, 23, 13, 17], [29, 19, 14, 28, 24, 18, 10, 13], [20, 26, 21, 25, 30, 15, 22, 16],
    [27, 26, 22, 23, 21, 30, 16, 24], [27, 24, 28, 31, 23, 18, 22, 17], [25, 30, 20, 26, 21, 11, 15, 22],
    [30, 26, 25, 20, 21, 27, 22, 15], [30, 27, 31, 26, 22, 23, 21, 24], [31, 27, 30, 26, 28, 23, 22, 24],
    [31, 28, 29, 27, 24, 23, 19, 18], [29, 28, 31, 24, 19, 27, 14, 18],
]  # fmt: skip
IQ2KL_NTRY = 5
IQ2KL_SIGMA = 2.25
IQ2KL_FUDGE = 1.025


def _iq2kl_tables(device):
    """-> (candidate codebook entries (64, 8) per (l1, l2) = 8*l1 + l2, pair values (32, 2) float32).

    A pair in the codebook has itself as its only candidate (repeated); any other pair has its
    8 neighbours, searched in order.
    """
    base = grids.IQ3NL_VALUES[:8].tolist()
    pairs = grids.IQ2KL_PAIRS.tolist()
    cand, m = [], 0
    for j in range(64):
        p = [base[j // 8], base[j % 8]]
        if p in pairs:
            cand.append([pairs.index(p)] * 8)
        else:
            cand.append(_IQ2KL_NEIGHBOURS[m])
            m += 1
    return (
        torch.tensor(cand, dtype=torch.int64, device=device),
        grids.IQ2KL_PAIRS.to(device=device, dtype=torch.float32),
    )


def _iq2kl_index(tables, id_, x1, x2, w1, w2):
    """Codebook index for the weight pairs (x1, x2) scaled by id_ (broadcastable): each coordinate
    goes to its nearest base IQ3 value; if that pair is not in the codebook, the neighbour with the
    smallest w1*(g1 - s1)^2 + w2*(g2 - s2)^2 wins (first of equals)."""
    cand, pv = tables
    base = grids.IQ3NL_VALUES[:8].to(device=x1.device, dtype=torch.float32)
    s1, s2 = id_ * x1, id_ * x2
    nb = cand[8 * enc.nearest_index(base, s1) + enc.nearest_index(base, s2)]  # (..., 8)
    d1 = pv[nb, 0] - s1.unsqueeze(-1)
    d2 = pv[nb, 1] - s2.unsqueeze(-1)
    score = enc.fma(w1.unsqueeze(-1) * d1, d1, (w2.unsqueeze(-1) * d2) * d2)
    return nb.gather(-1, score.argmin(-1, keepdim=True)).squeeze(-1)


def _iq2kl_block_scales(xb, wb, tables):
    """Pass 1 for 32-blocks xb, wb (N, 32) -> best signed float scale (N,); 0 for all-zero blocks."""
    _, pv = tables
    amax, m = enc.block_max(xb)
    safe_m = torch.where(amax < 1e-16, torch.ones_like(m), m)
    v0 = float(grids.IQ3NL_VALUES[0])
    ids = [1 / (-safe_m / v0)] + [(t + v0) / safe_m for t in range(-IQ2KL_NTRY, IQ2KL_NTRY + 1)]
    inv = torch.stack([s * i for i in ids for s in (1.0, -1.0)], dim=-1)  # (N, C): p, m per try
    x1, x2 = xb[:, None, 0::2], xb[:, None, 1::2]
    w1, w2 = wb[:, None, 0::2], wb[:, None, 1::2]
    idx = _iq2kl_index(tables, inv.unsqueeze(-1), x1, x2, w1, w2)  # (N, C, 16)
    q1, q2 = pv[idx, 0], pv[idx, 1]
    sumqx = _seq_sum(_pair_terms(w1, q1, x1, w2, q2, x2))
    sumq2 = _seq_sum(_pair_terms(w1, q1, q1, w2, q2, q2))
    scale = torch.zeros_like(amax)
    best = torch.zeros_like(amax)
    for c in range(inv.shape[-1]):
        sqx, sq2 = sumqx[:, c], sumq2[:, c]
        ok = (sq2 > 0) if c == 0 else (sq2 > 0) & (sqx * sqx > best * sq2)
        d = sqx / torch.where(sq2 > 0, sq2, torch.ones_like(sq2))
        scale = torch.where(ok, d, scale)
        best = torch.where(ok, d * sqx, best)
    return torch.where(amax < 1e-16, torch.zeros_like(scale), scale)


def _encode_iq2kl(x, imatrix):
    """quantize_row_iq2_kl_impl: per-32 scale search over the pair codebook, 6-bit scales
    (nearest of L-1, L, L+1 by weighted error) with d = -max_scale/32, indices, row refit * 1.025."""
    rows, n = x.shape
    nb = n // QK_K
    dev = x.device
    tables = _iq2kl_tables(dev)
    _, pv = tables
    xs = x.reshape(rows, nb, QK_K)
    w = xs.abs() if imatrix is None else enc.importance(xs, imatrix, 32, sigma_factor=IQ2KL_SIGMA)
    w = w.reshape(rows, nb * 8, 32)
    xb = x.reshape(rows, nb * 8, 32)
    xf, wf = xb.reshape(-1, 32), w.reshape(-1, 32)
    per_chunk = max(1, enc.CHUNK // (32 * 8 * (4 * IQ2KL_NTRY + 6)))
    scale = torch.cat(
        [
            _iq2kl_block_scales(xf[i : i + per_chunk], wf[i : i + per_chunk], tables)
            for i in range(0, xf.shape[0], per_chunk)
        ]
    ).reshape(rows, -1)
    max_scale = enc.max_abs_signed(scale)
    d = -max_scale / 32
    ls = enc.rint(_safe_inv(d).unsqueeze(-1) * scale).clamp(-32, 31)
    x1, x2, w1, w2 = xb[..., 0::2], xb[..., 1::2], w[..., 0::2], w[..., 1::2]
    best_ls = ls
    best_score = torch.full_like(ls, torch.finfo(torch.float32).max)
    for off in (-1.0, 0.0, 1.0):  # candidates L-1, L, L+1 inside [-32, 31]; the first lowest wins
        cl = ls + off
        dl = d.unsqueeze(-1) * cl
        idx = _iq2kl_index(tables, _safe_inv(dl).unsqueeze(-1), x1, x2, w1, w2)
        e1 = enc.fma(dl.unsqueeze(-1), pv[idx, 0], -x1)
        e2 = enc.fma(dl.unsqueeze(-1), pv[idx, 1], -x2)
        score = _seq_sum(_pair_terms(w1, e1, e1, w2, e2, e2))
        better = (cl >= -32) & (cl <= 31) & (score < best_score)
        best_ls, best_score = torch.where(better, cl, best_ls), torch.where(better, score, best_score)
    ls = best_ls
    dl = d.unsqueeze(-1) * ls
    idx = _iq2kl_index(tables, _safe_inv(dl).unsqueeze(-1), x1, x2, w1, w2)
    used = (ls != 0).unsqueeze(-1)  # sub-blocks with L = 0 keep zero indices and add nothing
    idx = torch.where(used, idx, torch.zeros_like(idx))
    q1, q2 = ls.unsqueeze(-1) * pv[idx, 0], ls.unsqueeze(-1) * pv[idx, 1]
    wz1, wz2 = torch.where(used, w1, torch.zeros_like(w1)), torch.where(used, w2, torch.zeros_like(w2))
    A = _seq_sum(_pair_terms(wz1, q1, x1, wz2, q2, x2).flatten(1))
    B = _seq_sum(_pair_terms(wz1, q1, q1, wz2, q2, q2).flatten(1))
    d = torch.where(B > 0, A / torch.where(B > 0, B, torch.ones_like(B)), d) * IQ2KL_FUDGE
    ok = (max_scale != 0).unsqueeze(-1)  # an all-zero row is written as zeros
    uls = torch.where(ok, ls.to(torch.int32) + 32, torch.zeros_like(ls, dtype=torch.int32)).reshape(
        rows, nb, 8
    )
    idx = torch.where(ok.unsqueeze(-1), idx, torch.zeros_like(idx)).to(torch.int32).reshape(rows, nb, 8, 16)
    i8 = torch.arange(8, device=dev, dtype=torch.int32)
    scales_h = ((uls >> 4) << (2 * i8)).sum(-1)
    scales_l = (uls[..., :4] & 15) | ((uls[..., 4:] & 15) << 4)
    lo = (idx & 15).reshape(rows, nb, 4, 2, 16)
    qs = (lo[..., 0, :] | (lo[..., 1, :] << 4)).flatten(-2)  # qs[16*(ib//2) + j]
    qh = ((idx >> 4) << i8[:, None]).sum(-2)  # (rows, nb, 16)
    blocks = torch.cat([_u16_bytes(scales_h), scales_l, qs, qh], dim=-1).to(torch.uint8)
    return torch.cat(
        [_f16_bytes(torch.where(ok.squeeze(-1), d, torch.zeros_like(d))), blocks.reshape(rows, -1)], dim=-1
    )


# --- IQ2_KS -------------------------------------------------------------------------------------
# The reference has an exhaustive search (`--slow-iq2ks`) and a faster AVX2 one that
# ggml_quantize_chunk uses by default on x86; the reference vectors come from the latter, which is
# what follows (quantize_row_iq2_ks_fast_impl).

IQ2KS_SIGMA = 1.5
IQ2KS_NMAX = 16  # 5-bit block scales L in [-16, 15]
IQ2KS_NTRY = 13  # candidate scales max / (g0 + t/2), t = -13..13, for each grid


def _hsum8(acc: torch.Tensor) -> torch.Tensor:
    """(..., 8) lanes -> (...,): the AVX2 horizontal sum ((a0+a4) + (a2+a6)) + ((a1+a5) + (a3+a7))."""
    s = acc[..., :4] + acc[..., 4:]
    return (s[..., 0] + s[..., 2]) + (s[..., 1] + s[..., 3])


def _lane_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum a*b over the last dim (a multiple of 8): 8 FMA lanes (lane l: positions l, l+8, ...), _hsum8."""
    a8, b8 = a.reshape(*a.shape[:-1], -1, 8), b.reshape(*b.shape[:-1], -1, 8)
    acc = torch.zeros(a8.shape[:-2] + (8,), dtype=torch.float32, device=a.device)
    for k in range(a8.shape[-2]):
        acc = enc.fma(a8[..., k, :], b8[..., k, :], acc)
    return _hsum8(acc)


def _nearest_scaled(vals: torch.Tensor, d: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
    """Index j of the 4 values minimising (x - f32(d*v_j))^2, the first of equals. d (...,), xb (..., B)."""
    err = (xb.unsqueeze(-1) - (d.unsqueeze(-1) * vals).unsqueeze(-2)) ** 2  # (..., B, 4)
    return err.argmin(-1)


def _iq2ks_try(vals, d, xb, wb):
    """compute_1block_iq2ks for candidate scales d (N, C): indices nearest to x/d and to -x/d; the
    better fit -> (ok (N, C), best scale, score = sum wqx * scale)."""
    x, w = xb.unsqueeze(1), wb.unsqueeze(1)
    res = []
    for sign in (1.0, -1.0):
        q = vals[_nearest_scaled(vals, sign * d, x)]
        res.append((_lane_sum(w * q, x.expand_as(q)), _lane_sum(w * q, q)))
    (sqx1, sq21), (sqx2, sq22) = res
    one = torch.ones_like(sq21)
    ok1 = sq21 > 0
    d1 = sqx1 / torch.where(ok1, sq21, one)
    s1 = sqx1 * d1
    take2 = (sq22 > 0) & (~ok1 | (sqx2 * sqx2 > s1 * sq22))
    d2 = sqx2 / torch.where(sq22 > 0, sq22, one)
    return ok1 | take2, torch.where(take2, d2, d1), torch.where(take2, sqx2 * d2, s1)


def _iq2ks_block_scales(xb, wb):
    """Pass 1 for 32-blocks (N, 32) -> (scale (N,), shift (N,) int32): the first best-scoring of
    max/22 on the base grid, max/(-31 + t/2) on the base grid and max/(-26 + t/2) on the shifted one."""
    dev = xb.device
    g = grids.IQ2NL_VALUES.to(device=dev, dtype=torch.float32)
    amax, m = enc.block_max(xb)
    t = 0.5 * torch.arange(-IQ2KS_NTRY, IQ2KS_NTRY + 1, device=dev, dtype=torch.float32)
    d0 = m / g[7]
    d_base = m.unsqueeze(-1) / (g[0] + t)
    d_shift = m.unsqueeze(-1) / (g[4] + t)
    ok_b, sc_b, score_b = _iq2ks_try(g[:4], torch.cat([d0.unsqueeze(-1), d_base], -1), xb, wb)
    ok_s, sc_s, score_s = _iq2ks_try(g[4:], d_shift, xb, wb)
    ok, sc, score = (torch.cat(p, -1) for p in ((ok_b, ok_s), (sc_b, sc_s), (score_b, score_s)))
    # sequential "strictly better than best" from best = 0, or from the first candidate's score
    floor = torch.where(ok[:, :1], torch.full_like(score[:, :1], -1.0), torch.zeros_like(score[:, :1]))
    score = torch.where(
        ok & ((torch.arange(score.shape[-1], device=dev) == 0) | (score > floor)), score, -2.0
    )
    best = score.argmax(-1, keepdim=True)  # first maximum
    found = score.gather(-1, best).squeeze(-1) > -2.0
    scale = torch.where(found, sc.gather(-1, best).squeeze(-1), d0)
    shift = (found & (best.squeeze(-1) > IQ2KS_NTRY * 2 + 1)).to(torch.int32)
    small = amax < 1e-14
    return torch.where(small, torch.zeros_like(scale), scale), torch.where(
        small, torch.zeros_like(shift), shift
    )


def _encode_iq2ks(x, imatrix):
    """quantize_row_iq2_ks_fast_impl: per-32 scale/shift search, make_qx_quants for the 5-bit block
    scales, each moved by one step when that lowers the block's weighted error, row refit."""
    rows, n = x.shape
    nb = n // QK_K
    dev = x.device
    g = grids.IQ2NL_VALUES.to(device=dev, dtype=torch.float32)
    w = enc.importance(x.reshape(rows, nb, QK_K), imatrix, 32, plain_sigma=0.25, sigma_factor=IQ2KS_SIGMA)
    w = w.reshape(rows, nb * 8, 32)
    xb = x.reshape(rows, nb * 8, 32)
    xf, wf = xb.reshape(-1, 32), w.reshape(-1, 32)
    per_chunk = max(1, enc.CHUNK // (32 * 4 * 2 * (4 * IQ2KS_NTRY + 3)))
    parts = [
        _iq2ks_block_scales(xf[i : i + per_chunk], wf[i : i + per_chunk])
        for i in range(0, xf.shape[0], per_chunk)
    ]
    scale = torch.cat([p[0] for p in parts]).reshape(rows, -1)
    shift = torch.cat([p[1] for p in parts]).reshape(rows, -1)
    sw = w[..., 0]
    for j in range(1, 32):
        sw = sw + w[..., j]
    d, L = enc.make_qx_quants(scale, sw, IQ2KS_NMAX)
    vals = torch.where(shift.bool().unsqueeze(-1), g[4:], g[:4])  # (rows, n_sub, 4)

    def rmse(dl):  # compute_1block_iq2ks_rmse: nearest indices for dl and their weighted error
        idx = _nearest_scaled(vals, dl, xb)
        q = vals.gather(-1, idx)
        diff = enc.fma(-dl.unsqueeze(-1), q, xb)
        return _lane_sum(w * diff, diff), idx

    dl = d.unsqueeze(-1) * (L - IQ2KS_NMAX).to(torch.float32)
    err1, idx = rmse(dl)
    down = (L > 0) & (dl > scale)
    up = ~down & (L < 15) & (dl < scale)  # (sic: 15, as in the reference)
    err2, idx2 = rmse(d.unsqueeze(-1) * (L - IQ2KS_NMAX + torch.where(down, -1, 1)).to(torch.float32))
    move = (down | up) & (err2 < err1)
    L = L + torch.where(move & down, -1, 0) + torch.where(move & up, 1, 0)
    idx = torch.where(move.unsqueeze(-1), idx2, idx)
    q = (L - IQ2KS_NMAX).to(torch.float32).unsqueeze(-1) * vals.gather(-1, idx)
    A, B = _lane_sum((w * q).flatten(1), xb.flatten(1)), _lane_sum((w * q).flatten(1), q.flatten(1))
    d_row = torch.where(B > 0, A / torch.where(B > 0, B, torch.ones_like(B)), d)
    ok = (d != 0).unsqueeze(-1)  # d == 0: only the shift bits are written
    L = torch.where(ok, L, torch.zeros_like(L)).reshape(rows, nb, 8)
    idx = torch.where(ok.unsqueeze(-1), idx, torch.zeros_like(idx)).to(torch.int32).reshape(rows, nb, 8, 32)
    i8 = torch.arange(8, device=dev, dtype=torch.int32)
    extra = ((shift.reshape(rows, nb, 8) << i8) + ((L >> 4) << (i8 + 8))).sum(-1)
    scales = (L[..., 0::2] & 15) | ((L[..., 1::2] & 15) << 4)
    blocks = torch.cat([_u16_bytes(extra), scales, _pack_two_bit(idx)], dim=-1).to(torch.uint8)
    d_row = torch.where(ok.squeeze(-1), d_row, torch.zeros_like(d_row))
    return torch.cat([_f16_bytes(d_row), blocks.reshape(rows, -1)], dim=-1)
