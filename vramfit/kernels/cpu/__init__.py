"""Fast CPU path: quantized matrix products straight from packed GGUF rows.

`qmatmul(x, packed, type_name)` computes `x @ decode(packed).T` without ever materialising a float
copy of the weight. The C extension `_qgemm` (built by setup.py; AVX2 or AVX-512 VNNI picked at run
time) quantizes the activations to 8-bit blocks of 32, as llama.cpp does for its CPU dot products, and
multiplies them with the weight codes in integer arithmetic (dpbusd / maddubs), accumulating per block
in float32. Two paths:
- n <= 8 (decode): fused per-type kernels read the packed rows directly, for the types that have one
  (q4_0..q8_0, iq4_nl, q4_K..q6_K, iq4_xs, iq4_ks, iq4_k, iq5_ks), on both ISAs (qgemm_decode.h,
  qgemm_decode_avx2.h; one driver and activation layout, qgemm_fused.h);
- otherwise (prefill, and the other types): weight rows are unpacked to 8-bit codes plus group scales
  in a small per-thread buffer. AVX-512: 16 rows at a time into a tile whose 4-weight lanes are
  interleaved, so one dpbusd serves 16 rows and the 8 activation rows of a micro-kernel call share
  every tile load; AVX2: 4 rows at a time, a 4x4 register-blocked micro-kernel.
Output rows are shared by `threads` threads of the extension's own small pool through an atomic
work counter; the caller works too, and a worker that wakes late (busy machine) skips the call instead
of making the caller wait at a barrier.

Accuracy: the only approximation is that 8-bit activation quantization. Against the reference
`x @ decode(W).T`, each output is within 3e-2 of the scale |x| * |w_row| / sqrt(K) (typical errors
~5e-3); against `q8(x) @ decode(W).T`, with q8 the same activation rounding, within 1e-4 (float32
summation order only). tests/test_cpu_kernels.py checks both.

For one decoded token, `fused_decode` (qlayer.c) runs every layer of a llama-family model in one call
on these kernels: the norms, rope, attention and SwiGLU between the products too. Attention, SwiGLU
and the Gated DeltaNet's conv and one-token step have AVX2 kernels (qops_avx2.c; the attention and
SwiGLU on the decode step's own math, qmath_avx2.h) and AVX-512 ones (qattn_avx512.c, qops_avx512.c).

When the extension is missing (not x86-64, no compiler at install time, CPU without AVX2),
`available()` is False and callers use the reference path (vramfit.kernels.dispatch).
"""

from __future__ import annotations

import torch

try:  # the compiled extension is optional
    from vramfit.kernels.cpu import _qgemm
except ImportError:  # pragma: no cover - depends on the build
    _qgemm = None

# ggml type ids of the types the kernels read (lower-case ggml names)
TYPE_IDS: dict[str, int] = {
    "q4_0": 2,
    "q4_1": 3,
    "q5_0": 6,
    "q5_1": 7,
    "q8_0": 8,
    "q2_k": 10,
    "q3_k": 11,
    "q4_k": 12,
    "q5_k": 13,
    "q6_k": 14,
    "iq4_nl": 20,
    "iq4_xs": 23,
    "q6_0": 133,
    "iq2_k": 137,
    "iq3_k": 138,
    "iq4_k": 139,
    "iq5_k": 140,
    "iq6_k": 141,
    "iq4_ks": 144,
    "iq2_ks": 145,
    "iq4_kss": 146,
    "iq5_ks": 152,
    "iq3_ks": 156,
    "iq2_kl": 157,
}

ISA_NAMES = ("none", "avx2", "avx512vnni")


def available() -> bool:
    """True when the extension is built and the CPU has at least AVX2 + FMA."""
    return _qgemm is not None and _qgemm.cpu_level() > 0


def isa() -> str:
    """The instruction set in use: 'none', 'avx2' or 'avx512vnni'."""
    return ISA_NAMES[_qgemm.cpu_level()] if _qgemm is not None else "none"


def set_isa(name: str | None) -> str:
    """Use at most the named instruction set (None: the best the CPU has). For tests and benchmarks."""
    if _qgemm is None:
        return "none"
    return ISA_NAMES[_qgemm.set_level(-1 if name is None else ISA_NAMES.index(name))]


