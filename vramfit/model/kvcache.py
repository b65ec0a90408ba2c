"""KV cache storage types: float (f32, f16, bf16) or ggml blocks (q8_0, q6_0, q5_0, q4_0, iq4_nl), K and
V chosen separately, each with an optional Walsh-Hadamard rotation (ik_llama.cpp's -khad / -vhad).

Block types are written with the codecs' encode when tokens are stored and decoded when attention
reads them; the storage is allocated once, (n_layer, n_kv_heads, n_ctx, row bytes), at its planned size.

The rotation H is the normalised Walsh-Hadamard matrix of the head size (orthogonal and symmetric), so
spreading an outlier over the whole head costs nothing in exactness:
- K: the cache holds k H, and queries are rotated too: (q H)(k H)^T = q k^T.
- V: the cache holds v H; attention's output P (v H) = (P v) H is rotated back by H.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from vramfit.gguf.types import type_by_name

KV_TYPES = ("f32", "f16", "bf16", "q8_0", "q6_0", "q5_0", "q4_0", "iq4_nl")
_FLOAT = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


class KVTypeError(ValueError):
    """A KV cache type that does not exist or does not suit the model's head size."""


@dataclass(frozen=True)
class KVSpec:
    k: str = "f32"
    v: str = "f32"
    k_hadamard: bool = False
    v_hadamard: bool = False

    @classmethod
    def parse(
        cls, ctk: str = "f32", ctv: str | None = None, khad: bool = False, vhad: bool = False
    ) -> KVSpec:
        for t in (ctk, ctv or ctk):
            if t.lower() not in KV_TYPES:
                raise KVTypeError(f"unknown KV cache type {t!r} (choose from {', '.join(KV_TYPES)})")
        return cls(ctk.lower(), (ctv or ctk).lower(), khad, vhad)

    @classmethod
    def of(cls, kv: KVSpec | str | torch.dtype | None) -> KVSpec:
        """A spec from a spec, a type name ("q8_0", "q8_0/q6_0") or a torch float dtype."""
        if kv is None:
            return cls()
        if isinstance(kv, KVSpec):
            return kv
        if isinstance(kv, torch.dtype):
            name = next((n for n, d in _FLOAT.items() if d == kv), None)
            if name is None:
                raise KVTypeError(f"no KV cache type for {kv}")
            return cls(name, name)
        k, _, v = kv.partition("/")
        return cls.parse(k, v or None)

    @property
    def is_plain(self) -> bool:
        """float32 without rotations: the cache the engine always had."""
        return self == KVSpec()

    def check(self, head_dim: int) -> None:
        for t, had in ((self.k, self.k_hadamard), (self.v, self.v_hadamard)):
            block = type_by_name(t).block_size
            if head_dim % block:
                raise KVTypeError(
                    f"KV cache type {t} needs a head size that is a multiple of {block}, not {head_dim}"
                )
            if had and head_dim & (head_dim - 1):
                raise KVTypeError(f"the Hadamard rotation needs a power-of-two head size, not {head_dim}")

    def bytes_per_token(self, n_layer: int, n_kv_heads: int, head_dim: int) -> int:
        n = n_kv_heads * head_dim
        return n_layer * (type_by_name(self.k).nbytes((n,)) + type_by_name(self.v).nbytes((n,)))


@lru_cache(maxsize=8)
def hadamard(n: int) -> torch.Tensor:
    """The n x n Walsh-Hadamard matrix (Sylvester order) divided by sqrt(n): orthogonal, symmetric."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return (h / n**0.5).to(torch.float32)


class KVStore:
    """K or V of every layer: (n_layer, n_kv_heads, n_ctx, head_dim) values in one storage type."""

    def __init__(
        self, type_name: str, n_layer: int, n_kv_heads: int, n_ctx: int, head_dim: int, rotate: bool,
        device: torch.device | str | None = None,
    ):  # fmt: skip
        self.type = type_name
        self.head_dim = head_dim
        self.rotation = hadamard(head_dim).to(device) if rotate else None
        self._decoded: torch.Tensor | None = None  # read()'s float32 buffer, made on the first read
        if type_name in _FLOAT:
            self.codec = None
            shape = (n_layer, n_kv_heads, n_ctx, head_dim)
            self.data = torch.zeros(shape, dtype=_FLOAT[type_name], device=device)
        else:
            from vramfit.quant import get_codec

            self.codec = get_codec(type_name)
            row = type_by_name(type_name).row_nbytes(head_dim)
            self.data = torch.zeros((n_layer, n_kv_heads, n_ctx, row), dtype=torch.uint8, device=device)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def write(self, layer: int, start: int, x: torch.Tensor) -> None:
        """x (n_tokens, n_kv_heads, head_dim) float32 at positions start.."""
        n, h, d = x.shape
        if self.rotation is not None:
            x = x @ self.rotation
        x = x.transpose(0, 1)  # (heads, n, d)
        if self.codec is None:
            self.data[layer, :, start : start + n] = x
        elif x.device.type == "cpu":
            from vramfit.quant import encode  # C encoders where built (same bytes as the codec's)

            rows = torch.from_numpy(encode(self.type, x.reshape(h * n, d).contiguous().float()))
            self.data[layer, :, start : start + n] = rows.view(h, n, -1)
        else:  # on a GPU: the codec's torch encoder runs there (the same bytes), no trip to the host
            rows = self.codec.encode(x.reshape(h * n, d).float())
            self.data[layer, :, start : start + n] = rows.view(h, n, -1)

    def read(self, layer: int, end: int) -> torch.Tensor:
        """Positions 0..end-1 as float32 (n_kv_heads, end, head_dim), still rotated. f16/bf16 and q8_0
        are decoded into one buffer the store keeps (valid until its next read): no allocation per
        layer, so no heap holes that grow with the context."""
        x = self.data[layer, :, :end]
        if x.dtype == torch.float32:
            return x
        h = x.shape[0]
        if self.codec is None:
            return self._scratch(end).copy_(x)
        if self.type == "q8_0":
            out = self._scratch(end)
            blocks = x.view(h, end, -1, 34)  # d fp16 | 32 int8 quants, as the codec's decode
            o = out.view(h, end, -1, 32).copy_(blocks[..., 2:].view(torch.int8))
            o.mul_(blocks[..., :2].contiguous().view(torch.float16).float())
            return out
        return self.codec.decode(x.reshape(h * end, -1), self.head_dim).view(h, end, self.head_dim)

    def _scratch(self, end: int) -> torch.Tensor:
        if self._decoded is None:
            n_kv, n_ctx = self.data.shape[1:3]
            self._decoded = torch.empty(
                (n_kv, n_ctx, self.head_dim), dtype=torch.float32, device=self.data.device
            )
        return self._decoded[:, :end]
