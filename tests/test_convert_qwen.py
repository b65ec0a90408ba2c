"""HF qwen3 / qwen3_5 checkpoints through our converter (`vramfit quantize HF_DIR OUT f32`): the file
has llama.cpp's qwen35 layout (the same tensors and values as the test writer in test_qwen35.py, which
follows llama.cpp's conversion/qwen.py), and vramfit's logits match transformers' float32 logits
within 1e-3 relative error at every position; DeltaNet alpha/beta stay at q8_0 in quantized mixes."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from tests.test_qwen35 import CASES, tiny, write_gguf
from vramfit.cli import main
from vramfit.gguf import GGUFFile
from vramfit.model.loader import load_model
from vramfit.quant.recipes import ModelFacts, Options, get_mix, plan
from vramfit.runtime.engine import Engine

transformers = pytest.importorskip("transformers")

VOCAB = 300
TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n" * 10
# Qwen 3.5's split (tokenizer.json pre_tokenizer); combining marks stay with their letters
QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _save(model, folder, split: str | None = None) -> None:
    """save_pretrained + a small byte-level BPE tokenizer (optionally with a Split pre-tokenizer)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    model.save_pretrained(folder)
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None)
    tok.pre_tokenizer = (
        byte_level
        if split is None
        else pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level])
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 8, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator([TEXT], trainer)
    tok.save(str(folder / "tokenizer.json"))
    cfg = {"bos_token": None, "eos_token": "<|endoftext|>", "add_bos_token": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))


def _convert(folder, out) -> None:
    assert main(["quantize", str(folder), str(out), "f32"]) == 0


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _max_rel_error(got: np.ndarray, want: np.ndarray) -> float:
    """The worst position's max |difference| over that position's largest |logit|."""
    return float((np.abs(got - want).max(-1) / np.abs(want).max(-1)).max())


