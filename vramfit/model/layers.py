"""Building blocks shared by the architectures: RMSNorm, RoPE, GQA attention over a KV cache, SwiGLU.

All float32 on the CPU path. RoPE follows ggml: "norm" style rotates adjacent pairs (x0,x1), (x2,x3)
... (llama, whose q/k rows llama.cpp's converter permutes for it); "neox" style rotates the two halves
of the rotary dims (qwen2). Frequencies honour linear and YaRN scaling and per-dim factors
(`rope_freqs.weight`, llama 3.1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vramfit.kernels.dispatch import QWeight, linear


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


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
    """Precomputed cos/sin tables for positions [0, max_pos)."""

    def __init__(self, cfg: RopeConfig, max_pos: int, freq_factors: torch.Tensor | None = None):
        self.cfg = cfg
        half = cfg.dim // 2
        inv_freq = cfg.base ** (-torch.arange(0, half, dtype=torch.float64) * 2 / cfg.dim)
        if freq_factors is not None:
            inv_freq = inv_freq / freq_factors.to(torch.float64)[:half]
        mscale = 1.0
        if cfg.scaling == "linear":
            inv_freq = inv_freq / cfg.factor
        elif cfg.scaling == "yarn":
            inv_freq, mscale = self._yarn(inv_freq)
        angles = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq[None, :]
        self.cos = (angles.cos() * mscale).to(torch.float32)  # (max_pos, half)
        self.sin = (angles.sin() * mscale).to(torch.float32)

    def _yarn(self, inv_freq: torch.Tensor) -> tuple[torch.Tensor, float]:
        # Blend interpolated and extrapolated frequencies by a ramp over the correction dims (YaRN).
        c, dim = self.cfg, self.cfg.dim
        orig = c.orig_ctx or 4096

        def corr_dim(n_rot: float) -> float:
            return dim * math.log(orig / (n_rot * 2 * math.pi)) / (2 * math.log(c.base))

        lo = max(0.0, math.floor(corr_dim(c.beta_fast)))
        hi = min(dim - 1.0, math.ceil(corr_dim(c.beta_slow)))
        i = torch.arange(dim // 2, dtype=torch.float64)
        ramp = ((i - lo) / max(0.001, hi - lo)).clamp(0, 1)
        extrap = 1.0 - ramp  # 1 where frequencies are kept as trained
        inv = inv_freq / c.factor * (1 - extrap) + inv_freq * extrap
        mscale = c.attn_factor * (1.0 + 0.1 * math.log(c.factor)) if c.factor > 1 else c.attn_factor
        return inv, mscale

    def apply(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x (n_tokens, n_heads, head_dim); pos (n_tokens,) int64."""
        d = self.cfg.dim
        cos = self.cos[pos][:, None, :]  # (n_tokens, 1, d/2)
        sin = self.sin[pos][:, None, :]
        rot, rest = x[..., :d], x[..., d:]
        if self.cfg.style == "neox":
            x1, x2 = rot[..., : d // 2], rot[..., d // 2 :]
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        else:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


class KVCache:
    """Preallocated keys and values for one sequence: (n_layer, n_kv_heads, n_ctx, head_dim) each."""

    def __init__(self, n_layer: int, n_kv_heads: int, head_dim: int, n_ctx: int, dtype=torch.float32):
        shape = (n_layer, n_kv_heads, n_ctx, head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        self.n_ctx = n_ctx

    @staticmethod
    def bytes_per_token(n_layer: int, n_kv_heads: int, head_dim: int, dtype=torch.float32) -> int:
        return 2 * n_layer * n_kv_heads * head_dim * torch.finfo(dtype).bits // 8

    def store(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: (n_tokens, n_kv_heads, head_dim) at positions start..start+n_tokens-1."""
        n = k.shape[0]
        self.k[layer, :, start : start + n] = k.transpose(0, 1)
        self.v[layer, :, start : start + n] = v.transpose(0, 1)


def attention(q: torch.Tensor, cache: KVCache, layer: int, start: int, scale: float) -> torch.Tensor:
    """Causal GQA attention of n new queries at positions start.. over the cached keys 0..start+n-1.

    q: (n_tokens, n_heads, head_dim) -> (n_tokens, n_heads * head_dim)
    """
    n, n_heads, head_dim = q.shape
    end = start + n
    k = cache.k[layer, :, :end]  # (n_kv_heads, end, head_dim)
    v = cache.v[layer, :, :end]
    qh = q.transpose(0, 1)  # (n_heads, n, head_dim)
    if n == 1:
        mask = None  # one new token sees every cached position
    else:
        q_pos = torch.arange(start, end)[:, None]
        mask = torch.arange(end)[None, :] <= q_pos  # (n, end)
    out = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(0, 1).reshape(n, n_heads * head_dim)
