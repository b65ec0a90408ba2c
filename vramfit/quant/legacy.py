"""Legacy 32-weight block types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q6_0, IQ4_NL).

Block layouts (ggml `block_*` structs, little-endian, fp16 = IEEE half):

    Q4_0   18 B: d fp16 | qs[16]                y = d * (q - 8)
    Q4_1   20 B: d fp16 | m fp16 | qs[16]       y = d * q + m
    Q5_0   22 B: d fp16 | qh u32 | qs[16]       y = d * (q - 16)
    Q5_1   24 B: d fp16 | m fp16 | qh u32 | qs[16]   y = d * q + m
    Q8_0   34 B: d fp16 | qs int8[32]           y = d * q
    Q6_0   26 B: d fp16 | qh[8] | qs[16]        y = d * (q - 32)        (ik_llama.cpp only)
    IQ4_NL 18 B: d fp16 | qs[16]                y = d * kvalues_iq4nl[q]

In every 4-bit `qs[16]`, byte j holds weight j in its low nibble and weight j+16 in its high nibble.
Q5_0/Q5_1 keep the fifth bit of weight k in bit k of `qh`. Q6_0 keeps two high bits per weight in
`qh[8]`: weight j (j < 16) uses bits 4*(j//8)..+1 of qh[j%8], weight j+16 the two bits above those.

The helpers here (block view, fp16 fields, nibble/bit unpacking) are shared by the K-quant and IQ4
modules. All work on CPU and CUDA tensors alike.
"""

from __future__ import annotations

import torch

from vramfit.quant.registry import Codec, register

QK = 32  # weights per legacy block

# kvalues_iq4nl (== iq4k_values[0..15], docs/iqk-formats.md Appendix A)
KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


# ---------------------------------------------------------------------------------------------
# shared helpers


def blocks(data: torch.Tensor, type_size: int) -> torch.Tensor:
    """(rows, row_nbytes) uint8 -> (rows, nblocks, type_size) uint8."""
    return data.reshape(data.shape[0], -1, type_size)


def f16(b: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 field at byte `offset` of every block: (rows, nb, type_size) -> (rows, nb, 1) float32."""
    return b[..., offset : offset + 2].contiguous().view(torch.float16).float()


def nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(..., n) uint8 -> (..., 2n) uint8: all low nibbles, then all high nibbles."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def bit_fields(b: torch.Tensor, width: int) -> torch.Tensor:
    """Split each byte into 8/width fields, lowest first: (..., n) uint8 -> (..., 8/width, n) uint8.

    out[..., k, i] = (b[..., i] >> (width*k)) & (2**width - 1)
    """
    n_fields = 8 // width
    shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=b.device).view(n_fields, 1)
    return (b.unsqueeze(-2) >> shifts) & ((1 << width) - 1)


def bits_le(b: torch.Tensor) -> torch.Tensor:
    """Little-endian bit string: (..., n) uint8 -> (..., 8n) uint8, bit k = (b[k//8] >> k%8) & 1."""
    return bit_fields(b, 1).transpose(-1, -2).reshape(*b.shape[:-1], -1)


def lookup(table: tuple[int, ...], idx: torch.Tensor) -> torch.Tensor:
    """Map integer indices through a small int table, giving float32 (exact for these tables)."""
    t = torch.tensor(table, dtype=torch.float32, device=idx.device)
    return t[idx.long()]


def rows_out(y: torch.Tensor, n_per_row: int) -> torch.Tensor:
    return y.reshape(-1, n_per_row)


# ---------------------------------------------------------------------------------------------
# codecs


class _LegacyCodec(Codec):
    def _blocks(self, data: torch.Tensor) -> torch.Tensor:
        return blocks(data, self.gtype.type_size)


@register
class Q4_0(_LegacyCodec):
    name = "q4_0"

    def decode(self, data, n_per_row):
        b = self._blocks(data)  # (rows, nb, 18)
        d = f16(b, 0)  # (rows, nb, 1)
        q = nibbles(b[..., 2:18]).to(torch.int32) - 8  # (rows, nb, 32)
        return rows_out(q.float() * d, n_per_row)


@register
class Q4_1(_LegacyCodec):
    name = "q4_1"

    def decode(self, data, n_per_row):
        b = self._blocks(data)  # (rows, nb, 20)
        d, m = f16(b, 0), f16(b, 2)  # (rows, nb, 1)
        q = nibbles(b[..., 4:20]).float()  # (rows, nb, 32)
        return rows_out(q * d + m, n_per_row)


def _q5_quants(b: torch.Tensor, qh_off: int) -> torch.Tensor:
    """5-bit values 0..31 of a Q5_0/Q5_1 block: (rows, nb, size) -> (rows, nb, 32) int32."""
    qh = bits_le(b[..., qh_off : qh_off + 4])  # (rows, nb, 32) bit k -> weight k
    lo = nibbles(b[..., qh_off + 4 : qh_off + 20])  # (rows, nb, 32)
    return (lo | (qh << 4)).to(torch.int32)


@register
class Q5_0(_LegacyCodec):
    name = "q5_0"

    def decode(self, data, n_per_row):
        b = self._blocks(data)  # (rows, nb, 22)
        d = f16(b, 0)
        q = _q5_quants(b, 2) - 16
        return rows_out(q.float() * d, n_per_row)


@register
class Q5_1(_LegacyCodec):
    name = "q5_1"

    def decode(self, data, n_per_row):
        b = self._blocks(data)  # (rows, nb, 24)
        d, m = f16(b, 0), f16(b, 2)
        q = _q5_quants(b, 4).float()
        return rows_out(q * d + m, n_per_row)


@register
class Q8_0(_LegacyCodec):
    name = "q8_0"

    def decode(self, data, n_per_row):
        b = self._blocks(data)  # (rows, nb, 34)
        d = f16(b, 0)
        q = b[..., 2:34].contiguous().view(torch.int8).float()  # (rows, nb, 32)
        return rows_out(q * d, n_per_row)


@register
class Q6_0(_LegacyCodec):
    name = "q6_0"

    def decode(self, data, n_per_row):
        b = self._blocks(data)  # (rows, nb, 26)
        d = f16(b, 0)
        # crumbs[k, i] = (qh[i] >> 2k) & 3; weights 0-7 use k=0, 8-15 k=2, 16-23 k=1, 24-31 k=3
        crumbs = bit_fields(b[..., 2:10], 2)  # (rows, nb, 4, 8)
        hi = crumbs[..., [0, 2, 1, 3], :].reshape(*b.shape[:-1], QK)  # (rows, nb, 32)
        lo = nibbles(b[..., 10:26])  # (rows, nb, 32)
        q = (lo | (hi << 4)).to(torch.int32) - 32
        return rows_out(q.float() * d, n_per_row)


@register
class IQ4_NL(_LegacyCodec):
    name = "iq4_nl"

    def decode(self, data, n_per_row):
        b = self._blocks(data)  # (rows, nb, 18)
        d = f16(b, 0)
        v = lookup(KVALUES_IQ4NL, nibbles(b[..., 2:18]))  # (rows, nb, 32)
        return rows_out(d * v, n_per_row)