def supports(type_name: str, k: int | None = None) -> bool:
    """Whether qmatmul handles weights of this ggml type (case-insensitive name, e.g. 'q4_K'),
    and, when `k` is given, rows of k weights (a multiple of the type's block size)."""
    if not available() or type_name.lower() not in TYPE_IDS:
        return False
    return k is None or row_nbytes(type_name, k) > 0


def row_nbytes(type_name: str, k: int) -> int:
    """Packed bytes per row of k weights as the kernel reads them (0 when unsupported)."""
    tid = TYPE_IDS.get(type_name.lower())
    return 0 if tid is None or _qgemm is None else _qgemm.row_nbytes(tid, k)


def qmatmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    type_name: str,
    out: torch.Tensor | None = None,
    threads: int | None = None,
) -> torch.Tensor:
    """x (n, K) float32 @ W.T -> (n, N) float32, where W is the decoded `packed` (N, row_nbytes) uint8.

    `out`, when given, must be a contiguous float32 (n, N) tensor and receives the result.
    `threads` defaults to torch.get_num_threads().
    """
    n, k = x.shape
    rows, nbytes = packed.shape
    tid = TYPE_IDS[type_name.lower()]
    if x.dtype != torch.float32 or packed.dtype != torch.uint8:
        raise TypeError("qmatmul expects float32 activations and uint8 packed rows")
    if not packed.is_contiguous():
        raise ValueError("qmatmul expects contiguous packed rows")
    x = x.contiguous()  # no copy when it already is
    if out is None:
        out = torch.empty((n, rows), dtype=torch.float32)
    elif out.shape != (n, rows) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 tensor of shape {(n, rows)}")
    nth = torch.get_num_threads() if threads is None else threads
    _qgemm.matmul(x.data_ptr(), n, k, packed.data_ptr(), rows, nbytes, tid, out.data_ptr(), nth)
    return out


def qmatmul_parts(x: torch.Tensor, parts: list[tuple[torch.Tensor, str, torch.Tensor]], threads: int) -> None:
    """x (n, K) float32 @ W_i.T into out_i for each (packed_i, type_i, out_i) of at most 4 parts, in one
    pass of the kernels for n <= 8 (x quantized once, one wake of the thread pool). Each out_i must
    be a contiguous float32 (n, N_i) tensor; the packed rows contiguous uint8."""
    n, k = x.shape
    if x.dtype != torch.float32 or not x.is_contiguous():
        raise TypeError("qmatmul_parts expects contiguous float32 activations")
    desc = []
    for packed, type_name, out in parts:
        rows, nbytes = packed.shape
        if packed.dtype != torch.uint8 or not packed.is_contiguous():
            raise TypeError("qmatmul_parts expects contiguous uint8 packed rows")
        if out.shape != (n, rows) or out.dtype != torch.float32 or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous float32 tensor of shape {(n, rows)}")
        desc.append((packed.data_ptr(), rows, nbytes, TYPE_IDS[type_name.lower()], out.data_ptr()))
    _qgemm.matmul_parts(x.data_ptr(), n, k, tuple(desc), threads)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of a contiguous float32 CPU tensor, in one C call."""
    out = torch.empty_like(x)
    k = x.shape[-1]
    _qgemm.rmsnorm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // k, k, float(eps))
    return out


def attention_supported(head_dim: int) -> bool:
    """Whether `attention` runs here: AVX2 (or better) in use and head_dim a multiple of 8."""
    return available() and head_dim % 8 == 0 and head_dim > 0


def attention_variant(head_dim: int, n: int) -> str | None:
    """Which kernel `attention` runs for n queries: "flash" (AVX-512, head_dim a multiple of 16 up to
    256: flash attention over a transposed copy of the keys), "rows" (AVX2, and one query on any ISA:
    each query head by the decode step's own routine, a row of scores per thread) or None."""
    if not attention_supported(head_dim):
        return None
    wide = _qgemm.cpu_level() >= 2 and n > 1 and head_dim % 16 == 0 and head_dim <= 256
    return "flash" if wide else "rows"


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float, threads: int
) -> torch.Tensor:
    """Causal GQA attention of n new tokens at positions start.. over a float32 cache.

    q (n, n_heads, head_dim) contiguous; k, v (n_kv_heads, >= start + n, head_dim) with contiguous
    rows (a layer of the KV cache); returns (n, n_heads * head_dim). Query i sees keys 0..start+i.
    Float32; see `attention_variant` for the two kernels (qattn_avx512.c, qops_avx2.c).
    """
    n, n_heads, head_dim = q.shape
    n_kv = k.shape[0]
    if q.dtype != torch.float32 or k.dtype != torch.float32 or v.dtype != torch.float32:
        raise TypeError("attention expects float32 q, k and v")
    if v.stride() != k.stride():  # e.g. a decoded (quantized) K beside a float V still in the cache
        k, v = k.contiguous(), v.contiguous()
    if not q.is_contiguous() or k.stride()[1:] != (head_dim, 1):
        raise ValueError("attention expects contiguous queries and cache rows")
    if k.shape[1] < start + n:
        raise ValueError(f"the cache holds {k.shape[1]} positions, attention needs {start + n}")
    out = torch.empty((n, n_heads * head_dim), dtype=torch.float32)
    _qgemm.attention(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), n, start, n_heads, n_kv, head_dim,
        k.stride(0), float(scale), threads,
    )  # fmt: skip
    return out


