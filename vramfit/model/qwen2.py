"""Qwen2 and Qwen3 (dense): the llama block with NeoX-style RoPE; qwen2 adds q/k/v biases and qwen3
adds per-head q/k RMSNorm. Both are optional tensors the llama block already handles."""

from __future__ import annotations

from vramfit.model.llama import LlamaConfig, LlamaModel


class Qwen2Config(LlamaConfig):
    rope_style = "neox"


class Qwen2Model(LlamaModel):
    config_class = Qwen2Config
