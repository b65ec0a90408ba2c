"""Importance matrix: the mean of the squared input activations per column of every weight matrix.

Collection follows ik_llama.cpp's llama-imatrix (iqk-formats.md 5.1): for every matmul with a `blk.*`
weight (plus `output.weight` when asked) and a batch of at least 16 tokens, add x_c^2 for every input
column c and count the tokens; one "call" per evaluated batch. Files: the legacy binary `.dat` that
ik's llama-quantize reads (written and read), and mainline's GGUF imatrix (read, 5.2).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

MIN_TOKENS = 16  # ik ignores dense batches with fewer tokens


class ImatrixError(ValueError):
    """An imatrix file that cannot be read, or one that does not fit the model."""


@dataclass
class Imatrix:
    """name -> mean of x^2 per input column (float32, length ne0 * n_expert), and its call count."""

    values: dict[str, np.ndarray] = field(default_factory=dict)
    ncall: dict[str, int] = field(default_factory=dict)
    dataset: str = ""
    chunks: int = 0

    def get(self, name: str) -> np.ndarray | None:
        """The entry for a tensor, with llama-quantize's name fallbacks (5.1)."""
        for candidate in _fallback_names(name):
            if candidate in self.values:
                return self.values[candidate]
        return None


def _fallback_names(name: str) -> list[str]:
    names = [name]
    if "ffn_up_exps" in name or "ffn_gate_exps" in name:
        base = name.replace("ffn_up_exps", "ffn_gate_up_exps").replace("ffn_gate_exps", "ffn_gate_up_exps")
        names += [base, base.replace("ffn_gate_up_exps", "ffn_up_exps")]
    elif "ffn_gate_up_exps" in name:
        names.append(name.replace("ffn_gate_up_exps", "ffn_up_exps"))
    elif name.endswith("ffn_gate.weight"):
        names.append(name.replace("ffn_gate.weight", "ffn_up.weight"))
    elif "attn_v_b" in name:
        names.append(name.replace("attn_v_b", "attn_kv_b"))
    elif "attn_kv_b" in name:
        names.append(name.replace("attn_kv_b", "attn_v_b"))
    return names


# ---------------------------------------------------------------------------------------------- .dat


def write_dat(im: Imatrix, path: str | Path) -> None:
    """Legacy format: n_entries, then per entry name, ncall, nval, values (= mean * ncall); trailer
    with the number of chunks and the dataset name. All integers int32 little-endian."""
    parts = [struct.pack("<i", len(im.values))]
    for name, mean in im.values.items():
        ncall = im.ncall.get(name, 1)
        raw = name.encode("utf-8")
        stored = (np.asarray(mean, dtype=np.float32) * np.float32(ncall)).astype("<f4")
        parts += [struct.pack("<i", len(raw)), raw, struct.pack("<ii", ncall, stored.size), stored.tobytes()]
    ds = im.dataset.encode("utf-8")
    parts += [struct.pack("<ii", im.chunks, len(ds)), ds]
    Path(path).write_bytes(b"".join(parts))


def read_dat(path: str | Path) -> Imatrix:
    buf = Path(path).read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(buf):
            raise ImatrixError(f"{path}: truncated imatrix file (at byte {pos})")
        out = struct.unpack_from(fmt, buf, pos)
        pos += size
        return out

    (n,) = take("<i")
    if not 0 < n < 1_000_000:
        raise ImatrixError(f"{path}: not an imatrix file ({n} entries)")
    im = Imatrix()
    for _ in range(n):
        (name_len,) = take("<i")
        if not 0 < name_len < 4096:
            raise ImatrixError(f"{path}: not an imatrix file (name length {name_len})")
        name = take(f"<{name_len}s")[0].decode("utf-8", errors="replace")
        ncall, nval = take("<ii")
        stored = np.array(take(f"<{nval}f"), dtype=np.float32)
        im.values[name] = stored / np.float32(max(ncall, 1))
        im.ncall[name] = ncall
    if pos + 8 <= len(buf):
        im.chunks, ds_len = take("<ii")
        if 0 <= ds_len <= len(buf) - pos:
            im.dataset = take(f"<{ds_len}s")[0].decode("utf-8", errors="replace")
    return im


# --------------------------------------------------------------------------------------------- GGUF


