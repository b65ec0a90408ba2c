"""Triton kernels for the Gated DeltaNet recurrence of qwen35 (the gated delta rule, float32 state).

Per value head h, state S (d_k, d_v) in float32, exactly as vramfit.model.qwen35 computes it:
    S <- exp(g) S;   u = beta (v - S^T k);   S <- S + k u^T;   o = S^T q

    available() -> bool                      triton importable and a CUDA device present
    recurrent_step(q, k, v, g, beta, state)  one token:  q, k (Hk, d_k); v (H, d_v); g, beta (H,);
                                             state (H, d_k, d_v) -> (o (H, d_v), state)
    prefill(q, k, v, g, beta, state)         T tokens:   q, k (Hk, T, d_k); v (H, T, d_v);
                                             g, beta (H, T) -> (o (H, T, d_v), state)
    forward_tokens(q, k, v, g, beta, state)  qwen35's token-first layout with raw q/k:
                                             q, k (T, Hk, d_k); v (T, H, d_v); g, beta (T, H)
                                             -> o (T, H, d_v); L2 norms and d_k**-0.5 applied

The shapes are those of qwen35.delta_rule_step / delta_rule_chunked; an optional leading batch dim
(B, ...) runs B sequences in one launch. Hk may be smaller than H: value head h reads key head
h % Hk (qwen35's tiled value heads; with Hk == H that is the identity, i.e. q/k already repeated).
With `l2norm=True` the kernels L2-normalise q and k themselves (eps 1e-6, as qwen35.l2_norm) and
scale q by `scale` (default d_k**-0.5); otherwise q and k are used as given (scale default 1).
The state is updated in place (as the torch functions do) and also returned; o is float32.

Two kernels, one program per (sequence, value head, block of BV state columns): the update of
column j of S only reads column j, so splitting d_v across programs is exact.

- `_recurrent_kernel` (recurrent_step, and prefill(..., chunked=False)): the fused recurrent form,
  the state block in registers, one token after another.
- `_chunk_kernel` (prefill): the chunked form of qwen35.delta_rule_chunked with chunks of 64 tokens
  (the tail chunk masked: its missing tokens have k = v = beta = g = 0 and change nothing). Inside
  a chunk, G the cumulative log decay, A[t,s] = beta_t e^(G_t-G_s) k_t.k_s (s < t):
      u = (I + A)^-1 (beta v - beta e^G k S0)
      o = e^G q S0 + ((q k^T) * e^(G_t-G_s), s <= t) u
      S <- e^(G_C) S0 + (k e^(G_C-G))^T u
  (I + A)^-1 is formed by forward substitution (row by row), the products are tl.dot in IEEE
  float32 (no TF32), and the state stays in registers from chunk to chunk.

With TRITON_INTERPRET=1 set before triton is imported, the kernels run on CPU tensors through
Triton's interpreter (the tests do that on machines without a GPU).
"""

from __future__ import annotations

import os

import torch

try:  # triton is optional (the `gpu` extra)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None
    tl = None

CHUNK = 64  # as qwen35.CHUNK
L2_EPS = 1e-6  # as qwen35.l2_norm


def interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available() -> bool:
    """Triton importable and a CUDA device present: the GPU kernels can run."""
    return triton is not None and torch.cuda.is_available()


