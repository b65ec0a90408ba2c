"""Tokenizer: llama.cpp's token ids for the shipped models, special tokens, SentencePiece, streaming."""

from __future__ import annotations

import json
import logging

import pytest
from transformers.convert_slow_tokenizer import bytes_to_unicode as hf_bytes_to_unicode

from tests.conftest import REFERENCE, REFERENCE_MODELS, load_reference
from vramfit.runtime.tokenizer import IncrementalDecoder, Tokenizer, TokenType

TEXTS = json.loads((REFERENCE / "texts.json").read_text())
MODELS = list(REFERENCE_MODELS)
TOKENIZE_CASES = [(m, name) for m in MODELS for name in TEXTS["tokenize"]]
LOGITS_CASES = [(m, name) for m in MODELS for name in TEXTS["logits"]]


@pytest.fixture(scope="module")
def tokenizer(metadata):
    cache: dict[str, Tokenizer] = {}

    def get(name: str) -> Tokenizer:
        if name not in cache:
            cache[name] = Tokenizer(metadata(name))
        return cache[name]

    return get


# ------------------------------------------------------------------------------------------------
# shipped models vs llama.cpp
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("model", "name"), TOKENIZE_CASES)
def test_ids_match_llama_cpp(tokenizer, model, name):
    meta, _ = load_reference(model)
    ref = meta["tokenize"][name]
    assert ref["text"] == TEXTS["tokenize"][name]
    assert tokenizer(model).encode(ref["text"], special=False, add_bos=False) == ref["ids"]


@pytest.mark.parametrize(("model", "name"), TOKENIZE_CASES)
def test_decode_round_trip(tokenizer, model, name):
    meta, _ = load_reference(model)
    ref = meta["tokenize"][name]
    tok = tokenizer(model)
    assert tok.decode(ref["ids"]) == ref["text"]
    assert tok.decode(tok.encode(ref["text"])) == ref["text"]


@pytest.mark.parametrize(("model", "name"), LOGITS_CASES)
def test_special_parsing_matches_logits_ids(tokenizer, model, name):
    meta, arrays = load_reference(model)
    text = TEXTS["logits"][name]
    assert meta["logits"][name]["text"] == text
    expected = arrays[f"{name}_ids"].tolist()
    assert len(expected) == meta["logits"][name]["n_tokens"]
    assert tokenizer(model).encode(text, special=True, add_bos=False) == expected


@pytest.mark.parametrize("model", MODELS)
def test_im_start_is_one_token_only_with_special(tokenizer, metadata, model):
    tok = tokenizer(model)
    im_start = metadata(model)["tokenizer.ggml.tokens"].index("<|im_start|>")
    assert tok.encode("<|im_start|>", special=True) == [im_start]
    plain = tok.encode("<|im_start|>", special=False)
    assert len(plain) > 1 and im_start not in plain
    assert tok.decode(plain) == "<|im_start|>"


@pytest.mark.parametrize("model", MODELS)
def test_special_ids(tokenizer, metadata, model):
    md = metadata(model)
    tok = tokenizer(model)
    tokens = md["tokenizer.ggml.tokens"]
    assert tok.vocab_size == len(tokens)
    assert tok.bos_id == md["tokenizer.ggml.bos_token_id"]
    assert tok.eos_id == md["tokenizer.ggml.eos_token_id"]
    assert tok.eot_ids == {tokens.index("<|im_end|>"), tokens.index("<|endoftext|>")}
    assert md["tokenizer.ggml.eos_token_id"] in tok.eot_ids


def test_add_bos_follows_gguf_flag(tokenizer, metadata):
    md = metadata("qwen2.5-coder-0.5b")
    tok = tokenizer("qwen2.5-coder-0.5b")
    assert md["tokenizer.ggml.add_bos_token"] is False
    assert tok.encode("hi") == tok.encode("hi", add_bos=False)
    assert tok.encode("hi", add_bos=True) == [md["tokenizer.ggml.bos_token_id"], *tok.encode("hi")]


def test_control_tokens_decode_unless_skipped(tokenizer):
    tok = tokenizer("qwen2.5-coder-0.5b")
    text = "<|im_start|>user\nhello<|im_end|>"
    ids = tok.encode(text, special=True)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special=True) == "user\nhello"


def test_user_defined_tokens_are_always_single(tokenizer, metadata):
    # llama.cpp (and HF) match user-defined tokens such as Qwen's <tool_call> even in plain text
    md = metadata("qwen2.5-coder-0.5b")
    tool_call = md["tokenizer.ggml.tokens"].index("<tool_call>")
    assert md["tokenizer.ggml.token_type"][tool_call] == TokenType.USER_DEFINED
    tok = tokenizer("qwen2.5-coder-0.5b")
    assert tool_call in tok.encode("x <tool_call> y", special=False)


