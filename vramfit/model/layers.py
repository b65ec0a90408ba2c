"""Building blocks shared by the architectures: RMSNorm, RoPE, GQA attention over a KV cache, SwiGLU.

All float32 on the CPU path. RoPE follows ggml: "norm" style rotates adjacent pairs (x0,x1), (x2,x3)
... (llama, whose q/k rows llama.cpp's converter permutes for it); "neox" style rotates the two halves
of the rotary dims (qwen2, qwen3.5): dims j and j + dim/2.
Frequencies honour linear and YaRN scaling and per-dim factors (`rope_freqs.weight`, llama 3.1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vramfit.kernels import cpu as cpu_kernels
from vramfit.kernels import dispatch
from vramfit.kernels.dispatch import QWeight, linear
from vramfit.model.kvcache import KVSpec, KVStore


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight of {weight.shape[0]} for rows of {x.shape[-1]}")
    return dispatch.rms_norm(x, weight, eps)


def swiglu(x: torch.Tensor, w_gate: QWeight, w_up: QWeight, w_down: QWeight) -> torch.Tensor:
    return linear(F.silu(linear(x, w_gate)) * linear(x, w_up), w_down)


@dataclass(frozen=True)
class RopeConfig:
    dim: int  # rotary dims (<= head_dim; the rest pass through)
    base: float = 10000.0
    style: str = "norm"  # "norm" (adjacent pairs) or "neox" (halves)
    scaling: str = "none"  # "none", "linear" or "yarn"
    factor: float = 1.0
    orig_ctx: int = 0  # original training context, for YaRN
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attn_factor: float = 1.0


class Rope:
    """RoPE as a rotation of pairs by e^(i pos theta_j): adjacent pairs (x0, x1), ggml's "norm" style,
    or the pairs (x_j, x_{j + dim/2}) of NeoX style. Each product is rounded apart and then added, as
    torch's complex multiply does and the C decode step (kernels/cpu/qlayer.c) does too.
    """

    def __init__(self, cfg: RopeConfig, max_pos: int, freq_factors: torch.Tensor | None = None):
        # the table is computed in float64 with numpy: torch's float64 kernels for it would be ~4 MiB
        # of library code paged in for a one-off (a fifth of a small model's memory headroom)
        self.cfg = cfg
        half = cfg.dim // 2
        inv_freq = cfg.base ** (-np.arange(half, dtype=np.float64) * 2 / cfg.dim)
        if freq_factors is not None:
            inv_freq = inv_freq / freq_factors.numpy().astype(np.float64)[:half]
        mscale = 1.0
        if cfg.scaling == "linear":
            inv_freq = inv_freq / cfg.factor
        elif cfg.scaling == "yarn":
            inv_freq, mscale = self._yarn(inv_freq)
        angles = np.arange(max_pos, dtype=np.float64)[:, None] * inv_freq[None, :]
        table = np.empty((max_pos, half, 2), dtype=np.float32)  # (cos, sin) pairs = complex64
        table[..., 0] = np.cos(angles) * mscale
        table[..., 1] = np.sin(angles) * mscale
        self.freqs = torch.view_as_complex(torch.from_numpy(table))  # (max_pos, half)

    def _yarn(self, inv_freq: np.ndarray) -> tuple[np.ndarray, float]:
        # Blend interpolated and extrapolated frequencies by a ramp over the correction dims (YaRN).
        c, dim = self.cfg, self.cfg.dim
        orig = c.orig_ctx or 4096

        def corr_dim(n_rot: float) -> float:
            return dim * math.log(orig / (n_rot * 2 * math.pi)) / (2 * math.log(c.base))

        lo = max(0.0, math.floor(corr_dim(c.beta_fast)))
        hi = min(dim - 1.0, math.ceil(corr_dim(c.beta_slow)))
        i = np.arange(dim // 2, dtype=np.float64)
        ramp = np.clip((i - lo) / max(0.001, hi - lo), 0, 1)
        extrap = 1.0 - ramp  # 1 where frequencies are kept as trained
        inv = inv_freq / c.factor * (1 - extrap) + inv_freq * extrap
        mscale = c.attn_factor * (1.0 + 0.1 * math.log(c.factor)) if c.factor > 1 else c.attn_factor
        return inv, mscale

    def to(self, device: torch.device | str) -> Rope:
        self.freqs = self.freqs.to(device)
        return self

    def at(self, start: int, n: int) -> torch.Tensor:
        """Rotations for positions start..start+n-1, shaped (n, 1, dim/2) to broadcast over heads."""
        return self.freqs[start : start + n, None, :]

    def apply(self, x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        """x (n_tokens, n_heads, head_dim), rot from `at` -> rotated copy of x."""
        n, h, hd = x.shape
        d = self.cfg.dim
        if self.cfg.style == "neox":
            c, s = rot.real, rot.imag
            a, b = x[..., : d // 2], x[..., d // 2 : d]
            return torch.cat((a * c - b * s, a * s + b * c, x[..., d:]), dim=-1)
        if d == hd:
            pairs = torch.view_as_complex(x.reshape(n, h, hd // 2, 2))
            return torch.view_as_real(pairs * rot).view(n, h, hd)
        pairs = torch.view_as_complex(x[..., :d].reshape(n, h, d // 2, 2))
        return torch.cat((torch.view_as_real(pairs * rot).view(n, h, d), x[..., d:]), dim=-1)


class KVCache:
    """Preallocated keys and values for one sequence: (n_layer, n_kv_heads, n_ctx, head_dim) each.

    `dtype` is a torch float dtype or a `KVSpec` (block-quantized K/V, Hadamard rotations; see
    model/kvcache.py); `k`/`v` hold the stored form, `keys`/`values` give float32."""

    def __init__(
        self, n_layer: int, n_kv_heads: int, head_dim: int, n_ctx: int, dtype=torch.float32, device=None
    ):
        self.spec = KVSpec.of(dtype)
        self.spec.check(head_dim)
        s = self.spec
        self.k_store = KVStore(s.k, n_layer, n_kv_heads, n_ctx, head_dim, s.k_hadamard, device)
        self.v_store = KVStore(s.v, n_layer, n_kv_heads, n_ctx, head_dim, s.v_hadamard, device)
        self.k, self.v = self.k_store.data, self.v_store.data
        self.n_ctx = n_ctx

    @staticmethod
    def bytes_per_token(n_layer: int, n_kv_heads: int, head_dim: int, dtype=torch.float32) -> int:
        return KVSpec.of(dtype).bytes_per_token(n_layer, n_kv_heads, head_dim)

    def store(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: (n_tokens, n_kv_heads, head_dim) at positions start..start+n_tokens-1."""
        self.k_store.write(layer, start, k)
        self.v_store.write(layer, start, v)

    def keys(self, layer: int, end: int) -> torch.Tensor:
        return self.k_store.read(layer, end)

    def values(self, layer: int, end: int) -> torch.Tensor:
        return self.v_store.read(layer, end)


