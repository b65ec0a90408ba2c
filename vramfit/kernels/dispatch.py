"""The one place that picks how a quantized weight is multiplied.

Backends:
- "reference": the packed rows are decoded once with the codec's vectorised decode, kept as float32
  and multiplied with torch. It is exact (float32 throughout) and is the oracle for the others.
- "cpu": the fused C kernels of `vramfit.kernels.cpu` (int8 activations x packed weights, never a
  float copy of the weights), for the types they support; other types use the reference.
- "triton": the Triton kernels of `vramfit.kernels.triton` (fused dequantize-and-multiply from the
  packed rows) for the types they support, also for CPU tensors when Triton runs in its interpreter
  (TRITON_INTERPRET=1: how the GPU path is tested without a GPU); other types use the reference.
"auto" (the default) picks "cpu" for tensors on the CPU when the extension is built and the CPU has
AVX2, and "triton" for tensors on a CUDA device.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from vramfit.kernels import cpu as cpu_kernels
from vramfit.quant import get_codec

BACKENDS = ("auto", "reference", "cpu", "triton")
_backend = "auto"
_threads = torch.get_num_threads()  # threads for the fused kernels (their own pool, not torch's)


def set_threads(n: int) -> None:
    """Threads for the fused CPU kernels and for the few big torch ops (see `parallel_torch`)."""
    global _threads
    if n < 1:
        raise ValueError("threads must be >= 1")
    _threads = n


def get_threads() -> int:
    return _threads


@contextmanager
def parallel_torch():
    """Run one big torch op (prefill attention, a reference product of many rows) on the configured
    threads. Everything else runs torch on one thread (the engine sets that): the many tiny ops of a
    layer gain nothing from splitting, and their barrier waits grow to milliseconds on a busy machine."""
    n = torch.get_num_threads()
    if n == _threads:
        yield
        return
    torch.set_num_threads(_threads)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def set_backend(name: str) -> None:
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r} (choose from {', '.join(BACKENDS)})")
    if name == "cpu" and not cpu_kernels.available():
        raise ValueError("the fast CPU kernels are not available on this machine (not built, or no AVX2)")
    if name == "triton" and not _triton_runs():
        raise ValueError("the Triton kernels need triton and a CUDA device (or TRITON_INTERPRET=1)")
    _backend = name


def get_backend() -> str:
    return _backend


@contextmanager
def use_backend(name: str):
    old = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(old)


def takes_cpu_kernels(w: QWeight) -> bool:
    """Whether the fused CPU kernels multiply w on the fast backends: a type and row length they read,
    and no float copy decoded yet (a weight once decoded keeps using it)."""
    if w._dense is not None:
        return False
    if w._cpu_ok is None:  # decided once per weight: type and row length
        w._cpu_ok = cpu_kernels.supports(w.gtype.name, w.shape[1])
    return w._cpu_ok


def _cpu_ops(x: torch.Tensor) -> bool:
    """Whether the C kernels (products, norms, attention, SwiGLU) take work on x: CPU tensors on the
    "auto" and "cpu" backends (the "triton" backend tests the GPU path's ops on the CPU)."""
    return _backend in ("auto", "cpu") and x.device.type == "cpu"


def _fast(w: QWeight, x: torch.Tensor) -> bool:
    return _cpu_ops(x) and takes_cpu_kernels(w)


def _triton_runs() -> bool:
    from vramfit.kernels import triton as triton_kernels

    return triton_kernels.available() or (triton_kernels.importable() and triton_kernels.interpreted())


def triton_ops(x: torch.Tensor) -> bool:
    """Whether the GPU path's Triton kernels (products, the DeltaNet recurrence) take work on x: on a
    CUDA device by default, on the CPU only when asked for (the "triton" backend, under the
    interpreter)."""
    if _backend in ("reference", "cpu"):
        return False
    return x.device.type == "cuda" or _backend == "triton"


def _triton(w: QWeight, x: torch.Tensor) -> bool:
    """Whether the Triton kernels multiply w (`triton_ops`, a type they read, and no float copy of w
    decoded yet: a weight once decoded keeps using it)."""
    if w._dense is not None or not triton_ops(x):
        return False
    if w._triton_ok is None:
        from vramfit.kernels import triton as triton_kernels

        w._triton_ok = triton_kernels.supports(w.gtype.name, w.shape[1])
    # q5_1 with one activation row is wrong on the GPU (kernels/triton/__init__.py, open bug)
    one_row = x.numel() == x.shape[-1]
    return w._triton_ok and not (w.gtype.name == "q5_1" and x.device.type == "cuda" and one_row)


_n_dense = 0  # weights decoded to float so far: a fused path re-checks its weights when this moves


def dense_count() -> int:
    return _n_dense


class QWeight:
    """A 2-D weight as stored in the GGUF: packed rows (out_features, row_nbytes) plus its type."""

    def __init__(self, packed: torch.Tensor, gtype, shape: tuple[int, int], name: str = ""):
        self.packed = packed  # uint8 (out_features, row_nbytes), usually a view of the mmap
        self.gtype = gtype
        self.shape = shape  # (out_features, in_features)
        self.name = name
        self._dense: torch.Tensor | None = None
        self._cpu_ok: bool | None = None  # whether the fused CPU kernels take this weight
        self._triton_ok: bool | None = None  # whether the Triton kernels take it
        self._file: tuple = None  # (open file, offset): lookups read rows from the file

    def read_rows_from_file(self, f, offset: int) -> None:
        """Make `rows(index)` read the selected rows from the file (f, byte offset of row 0) instead
        of the mapping: an untied embedding then keeps no pages mapped at all. Through the mapping, a
        lookup maps at least the fault-around window around each row, and on kernels that map the
        page cache's large folios whole up to megabytes per row."""
        self._file = (f, offset)

    def dense(self) -> torch.Tensor:
        """float32 (out_features, in_features), decoded once and cached."""
        global _n_dense
        if self._dense is None:
            self._dense = self.rows(None)
            _n_dense += 1
        return self._dense

    def rows(self, index: torch.Tensor | None) -> torch.Tensor:
        """Decode selected rows only (embedding lookup) or all rows. Rows of a weight kept in host
        memory for a model on a GPU are looked up there and sent to the index's device."""
        if index is not None and index.device != self.packed.device:
            return self.rows(index.to(self.packed.device)).to(index.device)
        if self._dense is not None:
            return self._dense if index is None else self._dense[index]
        if index is not None and self._file is not None:
            return get_codec(self.gtype).decode(self._read_rows(index), self.shape[1])
        packed = self.packed if index is None else self.packed[index]
        return get_codec(self.gtype).decode(packed, self.shape[1])

    def _read_rows(self, index: torch.Tensor) -> torch.Tensor:
        f, offset = self._file
        fd = f.fileno()
        nbytes = self.packed.shape[1]
        flat = index.reshape(-1).tolist()
        out = torch.empty((len(flat), nbytes), dtype=torch.uint8)
        view = memoryview(out.numpy()).cast("B")
        for i, r in enumerate(flat):
            if not 0 <= r < self.shape[0]:
                raise IndexError(f"row {r} of {self.name} (it has {self.shape[0]})")
            if os.preadv(fd, [view[i * nbytes : (i + 1) * nbytes]], offset + r * nbytes) != nbytes:
                raise OSError(f"{self.name}: short read of row {r}")
        return out.view(*index.shape, nbytes)

    @property
    def nbytes(self) -> int:
        return self.packed.numel()


def fast_attention(q: torch.Tensor, head_dim: int) -> bool:
    """Whether prefill attention for these queries runs on the C kernel (float32 on a CPU with
    AVX-512; the reference backend keeps torch's SDPA as the oracle)."""
    return _cpu_ops(q) and q.dtype == torch.float32 and cpu_kernels.attention_supported(head_dim)


def fast_deltanet(x: torch.Tensor) -> bool:
    """Whether the Gated DeltaNet's causal conv (kernel <= 16) and one-token delta-rule step run on the
    C kernels (float32, AVX-512; the reference backend keeps the torch ops as the oracle)."""
    return _cpu_ops(x) and x.dtype == torch.float32 and cpu_kernels.conv_supported()


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up. One threaded C pass when gate and up are the two halves of one stacked
    (n, 2 * n_ff) product (FusedLinear's output); torch's two ops otherwise."""
    n_ff = gate.shape[-1]
    stacked = (
        gate.dim() == 2
        and gate.stride() == (2 * n_ff, 1)
        and up.stride() == gate.stride()
        and up.data_ptr() == gate.data_ptr() + 4 * n_ff
    )
    if stacked and _cpu_ops(gate) and gate.dtype == torch.float32:
        if cpu_kernels.swiglu_supported():
            base = gate.as_strided((gate.shape[0], 2 * n_ff), (2 * n_ff, 1))
            return cpu_kernels.swiglu(base, _threads)
    return torch.nn.functional.silu(gate) * up


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: one C call on the fast CPU path, torch's op otherwise."""
    fast = _cpu_ops(x) and cpu_kernels.available()
    if fast and x.dtype == torch.float32 and x.is_contiguous() and weight.is_contiguous():
        return cpu_kernels.rms_norm(x, weight, eps)
    return torch.nn.functional.rms_norm(x, weight.shape, weight, eps)


# Callables (weight, x) that see every matrix input; the imatrix collector registers one here.
input_observers: list = []


def linear(x: torch.Tensor, w: QWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in_features) float32 -> (..., out_features)."""
    for observe in input_observers:
        observe(w, x)
    if _triton(w, x):
        from vramfit.kernels import triton as triton_kernels

        flat = x.reshape(-1, x.shape[-1])
        y = triton_kernels.qmatmul(flat, w.packed, w.gtype.name).view(*x.shape[:-1], w.shape[0])
        return y if bias is None else y.add_(bias)
    if _fast(w, x):
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        y = cpu_kernels.qmatmul(flat, w.packed, w.gtype.name, threads=_threads)
        y = y.view(*x.shape[:-1], w.shape[0])
        return y if bias is None else y.add_(bias)
    dense = w.dense()
    if x.numel() > x.shape[-1]:  # several rows: a real matrix product, worth the threads
        with parallel_torch():
            y = x @ dense.T
    else:
        y = x @ dense.T
    return y if bias is None else y + bias


def fused_decoder(cfg, blocks: list, rope, n_ctx: int):
    """The one-call C decode step of a llama-family model (kernels/cpu/fused_decode.py), or None
    where the fast CPU kernels are missing or do not take all its weights. Before each step its
    `usable(cache)` says whether the Python path would run those kernels now."""
    if not cpu_kernels.available() or rope.freqs.device.type != "cpu":
        return None
    from vramfit.kernels.cpu.fused_decode import FusedDecoder  # it imports this module

    return FusedDecoder.build(cfg, blocks, rope, n_ctx)


def concat_rows(ws: list[QWeight]) -> QWeight:
    """One weight whose rows are those of `ws` in order (same type and row length)."""
    if len(ws) == 1:
        return ws[0]
    packed = torch.cat([w.packed for w in ws])
    rows = sum(w.shape[0] for w in ws)
    return QWeight(packed, ws[0].gtype, (rows, ws[0].shape[1]), "+".join(w.name for w in ws))


def permute_rows(w: QWeight, index: torch.Tensor) -> QWeight:
    """The same weight with its output rows reordered (exact: whole packed rows move)."""
    return QWeight(w.packed[index].contiguous(), w.gtype, w.shape, w.name)


class FusedLinear:
    """Several linears on the same input, run as one product per group, into one output buffer.

    On a GPU adjacent weights of the same type are stacked into one matrix (the device holds a copy of
    every weight anyway). On the CPU nothing is copied: the weights stay views of the mapped file and
    each one writes its own columns of a shared (n, sum of rows) output. A copy there would cost
    memory twice on Linux kernels that map the page cache's large folios whole, where pages released
    after stacking come back as soon as a neighbouring tensor is read. Either way the call returns one
    output per original weight, adjacent column ranges of one tensor (so gate | up stays one [gate |
    up] row for the SwiGLU kernel).
    """

    def __init__(self, weights: list[QWeight], biases: list[torch.Tensor | None]):
        self.groups: list[tuple[QWeight, torch.Tensor | None, list[int]]] = []
        stack = weights[0].packed.device.type != "cpu"
        i = 0
        while i < len(weights):
            j = i + 1
            while stack and j < len(weights) and weights[j].gtype == weights[i].gtype:
                j += 1
            ws, bs = weights[i:j], biases[i:j]
            bias = bs[0]
            if len(ws) > 1 and any(b is not None for b in bs):
                zeros = [torch.zeros(w.shape[0], device=w.packed.device) for w in ws]
                bias = torch.cat([b if b is not None else z for b, z in zip(bs, zeros, strict=True)])
            self.groups.append((concat_rows(ws), bias, [w.shape[0] for w in ws]))
            i = j
        self.n_out = sum(w.shape[0] for w in weights)

    def parts(self) -> list[QWeight]:
        """One weight per original, in order: views into the stacked rows where stacking made a copy,
        so that a caller can drop its own references to the originals (or to their permuted copies)."""
        out: list[QWeight] = []
        for w, _, sizes in self.groups:
            if len(sizes) == 1:
                out.append(w)
                continue
            r0 = 0
            for name, n in zip(w.name.split("+"), sizes, strict=True):
                out.append(QWeight(w.packed[r0 : r0 + n], w.gtype, (n, w.shape[1]), name))
                r0 += n
        return out

    def copied(self) -> list[str]:
        """Names of the GGUF tensors whose bytes now live in a stacked copy."""
        return [n for w, _, sizes in self.groups if len(sizes) > 1 for n in w.name.split("+")]

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if len(self.groups) == 1:
            w, bias, sizes = self.groups[0]
            y = linear(x, w, bias)
            return list(y.split(sizes, dim=-1)) if len(sizes) > 1 else [y]
        flat = x.reshape(-1, x.shape[-1])
        out = torch.empty((flat.shape[0], self.n_out), dtype=torch.float32, device=x.device)
        c0, one = 0, flat.shape[0] == 1 and not input_observers and len(self.groups) <= 4
        if one and all(_fast(w, flat) and w.packed.is_contiguous() for w, _, _ in self.groups):
            # one row: each weight's columns are a contiguous slice, all filled in one kernel pass
            parts = []
            for w, _, _ in self.groups:
                parts.append((w.packed, w.gtype.name, out[:, c0 : c0 + w.shape[0]]))
                c0 += w.shape[0]
            cpu_kernels.qmatmul_parts(flat.contiguous(), parts, _threads)
            for (_w, bias, _), (_, _, cols) in zip(self.groups, parts, strict=True):
                if bias is not None:
                    cols.add_(bias)
        else:
            for w, bias, _ in self.groups:
                out[:, c0 : c0 + w.shape[0]].copy_(linear(flat, w, bias))
                c0 += w.shape[0]
        out = out.view(*x.shape[:-1], self.n_out)
        sizes = [s for _, _, ss in self.groups for s in ss]
        return list(out.split(sizes, dim=-1))
