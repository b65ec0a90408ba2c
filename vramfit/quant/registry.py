"""Codec registry: one `Codec` per ggml type, found by lower-case name or type id.

A codec turns packed GGUF rows into float32 and back. Both directions are written in torch so the
same code runs on CPU and CUDA; the vectorised decode is the oracle for every fast kernel.
"""

from __future__ import annotations

import torch

from vramfit.gguf.types import GGMLType, type_by_id, type_by_name


class UnsupportedTypeError(ValueError):
    pass


class Codec:
    """Base class. Subclasses set `name` and implement `decode` (and `encode` where supported).

    decode: uint8 tensor (rows, row_nbytes) -> float32 tensor (rows, n_per_row)
    encode: float32 tensor (rows, n_per_row), optional importance (n_per_row,) -> uint8 (rows, row_nbytes)
    """

    name: str = ""

    @property
    def gtype(self) -> GGMLType:
        return type_by_name(self.name)

    def decode(self, data: torch.Tensor, n_per_row: int) -> torch.Tensor:
        raise UnsupportedTypeError(f"no decoder for tensor type {self.name}")

    def encode(self, x: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
        raise UnsupportedTypeError(f"no encoder for tensor type {self.name}")


_CODECS: dict[str, Codec] = {}


def register(cls: type[Codec]) -> type[Codec]:
    """Class decorator: instantiate and register under the codec's lower-case ggml name."""
    codec = cls()
    type_by_name(codec.name)  # the name must exist in the type table
    _CODECS[codec.name.lower()] = codec
    return cls


def get_codec(type_: str | int | GGMLType) -> Codec:
    if isinstance(type_, GGMLType):
        name = type_.name
    elif isinstance(type_, int):
        name = type_by_id(type_).name
    else:
        name = type_by_name(type_).name
    codec = _CODECS.get(name.lower())
    if codec is None:
        raise UnsupportedTypeError(f"tensor type {name} is not supported yet (no codec)")
    return codec


def codec_names() -> list[str]:
    return sorted(_CODECS)
