"""Type choice per tensor. Expected types are typed in from iqk-formats.md section 6 (IQ4_KS) and from
the tensor types of the Q4_K_M files llama.cpp wrote for the shipped Qwen2.5-Coder models."""

from __future__ import annotations

import pytest

from vramfit.gguf import GGUFFile
from vramfit.gguf.types import type_by_name
from vramfit.quant.recipes import (
    ModelFacts,
    Options,
    RecipeError,
    get_mix,
    has_encoder,
    parse_custom_q,
    plan,
)


def model_tensors(n_layer: int, n_embd: int, n_ff: int, n_kv_dim: int, tied: bool, bias: bool = False):
    """A llama/qwen2-shaped tensor list in llama.cpp's file order; shapes in numpy order."""
    out = [] if tied else [("output.weight", (32000, n_embd))]
    out.append(("token_embd.weight", (32000, n_embd)))
    for i in range(n_layer):
        b = f"blk.{i}."
        out += [
            (b + "attn_norm.weight", (n_embd,)),
            (b + "ffn_down.weight", (n_embd, n_ff)),
            (b + "ffn_gate.weight", (n_ff, n_embd)),
            (b + "ffn_up.weight", (n_ff, n_embd)),
            (b + "ffn_norm.weight", (n_embd,)),
            (b + "attn_k.weight", (n_kv_dim, n_embd)),
            (b + "attn_output.weight", (n_embd, n_embd)),
            (b + "attn_q.weight", (n_embd, n_embd)),
            (b + "attn_v.weight", (n_kv_dim, n_embd)),
        ]
        if bias:
            out += [(b + "attn_q.bias", (n_embd,)), (b + "attn_k.bias", (n_kv_dim,))]
    out.append(("output_norm.weight", (n_embd,)))
    return out


QWEN2 = model_tensors(16, 1536, 8960, 256, tied=False, bias=True)  # GQA 12/2
QWEN2_FACTS = ModelFacts("qwen2", n_gqa=6, n_layer=16)
SMOLLM = model_tensors(4, 576, 1536, 192, tied=True)  # GQA 9/3, rows of 576 (not /256)
SMOLLM_FACTS = ModelFacts("llama", n_gqa=3, n_layer=4)


def types(tensors, mix="IQ4_KS", facts=QWEN2_FACTS, **opts) -> dict[str, str | None]:
    return {c.name: c.type for c in plan(tensors, get_mix(mix), Options(**opts), facts, encoders=False)}


def test_iq4_ks_qwen2_with_imatrix():
    t = types(QWEN2, has_imatrix=True)
    assert t["output.weight"] == "q6_k"  # separate output tensor
    assert t["token_embd.weight"] == "iq4_ks"  # no rule: stays at the default
    for i in range(16):
        assert t[f"blk.{i}.attn_v.weight"] == "iq5_k"  # n_gqa >= 2
        for name in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            assert t[f"blk.{i}.{name}.weight"] == "iq4_ks"
        assert t[f"blk.{i}.attn_norm.weight"] is None and t[f"blk.{i}.attn_q.bias"] is None
    assert t["output_norm.weight"] is None


def test_iq4_ks_without_imatrix_first_eighth_of_ffn_down_is_q5_k():
    t = types(QWEN2, has_imatrix=False)
    downs = [t[f"blk.{i}.ffn_down.weight"] for i in range(16)]
    assert downs == ["q5_k", "q5_k"] + ["iq4_ks"] * 14  # 16 / 8 = 2 layers


def test_iq4_ks_tied_rows_not_multiple_of_256():
    t = types(SMOLLM, facts=SMOLLM_FACTS, has_imatrix=True)
    assert t["token_embd.weight"] == "q8_0"  # the output rule, ne0 % 256 != 0
    assert t["blk.0.attn_v.weight"] == "q6_0"  # IQ5_K, then the row fallback
    assert t["blk.0.attn_q.weight"] == "iq4_nl"  # IQ4_KS -> IQ4_NL
    assert t["blk.0.ffn_down.weight"] == "iq4_ks"  # rows of 1536 = 6 * 256


def test_iq4_ks_tied_embedding_gets_iq5_k():
    t = types(model_tensors(2, 2048, 4096, 512, tied=True), facts=ModelFacts("llama", n_gqa=4, n_layer=2))
    assert t["token_embd.weight"] == "iq5_k"


def test_iq4_ks_mha_and_moe_rules():
    mha = types(QWEN2, facts=ModelFacts("llama", n_gqa=1, n_layer=16), has_imatrix=True)
    assert mha["blk.3.attn_v.weight"] == "iq4_ks"
    moe = types(QWEN2, facts=ModelFacts("qwen2", n_gqa=6, n_expert=8, n_layer=16), has_imatrix=True)
    assert moe["blk.3.attn_v.weight"] == "q8_0"
    assert moe["blk.3.attn_k.weight"] == "q8_0"
    assert moe["blk.3.attn_output.weight"] == "q5_k"
    assert moe["blk.3.attn_q.weight"] == "iq4_ks"


