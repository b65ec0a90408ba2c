"""The one place that picks how a quantized weight is multiplied.

Today there is one path, the reference: the packed rows are decoded once with the codec's vectorised
decode and kept as float32, then multiplied with torch. Fast fused kernels plug in here.
"""

from __future__ import annotations

import torch

from vramfit.quant import get_codec


class QWeight:
    """A 2-D weight as stored in the GGUF: packed rows (out_features, row_nbytes) plus its type."""

    def __init__(self, packed: torch.Tensor, gtype, shape: tuple[int, int], name: str = ""):
        self.packed = packed  # uint8 (out_features, row_nbytes), usually a view of the mmap
        self.gtype = gtype
        self.shape = shape  # (out_features, in_features)
        self.name = name
        self._dense: torch.Tensor | None = None

    def dense(self) -> torch.Tensor:
        """float32 (out_features, in_features), decoded once and cached."""
        if self._dense is None:
            self._dense = self.rows(None)
        return self._dense

    def rows(self, index: torch.Tensor | None) -> torch.Tensor:
        """Decode selected rows only (embedding lookup) or all rows."""
        if self._dense is not None:
            return self._dense if index is None else self._dense[index]
        packed = self.packed if index is None else self.packed[index]
        return get_codec(self.gtype).decode(packed, self.shape[1])

    @property
    def nbytes(self) -> int:
        return self.packed.numel()


# Callables (weight, x) that see every matrix input; the imatrix collector registers one here.
input_observers: list = []


def linear(x: torch.Tensor, w: QWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in_features) float32 -> (..., out_features)."""
    for observe in input_observers:
        observe(w, x)
    y = x @ w.dense().T
    return y if bias is None else y + bias