if triton is not None:

    @triton.jit
    def _recurrent_kernel(
        q_ptr, k_ptr, v_ptr, g_ptr, b_ptr, s_ptr, o_ptr,
        T, H, HK, DK, DV, scale, eps,
        BK: tl.constexpr, BV: tl.constexpr, L2NORM: tl.constexpr,
    ):  # fmt: skip
        """q, k (B, HK, T, DK); v, o (B, H, T, DV); g, beta (B, H, T); S (B, H, DK, DV), contiguous."""
        pid = tl.program_id(0)  # b * H + h
        pid_v = tl.program_id(1)
        b = pid // H
        hk = (pid % H) % HK
        offs_k = tl.arange(0, BK)
        offs_v = pid_v * BV + tl.arange(0, BV)
        mk = offs_k < DK
        mv = offs_v < DV
        s_off = pid.to(tl.int64) * DK * DV + offs_k[:, None] * DV + offs_v[None, :]
        s_mask = mk[:, None] & mv[None, :]
        s = tl.load(s_ptr + s_off, mask=s_mask, other=0.0)
        qk_base = (b * HK + hk).to(tl.int64) * T * DK
        v_base = pid.to(tl.int64) * T * DV
        gb_base = pid.to(tl.int64) * T
        for t in range(T):
            q = tl.load(q_ptr + qk_base + t * DK + offs_k, mask=mk, other=0.0).to(tl.float32)
            k = tl.load(k_ptr + qk_base + t * DK + offs_k, mask=mk, other=0.0).to(tl.float32)
            if L2NORM:
                q = q * tl.rsqrt(tl.sum(q * q, 0) + eps)
                k = k * tl.rsqrt(tl.sum(k * k, 0) + eps)
            q = q * scale
            v = tl.load(v_ptr + v_base + t * DV + offs_v, mask=mv, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + gb_base + t).to(tl.float32)
            beta = tl.load(b_ptr + gb_base + t).to(tl.float32)
            s = s * tl.exp(g)
            u = beta * (v - tl.sum(s * k[:, None], 0))
            s = s + k[:, None] * u[None, :]
            o = tl.sum(s * q[:, None], 0)
            tl.store(o_ptr + v_base + t * DV + offs_v, o, mask=mv)
        tl.store(s_ptr + s_off, s, mask=s_mask)

    @triton.jit
    def _chunk_kernel(
        q_ptr, k_ptr, v_ptr, g_ptr, b_ptr, s_ptr, o_ptr,
        T, H, HK, DK, DV, scale, eps,
        BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, L2NORM: tl.constexpr,
    ):  # fmt: skip
        """Same layouts as _recurrent_kernel; the tokens in chunks of C."""
        pid = tl.program_id(0)
        pid_v = tl.program_id(1)
        b = pid // H
        hk = (pid % H) % HK
        offs_k = tl.arange(0, BK)
        offs_v = pid_v * BV + tl.arange(0, BV)
        offs_c = tl.arange(0, C)
        mk = offs_k < DK
        mv = offs_v < DV
        causal = offs_c[:, None] >= offs_c[None, :]
        strict = offs_c[:, None] > offs_c[None, :]
        eye = tl.where(offs_c[:, None] == offs_c[None, :], 1.0, 0.0)
        s_off = pid.to(tl.int64) * DK * DV + offs_k[:, None] * DV + offs_v[None, :]
        s_mask = mk[:, None] & mv[None, :]
        s = tl.load(s_ptr + s_off, mask=s_mask, other=0.0)
        qk_base = (b * HK + hk).to(tl.int64) * T * DK
        v_base = pid.to(tl.int64) * T * DV
        gb_base = pid.to(tl.int64) * T
        for i in range(tl.cdiv(T, C)):
            t = i * C + offs_c
            mt = t < T
            qk_off = qk_base + t[:, None] * DK + offs_k[None, :]
            qk_mask = mt[:, None] & mk[None, :]
            q = tl.load(q_ptr + qk_off, mask=qk_mask, other=0.0).to(tl.float32)
            k = tl.load(k_ptr + qk_off, mask=qk_mask, other=0.0).to(tl.float32)
            if L2NORM:
                q = q * tl.rsqrt(tl.sum(q * q, 1) + eps)[:, None]
                k = k * tl.rsqrt(tl.sum(k * k, 1) + eps)[:, None]
            q = q * scale
            v_off = v_base + t[:, None] * DV + offs_v[None, :]
            v_mask = mt[:, None] & mv[None, :]
            v = tl.load(v_ptr + v_off, mask=v_mask, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + gb_base + t, mask=mt, other=0.0).to(tl.float32)
            beta = tl.load(b_ptr + gb_base + t, mask=mt, other=0.0).to(tl.float32)

            gam = tl.cumsum(g, 0)  # G_t: cumulative log decay from the chunk start
            g_end = tl.sum(g, 0)  # G_C (the missing tokens of a tail chunk add 0)
            # e^(G_t - G_s) for s <= t (the exponent is masked first: it is > 0 above the diagonal)
            decay = tl.where(causal, tl.exp(tl.where(causal, gam[:, None] - gam[None, :], 0.0)), 0.0)
            kb = k * beta[:, None]
            a = tl.where(strict, tl.dot(kb, tl.trans(k), input_precision="ieee") * decay, 0.0)
            # inv = (I + A)^-1, A strictly lower: row r = e_r - A[r, :r] inv[:r, :]
            inv = eye
            for r in range(1, C):
                a_r = tl.sum(tl.where(offs_c[:, None] == r, a, 0.0), 0)  # A[r, :]
                row = tl.sum(a_r[:, None] * inv, 0)
                inv = tl.where(offs_c[:, None] == r, inv - row[None, :], inv)
            e_g = tl.exp(gam)
            rhs = v * beta[:, None] - tl.dot(kb * e_g[:, None], s, input_precision="ieee")
            u = tl.dot(inv, rhs, input_precision="ieee")  # (C, BV)
            attn = tl.dot(q, tl.trans(k), input_precision="ieee") * decay
            o = tl.dot(q * e_g[:, None], s, input_precision="ieee") + tl.dot(attn, u, input_precision="ieee")
            tl.store(o_ptr + v_off, o, mask=v_mask)
            k_out = k * tl.exp(g_end - gam)[:, None]
            s = s * tl.exp(g_end) + tl.dot(tl.trans(k_out), u, input_precision="ieee")
        tl.store(s_ptr + s_off, s, mask=s_mask)


def _block_sizes(d_k: int, d_v: int, bv_max: int) -> tuple[int, int]:
    bk = max(16, triton.next_power_of_2(d_k))  # tl.dot needs every dimension >= 16
    bv = max(16, min(bv_max, triton.next_power_of_2(d_v)))
    return bk, bv


