"""NVIDIA path: Triton kernels that multiply activations by packed GGUF weights.

    available() -> bool                 triton importable and a CUDA device present
    supports(type_name) -> bool         a kernel exists for this ggml type
    qmatmul(x, packed, type_name)       x (n, K) float32/fp16/bf16, packed uint8 (N, row_nbytes)
                                        -> (n, N) in x's dtype (float32 accumulation)

The weights are read as stored in the file (row metadata included); nothing is repacked. One row
takes the matrix-vector kernel (float32 products and accumulation); 2..8 rows (decode batches) and
larger ones (prefill) take tiles dequantized to fp16 (bf16 for bf16 activations) multiplied on the
tensor cores with float32 accumulation; either way each weight byte is read once per program.
See kernels.py.

Every GGUF type the codecs decode has a kernel (24). Status on a GPU (H100, triton 3.6, the first 13
types only: the other 11 were added without a GPU and are checked in the interpreter alone): every type
matched the reference decode except q5_1 at batch 1, off by about 7% of the output scale on a 4095 x
4096 matrix (small K passes, and the interpreter is exact on the same data), an open bug that
`dispatch` routes around; measured speeds were far from the bandwidth bound (bench/gpu_decode.py).
The later decoders gather bytes per weight and read two grids (iq6_k, iq2_kl) from a small table
(`tab_ptr`): correct first, their word-load tuning needs a GPU.

With TRITON_INTERPRET=1 set before triton is imported, the same kernels run on CPU tensors through
Triton's interpreter (slow; used by the tests on machines without a GPU).
"""

from __future__ import annotations

import os

import torch

try:  # triton is optional (the `gpu` extra)
    import triton

    from vramfit.kernels.triton import kernels as _k
except ImportError:  # pragma: no cover - depends on the installation
    triton = None
    _k = None

DECODE_MAX_BATCH = 8  # like ik_llama.cpp's MMVQ_MAX_BATCH_SIZE

_TYPE_NAMES = (
    "iq4_ks", "q4_k", "q6_k", "q8_0", "q5_0", "q4_1", "iq4_k", "iq5_ks", "iq4_xs", "q4_0", "q5_k", "q5_1",
    "iq4_nl", "iq3_k", "iq2_k", "iq5_k", "iq2_ks", "iq3_ks", "q2_k", "q3_k", "iq4_kss", "iq6_k", "iq2_kl",
    "q6_0",
)  # fmt: skip
_TABLES: dict[torch.device, torch.Tensor] = {}


def _table(device: torch.device) -> torch.Tensor:
    """The kernels' float32 grid tables on `device` (see kernels.py TAB_*)."""
    t = _TABLES.get(device)
    if t is None:
        from vramfit.quant import grids

        t = torch.cat([grids.IQ6NL_VALUES[:64].float(), grids.IQ2KL_PAIRS.reshape(-1).float()]).to(device)
        _TABLES[device] = t
    return t


def interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def importable() -> bool:
    """Triton installed (the kernels compile, or run in the interpreter)."""
    return _k is not None


def available() -> bool:
    """Triton importable and a CUDA device present: the GPU kernels can run."""
    return _k is not None and torch.cuda.is_available()


def supports(type_name: str, k: int | None = None) -> bool:
    """A kernel for this type (and, given k, for rows of k weights: a whole number of its blocks)."""
    name = type_name.lower()
    if name not in _TYPE_NAMES:
        return False
    return k is None or _k is None or k % _k.TYPES[name][3] == 0


def type_names() -> tuple[str, ...]:
    return _TYPE_NAMES


def row_nbytes(type_name: str, k: int) -> int:
    _code, meta, size, block = _k.TYPES[type_name.lower()]
    if k % block:
        raise ValueError(f"{type_name}: row length {k} is not a multiple of {block}")
    return meta + (k // block) * size


def default_config(type_name: str, m: int) -> dict:
    """Launch parameters: mode, block_m, block_n, num_warps, num_stages, unroll (see kernels.py)."""
    if m == 1:
        return {"mode": 0, "block_m": 1, "block_n": 8, "num_warps": 4, "num_stages": 3, "unroll": 2}
    if m <= DECODE_MAX_BATCH:
        return {"mode": 2, "block_m": 16, "block_n": 32, "num_warps": 4, "num_stages": 3, "unroll": 1}
    return {"mode": 2, "block_m": 64, "block_n": 64, "num_warps": 8, "num_stages": 3, "unroll": 1}


def qmatmul(
    x: torch.Tensor, packed: torch.Tensor, type_name: str, config: dict | None = None
) -> torch.Tensor:
    """x (n, K) @ decode(packed).T -> (n, N): the fused dequantize-and-multiply.

    `packed` holds the N rows exactly as in the GGUF (uint8, row metadata included); both tensors on
    the same device (CUDA, or CPU under TRITON_INTERPRET=1). `config` overrides default_config()
    (benchmarks and tests).
    """
    if _k is None:
        raise RuntimeError("triton is not installed (pip install 'vramfit[gpu]')")
    name = type_name.lower()
    if name not in _k.TYPES:
        raise ValueError(f"no Triton kernel for tensor type {type_name}")
    if x.dim() != 2 or packed.dim() != 2 or packed.dtype != torch.uint8:
        raise ValueError("qmatmul expects x (n, K) and packed uint8 (N, row_nbytes)")
    code, meta, size, block = _k.TYPES[name]
    m, k = x.shape
    n = packed.shape[0]
    if packed.shape[1] != row_nbytes(name, k):
        raise ValueError(
            f"{type_name}: packed rows have {packed.shape[1]} bytes, expected {row_nbytes(name, k)} for K={k}"
        )
    if x.device != packed.device:
        raise ValueError("x and packed must be on the same device")
    x = x.contiguous()
    packed = packed.contiguous()
    if packed.data_ptr() % 4:
        packed = packed.clone()  # word loads need 4-byte aligned rows (the allocator gives 256)
    cfg = default_config(name, m)
    if config:
        cfg.update(config)
    out = torch.empty((m, n), dtype=torch.float32, device=x.device)
    if m == 0 or n == 0:
        return out.to(x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float32)
    if cfg["mode"] == 0 and m != 1:
        raise ValueError("mode 0 is for a single activation row")
    bm, bn = cfg["block_m"], cfg["block_n"]
    # Triton's interpreter mis-converts float32 to bf16 inside tl.dot, so it gets fp16 tiles instead
    dot_bf16 = x.dtype == torch.bfloat16 and not interpreted()
    grid = (triton.cdiv(n, bn), triton.cdiv(m, bm))
    _k._qmm_kernel[grid](
        x, packed, out, _table(x.device), m, n, k, k // block, packed.shape[1],
        x.stride(0), out.stride(0),
        QT=code, BLOCK_M=bm, BLOCK_N=bn, MODE=cfg["mode"], DOT_BF16=dot_bf16, UNROLL=cfg["unroll"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    if x.dtype in (torch.float16, torch.bfloat16):
        return out.to(x.dtype)
    return out


__all__ = ["available", "importable", "interpreted", "qmatmul", "supports", "type_names", "DECODE_MAX_BATCH"]
