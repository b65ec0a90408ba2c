"""Shared helpers for ik_llama.cpp's IQK codecs (iqk_ks.py, iqk.py): byte unpacking and dequantization.

Format reference: shared/docs/iqk-formats.md sections 2-3 (from ik_llama.cpp @ 8337e4cd). All
arithmetic is float32 in the spec's order, so results are bit-exact on CPU and CUDA.
"""

from __future__ import annotations

import torch

QK_K = 256  # weights per super-block


def split_rows(data: torch.Tensor, n_per_row: int, meta_bytes: int, block_bytes: int):
    """(rows, row_nbytes) uint8 -> (row metadata (rows, meta_bytes), blocks (rows, n_blocks, block_bytes))."""
    rows = data.shape[0]
    n_blocks = n_per_row // QK_K
    meta = data[:, :meta_bytes]
    blocks = data[:, meta_bytes : meta_bytes + n_blocks * block_bytes].reshape(rows, n_blocks, block_bytes)
    return meta, blocks


def f32_at(raw: torch.Tensor) -> torch.Tensor:
    """(..., 4) uint8 little-endian -> (...,) float32."""
    return raw.contiguous().view(torch.float32).squeeze(-1)


def f16_at(raw: torch.Tensor) -> torch.Tensor:
    """(..., 2) uint8 little-endian fp16 -> (...,) float32."""
    return raw.contiguous().view(torch.float16).squeeze(-1).to(torch.float32)


def u16_at(raw: torch.Tensor) -> torch.Tensor:
    """(..., 2k) uint8 -> (..., k) int32, little-endian 16-bit words."""
    b = raw.to(torch.int32)
    return b[..., 0::2] | (b[..., 1::2] << 8)


def bits(word: torch.Tensor, n: int, width: int = 1) -> torch.Tensor:
    """(...,) int -> (..., n): field i is `(word >> width*i) & (2**width - 1)`."""
    sh = torch.arange(n, device=word.device, dtype=torch.int32) * width
    return (word.to(torch.int32).unsqueeze(-1) >> sh) & ((1 << width) - 1)


def nibble_pairs(raw: torch.Tensor) -> torch.Tensor:
    """(..., k) uint8 -> (..., 2, k) int32: low nibbles, then high nibbles."""
    b = raw.to(torch.int32)
    return torch.stack([b & 15, b >> 4], dim=-2)


def dequant(d: torch.Tensor, scale: torch.Tensor, grid: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """y = f32(d * L) * grid[idx]

    d: (rows, 1, ...) or broadcastable to scale; scale: (..., n_sub) integer block scales L;
    idx: (..., n_sub, sub_len) grid indices (shift offset already added). Returns float32 like idx.
    """
    dl = d * scale.to(torch.float32)  # rounded to float32 first (spec 0.7)
    values = grid.to(device=idx.device, dtype=torch.float32)[idx.long()]
    return dl.unsqueeze(-1) * values
