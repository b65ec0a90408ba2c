"""Memory-mapped GGUF reader (versions 2 and 3).

Layout: magic "GGUF", u32 version, u64 tensor count, u64 metadata count, the metadata key/values,
the tensor infos (name, dims innermost-first, type id, offset), padding to `general.alignment`, then
the tensor data. Tensor data is never copied: `tensor_bytes` returns a uint8 view of the mapping.
Sizes come from our own type table so that IQK row metadata is counted (gguf-py's is not).
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGUFValueType as VT

from vramfit.gguf.types import GGMLType, UnknownTypeError, type_by_id

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

_SCALAR = {
    VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I",
    VT.INT32: "<i", VT.FLOAT32: "<f", VT.BOOL: "<?", VT.UINT64: "<Q", VT.INT64: "<q",
    VT.FLOAT64: "<d",
}  # fmt: skip
_NP = {
    VT.UINT8: np.uint8, VT.INT8: np.int8, VT.UINT16: np.uint16, VT.INT16: np.int16,
    VT.UINT32: np.uint32, VT.INT32: np.int32, VT.FLOAT32: np.float32, VT.BOOL: np.bool_,
    VT.UINT64: np.uint64, VT.INT64: np.int64, VT.FLOAT64: np.float64,
}  # fmt: skip


class GGUFError(ValueError):
    """A file that is not GGUF, is truncated or is malformed."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order: outermost first, row length last
    type: GGMLType
    offset: int  # from the start of the data section
    nbytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    @property
    def n_rows(self) -> int:
        return self.n_elements // self.shape[-1] if self.shape else 1


class StringArray(Sequence):
    """A GGUF string array kept as the bytes it is stored as; an item is decoded when read.

    A 150K-token vocabulary as Python strings costs ~10 MiB; here it is a view of the file's mapping
    plus an offset table (4 bytes a string), and its pages are only resident while read (closing the
    file keeps it valid: the mapping stays while arrays use it). Compares equal to any sequence of
    the same strings.
    """

    __slots__ = ("_raw", "_starts")

    def __init__(self, raw: bytes | memoryview, starts: np.ndarray):
        # raw: each string as u64 length + UTF-8 bytes; starts[i]: where string i's bytes begin,
        # starts[n]: len(raw) + 8 (so that string i ends at starts[i + 1] - 8)
        self._raw, self._starts = raw, starts

    @property
    def raw(self) -> bytes:
        """The array's items exactly as stored in GGUF (length-prefixed UTF-8)."""
        return bytes(self._raw)

    def buffers(self) -> tuple[memoryview | bytes, np.ndarray]:
        """(raw, starts): item i is raw[starts[i] : starts[i + 1] - 8] (the 8-byte length prefixes)."""
        return self._raw, self._starts

    def __len__(self) -> int:
        return len(self._starts) - 1

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("StringArray index out of range")
        s, e = int(self._starts[i]), int(self._starts[i + 1]) - 8
        return str(self._raw[s:e], "utf-8", "replace")

    def __iter__(self) -> Iterator[str]:
        raw, starts = self._raw, self._starts.tolist()
        for s, e in zip(starts, starts[1:], strict=False):
            yield str(raw[s : e - 8], "utf-8", "replace")

    def __eq__(self, other: object) -> bool:
        if isinstance(other, StringArray):
            return self._raw == other._raw
        if isinstance(other, str) or not isinstance(other, Sequence):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"StringArray({len(self)} strings)"


class _Cursor:
    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise GGUFError(f"{self.path}: truncated GGUF header (ends at byte {len(self.buf)})")
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise GGUFError(f"{self.path}: truncated GGUF header (string of {n} bytes at {self.pos})")
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def strings(self, n: int) -> StringArray:
        begin, pos, size, buf = self.pos, self.pos, len(self.buf), self.buf
        # filled in place (no list of n Python ints); 4-byte offsets unless the array is over 4 GiB
        starts = np.empty(n + 1, dtype=np.uint32 if size - begin < 2**32 - 8 else np.int64)
        for i in range(n):
            if pos + 8 > size:
                raise GGUFError(f"{self.path}: truncated GGUF header (string array at {begin})")
            pos += 8
            starts[i] = pos - begin
            pos += struct.unpack_from("<Q", buf, pos - 8)[0]
        if pos > size:
            raise GGUFError(f"{self.path}: truncated GGUF header (string array at {begin})")
        starts[n] = pos - begin + 8
        self.pos = pos
        return StringArray(buf[begin:pos], starts)  # a view of the mapping, not a copy

    def array(self, vtype: VT, n: int) -> Any:
        if vtype == VT.STRING:
            return self.strings(n)
        if vtype == VT.ARRAY:
            return [self.value(VT.ARRAY) for _ in range(n)]
        dt = np.dtype(_NP[vtype]).newbyteorder("<")
        end = self.pos + n * dt.itemsize
        if end > len(self.buf):
            raise GGUFError(f"{self.path}: truncated GGUF header (array of {n} at {self.pos})")
        arr = np.frombuffer(self.buf, dtype=dt, count=n, offset=self.pos).copy()
        self.pos = end
        return arr.tolist()

    def value(self, vtype: VT) -> Any:
        if vtype == VT.STRING:
            return self.string()
        if vtype == VT.ARRAY:
            sub = self.vtype()
            return self.array(sub, self.take("<Q"))
        return self.take(_SCALAR[vtype])

    def vtype(self) -> VT:
        raw = self.take("<I")
        try:
            return VT(raw)
        except ValueError:
            raise GGUFError(
                f"{self.path}: unknown metadata value type {raw} at byte {self.pos - 4}"
            ) from None


