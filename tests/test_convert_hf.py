"""HF safetensors -> GGUF: a tiny random transformers model converted, loaded by vramfit, same logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import vramfit
from vramfit.convert.hf import ConvertError, open_hf
from vramfit.gguf import GGUFFile
from vramfit.quant.pipeline import QuantizeRequest, quantize

TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n" * 20


def _tokenizer(folder, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 8, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator([TEXT], trainer)
    tok.save(str(folder / "tokenizer.json"))
    cfg = {"bos_token": None, "eos_token": "<|endoftext|>", "add_bos_token": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))


def _model(arch: str, folder, tied: bool):
    import transformers

    common = dict(
        vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=tied, eos_token_id=0, bos_token_id=0,
    )  # fmt: skip
    cls, cfg = {
        "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig),
        "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config),
    }[arch]
    torch.manual_seed(0)
    model = cls(cfg(**common)).float().eval()
    model.save_pretrained(folder, safe_serialization=True)
    _tokenizer(folder, 320)
    return model


@pytest.mark.parametrize("arch,tied", [("llama", False), ("qwen2", True)])
def test_converted_model_matches_transformers(tmp_path, arch, tied):
    folder = tmp_path / arch
    hf = _model(arch, folder, tied)
    out = tmp_path / f"{arch}.gguf"
    quantize(QuantizeRequest(folder, out, "F32"))
    g = GGUFFile(out)
    assert g.metadata["general.architecture"] == arch and g.metadata["general.file_type"] == 0
    assert ("output.weight" in g.tensors) == (not tied)
    assert g.tensors["blk.0.attn_k.weight"].shape == (64, 128)
    if arch == "qwen2":
        assert "blk.1.attn_q.bias" in g.tensors
    m = vramfit.load(out, n_ctx=64)
    ids = m.tokenize("class Point:\n    x: int = 0\n")
    assert len(ids) > 4 and max(ids) < 320
    from tokenizers import Tokenizer

    assert (
        ids
        == Tokenizer.from_file(str(folder / "tokenizer.json")).encode("class Point:\n    x: int = 0\n").ids
    )
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(m.logits(ids), want, rtol=1e-4, atol=1e-4)
    q8 = tmp_path / f"{arch}-q8_0.gguf"  # straight from the folder, through the row-batch encoder
    quantize(QuantizeRequest(folder, q8, "Q8_0"))
    assert GGUFFile(q8).tensors["blk.0.ffn_up.weight"].type.name == "Q8_0"
    got = vramfit.load(q8, n_ctx=64).logits(ids)
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.8


def test_missing_shard_is_an_error_before_work(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConvertError, match="missing shard"):
        open_hf(folder)
    with pytest.raises(ConvertError, match="missing shard"):
        quantize(QuantizeRequest(folder, tmp_path / "o.gguf", "F16"))
    assert not (tmp_path / "o.gguf").exists()
