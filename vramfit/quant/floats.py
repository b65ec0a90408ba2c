"""Plain float types: F32, F16, BF16 (ggml stores them as little-endian IEEE values, no blocks)."""

from __future__ import annotations

import torch

from vramfit.quant.registry import Codec, register


class _FloatCodec(Codec):
    dtype: torch.dtype = torch.float32

    def decode(self, data: torch.Tensor, n_per_row: int) -> torch.Tensor:
        return data.contiguous().view(self.dtype).reshape(-1, n_per_row).to(torch.float32)

    def encode(self, x: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
        # torch rounds to nearest-even, as ggml's F16C and bf16 conversions do
        return x.to(self.dtype).contiguous().view(torch.uint8).reshape(x.shape[0], -1)


@register
class F32(_FloatCodec):
    name = "f32"
    dtype = torch.float32


@register
class F16(_FloatCodec):
    name = "f16"
    dtype = torch.float16


@register
class BF16(_FloatCodec):
    name = "bf16"
    dtype = torch.bfloat16