def test_custom_q_first_match_wins_then_row_fallback():
    rules = parse_custom_q(r"blk\.[0-1]\.ffn_down=iq5_ks,ffn_down=q8_0,attn_v=q8_0,token_embd=iq4_k")
    t = types(QWEN2, custom_q=rules, has_imatrix=True)
    assert t["blk.0.ffn_down.weight"] == "iq5_ks" and t["blk.1.ffn_down.weight"] == "iq5_ks"
    assert t["blk.2.ffn_down.weight"] == "q8_0"
    assert t["blk.5.attn_v.weight"] == "q8_0"
    assert t["token_embd.weight"] == "iq4_k"
    s = types(SMOLLM, facts=SMOLLM_FACTS, custom_q=parse_custom_q("attn_q=iq5_ks"), has_imatrix=True)
    assert s["blk.0.attn_q.weight"] == "q5_0"  # IQ5_KS on rows of 576 -> Q5_0


def test_explicit_overrides_beat_custom_q():
    rules = parse_custom_q("token_embd=iq4_k,output=q8_0")
    t = types(QWEN2, custom_q=rules, token_embedding_type="q8_0", output_tensor_type="bf16")
    assert t["token_embd.weight"] == "q8_0"
    assert t["output.weight"] == "bf16"


def test_pure_ignores_rules_but_keeps_overrides_and_row_fallback():
    t = types(QWEN2, pure=True, custom_q=parse_custom_q("ffn_down=q8_0"), token_embedding_type="q8_0")
    assert t["output.weight"] == "iq4_ks" and t["blk.0.attn_v.weight"] == "iq4_ks"
    assert t["blk.0.ffn_down.weight"] == "iq4_ks"  # custom rules are ignored with --pure
    assert t["token_embd.weight"] == "q8_0"
    s = types(SMOLLM, facts=SMOLLM_FACTS, pure=True)
    assert s["blk.0.attn_v.weight"] == "iq4_nl"


def test_plain_type_mixes():
    t = types(QWEN2, mix="Q8_0")
    assert set(v for v in t.values() if v) == {"q8_0"}
    f16 = types(QWEN2, mix="F16", custom_q=parse_custom_q("attn=q8_0"))
    assert set(v for v in f16.values() if v) == {"f16"}  # rules are not used for float mixes
    assert get_mix("IQ4_KS").ftype == 145 and get_mix("iq4_ks").ftype == 145
    assert get_mix("Q4_K_M").ftype == 15 and get_mix("Q8_0").ftype == 7


# the 1.5B (a 1 GB download and a minute of planning) is the slow form; CI runs the 0.5B
@pytest.mark.parametrize(
    "name", ["qwen2.5-coder-0.5b", pytest.param("qwen2.5-coder-1.5b", marks=pytest.mark.slow)]
)
def test_q4_k_m_matches_the_llama_cpp_files(model_path, name):
    g = GGUFFile(model_path(name))
    tensors = [(n, t.shape) for n, t in g.tensors.items()]
    choices = plan(
        tensors, get_mix("Q4_K_M"), Options(), ModelFacts.from_metadata(g.metadata), encoders=False
    )
    for c in choices:
        if c.type is not None:
            assert c.type == g.tensors[c.name].type.name.lower(), c.name
    assert sum(c.type == "q6_k" for c in choices) > 10


def test_missing_encoders_fall_back_to_an_encodable_type_with_a_note():
    for mix in ("IQ4_KS", "Q4_K_M"):
        for c in plan(QWEN2, get_mix(mix), Options(has_imatrix=True), QWEN2_FACTS):
            if c.type is None:
                continue
            assert has_encoder(c.type), c
            if mix == "Q4_K_M":
                assert type_by_name(c.type).id < 100  # mainline mixes keep mainline ids
    by_name = {c.name: c for c in plan(QWEN2, get_mix("IQ4_KS"), Options(), QWEN2_FACTS)}
    out = by_name["output.weight"]
    if not has_encoder("q6_k"):
        assert out.type != "q6_k" and "Q6_K" in out.note
        assert type_by_name(out.type).bpw >= type_by_name("q6_k").bpw - 0.1


@pytest.mark.parametrize("spec", ["attn_v=q9_9", "attn_v", r"blk\.(=q8_0"])
def test_bad_custom_q_rules(spec):
    with pytest.raises(RecipeError):
        parse_custom_q(spec)


def test_unknown_mix():
    with pytest.raises(RecipeError, match="unknown quantization type"):
        get_mix("Q7_Z")
