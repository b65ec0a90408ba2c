"""`vramfit quantize`: GGUF (any type) -> GGUF of a chosen mix, streamed tensor by tensor.

Everything that can be wrong with the request (unknown type, bad --custom-q rule, imatrix for another
model, missing output folder) is checked before any tensor is touched. The header is written first
(every tensor's type and size is known from the plan), then each tensor is decoded to float32 and
encoded in row batches, so memory stays near one batch. The file is written under a temporary name
and renamed at the end: an interrupted run leaves nothing under the output name.
"""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from gguf.constants import GGUFValueType as VT

from vramfit.gguf import GGUFFile
from vramfit.gguf.reader import GGUF_MAGIC
from vramfit.gguf.types import type_by_name
from vramfit.gguf.writer import _string, _value
from vramfit.quant import encode, get_codec
from vramfit.quant.imatrix import Imatrix, ImatrixError, load_imatrix
from vramfit.quant.recipes import Choice, ModelFacts, Options, check_type, get_mix, parse_custom_q, plan

ROW_BATCH_ELEMENTS = 1 << 22  # float32 weights decoded and encoded at a time
QUANTIZATION_VERSION = 2


class QuantizeError(ValueError):
    """A quantize request that cannot be carried out (checked before any work)."""


@dataclass
class TensorResult:
    choice: Choice
    src_type: str
    nbytes: int
    seconds: float = 0.0


