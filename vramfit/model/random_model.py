"""Random but valid quantized weights: the building block of `vramfit make-random` (issue 6; the
whole-model writer and its CLI verb are still to come) and the input of the Triton kernel tests.

`random_rows(type_name, n_rows, n_per_row)` returns packed rows whose bytes are uniformly random except
the floating-point fields (fp16 block scales and mins, float32/fp16 row scales), which are set to
finite positive values scaled so the decoded weights have roughly the spread of a trained model's
(std about 0.02). Every bit pattern of quants, sub-block scales and grid shifts can therefore occur,
which is what kernel tests want, and no quantization work is done (a 27B-shaped matrix takes well
under a second).
"""

from __future__ import annotations

import numpy as np
import torch

from vramfit.gguf.types import type_by_name

# byte offsets of the fp16 fields inside one block (d, and dmin/m where there is one)
_F16_FIELDS: dict[str, tuple[int, ...]] = {
    "q4_0": (0,), "q4_1": (0, 2), "q5_0": (0,), "q5_1": (0, 2), "q8_0": (0,), "q6_0": (0,),
    "iq4_nl": (0,), "q2_k": (80, 82), "q3_k": (108,), "q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,),
    "iq4_xs": (0,), "iq2_k": (0,), "iq3_k": (0,), "iq4_k": (0,), "iq5_k": (0,), "iq6_k": (0,),
    "iq4_ks": (), "iq4_kss": (), "iq5_ks": (), "iq2_ks": (), "iq3_ks": (), "iq2_kl": (),
}  # fmt: skip

TARGET_STD = 0.02


def random_types() -> list[str]:
    return sorted(_F16_FIELDS)


def _raw_rows(gt, n_rows: int, n_per_row: int, rng: np.random.Generator, unit: float) -> np.ndarray:
    """Random bytes with every float field set to unit * U[0.5, 1) (as fp16 or float32)."""
    name = gt.name.lower()
    row = gt.row_nbytes(n_per_row)
    raw = rng.integers(0, 256, size=(n_rows, row), dtype=np.uint8)
    nb = n_per_row // gt.block_size
    blocks = raw[:, gt.row_meta :].reshape(n_rows, nb, gt.type_size)
    for off in _F16_FIELDS[name]:
        v = (unit * rng.uniform(0.5, 1.0, size=(n_rows, nb))).astype(np.float16)
        blocks[:, :, off : off + 2] = v.view(np.uint8).reshape(n_rows, nb, 2)
    if gt.row_meta == 4:
        v = (unit * rng.uniform(0.5, 1.0, size=n_rows)).astype(np.float32)
        raw[:, :4] = v.view(np.uint8).reshape(n_rows, 4)
    elif gt.row_meta == 2:
        v = (unit * rng.uniform(0.5, 1.0, size=n_rows)).astype(np.float16)
        raw[:, :2] = v.view(np.uint8).reshape(n_rows, 2)
    return raw


_unit_cache: dict[str, float] = {}


def _unit(type_name: str) -> float:
    """The float-field scale that gives decoded weights a std of about TARGET_STD (measured once)."""
    name = type_name.lower()
    if name not in _unit_cache:
        from vramfit.quant import decode

        gt = type_by_name(name)
        k = max(256, gt.block_size)
        probe = _raw_rows(gt, 64, k, np.random.default_rng(0), 1e-3)
        std = float(np.std(decode(name, probe, k)))
        _unit_cache[name] = 1e-3 * TARGET_STD / std if std > 0 else 1e-3
    return _unit_cache[name]


def random_rows(
    type_name: str, n_rows: int, n_per_row: int, seed: int | np.random.Generator = 0
) -> np.ndarray:
    """Packed rows (n_rows, row_nbytes) uint8 of `type_name` with random, valid content."""
    name = type_name.lower()
    if name not in _F16_FIELDS:
        known = ", ".join(random_types())
        raise ValueError(f"random blocks for {type_name} are not supported (known: {known})")
    gt = type_by_name(name)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    return _raw_rows(gt, n_rows, n_per_row, rng, _unit(name))


def random_rows_torch(type_name: str, n_rows: int, n_per_row: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(random_rows(type_name, n_rows, n_per_row, seed))


__all__ = ["random_rows", "random_rows_torch", "random_types"]
