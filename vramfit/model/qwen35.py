"""Qwen3.5 / Qwen3.6 hybrid decoder (GGUF architecture `qwen35`).

Every `full_attention_interval`-th layer is gated full attention (q/k RMSNorm, partial NeoX RoPE,
output times sigmoid(gate)); the others are Gated DeltaNet layers (linear attention whose state is
updated by the gated delta rule). Every layer has a SwiGLU MLP.

Weights as llama.cpp's converter writes them (conversion/qwen.py, `Qwen3_5TextModel`): the
zero-centred norms already hold 1 + w (ssm_norm, a plain weight, does not), `ssm_a` = -exp(A_log),
`ssm_dt.bias` = dt_bias, `ssm_conv1d` is (channels, kernel), and value heads are *tiled*: value head
h reads key head h % n_k_heads (HF groups them and uses h // ratio).

Gated DeltaNet, per value head, state S (d_k, d_v) in float32 (Yang et al., "Gated Delta Networks"):
    S <- exp(g) S;   u = beta (v - S^T k);   S <- S + k u^T;   o = S^T q
Decode runs that step; prefill runs the chunked form (a UT transform inside chunks of 64 tokens,
the state carried from chunk to chunk), so a long prompt is a loop over chunks, not over tokens.
M-RoPE (`rope.dimension_sections`) is plain NeoX RoPE for text, where the three positions agree.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F

from vramfit.kernels import cpu as cpu_kernels
from vramfit.kernels import dispatch
from vramfit.kernels.dispatch import FusedLinear, QWeight, linear, swiglu
from vramfit.model.layers import KVCache, Rope, attention, rms_norm
from vramfit.model.llama import LlamaConfig, embeddings_and_head
from vramfit.model.loader import WeightSource, require
from vramfit.model.qwen2 import Qwen2Config

# GGUF tensor names per block; the only place they appear for this architecture.
FFN_TENSORS = {
    "attn_norm": "blk.{i}.attn_norm.weight",
    "ffn_norm": "blk.{i}.post_attention_norm.weight",
    "w_gate": "blk.{i}.ffn_gate.weight",
    "w_up": "blk.{i}.ffn_up.weight",
    "w_down": "blk.{i}.ffn_down.weight",
}
ATTN_TENSORS = {
    "wqg": "blk.{i}.attn_q.weight",  # per head [q (head_dim) | gate (head_dim)]
    "wk": "blk.{i}.attn_k.weight",
    "wv": "blk.{i}.attn_v.weight",
    "wo": "blk.{i}.attn_output.weight",
    "q_norm": "blk.{i}.attn_q_norm.weight",
    "k_norm": "blk.{i}.attn_k_norm.weight",
}
DELTANET_TENSORS = {
    "w_qkv": "blk.{i}.attn_qkv.weight",  # [q (n_k*d_k) | k (n_k*d_k) | v (n_v*d_v)]
    "w_z": "blk.{i}.attn_gate.weight",
    "w_beta": "blk.{i}.ssm_beta.weight",
    "w_alpha": "blk.{i}.ssm_alpha.weight",
    "dt_bias": "blk.{i}.ssm_dt.bias",
    "a": "blk.{i}.ssm_a",
    "conv": "blk.{i}.ssm_conv1d.weight",
    "norm": "blk.{i}.ssm_norm.weight",
    "w_out": "blk.{i}.ssm_out.weight",
}
CHUNK = 64  # prefill chunk of the delta rule (the size FLA and llama.cpp use)


@dataclass(frozen=True)
class DeltaNetConfig:
    n_k_heads: int  # ssm.group_count
    n_v_heads: int  # ssm.time_step_rank (a multiple of n_k_heads)
    d_k: int  # ssm.state_size
    d_v: int  # ssm.inner_size / n_v_heads
    conv_kernel: int  # ssm.conv_kernel

    @property
    def conv_channels(self) -> int:
        return 2 * self.n_k_heads * self.d_k + self.n_v_heads * self.d_v


@dataclass(frozen=True)
class Qwen35Config(LlamaConfig):
    deltanet: DeltaNetConfig
    attn_interval: int  # full_attention_interval: layer i is attention iff (i + 1) % interval == 0

    rope_style = "neox"

    @classmethod
    def from_metadata(cls, md: dict[str, Any], n_vocab: int) -> Qwen35Config:
        arch = md["general.architecture"]

        def key(name: str) -> Any:
            return require(md, f"{arch}.{name}")

        base = Qwen2Config.from_metadata(md, n_vocab)
        n_v = key("ssm.time_step_rank")
        dn = DeltaNetConfig(
            n_k_heads=key("ssm.group_count"),
            n_v_heads=n_v,
            d_k=key("ssm.state_size"),
            d_v=key("ssm.inner_size") // n_v,
            conv_kernel=key("ssm.conv_kernel"),
        )
        if n_v % dn.n_k_heads:
            raise ValueError(f"{arch}: {n_v} value heads are not a multiple of {dn.n_k_heads} key heads")
        # an MTP (next-token prediction) block, when kept, is counted in block_count but not run
        n_layer = base.n_layer - md.get(f"{arch}.nextn_predict_layers", 0)
        values = {f.name: getattr(base, f.name) for f in fields(base)} | {"n_layer": n_layer}
        return cls(**values, deltanet=dn, attn_interval=key("full_attention_interval"))

    def is_recurrent(self, layer: int) -> bool:
        return (layer + 1) % self.attn_interval != 0


# ------------------------------------------------------------------------------------------------
# State: declared per layer, allocated once per sequence


@dataclass(frozen=True)
class LayerState:
    """What one layer keeps: bytes per token of context (KV) and bytes per sequence (recurrent)."""

    kind: str  # "kv" or "recurrent"
    per_token: int
    per_sequence: int


def layer_states(cfg: Qwen35Config, kv_dtype: torch.dtype = torch.float32) -> list[LayerState]:
    dn = cfg.deltanet
    kv = KVCache.bytes_per_token(1, cfg.n_head_kv, cfg.head_dim, kv_dtype)
    conv = (dn.conv_kernel - 1) * dn.conv_channels * 4  # float32 last inputs of the conv
    ssm = dn.n_v_heads * dn.d_k * dn.d_v * 4  # float32 delta-rule state
    return [
        LayerState("recurrent", 0, conv + ssm) if cfg.is_recurrent(i) else LayerState("kv", kv, 0)
        for i in range(cfg.n_layer)
    ]


def layer_slots(cfg: Qwen35Config) -> list[int]:
    """Layer -> its index among the layers of its kind (into the KV cache or the recurrent state)."""
    kinds = [cfg.is_recurrent(i) for i in range(cfg.n_layer)]
    return [sum(kinds[j] == r for j in range(i)) for i, r in enumerate(kinds)]


class HybridState:
    """One sequence's state: keys/values of the attention layers, conv and delta-rule state of the
    DeltaNet layers. `pos` counts the tokens the recurrent part has absorbed; it cannot be rolled
    back, so `supports_truncate` tells the engine to recompute from 0 instead of cutting a prefix."""

    supports_truncate = False

    def __init__(self, cfg: Qwen35Config, n_ctx: int, kv_dtype=torch.float32, device=None):  # dtype or KVSpec
        dn = cfg.deltanet
        n_rec = sum(cfg.is_recurrent(i) for i in range(cfg.n_layer))
        self.kv = KVCache(cfg.n_layer - n_rec, cfg.n_head_kv, cfg.head_dim, n_ctx, kv_dtype, device)
        self.conv = torch.zeros(n_rec, dn.conv_kernel - 1, dn.conv_channels, device=device)
        self.ssm = torch.zeros(n_rec, dn.n_v_heads, dn.d_k, dn.d_v, device=device)
        self.n_ctx = n_ctx
        self.pos = 0

    def reset(self) -> None:
        self.conv.zero_()
        self.ssm.zero_()
        self.pos = 0

    @staticmethod
    def bytes_per_token(cfg: Qwen35Config, kv_dtype: torch.dtype = torch.float32) -> int:
        return sum(s.per_token for s in layer_states(cfg, kv_dtype))

    @staticmethod
    def bytes_per_sequence(cfg: Qwen35Config) -> int:
        return sum(s.per_sequence for s in layer_states(cfg))


# ------------------------------------------------------------------------------------------------
# Gated DeltaNet: reference ops


def causal_conv(x: torch.Tensor, state: torch.Tensor, w: torch.Tensor, taps: torch.Tensor | None = None):
    """Depthwise causal conv + SiLU over new inputs x (T, C), continuing from `state` (K-1, C), the
    last K-1 raw inputs (updated in place). w (C, K): tap K-1 multiplies the current input; taps: the
    same as (K, C), for the C kernel (one pass; used when given and the fast CPU path is on)."""
    t, k = x.shape[0], w.shape[1]
    if taps is not None and k <= 16 and dispatch.fast_deltanet(x):
        out = cpu_kernels.conv_silu(x, state, taps, dispatch.get_threads())
        state.copy_(x[t - k + 1 :] if t >= k - 1 else torch.cat((state[t:], x)))
        return out
    xs = torch.cat((state, x))  # (K-1+T, C)
    out = xs[:t] * w[:, 0]  # K shifted multiply-adds: cheaper than F.conv1d at these shapes
    for j in range(1, k):
        out.addcmul_(xs[j : j + t], w[:, j])
    state.copy_(xs[t:])
    return F.silu(out)


def delta_rule_step(q, k, v, g, beta, state: torch.Tensor) -> torch.Tensor:
    """One token. q, k (H, d_k); v (H, d_v); g, beta (H,); state (H, d_k, d_v) updated in place.
    Returns o (H, d_v)."""
    state.mul_(g.exp()[:, None, None])
    kv_mem = (k[:, None, :] @ state)[:, 0]  # S^T k: (H, d_v)
    u = beta[:, None] * (v - kv_mem)
    state.add_(k[:, :, None] * u[:, None, :])
    return (q[:, None, :] @ state)[:, 0]


def delta_rule_chunked(q, k, v, g, beta, state: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """The same recurrence over T tokens in chunks. q, k (H, T, d_k); v (H, T, d_v); g, beta (H, T);
    state (H, d_k, d_v) updated in place. Returns o (H, T, d_v).

    Inside a chunk, with G_t the cumulative log decay from the chunk start and S0 the incoming state:
      u = (I + A)^-1 (beta v - beta e^G k S0),  A[t,s] = beta_t e^(G_t-G_s) k_t.k_s  (s < t)
      o_t = e^G_t S0^T q_t + sum_{s<=t} e^(G_t-G_s) (q_t.k_s) u_s
      S  <- e^G_C S0 + sum_s e^(G_C-G_s) k_s u_s^T
    """
    h, t, d_k = k.shape
    c = min(chunk, t)
    pad = -t % c
    if pad:  # padded tokens have k = v = beta = g = 0: they leave the state unchanged
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    n = (t + pad) // c
    q, k, v = (x.reshape(h, n, c, x.shape[-1]) for x in (q, k, v))
    gam = g.reshape(h, n, c).cumsum(-1)  # (H, N, C)
    beta = beta.reshape(h, n, c, 1)

    causal = torch.ones(c, c, dtype=torch.bool, device=k.device).tril()
    # e^(G_t - G_s) for s <= t; masked before exp since G_t - G_s > 0 above the diagonal
    decay = (gam[..., :, None] - gam[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    kb = k * beta
    # (I + A)^-1 once, then two products: half the time of two solves, whose right-hand sides LAPACK
    # copies to column-major. unitriangular: the solver reads only the strict lower triangle of A.
    a = (kb @ k.transpose(-1, -2)) * decay
    eye = torch.eye(c, dtype=a.dtype, device=a.device).expand_as(a)
    inv = torch.linalg.solve_triangular(a, eye, upper=False, unitriangular=True)
    w_v = inv @ (v * beta)
    w_k = inv @ (kb * gam.exp()[..., None])
    attn = (q @ k.transpose(-1, -2)) * decay
    q_in = q * gam.exp()[..., None]  # reads the incoming state
    k_out = k * (gam[..., -1:] - gam).exp()[..., None]  # writes the outgoing state
    chunk_decay = gam[..., -1].exp()[..., None, None]  # (H, N, 1, 1)

    out = torch.empty_like(v)
    for i in range(n):
        u = w_v[:, i] - w_k[:, i] @ state  # (H, C, d_v)
        out[:, i] = q_in[:, i] @ state + attn[:, i] @ u
        state.mul_(chunk_decay[:, i]).add_(k_out[:, i].transpose(-1, -2) @ u)
    return out.reshape(h, n * c, -1)[:, :t]


def l2_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


# ------------------------------------------------------------------------------------------------
# Layers


@dataclass
class Rows:
    """A batch: sequence i owns the next lengths[i] rows of every activation, starts at position
    starts[i] and keeps its state in states[i]."""

    lengths: list[int]
    starts: list[int]
    states: list[HybridState]

    def split(self, *xs: torch.Tensor):
        """Per sequence, its rows of each x (a tuple when several xs are given)."""
        parts = [x.split(self.lengths) for x in xs]
        return parts[0] if len(xs) == 1 else zip(*parts, strict=True)

    def join(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def _load(src: WeightSource, names: dict[str, str], i: int) -> dict[str, Any]:
    out = {}
    for field, template in names.items():
        name = template.format(i=i)
        out[field] = src.vector(name) if src.is_vector(name) else src.qweight(name)
    return out


class GatedAttention:
    """GQA attention with per-head q/k RMSNorm, partial RoPE and an elementwise sigmoid output gate."""

    def __init__(self, cfg: Qwen35Config, src: WeightSource, i: int):
        self.cfg = cfg
        t = _load(src, ATTN_TENSORS, i)
        # wqg interleaves per head hd rows of q and hd rows of the output gate: one product, split
        # by views (no copies of the mapped weights)
        self.proj = FusedLinear([t["wqg"], t["wk"], t["wv"]], [None] * 3)
        self.copied = self.proj.copied()  # GGUF tensors now held as stacked copies (a GPU's)
        self.q_norm, self.k_norm = t["q_norm"], t["k_norm"]
        self.wo = t["wo"]

    def __call__(self, x: torch.Tensor, rows: Rows, slot: int, rope: Rope, rot) -> torch.Tensor:
        c, n = self.cfg, x.shape[0]
        qg, k, v = self.proj(x)
        qg = qg.reshape(n, c.n_head, 2, c.head_dim)
        gate = qg[:, :, 1].reshape(n, c.n_head * c.head_dim)
        q = rms_norm(qg[:, :, 0].contiguous(), self.q_norm, c.norm_eps)
        k = rms_norm(k.view(n, c.n_head_kv, c.head_dim), self.k_norm, c.norm_eps)
        q, k = rope.apply(q, rot), rope.apply(k, rot)
        v = v.view(n, c.n_head_kv, c.head_dim)
        outs = []
        for (qi, ki, vi), state, start in zip(rows.split(q, k, v), rows.states, rows.starts, strict=True):
            state.kv.store(slot, start, ki, vi)
            outs.append(attention(qi, state.kv, slot, start, scale=c.head_dim**-0.5))
        return linear(rows.join(outs) * torch.sigmoid(gate), self.wo)


class GatedDeltaNet:
    """Conv + gated delta rule + gated RMSNorm, over a per-sequence conv and recurrent state."""

    def __init__(self, cfg: Qwen35Config, src: WeightSource, i: int):
        self.cfg, dn = cfg, cfg.deltanet
        t = _load(src, DELTANET_TENSORS, i)
        self.proj = FusedLinear([t["w_qkv"], t["w_z"], t["w_beta"], t["w_alpha"]], [None] * 4)
        self.copied = self.proj.copied()
        self.conv = t["conv"].dense()  # (channels, kernel), float32
        if self.conv.shape != (dn.conv_channels, dn.conv_kernel):
            raise src.error(f"ssm_conv1d of block {i} has shape {tuple(self.conv.shape)}")
        self.conv_taps = self.conv.t().contiguous()  # (kernel, channels): the C kernel's layout
        self.dt_bias, self.a, self.norm, self.w_out = t["dt_bias"], t["a"], t["norm"], t["w_out"]

    def __call__(self, x: torch.Tensor, rows: Rows, slot: int) -> torch.Tensor:
        dn, n = self.cfg.deltanet, x.shape[0]
        qkv, z, b, a = self.proj(x)
        beta = torch.sigmoid(b)
        g = F.softplus(a + self.dt_bias) * self.a  # log decay <= 0 (ssm_a = -exp(A_log))
        outs = [
            self._recurrent(qkv_i, g_i, beta_i, state.conv[slot], state.ssm[slot])
            for (qkv_i, g_i, beta_i), state in zip(rows.split(qkv, g, beta), rows.states, strict=True)
        ]
        o = rms_norm(rows.join(outs), self.norm, self.cfg.norm_eps) * F.silu(z.view(n, dn.n_v_heads, dn.d_v))
        return linear(o.reshape(n, dn.n_v_heads * dn.d_v), self.w_out)

    def _recurrent(self, qkv, g, beta, conv: torch.Tensor, ssm: torch.Tensor) -> torch.Tensor:
        """One sequence's conv + delta rule over its n new tokens -> o (n, n_v_heads, d_v)."""
        dn, n = self.cfg.deltanet, qkv.shape[0]
        nk, nv, d_k, d_v = dn.n_k_heads, dn.n_v_heads, dn.d_k, dn.d_v
        qkv = causal_conv(qkv, conv, self.conv, self.conv_taps)
        q, k, v = qkv.split([nk * d_k, nk * d_k, nv * d_v], dim=-1)
        if dispatch.triton_ops(qkv):  # the GPU path: norms, tiling and the recurrence in one kernel
            from vramfit.kernels.triton import deltanet

            qk = (q.reshape(n, nk, d_k), k.reshape(n, nk, d_k))
            return deltanet.forward_tokens(*qk, v.reshape(n, nv, d_v), g, beta, ssm)
        q = l2_norm(q.reshape(n, nk, d_k)) * d_k**-0.5
        k = l2_norm(k.reshape(n, nk, d_k))
        v = v.reshape(n, nv, d_v)
        if n == 1 and dispatch.fast_deltanet(qkv) and ssm.is_contiguous():  # two passes over the state
            one = [x[0].contiguous() for x in (q, k, v, g, beta)]
            return cpu_kernels.delta_step(*one, ssm, dispatch.get_threads())[None]
        # tiled value heads: head h uses key head h % nk, i.e. q/k repeated as whole blocks
        q, k = (x.repeat(1, nv // nk, 1) if nv != nk else x for x in (q, k))
        if n == 1:
            return delta_rule_step(q[0], k[0], v[0], g[0], beta[0], ssm)[None]
        heads_first = [x.transpose(0, 1) for x in (q, k, v, g, beta)]
        return delta_rule_chunked(*heads_first, ssm).transpose(0, 1)


@dataclass
class Block:
    attn_norm: torch.Tensor
    ffn_norm: torch.Tensor
    w_gate: QWeight
    w_up: QWeight
    w_down: QWeight
    mixer: GatedAttention | GatedDeltaNet
    slot: int  # index among the layers of the same kind (into the KV cache or the recurrent state)
    gate_up: FusedLinear | None = None


class Qwen35Model:
    config_class = Qwen35Config

    def __init__(self, cfg: Qwen35Config, src: WeightSource, n_ctx: int):
        self.cfg = cfg
        self.n_ctx = n_ctx
        self.embed, self.norm, self.output = embeddings_and_head(src)
        slots = layer_slots(cfg)
        self.blocks = [self._block(src, i, slots[i]) for i in range(cfg.n_layer)]
        self.rope = Rope(cfg.rope, n_ctx)

    def _block(self, src: WeightSource, i: int, slot: int) -> Block:
        mixer_cls = GatedDeltaNet if self.cfg.is_recurrent(i) else GatedAttention
        blk = Block(**_load(src, FFN_TENSORS, i), mixer=mixer_cls(self.cfg, src, i), slot=slot)
        blk.gate_up = FusedLinear([blk.w_gate, blk.w_up], [None, None])
        # the row-selected / stacked copies replace the mapped originals: drop those pages
        src.release(blk.mixer.copied + blk.gate_up.copied())
        return blk

    def new_cache(self) -> HybridState:
        kv, device = getattr(self, "kv_type", None), getattr(self, "device", None)
        return HybridState(self.cfg, self.n_ctx, kv, device)

    def forward(self, tokens: torch.Tensor, cache: HybridState, start: int) -> torch.Tensor:
        """tokens (n,) int64 at positions start..start+n-1 -> hidden states (n, n_embd).

        start == 0 begins a new sequence; otherwise start must continue the state (cache.pos)."""
        return self.forward_batch([tokens], [cache], [start])[0]

    def forward_batch(
        self, seqs: list[torch.Tensor], caches: list[HybridState], starts: list[int] | None = None
    ) -> list[torch.Tensor]:
        """Several sequences at once, each with its own state: their rows go through the projections,
        norms and MLP together; the conv, the delta rule, the KV cache and attention stay per sequence.
        `starts` (default: where each state stands) as in `forward`. -> hidden states per sequence."""
        starts = [c.pos for c in caches] if starts is None else list(starts)
        if not len(seqs) == len(caches) == len(starts):
            raise ValueError(f"{len(seqs)} sequences, {len(caches)} states, {len(starts)} starts")
        if len({id(c) for c in caches}) != len(caches):
            raise ValueError("each sequence of a batch needs its own state")
        for cache, start in zip(caches, starts, strict=True):
            if start not in (0, cache.pos):
                raise ValueError(f"the recurrent state holds {cache.pos} tokens; cannot continue at {start}")
        for cache, start in zip(caches, starts, strict=True):
            if start == 0:
                cache.reset()
        rows = Rows([int(t.shape[0]) for t in seqs], starts, caches)
        eps = self.cfg.norm_eps
        x = self.embed.rows(rows.join(seqs))
        rot = rows.join([self.rope.at(s, n) for s, n in zip(starts, rows.lengths, strict=True)])
        for blk in self.blocks:
            h = rms_norm(x, blk.attn_norm, eps)
            if isinstance(blk.mixer, GatedDeltaNet):
                x = x + blk.mixer(h, rows, blk.slot)
            else:
                x = x + blk.mixer(h, rows, blk.slot, self.rope, rot)
            gate, up = blk.gate_up(rms_norm(x, blk.ffn_norm, eps))
            x = x + linear(swiglu(gate, up), blk.w_down)
        for cache, start, n in zip(caches, starts, rows.lengths, strict=True):
            cache.pos = start + n
        return list(rows.split(rms_norm(x, self.norm, eps)))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.output)
