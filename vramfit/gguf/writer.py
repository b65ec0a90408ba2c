"""GGUF v3 writer that knows IQK row metadata.

Metadata is given as (key, value) with an optional explicit value type so that a file read with
`GGUFFile` can be written back with the same types; tensor data is written byte for byte.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from gguf.constants import GGUFValueType as VT

from vramfit.gguf.reader import _NP, _SCALAR, DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUFFile, StringArray
from vramfit.gguf.types import GGMLType

_VT_BY_DTYPE = {np.dtype(t): vt for vt, t in _NP.items()}


def _guess_vtype(value: Any) -> tuple[VT, VT | None]:
    if isinstance(value, np.ndarray) and value.dtype in _VT_BY_DTYPE:
        return VT.ARRAY, _VT_BY_DTYPE[value.dtype]  # the dtype decides, not the first element
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool):
        return VT.BOOL, None
    if isinstance(value, int):
        return (VT.INT32 if -(2**31) <= value < 2**31 else VT.INT64), None
    if isinstance(value, float):
        return VT.FLOAT32, None
    if isinstance(value, str):
        return VT.STRING, None
    if isinstance(value, (Sequence, np.ndarray)):
        first = value[0] if len(value) else ""
        return VT.ARRAY, _guess_vtype(first)[0]
    raise TypeError(f"cannot store {type(value).__name__} in GGUF metadata")


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _value(vtype: VT, sub: VT | None, value: Any) -> bytes:
    if vtype == VT.STRING:
        return _string(value)
    if vtype == VT.ARRAY:
        assert sub is not None
        head = struct.pack("<IQ", sub, len(value))
        if sub == VT.STRING and isinstance(value, StringArray):
            return head + value.raw  # the bytes as read: no decode / encode round trip
        if sub == VT.STRING:
            return head + b"".join(_string(v) for v in value)
        if sub == VT.ARRAY:
            return head + b"".join(_value(VT.ARRAY, _guess_vtype(v)[1], v) for v in value)
        return head + np.asarray(value, dtype=np.dtype(_NP[sub]).newbyteorder("<")).tobytes()
    return struct.pack(_SCALAR[vtype], value)


class GGUFWriter:
    """Collects metadata and tensors, then `write()` lays them out with the given alignment."""

    def __init__(self, path: str | Path, alignment: int = DEFAULT_ALIGNMENT):
        self.path = Path(path)
        self.alignment = alignment
        self.kv: dict[str, tuple[VT, VT | None, Any]] = {}
        self.tensors: list[tuple[str, tuple[int, ...], GGMLType, np.ndarray]] = []

    def add(self, key: str, value: Any, vtype: VT | None = None, sub: VT | None = None) -> None:
        if vtype is None:
            vtype, sub = _guess_vtype(value)
        self.kv[key] = (vtype, sub, value)

    def add_tensor(self, name: str, shape: tuple[int, ...], gtype: GGMLType, data: np.ndarray) -> None:
        """`shape` in numpy order (row length last); `data` holds the raw bytes of every row."""
        raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        if raw.size != gtype.nbytes(tuple(shape)):
            raise ValueError(
                f"tensor {name!r}: {raw.size} bytes given, {gtype.name}{list(shape)} needs "
                f"{gtype.nbytes(tuple(shape))}"
            )
        self.tensors.append((name, tuple(shape), gtype, raw))

    def write(self) -> None:
        if self.alignment != DEFAULT_ALIGNMENT:
            self.add("general.alignment", self.alignment, VT.UINT32)
        # written beside and renamed over the target: a failure leaves any old file whole, and a
        # reader that still maps the old file (its metadata arrays, its tensors) keeps valid pages
        tmp = self.path.with_name(f".{self.path.name}.partial")
        try:
            with open(tmp, "wb") as f:
                self._write_header(f)
                for _, _, _, raw in self.tensors:
                    f.write(raw.tobytes())
                    f.write(b"\0" * (-raw.size % self.alignment))
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _write_header(self, f: BinaryIO) -> None:
        f.write(GGUF_MAGIC + struct.pack("<IQQ", 3, len(self.tensors), len(self.kv)))
        for key, (vtype, sub, value) in self.kv.items():
            f.write(_string(key) + struct.pack("<I", vtype) + _value(vtype, sub, value))
        offset = 0
        for name, shape, gtype, raw in self.tensors:
            dims = tuple(reversed(shape))
            f.write(_string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, gtype.id, offset))
            offset += raw.size + (-raw.size % self.alignment)
        f.write(b"\0" * (-f.tell() % self.alignment))


def copy_gguf(src: GGUFFile, dst: str | Path) -> None:
    """Write `src` back out: same metadata (types kept) and the same tensor bytes."""
    w = GGUFWriter(dst, src.alignment)
    for key, value in src.metadata.items():
        vtype, sub = src.metadata_types[key]
        w.add(key, value, vtype, sub)
    for t in src.tensors.values():
        w.add_tensor(t.name, t.shape, t.type, src.tensor_bytes(t.name))
    w.write()
