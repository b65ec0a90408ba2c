"""Quantization codecs. Public API: `decode(type_name, data, n_per_row)`, `encode(type_name, x, imatrix)`.

Each family module registers its codecs on import; add a family by adding a file and listing it here.
"""

from __future__ import annotations

import importlib

import numpy as np
import torch

from vramfit.quant.registry import Codec, UnsupportedTypeError, codec_names, get_codec, register

_FAMILIES = ["floats", "legacy", "kquants", "iq4", "iqk_ks", "iqk"]
for _family in _FAMILIES:
    importlib.import_module(f"vramfit.quant.{_family}")


def _as_tensor(a: np.ndarray | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
    return t.to(dtype)


def decode(type_name: str, data: np.ndarray | torch.Tensor, n_per_row: int) -> np.ndarray:
    """Packed rows (rows, row_nbytes) uint8 -> float32 (rows, n_per_row)."""
    codec = get_codec(type_name)
    raw = _as_tensor(data, torch.uint8).reshape(-1, codec.gtype.row_nbytes(n_per_row))
    return codec.decode(raw, n_per_row).numpy()


_C_SAFE_MAX = 1e6  # "auto" sends larger (or NaN) inputs to the torch codecs


def encode(type_name: str, x: np.ndarray | torch.Tensor, imatrix=None, backend: str = "auto") -> np.ndarray:
    """float32 (rows, n_per_row) -> packed rows (rows, row_nbytes) uint8.

    backend: "torch" (the reference codecs), "c" (the C encoders of `vramfit.quant.fast`; raises
    when the type has none or the extension is not built) or "auto" (C where available, for CPU
    inputs, else torch). Both give the same bytes. "auto" keeps inputs with non-finite values or
    magnitudes >= 1e6 (where fp16 scales and float32 sums overflow) on torch, whose NaN propagation the C
    code does not replicate.
    """
    if backend not in ("auto", "torch", "c"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'c', not {backend!r}")
    codec = get_codec(type_name)
    xt = _as_tensor(x, torch.float32)
    if xt.ndim != 2:
        raise ValueError(f"encode expects a 2-D array, got shape {tuple(xt.shape)}")
    codec.gtype.row_nbytes(xt.shape[1])  # raises for a row length that is not a block multiple
    imat = None if imatrix is None else _as_tensor(imatrix, torch.float32)
    if backend != "torch":
        from vramfit.quant import fast

        usable = fast.supports(codec.name) and xt.device.type == "cpu"
        if backend == "c" and not usable:
            raise UnsupportedTypeError(f"no C encoder for {codec.name} (or input not on the CPU)")
        if usable and (backend == "c" or xt.numel() == 0 or float(xt.abs().max()) < _C_SAFE_MAX):
            return fast.encode(codec.name, xt, None if imat is None else imat.cpu())
    return codec.encode(xt, imat).numpy()


__all__ = ["Codec", "UnsupportedTypeError", "codec_names", "decode", "encode", "get_codec", "register"]
