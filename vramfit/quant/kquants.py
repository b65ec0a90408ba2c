"""K-quants: 256-weight super-blocks (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K).

Block layouts (ggml `block_q*_K`, little-endian, QK_K = 256):

    Q2_K  84 B: scales[16] | qs[64] | d fp16 | dmin fp16
          16 sub-blocks of 16; scales[i] = scale (low nibble) | min (high nibble)
          y = (d * sc) * q - (dmin * m),  q 2-bit
    Q3_K 110 B: hmask[32] | qs[64] | scales[12] | d fp16
          16 sub-blocks of 16; 6-bit scales (packed, see `_q3_scales`), minus 32
          y = (d * (sc - 32)) * (q - (high bit ? 0 : 4)),  q 2-bit + inverted high bit
    Q4_K 144 B: d fp16 | dmin fp16 | scales[12] | qs[128]
          8 sub-blocks of 32; 6-bit scale and min packed in 12 bytes (`_k4_scales_mins`)
          y = (d * sc) * q - (dmin * m),  q 4-bit
    Q5_K 176 B: d fp16 | dmin fp16 | scales[12] | qh[32] | qs[128]
          as Q4_K with a fifth bit from qh
    Q6_K 210 B: ql[128] | qh[64] | scales int8[16] | d fp16
          16 sub-blocks of 16; y = (d * sc) * (q - 32),  q 6-bit

Bit placement, for the 2-bit fields of Q2_K/Q3_K: each 128-weight half uses 32 bytes of qs; weight
32*j + l of that half is (qs[l] >> 2j) & 3. For Q4_K/Q5_K each 64-weight chunk uses 32 bytes of qs:
low nibbles give its first 32 weights, high nibbles the next 32. The extra high bits (Q3_K hmask,
Q5_K qh) are bit-planes: weight 32*k + l takes bit k of byte l. Q6_K: each 128-weight half uses 64
bytes of ql (low nibbles -> weights 0..63, high nibbles -> 64..127) and 32 bytes of qh (bits 2k..2k+1
of qh[l] -> weight 32*k + l).

The float operation order matches ggml's `dequantize_row_q*_K` exactly (sub-block scale first, then
times the quant, then minus the min), which is what makes the output bit-exact.
"""

from __future__ import annotations

import torch

from vramfit.quant.legacy import bit_fields, blocks, f16, nibbles, rows_out
from vramfit.quant.registry import Codec, register

QK_K = 256