# ------------------------------------------------------------------------------------------------
# incremental decoding
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("name", ["emoji", "cjk", "accents", "mixed_scripts"])
def test_incremental_decode_never_splits_characters(tokenizer, model, name):
    meta, _ = load_reference(model)
    ref = meta["tokenize"][name]
    tok = tokenizer(model)
    dec = IncrementalDecoder(tok)
    chunks = [dec.feed(i) for i in ref["ids"]]
    chunks.append(dec.flush())
    assert "".join(chunks) == ref["text"]
    assert all("\ufffd" not in c for c in chunks)
    for c in chunks:
        c.encode("utf-8")  # a lone surrogate or partial char would not encode


@pytest.mark.parametrize("model", MODELS)
def test_emoji_spans_several_tokens(tokenizer, model):
    meta, _ = load_reference(model)
    ids = meta["tokenize"]["emoji"]["ids"]
    dec = IncrementalDecoder(tokenizer(model))
    outputs = [dec.feed(i) for i in ids]
    # some token ends inside a character: nothing comes out for it, the character comes whole later
    assert "" in outputs
    assert "".join(outputs) + dec.flush() == meta["tokenize"]["emoji"]["text"]
    assert list(tokenizer(model).stream_decode(ids)) == [o for o in outputs if o]


def test_flush_emits_incomplete_character(tokenizer):
    tok = tokenizer("qwen2.5-coder-0.5b")
    meta, _ = load_reference("qwen2.5-coder-0.5b")
    rocket = meta["tokenize"]["emoji"]["ids"][1:3]  # " " + first bytes of 🚀 (its last token held back)
    dec = IncrementalDecoder(tok)
    assert "".join(dec.feed(i) for i in rocket) == " "
    assert dec.flush() == "\ufffd"


# ------------------------------------------------------------------------------------------------
# pre-tokenizer selection, on synthetic byte-level vocabularies
# ------------------------------------------------------------------------------------------------


def _byte_level_meta(pre: str, merges: list[str], extra: list[str] = ()) -> dict:
    alphabet = list(hf_bytes_to_unicode().values())
    tokens = alphabet + [m.replace(" ", "") for m in merges] + list(extra)
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * len(tokens),
        "tokenizer.ggml.merges": merges,
    }


def _texts(tok: Tokenizer, ids: list[int]) -> list[str]:
    return [tok.tokens[i] for i in ids]


DIGIT_MERGES = ["1 2", "12 3", "4 5", "123 45"]


@pytest.mark.parametrize(
    ("pre", "expected"),
    [
        ("gpt2", ["12345"]),  # \p{N}+
        ("llama-bpe", ["123", "45"]),  # \p{N}{1,3}
        ("qwen2", ["1", "2", "3", "4", "5"]),  # \p{N}
        ("qwen35", ["1", "2", "3", "4", "5"]),
        ("smollm", ["1", "2", "3", "4", "5"]),  # digits isolated first
    ],
)
def test_digit_splitting_per_pre_tokenizer(pre, expected):
    tok = Tokenizer(_byte_level_meta(pre, DIGIT_MERGES))
    assert _texts(tok, tok.encode("12345")) == expected


def test_qwen35_keeps_combining_marks_with_letters():
    # "e" + U+0301 (bytes CC 81): qwen35's [\p{L}\p{M}]+ keeps them together, qwen2 splits the mark off
    b2u = hf_bytes_to_unicode()
    e_acute = "e" + b2u[0xCC] + b2u[0x81]
    merges = [f"e {b2u[0xCC]}", f"e{b2u[0xCC]} {b2u[0x81]}"]
    text = "ce\u0301"
    qwen35 = Tokenizer(_byte_level_meta("qwen35", merges))
    qwen2 = Tokenizer(_byte_level_meta("qwen2", merges))
    assert _texts(qwen35, qwen35.encode(text)) == ["c", e_acute]
    assert _texts(qwen2, qwen2.encode(text)) == ["c", "e", b2u[0xCC], b2u[0x81]]
    assert qwen35.decode(qwen35.encode(text)) == qwen2.decode(qwen2.encode(text)) == text


def test_llama_bpe_ignore_merges_and_default_bos():
    # "abc" is in the vocabulary but no merge path builds it: llama3 takes the whole word anyway
    meta = _byte_level_meta("llama-bpe", ["a b"], extra=["abc"])
    meta["tokenizer.ggml.bos_token_id"] = 0
    tok = Tokenizer(meta)
    assert _texts(tok, tok.encode("abc", add_bos=False)) == ["abc"]
    assert tok.encode("abc")[0] == 0  # llama.cpp adds BOS for llama3 vocabularies without the flag
    gpt2 = Tokenizer(_byte_level_meta("gpt2", ["a b"], extra=["abc"]))
    assert _texts(gpt2, gpt2.encode("abc")) == ["ab", "c"]