@dataclass
class QuantizeReport:
    path: Path
    mix: str
    ftype: int
    tensors: list[TensorResult] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def n_elements(self) -> int:
        return sum(int(np.prod(t.choice.shape)) for t in self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def bpw(self) -> float:
        return 8.0 * self.nbytes / max(self.n_elements, 1)

    def by_type(self) -> dict[str, tuple[int, int, int]]:
        """type -> (tensors, weights, bytes)."""
        acc: dict[str, list[int]] = {}
        for t in self.tensors:
            name = (t.choice.type or t.src_type).upper()
            a = acc.setdefault(name, [0, 0, 0])
            a[0], a[1], a[2] = a[0] + 1, a[1] + int(np.prod(t.choice.shape)), a[2] + t.nbytes
        return {k: (v[0], v[1], v[2]) for k, v in sorted(acc.items())}


@dataclass
class QuantizeRequest:
    src: Path
    dst: Path
    type: str
    imatrix: Path | None = None
    custom_q: str | None = None
    pure: bool = False
    token_embedding_type: str | None = None
    output_tensor_type: str | None = None


class _Progress:
    """Callbacks the CLI fills in: start(total_weights), tensor(choice), advance(n_weights)."""

    def start(self, total: int) -> None: ...
    def tensor(self, choice: Choice, index: int, count: int) -> None: ...
    def advance(self, n: int) -> None: ...


def quantize(req: QuantizeRequest, progress: _Progress | None = None) -> QuantizeReport:
    """Library entry point of `vramfit quantize`."""
    progress = progress or _Progress()
    src = _open_source(req.src)
    mix, opts, imat = _check_request(req, src)
    tensors = [(t.name, t.shape) for t in src.tensors.values()]
    choices = plan(tensors, mix, opts, ModelFacts.from_metadata(src.metadata))
    report = QuantizeReport(req.dst, mix.name, mix.ftype)
    report.notes = sorted({c.note for c in choices if c.note})
    tmp = req.dst.with_name(f".{req.dst.name}.partial")
    t0 = time.perf_counter()
    try:
        with open(tmp, "wb") as f:
            _write_all(f, src, choices, _metadata(src, mix, req, imat), imat, report, progress)
        os.replace(tmp, req.dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    report.seconds = time.perf_counter() - t0
    return report


def _open_source(path: Path) -> GGUFFile:
    if path.is_dir():
        from vramfit.convert.hf import open_hf

        return open_hf(path)
    return GGUFFile(path)


def _check_request(req: QuantizeRequest, src) -> tuple:
    if not req.dst.parent.is_dir():
        raise QuantizeError(f"output folder {req.dst.parent} does not exist")
    if req.dst.exists() and req.dst.resolve() == Path(req.src).resolve():
        raise QuantizeError("the output file is the input file")
    mix = get_mix(req.type)
    tok_t, out_t = req.token_embedding_type, req.output_tensor_type
    opts = Options(
        custom_q=parse_custom_q(req.custom_q),
        pure=req.pure,
        token_embedding_type=tok_t and check_type(tok_t, "--token-embedding-type"),
        output_tensor_type=out_t and check_type(out_t, "--output-tensor-type"),
    )
    imat = None
    if req.imatrix is not None:
        imat = load_imatrix(req.imatrix)
        check_imatrix(imat, src)
        opts.has_imatrix = True
    return mix, opts, imat


def check_imatrix(imat: Imatrix, src) -> None:
    """An imatrix must name tensors of this model and match their row lengths (ne0 * n_expert)."""
    hits = 0
    for t in src.tensors.values():
        v = imat.get(t.name)
        if v is None or len(t.shape) < 2:
            continue
        n_mat = int(np.prod(t.shape[:-2])) if len(t.shape) > 2 else 1
        if v.size != t.shape[-1] * n_mat:
            if t.name == "token_embd.weight":
                continue
            raise ImatrixError(
                f"imatrix entry {t.name} has {v.size} values but the tensor's rows have {t.shape[-1]} "
                "weights (is the imatrix for another model?)"
            )
        hits += 1
    if hits == 0:
        raise ImatrixError("the imatrix has no entry for any tensor of this model (made for another model?)")


def _metadata(src, mix, req: QuantizeRequest, imat: Imatrix | None) -> dict:
    kv = {
        k: (*src.metadata_types[k], v)
        for k, v in src.metadata.items()
        if not k.startswith("quantize.imatrix.") and k != "general.alignment"
    }
    kv["general.quantization_version"] = (VT.UINT32, None, QUANTIZATION_VERSION)
    kv["general.file_type"] = (VT.UINT32, None, mix.ftype)
    if imat is not None:
        kv["quantize.imatrix.file"] = (VT.STRING, None, str(req.imatrix))
        kv["quantize.imatrix.dataset"] = (VT.STRING, None, imat.dataset)
        kv["quantize.imatrix.entries_count"] = (VT.INT32, None, len(imat.values))
        kv["quantize.imatrix.chunks_count"] = (VT.INT32, None, imat.chunks)
    if src.alignment != 32:
        kv["general.alignment"] = (VT.UINT32, None, src.alignment)
    return kv


def _out_nbytes(src, c: Choice) -> int:
    t = src.tensors[c.name]
    return t.nbytes if _copied(c, t) else type_by_name(c.type).nbytes(c.shape)


def _copied(c: Choice, t) -> bool:
    """Tensors left as they are: not quantized, or already of the chosen type."""
    return c.type is None or c.type == t.type.name.lower()


def _write_all(f: BinaryIO, src, choices, kv, imat, report: QuantizeReport, progress: _Progress) -> None:
    align = src.alignment
    sizes = [_out_nbytes(src, c) for c in choices]
    _write_header(f, kv, choices, sizes, src, align)
    progress.start(sum(int(np.prod(c.shape)) for c in choices))
    for i, (c, size) in enumerate(zip(choices, sizes, strict=True)):
        progress.tensor(c, i, len(choices))
        t0 = time.perf_counter()
        written = _write_tensor(f, src, c, imat, progress)
        if written != size:
            raise RuntimeError(f"{c.name}: wrote {written} bytes, planned {size}")
        f.write(b"\0" * (-size % align))
        src_type = src.tensors[c.name].type.name
        report.tensors.append(TensorResult(c, src_type, size, time.perf_counter() - t0))


def _write_header(f: BinaryIO, kv: dict, choices, sizes, src, align: int) -> None:
    f.write(GGUF_MAGIC + struct.pack("<IQQ", 3, len(choices), len(kv)))
    for key, (vtype, sub, value) in kv.items():
        f.write(_string(key) + struct.pack("<I", vtype) + _value(vtype, sub, value))
    offset = 0
    for c, size in zip(choices, sizes, strict=True):
        gt = src.tensors[c.name].type if _copied(c, src.tensors[c.name]) else type_by_name(c.type)
        dims = tuple(reversed(c.shape))
        f.write(_string(c.name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, gt.id, offset))
        offset += size + (-size % align)
    f.write(b"\0" * (-f.tell() % align))


def _write_tensor(f: BinaryIO, src, c: Choice, imat: Imatrix | None, progress: _Progress) -> int:
    t = src.tensors[c.name]
    if _copied(c, t):
        f.write(np.ascontiguousarray(src.tensor_bytes(c.name)).tobytes())
        progress.advance(t.n_elements)
        return t.nbytes
    ne0 = t.shape[-1]
    weights = _importance(imat, c.name, t.shape)  # (n_mat, ne0) or None
    rows_per_mat = t.n_rows // (weights.shape[0] if weights is not None else 1)
    step = max(1, ROW_BATCH_ELEMENTS // ne0)
    written = 0
    for r0 in range(0, t.n_rows, step):
        r1 = min(t.n_rows, r0 + step, (r0 // rows_per_mat + 1) * rows_per_mat)  # one expert per batch
        x = src.rows(c.name, r0, r1) if hasattr(src, "rows") else _decode_rows(src, t, r0, r1)
        w = None if weights is None else torch.from_numpy(weights[r0 // rows_per_mat])
        packed = encode(c.type, x, w)  # the C encoders where built (same bytes), else torch
        f.write(packed.tobytes())
        written += packed.size
        progress.advance((r1 - r0) * ne0)
    return written


def _decode_rows(src: GGUFFile, t, r0: int, r1: int) -> np.ndarray:
    raw = torch.from_numpy(np.array(src.tensor_bytes(t.name)[r0:r1]))
    return get_codec(t.type).decode(raw, t.shape[-1]).float().numpy()


def _importance(imat: Imatrix | None, name: str, shape) -> np.ndarray | None:
    if imat is None:
        return None
    v = imat.get(name)
    n_mat = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    if v is None or v.size != shape[-1] * n_mat:
        return None  # no entry (token_embd of another size falls back to no imatrix, as in ik)
    return np.ascontiguousarray(v, dtype=np.float32).reshape(n_mat, shape[-1])