def _per16(s: torch.Tensor) -> torch.Tensor:
    """Broadcast per-sub-block values (rows, nb, 256/g) to weights (rows, nb, 256)."""
    return s.repeat_interleave(QK_K // s.shape[-1], dim=-1)


def _crumbs_128(qs: torch.Tensor) -> torch.Tensor:
    """2-bit fields of Q2_K/Q3_K: qs (rows, nb, 64) -> (rows, nb, 256) uint8 in weight order."""
    halves = qs.reshape(*qs.shape[:-1], 2, 32)  # (rows, nb, half, l)
    return bit_fields(halves, 2).reshape(*qs.shape[:-1], QK_K)  # (rows, nb, half, j, l) -> 256


def _k4_scales_mins(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml `get_scale_min_k4` for all 8 sub-blocks: scales[12] -> (sc, m), each (rows, nb, 8) uint8.

    j < 4:  sc = s[j] & 63,                          m = s[j+4] & 63
    j >= 4: sc = (s[j+4] & 15) | (s[j-4] >> 6) << 4,  m = (s[j+4] >> 4) | (s[j] >> 6) << 4
    """
    a, b, c = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([a & 63, (c & 15) | ((a >> 6) << 4)], dim=-1)
    m = torch.cat([b & 63, (c >> 4) | ((b >> 6) << 4)], dim=-1)
    return sc, m


def _q3_scales(s: torch.Tensor) -> torch.Tensor:
    """Q3_K's 16 six-bit scales from scales[12]: (rows, nb, 12) uint8 -> (rows, nb, 16) int32 (minus 32).

    low 4 bits of scale k: s[k] & 15 for k < 8, s[k-8] >> 4 for k >= 8
    high 2 bits of scale k: (s[8 + k%4] >> 2*(k//4)) & 3
    """
    low = nibbles(s[..., 0:8])  # (rows, nb, 16)
    high = bit_fields(s[..., 8:12], 2).reshape(*s.shape[:-1], 16)  # (rows, nb, k//4, k%4) -> 16
    return (low | (high << 4)).to(torch.int32) - 32


class _KCodec(Codec):
    def _blocks(self, data: torch.Tensor) -> torch.Tensor:
        return blocks(data, self.gtype.type_size)


@register
class Q2_K(_KCodec):
    name = "q2_K"

    def decode(self, data, n_per_row):
        b = self._blocks(data)  # (rows, nb, 84)
        sc = b[..., 0:16]  # (rows, nb, 16)
        q = _crumbs_128(b[..., 16:80]).float()  # (rows, nb, 256)
        d, dmin = f16(b, 80), f16(b, 82)  # (rows, nb, 1)
        dl = d * (sc & 15).float()  # (rows, nb, 16)
        ml = dmin * (sc >> 4).float()
        return rows_out(_per16(dl) * q - _per16(ml), n_per_row)


@register
class Q3_K(_KCodec):
    name = "q3_K"

    def decode(self, data, n_per_row):
        b = self._blocks(data)  # (rows, nb, 110)
        # hmask is a bit-plane: weight 32*k + l takes bit k of hmask[l]
        hbit = bit_fields(b[..., 0:32], 1).reshape(*b.shape[:-1], QK_K)  # (rows, nb, k, l) -> 256
        low = _crumbs_128(b[..., 32:96])  # (rows, nb, 256)
        q = low.to(torch.int32) - 4 + 4 * hbit.to(torch.int32)  # (rows, nb, 256) in -4..3
        d = f16(b, 108)  # (rows, nb, 1)
        dl = d * _q3_scales(b[..., 96:108]).float()  # (rows, nb, 16)
        return rows_out(_per16(dl) * q.float(), n_per_row)


def _k4_dm(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-32 scale and min of Q4_K/Q5_K: (rows, nb, 8) float32 each, as d*sc and dmin*m."""
    d, dmin = f16(b, 0), f16(b, 2)  # (rows, nb, 1)
    sc, m = _k4_scales_mins(b[..., 4:16])  # (rows, nb, 8)
    return d * sc.float(), dmin * m.float()


def _k4_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K low 4 bits: qs (rows, nb, 128) -> (rows, nb, 256): per 32 bytes, low then high nibbles."""
    chunks = qs.reshape(*qs.shape[:-1], 4, 32)  # (rows, nb, chunk, l)
    return nibbles(chunks).reshape(*qs.shape[:-1], QK_K)


@register
class Q4_K(_KCodec):
    name = "q4_K"

    def decode(self, data, n_per_row):
        b = self._blocks(data)  # (rows, nb, 144)
        d1, m1 = _k4_dm(b)  # (rows, nb, 8)
        q = _k4_nibbles(b[..., 16:144]).float()  # (rows, nb, 256)
        return rows_out(_per16(d1) * q - _per16(m1), n_per_row)


@register
class Q5_K(_KCodec):
    name = "q5_K"

    def decode(self, data, n_per_row):
        b = self._blocks(data)  # (rows, nb, 176)
        d1, m1 = _k4_dm(b)  # (rows, nb, 8)
        # qh is a bit-plane: weight 32*k + l takes bit k of qh[l]
        hbit = bit_fields(b[..., 16:48], 1).reshape(*b.shape[:-1], QK_K)  # (rows, nb, 256)
        q = (_k4_nibbles(b[..., 48:176]) | (hbit << 4)).float()
        return rows_out(_per16(d1) * q - _per16(m1), n_per_row)


@register
class Q6_K(_KCodec):
    name = "q6_K"

    def decode(self, data, n_per_row):
        b = self._blocks(data)  # (rows, nb, 210)
        lead = b.shape[:-1]
        ql = nibbles(b[..., 0:128].reshape(*lead, 2, 64))  # (rows, nb, half, 128)
        qh = bit_fields(b[..., 128:192].reshape(*lead, 2, 32), 2)  # (rows, nb, half, k, l)
        q = (ql | (qh.reshape(*lead, 2, 128) << 4)).to(torch.int32) - 32
        sc = b[..., 192:208].contiguous().view(torch.int8).float()  # (rows, nb, 16)
        d = f16(b, 208)  # (rows, nb, 1)
        dl = d * sc  # (rows, nb, 16)
        return rows_out(_per16(dl) * q.reshape(*lead, QK_K).float(), n_per_row)
