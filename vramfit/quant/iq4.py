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

from vramfit.quant.legacy import (
    KVALUES_IQ4NL,
    best_index,
    bit_fields,
    blocks,
    f16,
    first_absmax,
    half_bytes,
    iq4_block_fit,
    lookup,
    nibbles,
    pack_nibbles,
    rint,
    rows_out,
    seq_dot,
    sqrt_f32,
)
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


# ---------------------------------------------------------------------------------------------
# encoder: ik_llama.cpp quantize_iq4_xs (quantize_row_iq4_nl_impl with 256-weight super-blocks)


def _iq4_xs_encode(x: torch.Tensor, imatrix: torch.Tensor | None) -> torch.Tensor:
    """Per 32-block scale search (`iq4_block_fit`, ntry=7), then 6-bit block scales under an fp16 d.

    Error weights: x^2 without an imatrix; imatrix * sqrt(sigma2 + x^2) with sigma2 = 2*mean(x^2)
    over the 256-weight super-block (spec 4.0). d = -max_scale/32 with max_scale the block scale of
    largest magnitude; block scale l = nearest(scale/d) in -32..31; indices are refit to d*l.
    """
    rows = x.shape[0]
    xs = x.reshape(rows, -1, 256)  # (rows, nsb, 256)
    nsb = xs.shape[1]
    if imatrix is None:
        w = xs * xs
    else:
        sigma2 = seq_dot(xs, xs) * (2.0 / 256)  # (rows, nsb), sequential float32 sum
        w = imatrix.reshape(1, nsb, 256) * sqrt_f32(sigma2.unsqueeze(-1) + xs * xs)
    xb = xs.reshape(rows, nsb, 8, 32)
    scales, _ = iq4_block_fit(xb, w.reshape(xb.shape))  # (rows, nsb, 8), 0 for all-tiny blocks
    _, max_scale = first_absmax(scales)
    d = -max_scale / 32
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    ls = torch.clamp(rint(inv.unsqueeze(-1) * scales), -32, 31)  # (rows, nsb, 8)
    dl = d.unsqueeze(-1) * ls
    idl = torch.where(dl != 0, 1 / dl, torch.zeros_like(dl))
    grid = torch.tensor(KVALUES_IQ4NL, dtype=torch.float32, device=x.device)
    q = best_index(grid, idl.unsqueeze(-1) * xb)  # (rows, nsb, 8, 32)
    u = (ls + 32).to(torch.int64)  # 0..63
    lo, hi = u & 15, u >> 4
    scales_l = (lo[..., 0::2] | (lo[..., 1::2] << 4)).to(torch.uint8)  # (rows, nsb, 4)
    h = (hi << (2 * torch.arange(8, device=x.device))).sum(-1)  # (rows, nsb) u16
    scales_h = torch.stack([h & 255, h >> 8], dim=-1).to(torch.uint8)
    qs = pack_nibbles(q).reshape(rows, nsb, 128)
    out = torch.cat([half_bytes(d), scales_h, scales_l, qs], dim=-1)
    return out.reshape(rows, -1)


IQ4_XS.encode = lambda self, x, imatrix=None: _iq4_xs_encode(x, imatrix)  # noqa: E731