def read_gguf(path: str | Path) -> Imatrix:
    """Mainline GGUF imatrix: mean = in_sum2[e] / counts[e] per matrix (expert) e, concatenated."""
    from vramfit.gguf import GGUFFile
    from vramfit.quant import decode

    g = GGUFFile(path)
    if g.metadata.get("general.type") != "imatrix":
        raise ImatrixError(f"{path}: GGUF file is not an imatrix (general.type is not 'imatrix')")
    chunk_size = int(g.metadata.get("imatrix.chunk_size", 1)) or 1
    datasets = g.metadata.get("imatrix.datasets", [])
    n_chunks = int(g.metadata.get("imatrix.chunk_count", 0))
    im = Imatrix(dataset=datasets[0] if datasets else "", chunks=n_chunks)

    def f32(name: str) -> np.ndarray:
        t = g.tensors[name]
        return decode(t.type.name, np.array(g.tensor_bytes(name)), t.shape[-1]).reshape(t.shape)

    for tname in g.tensors:
        if not tname.endswith(".in_sum2"):
            continue
        name = tname[: -len(".in_sum2")]
        sum2 = f32(tname).reshape(-1, g.tensors[tname].shape[-1])  # (n_mat, ne0)
        counts = f32(name + ".counts").reshape(-1)  # (n_mat,)
        im.values[name] = (sum2 / np.maximum(counts, 1)[:, None]).reshape(-1).astype(np.float32)
        im.ncall[name] = max(1, int(round(float(counts[0]) / chunk_size)))
    return im


def load_imatrix(path: str | Path) -> Imatrix:
    """Read a `.dat` or a mainline GGUF imatrix, recognised by its first bytes."""
    path = Path(path)
    if not path.is_file():
        raise ImatrixError(f"{path}: no such imatrix file")
    with open(path, "rb") as f:
        magic = f.read(4)
    return read_gguf(path) if magic == b"GGUF" else read_dat(path)


# ---------------------------------------------------------------------------------------- collection


class Collector:
    """Input observer for kernels.dispatch: accumulates sum x^2 and token counts per weight."""

    def __init__(self, process_output: bool = False):
        self.process_output = process_output
        self.sum2: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.ncall: dict[str, int] = {}

    def wanted(self, name: str) -> bool:
        return name.startswith("blk.") or (self.process_output and name == "output.weight")

    def __call__(self, weight, x: torch.Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1])  # (n_tokens, in_features)
        names = [n for n in weight.name.split("+") if self.wanted(n)]  # fused q+k+v share one input
        if x2.shape[0] < MIN_TOKENS or not names:
            return
        s = x2.double().pow(2).sum(0)
        for name in names:
            self.sum2[name] = self.sum2[name] + s if name in self.sum2 else s.clone()
            self.counts[name] = self.counts.get(name, 0) + x2.shape[0]
            self.ncall[name] = self.ncall.get(name, 0) + 1

    def result(self, dataset: str = "", chunks: int = 0) -> Imatrix:
        values = {n: (s / self.counts[n]).float().numpy() for n, s in self.sum2.items()}
        return Imatrix(values, dict(self.ncall), dataset, chunks)


def chunk_tokens(tokens: list[int], n_ctx: int, n_chunks: int | None, bos: int | None) -> list[list[int]]:
    """Consecutive windows of n_ctx tokens; the first token of each becomes BOS when the model adds
    one (as llama-imatrix and llama-perplexity do)."""
    n = len(tokens) // n_ctx
    if n_chunks is not None and n_chunks > 0:
        n = min(n, n_chunks)
    out = []
    for i in range(n):
        chunk = list(tokens[i * n_ctx : (i + 1) * n_ctx])
        if bos is not None:
            chunk[0] = bos
        out.append(chunk)
    return out


def collect_imatrix(
    engine,
    chunks: Iterable[list[int]],
    process_output: bool = False,
    dataset: str = "",
    on_chunk: Callable[[int], None] | None = None,
) -> Imatrix:
    """Run `engine.logits_all` over each chunk with a Collector observing every matrix input."""
    from vramfit.kernels import dispatch

    col = Collector(process_output)
    dispatch.input_observers.append(col)
    n = 0
    try:
        for chunk in chunks:
            engine.logits_all(chunk)
            n += 1
            if on_chunk:
                on_chunk(n)
    finally:
        dispatch.input_observers.remove(col)
    return col.result(dataset, n)
