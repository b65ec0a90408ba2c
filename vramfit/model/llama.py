"""Llama-family decoder (llama, and the base of qwen2/qwen3): pre-norm blocks of GQA attention + SwiGLU.

Config and weights come from GGUF as llama.cpp's converter writes them (names in `TENSORS`); q/k/v
biases are used when the file has them. Forward runs float32 over a preallocated KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vramfit.kernels.dispatch import FusedLinear, QWeight, fused_decoder, linear, swiglu
from vramfit.model.layers import KVCache, Rope, RopeConfig, attention, rms_norm
from vramfit.model.loader import WeightSource, require

# GGUF tensor names (per block, then global); the only place they appear for this family.
TENSORS = {
    "attn_norm": "blk.{i}.attn_norm.weight",
    "wq": "blk.{i}.attn_q.weight",
    "wk": "blk.{i}.attn_k.weight",
    "wv": "blk.{i}.attn_v.weight",
    "wo": "blk.{i}.attn_output.weight",
    "bq": "blk.{i}.attn_q.bias",
    "bk": "blk.{i}.attn_k.bias",
    "bv": "blk.{i}.attn_v.bias",
    "q_norm": "blk.{i}.attn_q_norm.weight",
    "k_norm": "blk.{i}.attn_k_norm.weight",
    "ffn_norm": "blk.{i}.ffn_norm.weight",
    "w_gate": "blk.{i}.ffn_gate.weight",
    "w_up": "blk.{i}.ffn_up.weight",
    "w_down": "blk.{i}.ffn_down.weight",
}
GLOBAL_TENSORS = {
    "embed": "token_embd.weight",
    "norm": "output_norm.weight",
    "output": "output.weight",
    "rope_freqs": "rope_freqs.weight",
}


@dataclass(frozen=True)
class LlamaConfig:
    arch: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    n_ctx_train: int
    norm_eps: float
    rope: RopeConfig

    rope_style = "norm"  # llama.cpp's LLAMA_ROPE_TYPE_NORM; qwen2 overrides with neox

    @classmethod
    def from_metadata(cls, md: dict[str, Any], n_vocab: int) -> LlamaConfig:
        arch = md["general.architecture"]

        def key(name: str, default: Any = None) -> Any:
            return require(md, f"{arch}.{name}", default)

        n_embd, n_head = key("embedding_length"), key("attention.head_count")
        head_dim = key("attention.key_length", n_embd // n_head)
        return cls(
            arch=arch,
            n_layer=key("block_count"),
            n_embd=n_embd,
            n_ff=key("feed_forward_length"),
            n_head=n_head,
            n_head_kv=key("attention.head_count_kv", n_head),
            head_dim=head_dim,
            n_vocab=md.get(f"{arch}.vocab_size", n_vocab),
            n_ctx_train=key("context_length"),
            norm_eps=key("attention.layer_norm_rms_epsilon"),
            rope=rope_config(md, arch, head_dim, cls.rope_style),
        )


def rope_config(md: dict[str, Any], arch: str, head_dim: int, style: str) -> RopeConfig:
    scaling = md.get(f"{arch}.rope.scaling.type", "none")
    factor = md.get(f"{arch}.rope.scaling.factor", 0.0) or 1.0
    if scaling == "linear" and factor == 1.0:
        scaling = "none"
    return RopeConfig(
        dim=md.get(f"{arch}.rope.dimension_count", head_dim),
        base=md.get(f"{arch}.rope.freq_base", 10000.0),
        style=style,
        scaling=scaling if scaling in ("linear", "yarn") else "none",
        factor=factor,
        orig_ctx=md.get(f"{arch}.rope.scaling.original_context_length", 0),
        attn_factor=md.get(f"{arch}.rope.scaling.attn_factor", 1.0),
    )


@dataclass
class Block:
    attn_norm: torch.Tensor
    wq: QWeight
    wk: QWeight
    wv: QWeight
    wo: QWeight
    ffn_norm: torch.Tensor
    w_gate: QWeight
    w_up: QWeight
    w_down: QWeight
    bq: torch.Tensor | None = None
    bk: torch.Tensor | None = None
    bv: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None  # qwen3: RMSNorm over each head's q and k
    k_norm: torch.Tensor | None = None
    qkv: FusedLinear | None = None  # built by the model from wq/wk/wv (+ biases)
    gate_up: FusedLinear | None = None


def embeddings_and_head(src: WeightSource) -> tuple[QWeight, torch.Tensor, QWeight]:
    """(token embedding, final norm, output matrix); the output is the embedding when tied."""
    embed = src.qweight(GLOBAL_TENSORS["embed"])
    tied = GLOBAL_TENSORS["output"] not in src
    output = embed if tied else src.qweight(GLOBAL_TENSORS["output"])
    if not tied:  # only looked up: rows read from the file, no pages of it mapped
        src.rows_from_file(embed)
    return embed, src.vector(GLOBAL_TENSORS["norm"]), output


class LlamaModel:
    config_class = LlamaConfig

    def __init__(self, cfg: LlamaConfig, src: WeightSource, n_ctx: int):
        self.cfg = cfg
        self.n_ctx = n_ctx
        self.embed, self.norm, self.output = embeddings_and_head(src)
        self.blocks = [self._block(src, i) for i in range(cfg.n_layer)]
        freqs = src.vector(GLOBAL_TENSORS["rope_freqs"]) if GLOBAL_TENSORS["rope_freqs"] in src else None
        self.rope = Rope(cfg.rope, n_ctx, freqs)
        self._fused = None  # the C decode step, built on the first one-token forward (False: none)

    def _block(self, src: WeightSource, i: int) -> Block:
        names = {k: v.format(i=i) for k, v in TENSORS.items()}
        fields: dict[str, Any] = {}
        for field, name in names.items():
            if name not in src:
                continue  # optional tensors (biases, q/k norms); required ones fail in Block()
            fields[field] = src.vector(name) if src.is_vector(name) else src.qweight(name)
        try:
            blk = Block(**fields)
        except TypeError:
            missing = [names[f] for f in Block.__dataclass_fields__ if f not in fields]
            raise src.error(f"missing tensor {missing[0]}") from None
        blk.qkv = FusedLinear([blk.wq, blk.wk, blk.wv], [blk.bq, blk.bk, blk.bv])
        blk.gate_up = FusedLinear([blk.w_gate, blk.w_up], [None, None])
        # the block's own fields become views of the stacked copies (a GPU's; the CPU stacks nothing)
        blk.wq, blk.wk, blk.wv = blk.qkv.parts()
        blk.w_gate, blk.w_up = blk.gate_up.parts()
        src.release(blk.qkv.copied() + blk.gate_up.copied())  # stacked copies replace the originals
        return blk

    def new_cache(self) -> KVCache:
        c = self.cfg
        kv, device = getattr(self, "kv_type", None), getattr(self, "device", None)
        return KVCache(c.n_layer, c.n_head_kv, c.head_dim, self.n_ctx, kv, device)

    def forward(self, tokens: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        """tokens (n,) int64 at positions start..start+n-1 -> hidden states (n, n_embd)."""
        eps = self.cfg.norm_eps
        x = self.embed.rows(tokens)
        fused = self._fused_decoder(cache) if tokens.shape[0] == 1 else None
        if fused is not None:  # the loop below in one C call (same kernels, no per-op overhead)
            return rms_norm(fused.step(x, cache, start), self.norm, eps)
        rot = self.rope.at(start, tokens.shape[0])
        for i in range(len(self.blocks)):
            x = self.layer(i, x, cache, start, rot)
        return rms_norm(x, self.norm, eps)

    def layer(self, i: int, x: torch.Tensor, cache: KVCache, start: int, rot: torch.Tensor) -> torch.Tensor:
        """Decoder layer i on x (n, n_embd) at positions start.. (rot from `rope.at`)."""
        blk, eps = self.blocks[i], self.cfg.norm_eps
        x = x + self._attention(blk, rms_norm(x, blk.attn_norm, eps), cache, i, start, rot)
        gate, up = blk.gate_up(rms_norm(x, blk.ffn_norm, eps))
        return x + linear(swiglu(gate, up), blk.w_down)

    def _fused_decoder(self, cache: KVCache):
        """The C decode step where it may replace the layer loop for this cache now, else None."""
        if self._fused is None:
            self._fused = fused_decoder(self.cfg, self.blocks, self.rope, self.n_ctx) or False
        return self._fused if self._fused and self._fused.usable(cache) else None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.output)

    def _attention(self, blk: Block, x: torch.Tensor, cache: KVCache, layer: int, start: int, rot):
        c = self.cfg
        n = x.shape[0]
        q, k, v = blk.qkv(x)
        q, k, v = (
            q.view(n, c.n_head, c.head_dim),
            k.view(n, c.n_head_kv, c.head_dim),
            v.view(n, -1, c.head_dim),
        )
        if blk.q_norm is not None:
            q, k = rms_norm(q, blk.q_norm, c.norm_eps), rms_norm(k, blk.k_norm, c.norm_eps)
        q, k = self.rope.apply(q, rot), self.rope.apply(k, rot)
        cache.store(layer, start, k, v)
        out = attention(q, cache, layer, start, scale=c.head_dim**-0.5)
        return linear(out, blk.wo)