def swiglu_supported() -> bool:
    return available()


def swiglu(gate_up: torch.Tensor, threads: int) -> torch.Tensor:
    """silu(gate) * up for a contiguous float32 (n, 2 * n_ff) tensor holding [gate | up] per row."""
    if gate_up.dtype != torch.float32 or not gate_up.is_contiguous() or gate_up.shape[-1] % 2:
        raise ValueError("swiglu expects a contiguous float32 [gate | up] tensor")
    n_ff = gate_up.shape[-1] // 2
    out = torch.empty((*gate_up.shape[:-1], n_ff), dtype=torch.float32)
    _qgemm.swiglu(gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // (2 * n_ff), n_ff, threads)
    return out


def conv_supported() -> bool:
    return available()


def conv_silu(x: torch.Tensor, state: torch.Tensor, taps: torch.Tensor, threads: int) -> torch.Tensor:
    """silu(causal depthwise conv) of x (T, C) continuing from state (K-1, C), the previous raw inputs;
    taps (K, C), tap K-1 on the current input. Float32; x's rows may be strided (columns of a wider
    product), state and taps contiguous. `state` is not updated here."""
    k = taps.shape[0]
    t, c = x.shape
    floats = all(a.dtype == torch.float32 for a in (x, state, taps))
    ok = floats and state.is_contiguous() and taps.is_contiguous() and x.stride(1) == 1
    if not ok or state.shape != (k - 1, c) or taps.shape[1] != c or not 1 <= k <= 16:
        raise ValueError("conv_silu expects float32 x (T, C) with unit column stride, state, taps (K, C)")
    out = torch.empty((t, c), dtype=torch.float32)
    ldx = max(x.stride(0), c)  # a single row may report any stride
    _qgemm.conv_silu(state.data_ptr(), x.data_ptr(), ldx, taps.data_ptr(), out.data_ptr(), t, c, k, threads)
    return out


def delta_step(q, k, v, g, beta, state: torch.Tensor, threads: int) -> torch.Tensor:
    """One token of the gated delta rule: q, k (n_k, d_k), value head h reading key head h % n_k;
    v (H, d_v); g (log decay), beta (H,); state (H, d_k, d_v) updated in place. Returns o (H, d_v).
    Float32, contiguous."""
    h, d_k, d_v = state.shape
    n_k = q.shape[0]
    args = (q, k, v, g, beta, state)
    shapes_ok = q.shape == k.shape == (n_k, d_k) and v.shape == (h, d_v) and g.shape == beta.shape == (h,)
    if not shapes_ok or h % n_k or not all(a.dtype == torch.float32 and a.is_contiguous() for a in args):
        raise ValueError("delta_step expects contiguous float32 q, k (n_k, d_k), v (H, d_v), g, beta (H,)")
    if d_v > 1024:
        raise ValueError("delta_step takes value heads of at most 1024")
    out = torch.empty((h, d_v), dtype=torch.float32)
    _qgemm.delta_step(*(a.data_ptr() for a in args), out.data_ptr(), h, n_k, d_k, d_v, threads)
    return out


__all__ = [
    "attention",
    "conv_silu",
    "conv_supported",
    "delta_step",
    "attention_supported",
    "attention_variant",
    "available",
    "isa",
    "qmatmul",
    "qmatmul_parts",
    "rms_norm",
    "row_nbytes",
    "set_isa",
    "supports",
    "swiglu",
    "swiglu_supported",
]
