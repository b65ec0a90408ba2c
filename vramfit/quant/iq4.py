"""IQ4_XS: 256-weight super-blocks of 8 sub-blocks of 32, non-linear 4-bit grid (mainline layout).

Block (136 B): d fp16 | scales_h u16 | scales_l[4] | qs[128]

- Sub-block ib (0..7) has a 6-bit scale: low 4 bits = (scales_l[ib//2] >> 4*(ib%2)) & 15,
  high 2 bits = (scales_h >> 2*ib) & 3; it is stored with an offset of 32.
- Each sub-block uses 16 bytes of qs: byte j holds weight j (low nibble) and weight j+16 (high nibble),
  as in IQ4_NL. The nibble indexes `kvalues_iq4nl`.
- y = (d * (ls - 32)) * kvalues_iq4nl[q], in that float order (ggml `dequantize_row_iq4_xs`).
"""

from __future__ import annotations

import torch

from vramfit.quant.legacy import KVALUES_IQ4NL, bit_fields, blocks, f16, lookup, nibbles, rows_out
from vramfit.quant.registry import Codec, register


def _xs_scales(b: torch.Tensor) -> torch.Tensor:
    """The 8 sub-block scales (offset removed): (rows, nb, 136) -> (rows, nb, 8) int32."""
    lead = b.shape[:-1]
    # scales_l nibbles in order byte0 lo, byte0 hi, byte1 lo, ...
    low = bit_fields(b[..., 4:8], 4).transpose(-1, -2).reshape(*lead, 8)
    # scales_h 2-bit fields, lowest first: byte 2 holds ib 0..3, byte 3 holds ib 4..7
    high = bit_fields(b[..., 2:4], 2).transpose(-1, -2).reshape(*lead, 8)
    return (low | (high << 4)).to(torch.int32) - 32


@register
class IQ4_XS(Codec):
    name = "iq4_xs"

    def decode(self, data, n_per_row):
        b = blocks(data, self.gtype.type_size)  # (rows, nb, 136)
        lead = b.shape[:-1]
        dl = f16(b, 0) * _xs_scales(b).float()  # (rows, nb, 8)
        q = nibbles(b[..., 8:136].reshape(*lead, 8, 16))  # (rows, nb, ib, 32)
        y = dl.unsqueeze(-1) * lookup(KVALUES_IQ4NL, q)  # (rows, nb, ib, 32)
        return rows_out(y, n_per_row)
