"""Tiny random llama / qwen2 / qwen3 models from `transformers`, written to GGUF the way llama.cpp's
converter names and permutes them, must give transformers' float32 logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vramfit.gguf import GGUFWriter, type_by_name
from vramfit.model.loader import load_model
from vramfit.runtime.engine import Engine

transformers = pytest.importorskip("transformers")

HF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
}  # fmt: skip


def _llama_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # llama.cpp's converter reorders q/k rows so that its pairwise ("norm") RoPE equals HF's halves
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    parts = hf.split(".")  # model.layers.{i}.<module...>.<weight|bias>
    return f"blk.{parts[2]}.{HF_NAMES['.'.join(parts[3:-1])]}.{parts[-1]}"


def write_gguf(model, arch: str, path, rope_scaling: dict | None = None) -> None:
    cfg = model.config
    w = GGUFWriter(path)
    w.add("general.architecture", arch)
    for key, value in {
        "block_count": cfg.num_hidden_layers, "context_length": cfg.max_position_embeddings,
        "embedding_length": cfg.hidden_size, "feed_forward_length": cfg.intermediate_size,
        "attention.head_count": cfg.num_attention_heads, "attention.head_count_kv": cfg.num_key_value_heads,
        "attention.key_length": cfg.head_dim, "attention.value_length": cfg.head_dim,
        "rope.freq_base": float(cfg.rope_parameters["rope_theta"]), "rope.dimension_count": cfg.head_dim,
        "attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps), "vocab_size": cfg.vocab_size,
    }.items():  # fmt: skip
        w.add(f"{arch}.{key}", value)
    for key, value in (rope_scaling or {}).items():
        w.add(f"{arch}.rope.scaling.{key}", value)
    f32 = type_by_name("f32")
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        t = t.float()
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = cfg.num_attention_heads if ".q_proj." in name else cfg.num_key_value_heads
            t = _llama_permute(t, heads)
        w.add_tensor(_gguf_name(name), tuple(t.shape), f32, t.numpy())
    w.write()


def tiny(model_type: str, **extra):
    common = dict(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6,
    )  # fmt: skip
    common.update(extra)
    cfg = transformers.AutoConfig.for_model(model_type, **common)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():  # random norms so that a wrong norm placement shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


CASES = {
    "llama": ("llama", dict(tie_word_embeddings=True), None),
    "qwen2": ("qwen2", dict(tie_word_embeddings=False), None),
    "qwen3": ("qwen3", dict(tie_word_embeddings=False), None),
    "llama-linear-rope": (
        "llama",
        dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
        {"type": "linear", "factor": 2.0},
    ),
    "qwen2-yarn": (
        "qwen2",
        dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
        {"type": "yarn", "factor": 4.0, "original_context_length": 64},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_tiny_model_matches_transformers(case, tmp_path):
    arch, extra, scaling = CASES[case]
    model = tiny(arch, **extra)
    if arch == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None  # qkv biases are exercised
    path = tmp_path / f"{case}.gguf"
    write_gguf(model, arch, path, scaling)
    ours, _ = load_model(path, n_ctx=128)
    ids = torch.randint(0, 300, (1, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits[0].numpy()
    got = Engine(ours, prefill_chunk=37).logits_all(ids[0].tolist()).numpy()
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