def attention(q: torch.Tensor, cache: KVCache, layer: int, start: int, scale: float) -> torch.Tensor:
    """Causal GQA attention of n new queries at positions start.. over the cached keys 0..start+n-1.

    q: (n_tokens, n_heads, head_dim) -> (n_tokens, n_heads * head_dim)
    """
    n, n_heads, head_dim = q.shape
    end = start + n
    k = cache.keys(layer, end)  # (n_kv_heads, end, head_dim)
    v = cache.values(layer, end)
    if cache.k_store.rotation is not None:  # keys are stored rotated: rotate q too
        q = q @ cache.k_store.rotation
    if dispatch.fast_attention(q, head_dim):  # the C kernels (one query: the decode step's own)
        out = cpu_kernels.attention(q.contiguous(), k, v, start, scale, dispatch.get_threads())
    elif n == 1:
        out = _decode_attention(q, k, v, scale)
    else:
        qh = q.transpose(0, 1)  # (n_heads, n, head_dim)
        # from position 0 torch's own causal mask is the right one (and faster than an explicit one)
        pos = torch.arange(end, device=q.device)
        mask = None if start == 0 else pos[None, :] <= pos[start:, None]
        with dispatch.parallel_torch():  # 4-D inputs reach torch's fused (flash) CPU kernel
            out = F.scaled_dot_product_attention(
                qh[None], k[None], v[None], attn_mask=mask, is_causal=mask is None, scale=scale,
                enable_gqa=True,
            )[0]  # fmt: skip
        out = out.transpose(0, 1).reshape(n, n_heads * head_dim)
    if cache.v_store.rotation is not None:  # values are stored rotated: rotate the output back
        out = (out.view(n, n_heads, head_dim) @ cache.v_store.rotation).reshape(n, n_heads * head_dim)
    return out


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token: heads grouped by the kv head they share (head h uses kv head h // group), so
    no key/value copies are made. q (1, H, D), k/v (KV, T, D) -> (1, H * D)."""
    n_kv, _, head_dim = k.shape
    qg = q.view(n_kv, -1, head_dim)  # (KV, G, D)
    scores = torch.bmm(qg, k.transpose(1, 2)).mul_(scale)  # (KV, G, T)
    out = torch.bmm(torch.softmax(scores, dim=-1), v)  # (KV, G, D)
    return out.view(1, -1)