class GGUFFile:
    """An open GGUF file: `metadata`, `tensors` (name -> TensorInfo) and zero-copy tensor views."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            raise GGUFError(f"{self.path}: is a directory, not a GGUF file")
        if not self.path.is_file():
            raise GGUFError(f"{self.path}: no such file")
        with open(self.path, "rb") as f:
            if self.path.stat().st_size == 0:
                raise GGUFError(f"{self.path}: empty file, not a GGUF")
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._buf = memoryview(self._mmap)
        self.metadata: dict[str, Any] = {}
        self.metadata_types: dict[str, tuple[VT, VT | None]] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._parse()

    def _parse(self) -> None:
        c = _Cursor(self._buf, self.path)
        if bytes(self._buf[:4]) != GGUF_MAGIC:
            raise GGUFError(f"{self.path}: not a GGUF file (bad magic {bytes(self._buf[:4])!r})")
        c.pos = 4
        self.version = c.take("<I")
        if self.version not in (2, 3):
            raise GGUFError(f"{self.path}: unsupported GGUF version {self.version} (2 and 3 are read)")
        n_tensors, n_kv = c.take("<Q"), c.take("<Q")
        for _ in range(n_kv):
            key = c.string()
            vtype = c.vtype()
            sub = None
            if vtype == VT.ARRAY:
                save = c.pos
                sub = c.vtype()
                c.pos = save
            self.metadata[key] = c.value(vtype)
            self.metadata_types[key] = (vtype, sub)
        infos = [self._tensor_info(c) for _ in range(n_tensors)]
        self.alignment = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        if self.alignment <= 0 or self.alignment & (self.alignment - 1):
            raise GGUFError(f"{self.path}: general.alignment {self.alignment} is not a power of two")
        self.data_offset = -(-c.pos // self.alignment) * self.alignment
        for name, shape, gtype, offset in infos:
            nbytes = gtype.nbytes(shape)
            end = self.data_offset + offset + nbytes
            if end > len(self._buf):
                raise GGUFError(
                    f"{self.path}: truncated GGUF: tensor {name!r} ends at byte {end} "
                    f"but the file has {len(self._buf)}"
                )
            self.tensors[name] = TensorInfo(name, shape, gtype, offset, nbytes)
        self.release_header()

    def release_header(self) -> None:
        """Drop the header's pages from memory: after parsing, and after a reader of the string
        arrays (the tokenizer) is built; what is read later faults back in from the page cache."""
        header = self.data_offset // mmap.PAGESIZE * mmap.PAGESIZE
        if header:
            self._mmap.madvise(mmap.MADV_DONTNEED, 0, header)

    def _tensor_info(self, c: _Cursor) -> tuple[str, tuple[int, ...], GGMLType, int]:
        name = c.string()
        n_dims = c.take("<I")
        if n_dims > 8:
            raise GGUFError(f"{self.path}: tensor {name!r} has {n_dims} dimensions")
        dims = [c.take("<Q") for _ in range(n_dims)]
        raw_type = c.take("<I")
        offset = c.take("<Q")
        try:
            gtype = type_by_id(raw_type)
        except UnknownTypeError as e:
            raise GGUFError(f"{self.path}: tensor {name!r}: {e}") from None
        shape = tuple(reversed(dims))
        if shape and shape[-1] % gtype.block_size:
            raise GGUFError(
                f"{self.path}: tensor {name!r} row length {shape[-1]} is not a multiple of "
                f"{gtype.name} block size {gtype.block_size}"
            )
        return name, shape, gtype, offset

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def tensor_bytes(self, name: str) -> np.ndarray:
        """uint8 view of shape (n_rows, row_nbytes) into the mapping (read-only, zero-copy)."""
        t = self.tensors[name]
        start = self.data_offset + t.offset
        arr = np.frombuffer(self._buf, dtype=np.uint8, count=t.nbytes, offset=start)
        row = t.type.row_nbytes(t.shape[-1]) if t.shape else t.nbytes
        return arr.reshape(-1, row)

    def release(self, *names: str) -> None:
        """Drop tensors' pages from this process's memory (they are re-read from disk if touched
        again). For tensors whose bytes were copied elsewhere, e.g. stacked with their neighbours.
        Tensors next to each other in the file are dropped as one span, so the page they share goes
        too; a page shared with a tensor not named stays."""
        spans = sorted((self.data_offset + self.tensors[n].offset, self.tensors[n].nbytes) for n in names)
        merged: list[list[int]] = []
        for start, nbytes in spans:
            if merged and start - merged[-1][1] < self.alignment:  # only padding in between
                merged[-1][1] = max(merged[-1][1], start + nbytes)
            else:
                merged.append([start, start + nbytes])
        page = mmap.PAGESIZE
        for start, end in merged:
            lo, hi = -(-start // page) * page, end // page * page
            if hi > lo:
                self._mmap.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def close(self) -> None:
        try:
            self._buf.release()
            self._mmap.close()
        except BufferError:
            pass  # tensor views are still alive; the mapping closes when they are collected

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