def _vlm(**text):
    """Qwen3_5ForConditionalGeneration (weights under model.language_model.*, plus a vision tower)."""
    vision = dict(
        depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
        spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=text["hidden_size"],
    )  # fmt: skip
    cfg = transformers.Qwen3_5Config(
        text_config=text, vision_config=vision, tie_word_embeddings=text["tie_word_embeddings"]
    )
    torch.manual_seed(1)
    model = transformers.Qwen3_5ForConditionalGeneration(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("model.language_model.") and "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith("A_log"):
                p.copy_(torch.empty_like(p).uniform_(0.02, 0.3).log())
    return model


TEXT_CFG = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, max_position_embeddings=512, rms_norm_eps=1e-6,
    linear_num_key_heads=2, linear_num_value_heads=6, linear_key_head_dim=16, linear_value_head_dim=12,
    linear_conv_kernel_dim=4, tie_word_embeddings=True, rope_parameters={
        "rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.25, "mrope_section": [2, 1, 1]},
    layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
)  # fmt: skip


def test_qwen35_file_is_llama_cpps_layout(tmp_path):
    """Every tensor (name, shape, type, values) and every qwen35.* key as the known-correct writer of
    test_qwen35.py puts them: tiled value heads (2 key heads, 6 value heads), +1 in the zero-centred
    norms, ssm_a = -exp(A_log), the conv (channels, kernel) in F32."""
    model = tiny(**CASES["kv2-v6"])
    _save(model, tmp_path / "hf")
    _convert(tmp_path / "hf", tmp_path / "ours.gguf")
    write_gguf(model, tmp_path / "ref.gguf")
    ours, ref = GGUFFile(tmp_path / "ours.gguf"), GGUFFile(tmp_path / "ref.gguf")
    assert ours.metadata["general.architecture"] == "qwen35"
    assert sorted(ours.tensors) == sorted(ref.tensors)
    for name, info in ref.tensors.items():
        mine = ours.tensors[name]
        assert (mine.shape, mine.type.name) == (info.shape, info.type.name), name
        np.testing.assert_array_equal(ours.tensor_bytes(name), ref.tensor_bytes(name), err_msg=name)
    for key, value in ref.metadata.items():
        if key.startswith("qwen35."):
            assert ours.metadata[key] == pytest.approx(value), key
    assert ours.tensors["blk.0.ssm_conv1d.weight"].shape == (2 * 2 * 16 + 6 * 12, 4)


def test_qwen35_logits_match_transformers(tmp_path):
    """2 key heads, 6 value heads (the 27B's 1:3 broadcast); every position of 200 tokens (several
    prefill chunks of the delta rule)."""
    model = tiny(**CASES["kv2-v6"])
    _save(model, tmp_path / "hf", split=QWEN35_SPLIT)
    _convert(tmp_path / "hf", tmp_path / "m.gguf")
    ours, g = load_model(tmp_path / "m.gguf", n_ctx=256)
    assert g.metadata["tokenizer.ggml.pre"] == "qwen35"
    ids = _ids(200, seed=1)
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    got = Engine(ours, prefill_chunk=97).logits_all(ids).numpy()
    assert _max_rel_error(got, want) < 1e-3


def test_qwen35_vlm_wrapper_converts_its_text_model(tmp_path):
    """A Qwen3_5ForConditionalGeneration folder (model_type qwen3_5, text weights under
    model.language_model.*, a vision tower, tied embeddings): the text model alone is written."""
    model = _vlm(**TEXT_CFG)
    _save(model, tmp_path / "hf")
    _convert(tmp_path / "hf", tmp_path / "m.gguf")
    ours, g = load_model(tmp_path / "m.gguf", n_ctx=256)
    assert "output.weight" not in g.tensors and not any("visual" in n for n in g.tensors)
    assert g.metadata["qwen35.full_attention_interval"] == 4
    assert g.metadata["qwen35.rope.dimension_sections"] == [2, 1, 1, 0]
    assert g.metadata["qwen35.rope.freq_base"] == 1e6
    ids = _ids(150, seed=2)
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    got = Engine(ours).logits_all(ids).numpy()
    assert _max_rel_error(got, want) < 1e-3


def test_qwen3_logits_match_transformers(tmp_path):
    """Dense qwen3 (q/k RMSNorm, plain weights; rope_theta inside transformers 5's rope_parameters)."""
    cfg = transformers.Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=512, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(3)
    model = transformers.Qwen3ForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    _save(model, tmp_path / "hf")
    _convert(tmp_path / "hf", tmp_path / "m.gguf")
    ours, g = load_model(tmp_path / "m.gguf", n_ctx=256)
    assert g.metadata["general.architecture"] == "qwen3"
    assert g.metadata["qwen3.rope.freq_base"] == 1e6 and "blk.1.attn_q_norm.weight" in g.tensors
    ids = _ids(150, seed=4)
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    got = Engine(ours).logits_all(ids).numpy()
    assert _max_rel_error(got, want) < 1e-3


QWEN35_TENSORS = [
    ("blk.0.attn_qkv.weight", (10240, 5120)), ("blk.0.attn_gate.weight", (6144, 5120)),
    ("blk.0.ssm_alpha.weight", (48, 5120)), ("blk.0.ssm_beta.weight", (48, 5120)),
    ("blk.0.ssm_conv1d.weight", (10240, 4)), ("blk.0.ssm_out.weight", (5120, 6144)),
    ("blk.0.ffn_up.weight", (17408, 5120)),
]  # fmt: skip


@pytest.mark.parametrize(
    "mix,alpha_beta",
    [("IQ4_KS", "q8_0"), ("Q4_K_M", "q8_0"), ("Q4_0", "q8_0"), ("Q6_K", "q8_0"), ("Q8_0", "q8_0"),
     ("F16", "f16"), ("BF16", "bf16")],
)  # fmt: skip
def test_deltanet_alpha_beta_stay_at_q8_0(mix, alpha_beta):
    facts = ModelFacts("qwen35", n_gqa=6, n_layer=64)
    got = {c.name: c.type for c in plan(QWEN35_TENSORS, get_mix(mix), Options(), facts, encoders=False)}
    assert got["blk.0.ssm_alpha.weight"] == got["blk.0.ssm_beta.weight"] == alpha_beta
    assert got["blk.0.ssm_conv1d.weight"] is None  # kept as converted (F32)
    if mix in ("IQ4_KS", "Q4_0"):  # the rest of the mix is unchanged
        assert got["blk.0.attn_gate.weight"] == got["blk.0.ffn_up.weight"] == mix.lower()


def test_deltanet_alpha_beta_rule_yields_to_custom_q():
    facts = ModelFacts("qwen35", n_gqa=6, n_layer=64)
    opts = Options(custom_q=[(re.compile("ssm_alpha"), "q6_0")])
    got = {c.name: c.type for c in plan(QWEN35_TENSORS, get_mix("IQ4_KS"), opts, facts, encoders=False)}
    assert got["blk.0.ssm_alpha.weight"] == "q6_0" and got["blk.0.ssm_beta.weight"] == "q8_0"


def test_quantize_hf_qwen35_folder_keeps_alpha_beta_at_q8_0(tmp_path):
    model = tiny(**CASES["kv2-v6"])
    _save(model, tmp_path / "hf")
    assert main(["quantize", str(tmp_path / "hf"), str(tmp_path / "q4.gguf"), "Q4_0"]) == 0
    types = {n: t.type.name for n, t in GGUFFile(tmp_path / "q4.gguf").tensors.items()}
    assert types["blk.0.ssm_alpha.weight"] == types["blk.0.ssm_beta.weight"] == "Q8_0"
    assert types["blk.0.attn_qkv.weight"] == "Q4_0" and types["blk.0.ssm_conv1d.weight"] == "F32"
