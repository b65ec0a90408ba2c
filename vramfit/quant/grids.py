"""Non-linear value grids of ik_llama.cpp's IQK quantization types (int8 lookup tables).

Source: shared/docs/iqk-formats.md, Appendix A (format data read from ik_llama.cpp's
ggml-common.h). Each grid holds the base values followed by the "shifted" values (base plus a
small constant) that a per-block flag selects; IQ2_KL's grid is a table of value pairs.
"""

from __future__ import annotations

import torch

_IQ4K_BASE = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113]
_IQ5NL_BASE = [
    -126, -114, -103, -92, -83, -74, -65, -57, -50, -43, -36, -30, -24, -18, -12, -6,
    -1, 5, 11, 17, 23, 29, 36, 43, 51, 59, 68, 77, 87, 97, 109, 121,
]  # fmt: skip
_IQ3NL_BASE = [-63, -40, -23, -10, 1, 13, 28, 47]
_IQ2NL_BASE = [-31, -13, 1, 17]
_IQ6NL_BASE = [
    -127, -121, -115, -109, -104, -98, -93, -88, -84, -79, -74, -70, -66, -62, -58, -54,
    -51, -47, -44, -40, -37, -34, -31, -28, -25, -22, -19, -16, -13, -11, -8, -5,
    -2, 0, 3, 6, 9, 12, 14, 17, 20, 23, 27, 30, 33, 36, 40, 44,
    47, 51, 55, 59, 63, 68, 72, 77, 82, 87, 92, 98, 103, 109, 115, 121,
]  # fmt: skip
_IQ2KL_PAIRS = [
    (-63, -23), (-63, 13), (-40, -63), (-40, -10), (-40, 13), (-40, 47), (-23, -40), (-23, -23),
    (-23, 1), (-23, 13), (-23, 28), (-10, -63), (-10, 1), (-10, 13), (-10, 47), (1, -23),
    (1, -10), (1, 1), (1, 13), (1, 28), (13, -40), (13, -23), (13, -10), (13, 1),
    (13, 13), (28, -63), (28, -23), (28, 1), (28, 28), (28, 47), (47, -23), (47, 13),
]  # fmt: skip


def _with_shift(base: list[int], shift: int) -> torch.Tensor:
    return torch.tensor(base + [v + shift for v in base], dtype=torch.int8)


IQ4K_VALUES = _with_shift(_IQ4K_BASE, 4)  # (32,)  IQ4_KS, IQ4_KSS, IQ4_K; [:16] == kvalues_iq4nl
IQ5NL_VALUES = _with_shift(_IQ5NL_BASE, 2)  # (64,)  IQ5_KS, IQ5_K
IQ3NL_VALUES = _with_shift(_IQ3NL_BASE, 4)  # (16,)  IQ3_K, IQ3_KS
IQ2NL_VALUES = _with_shift(_IQ2NL_BASE, 5)  # (8,)   IQ2_K, IQ2_KS
IQ6NL_VALUES = _with_shift(_IQ6NL_BASE, 1)  # (128,) IQ6_K
IQ2KL_PAIRS = torch.tensor(_IQ2KL_PAIRS, dtype=torch.int8)  # (32, 2) IQ2_KL: index -> two weights
