"""`make-random`: real shapes and metadata (checked against shared/docs/qwen35-27b.md), a valid GGUF that
loads and generates (tiny presets only are written)."""

from __future__ import annotations

import numpy as np
import pytest

import vramfit
from vramfit.cli import main
from vramfit.gguf import GGUFFile
from vramfit.gguf.reader import VT
from vramfit.model.random_model import random_model_spec, write_random_model


@pytest.mark.parametrize("arch", ["llama", "qwen35"])
def test_tiny_loads_and_generates(tmp_path, arch, capsys):
    path = tmp_path / f"{arch}.gguf"
    assert main(["make-random", "--arch", arch, "--preset", "tiny", "--type", "IQ4_KS", str(path)]) == 0
    assert "tiny" in capsys.readouterr().out
    m = vramfit.load(path)
    ids = m.tokenize("hello world")
    assert m.detokenize(ids) == "hello world"
    logits = m.logits(ids)
    assert logits.shape == (len(ids), 512) and np.isfinite(logits).all() and logits.std() > 0.01
    events = list(m.engine.generate(ids, 6, vramfit.runtime.sampling.SamplingParams(temperature=0)))
    assert len(events) == 6
    types = {t.name: t.type.name for t in GGUFFile(path).tensors.values()}
    assert types["blk.0.ffn_up.weight"] == "IQ4_KS" and types["blk.0.attn_norm.weight"] == "F32"


@pytest.mark.parametrize("arch", ["llama", "qwen35"])
def test_integer_keys_are_uint32(tmp_path, arch):
    # llama.cpp refuses these files otherwise ("key general.file_type has wrong type i32 but expected type
    # u32"); with uint32 keys llama-cpp-python 0.3.36 loads the tiny llama and its logits agree with ours
    path = tmp_path / "m.gguf"
    write_random_model(random_model_spec(arch, "tiny", "q4_1"), path)
    g = GGUFFile(path)
    ints = [k for k, v in g.metadata.items() if isinstance(v, int) and not isinstance(v, bool)]
    assert {"general.file_type", f"{arch}.block_count", f"{arch}.context_length"} <= set(ints)
    assert {k: g.metadata_types[k][0] for k in ints} == dict.fromkeys(ints, VT.UINT32)


def test_27b_tensor_table_matches_the_doc():
    spec = random_model_spec("qwen35", "27b", "iq4_ks")
    # section 1.1: 24.353 B in the repeating layers + 2 x 1.271 B (embedding, lm_head) = 26.90 B
    assert spec.n_params == pytest.approx(26.90e9, rel=0.005)
    shapes = {t.name: t.shape[::-1] for t in spec.tensors}  # ggml order {in, out}
    assert shapes["token_embd.weight"] == (5120, 248320) and shapes["output.weight"] == (5120, 248320)
    assert shapes["blk.3.attn_q.weight"] == (5120, 12288) and shapes["blk.3.attn_output.weight"] == (
        6144,
        5120,
    )
    assert shapes["blk.0.attn_qkv.weight"] == (5120, 10240) and shapes["blk.0.ssm_conv1d.weight"] == (
        4,
        10240,
    )
    assert shapes["blk.0.ssm_out.weight"] == (6144, 5120) and shapes["blk.0.ssm_alpha.weight"] == (5120, 48)
    assert sum(n.endswith("attn_k.weight") for n in shapes) == 16  # layers 3, 7, ..., 63
    md = spec.metadata
    assert md["qwen35.ssm.inner_size"] == 6144 and md["qwen35.full_attention_interval"] == 4
    types = {t.name: t.type for t in spec.tensors}
    # ik's IQ4_KS recipe: output q6_K, attn_v iq5_k (GQA >= 2), first 1/8 of ffn_down q5_K
    assert types["output.weight"] == "q6_k" and types["blk.3.attn_v.weight"] == "iq5_k"
    assert types["blk.7.ffn_down.weight"] == "q5_k" and types["blk.8.ffn_down.weight"] == "iq4_ks"


def test_27b_community_mix_is_13_gib():
    spec = random_model_spec("qwen35", "27b", "sokann-4.151")
    # the doc's sokann 4.151bpw file: 12.999 GiB
    assert spec.nbytes / 2**30 == pytest.approx(12.999, rel=0.01)


def test_llama_8b_parameter_count():
    assert random_model_spec("llama", "8b").n_params == pytest.approx(8.03e9, rel=0.005)  # Llama-3.1-8B
