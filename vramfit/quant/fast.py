"""C quantization encoders (the optional extension `vramfit.quant._cenc`).

Ports of the torch encoders' hot paths to C, multithreaded over rows. Each produces exactly the bytes
of the torch encoder of the same type (the torch code stays the oracle; tests/quant/test_fast_encode.py
compares them). `vramfit.quant.encode(..., backend="auto")` uses these when the extension is built.
"""

from __future__ import annotations

import numpy as np
import torch

try:  # the compiled extension is optional
    from vramfit.quant import _cenc
except ImportError:  # pragma: no cover - depends on the build
    _cenc = None

_TYPES = frozenset(_cenc.types()) if _cenc is not None else frozenset()


def available() -> bool:
    """True when the extension is built."""
    return _cenc is not None


def types() -> list[str]:
    """Lower-case names of the types with a C encoder."""
    return sorted(_TYPES)


_KQUANTS = frozenset({"q2_k", "q3_k", "q4_k", "q5_k", "q6_k"})


def supports(name: str) -> bool:
    """True when the type has a C encoder that matches the torch encoder as configured now (the
    K-quant C encoders implement kquants.REFIT = True only)."""
    key = name.lower()
    if key in _KQUANTS:
        from vramfit.quant import kquants

        if not kquants.REFIT:
            return False
    return key in _TYPES


def set_simd(flag: bool) -> bool:
    """Use the AVX2 search where the CPU has it (default); False: the portable C path. Returns the state."""
    return bool(_cenc.set_simd(int(flag))) if _cenc is not None else False


def encode(name: str, x, imatrix=None, threads: int | None = None) -> np.ndarray:
    """float32 (rows, n) -> uint8 (rows, row_nbytes). imatrix: (n,) float32 or None.

    threads defaults to torch.get_num_threads().
    """
    key = name.lower()
    if not supports(key):
        raise ValueError(f"no C encoder for {name}")
    xa = np.ascontiguousarray(x.numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float32)
    if xa.ndim != 2:
        raise ValueError(f"encode expects a 2-D array, got shape {xa.shape}")
    rows, n = xa.shape
    nbytes = _cenc.row_nbytes(key, n)
    if nbytes == 0:
        raise ValueError(f"{name}: row length {n} is not a multiple of the block size")
    im = None
    if imatrix is not None:
        im = np.ascontiguousarray(
            imatrix.numpy() if isinstance(imatrix, torch.Tensor) else imatrix, dtype=np.float32
        ).reshape(-1)
        if im.shape[0] != n:
            raise ValueError(f"imatrix has {im.shape[0]} entries for rows of {n}")
    out = np.empty((rows, nbytes), dtype=np.uint8)
    if rows:
        nth = torch.get_num_threads() if threads is None else threads
        _cenc.encode(key, xa.ctypes.data, rows, n, 0 if im is None else im.ctypes.data, out.ctypes.data, nth)
    return out