def test_unknown_pre_falls_back_to_gpt2_with_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="vramfit.runtime.tokenizer"):
        tok = Tokenizer(_byte_level_meta("no-such-pre", DIGIT_MERGES))
    assert tok.pre == "gpt2"
    assert any("no-such-pre" in r.getMessage() for r in caplog.records)
    assert _texts(tok, tok.encode("12345")) == ["12345"]


# ------------------------------------------------------------------------------------------------
# SentencePiece (tokenizer.ggml.model == "llama"), on a hand-made vocabulary
# ------------------------------------------------------------------------------------------------

BYTE0 = 3  # <0x00> .. <0xFF> are ids 3..258


def _spm_meta(normal: list[tuple[str, float]], extra: dict | None = None) -> dict:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    scores = [0.0] * len(tokens)
    for text, score in normal:
        tokens.append(text)
        types.append(TokenType.USER_DEFINED if text.startswith("<") else TokenType.NORMAL)
        scores.append(score)
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [int(t) for t in types],
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }
    meta.update(extra or {})
    return meta


SPM_VOCAB = [
    ("▁", -1), ("h", -2), ("e", -3), ("l", -4), ("o", -5), ("w", -6), ("r", -7), ("d", -8),
    ("ll", -10), ("he", -11), ("llo", -12), ("▁he", -13), ("▁hello", -14),
    ("▁w", -15), ("or", -16), ("▁wor", -17), ("ld", -18), ("▁world", -19), ("<tool>", 0),
]  # fmt: skip


@pytest.fixture(scope="module")
def spm():
    return Tokenizer(_spm_meta(SPM_VOCAB))


def _spm_ids(tok: Tokenizer, pieces: list[str]) -> list[int]:
    return [tok.tokens.index(p) for p in pieces]


def test_spm_merges_words_with_space_prefix(spm):
    assert spm.encode("hello world", add_bos=False) == _spm_ids(spm, ["▁hello", "▁world"])
    assert spm.decode(spm.encode("hello world", add_bos=False)) == "hello world"
    assert spm.decode(spm.encode("hello world")) == "<s>hello world"


def test_spm_adds_bos_by_default(spm):
    assert spm.add_bos
    assert spm.encode("hello") == [1, *_spm_ids(spm, ["▁hello"])]
    assert spm.decode(spm.encode("hello"), skip_special=True) == "hello"


def test_spm_byte_fallback(spm):
    ids = spm.encode("hé", add_bos=False)  # é is not in the vocabulary: bytes C3 A9
    assert ids == [*_spm_ids(spm, ["▁", "h"]), BYTE0 + 0xC3, BYTE0 + 0xA9]
    assert spm.decode(ids) == "hé"
    dec = IncrementalDecoder(spm)
    assert [dec.feed(i) for i in ids] == ["", "h", "", "é"]


def test_spm_special_tokens_and_prefix_after_them(spm):
    # a special token is followed by a fresh space prefix, as in llama.cpp
    assert spm.encode("<s>hello", special=True, add_bos=False) == [1, *_spm_ids(spm, ["▁hello"])]
    plain = spm.encode("<s>hello", special=False, add_bos=False)
    assert plain == [*_spm_ids(spm, ["▁"]), BYTE0 + ord("<"), BYTE0 + ord("s"), BYTE0 + ord(">"),
                     *_spm_ids(spm, ["he", "llo"])]  # fmt: skip
    assert spm.decode(plain) == "<s>hello"
    user = spm.encode("hello<tool>world", add_bos=False)  # user-defined: matched without special=True
    assert user == _spm_ids(spm, ["▁hello", "<tool>", "▁world"])
    assert spm.decode(user) == "hello<tool>world"


@pytest.mark.parametrize(("ab", "bc", "expected"), [(-2.0, -1.0, ["a", "bc"]), (-1.0, -2.0, ["ab", "c"])])
def test_spm_merges_best_score_first(ab, bc, expected):
    vocab = [("a", -5), ("b", -6), ("c", -7), ("ab", ab), ("bc", bc)]
    tok = Tokenizer(_spm_meta(vocab, {"tokenizer.ggml.add_space_prefix": False}))
    assert _texts(tok, tok.encode("abc", add_bos=False)) == expected
    assert tok.decode(tok.encode("abc"), skip_special=True) == "abc"


def test_unsupported_model_is_rejected():
    with pytest.raises(ValueError, match="unsupported"):
        Tokenizer({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})


def test_surrogates_are_joined_or_replaced(tokenizer):
    # a str may hold UTF-16 surrogates (JSON's "\ud800" escapes); they have no UTF-8 of their own
    tok = tokenizer("qwen2.5-coder-0.5b")
    assert tok.encode("a\ud83d\ude00b") == tok.encode("a\U0001f600b")  # a valid pair: the character
    assert tok.encode("hi \ud800 there \udfff") == tok.encode("hi \ufffd there \ufffd")  # lone: U+FFFD