def _launch(q, k, v, g, beta, state, chunked: bool, l2norm: bool, scale: float | None):
    """q, k (B, Hk, T, d_k); v (B, H, T, d_v); g, beta (B, H, T); state (B, H, d_k, d_v)."""
    if triton is None:
        raise RuntimeError("triton is not installed (pip install 'vramfit[gpu]')")
    nb, hk, t, d_k = q.shape
    h, d_v = v.shape[1], v.shape[3]
    if k.shape != q.shape or v.shape[:3] != (nb, h, t) or g.shape != (nb, h, t) or beta.shape != (nb, h, t):
        raise ValueError(f"shapes: q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)} "
                         f"g {tuple(g.shape)} beta {tuple(beta.shape)}")  # fmt: skip
    if h % hk:
        raise ValueError(f"{h} value heads are not a multiple of {hk} key heads")
    if state.shape != (nb, h, d_k, d_v) or state.dtype != torch.float32:
        raise ValueError(f"state must be float32 {(nb, h, d_k, d_v)}, got {state.dtype} {tuple(state.shape)}")
    if len({x.device for x in (q, k, v, g, beta, state)}) != 1:
        raise ValueError("all tensors must be on the same device")
    if scale is None:
        scale = d_k**-0.5 if l2norm else 1.0
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    s = state if state.is_contiguous() else state.contiguous()
    o = torch.empty((nb, h, t, d_v), dtype=torch.float32, device=v.device)
    if t == 0 or nb == 0 or h == 0:
        return o, state
    if chunked:
        bk, bv = _block_sizes(d_k, d_v, 32)
        grid = (nb * h, triton.cdiv(d_v, bv))
        _chunk_kernel[grid](
            q, k, v, g, beta, s, o, t, h, hk, d_k, d_v, float(scale), L2_EPS,
            BK=bk, BV=bv, C=CHUNK, L2NORM=l2norm, num_warps=8,
        )  # fmt: skip
    else:
        bk, bv = _block_sizes(d_k, d_v, 64)
        grid = (nb * h, triton.cdiv(d_v, bv))
        _recurrent_kernel[grid](
            q, k, v, g, beta, s, o, t, h, hk, d_k, d_v, float(scale), L2_EPS,
            BK=bk, BV=bv, L2NORM=l2norm, num_warps=4,
        )  # fmt: skip
    if s is not state:
        state.copy_(s)
    return o, state


def recurrent_step(q, k, v, g, beta, state, *, l2norm: bool = False, scale: float | None = None):
    """One token (qwen35.delta_rule_step): q, k (Hk, d_k); v (H, d_v); g, beta (H,);
    state (H, d_k, d_v) float32, updated in place. Returns (o (H, d_v) float32, state).
    A leading batch dim on every tensor (B, ...) steps B sequences at once."""
    batched = v.dim() == 3
    if not batched:
        q, k, v, g, beta, state_b = q[None], k[None], v[None], g[None], beta[None], state[None]
    else:
        state_b = state
    o, _ = _launch(q[:, :, None], k[:, :, None], v[:, :, None], g[..., None], beta[..., None], state_b,
                   chunked=False, l2norm=l2norm, scale=scale)  # fmt: skip
    o = o[:, :, 0]
    return (o if batched else o[0]), state


def prefill(
    q, k, v, g, beta, state, *, chunked: bool = True, l2norm: bool = False, scale: float | None = None
):
    """T tokens (qwen35.delta_rule_chunked): q, k (Hk, T, d_k); v (H, T, d_v); g, beta (H, T);
    state (H, d_k, d_v) float32, updated in place. Returns (o (H, T, d_v) float32, final state).
    chunked=False runs the fused recurrent kernel over the tokens instead of the chunked one.
    A leading batch dim on every tensor (B, ...) runs B sequences of the same length at once."""
    batched = v.dim() == 4
    if not batched:
        o, _ = _launch(q[None], k[None], v[None], g[None], beta[None], state[None], chunked, l2norm, scale)
        return o[0], state
    o, _ = _launch(q, k, v, g, beta, state, chunked, l2norm, scale)
    return o, state


def forward_tokens(q, k, v, g, beta, state) -> torch.Tensor:
    """qwen35's layer layout: raw (not yet normalised) q, k (T, Hk, d_k) straight from the conv;
    v (T, H, d_v); g, beta (T, H); state (H, d_k, d_v) updated in place. Returns o (T, H, d_v), as
    GatedDeltaNet._recurrent's delta rule returns it (L2 norms, q * d_k**-0.5, head h reads key head
    h % Hk). One token takes the recurrent kernel, more take the chunked one."""
    heads_first = [x.transpose(0, 1) for x in (q, k, v, g, beta)]
    o, _ = prefill(*heads_first, state, chunked=q.shape[0] > 1, l2norm=True)
    return o.transpose(0, 1)


__all__ = ["available", "interpreted", "recurrent_step", "prefill", "forward_tokens", "CHUNK"]
