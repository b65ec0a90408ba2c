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


def _max_abs_signed(s: torch.Tensor) -> torch.Tensor:
    """(rows, n) -> (rows,): the first entry of largest magnitude, with its sign."""
    return s.gather(-1, s.abs().argmax(-1, keepdim=True)).squeeze(-1)


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
    d = -_max_abs_signed(scale) / 16
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
