"""Compact byte-level BPE (vramfit.runtime._bpe) against HF tokenizers' BPE model on the same inputs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from transformers.convert_slow_tokenizer import bytes_to_unicode

from tests.conftest import REFERENCE, REFERENCE_MODELS
from vramfit.runtime import bpe
from vramfit.runtime.tokenizer import _IGNORE_MERGES, PRE_TOKENIZER_REGEXES, Tokenizer, resolve_pre

B2U = bytes_to_unicode()
ALPHABET = list(B2U.values())

CHAR_POOL = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    "  \t\n\n\r.,;:!?'\"()[]{}<>/\\|_-+=*&^%$#@~`"
    "éèüöäßñçÅøœ"  # Latin-1 and beyond
    "日本語中文字한국어"  # CJK, Hangul
    "привет мир"  # Cyrillic
    "مرحبا"  # Arabic
    "\u0301\u0308\u200d\u00a0\u3000"  # combining marks, zero-width joiner, no-break and ideographic spaces
    "😀🚀👍🏽🧪"  # 4-byte characters, a skin-tone modifier
)


def random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["the", " the", "def", "return", "  ", "\n\n", "1234567", "'s", "'ll", "don't", "x**2", "🙂🙂"]
    out = []
    for _ in range(n):
        parts = [
            rng.choice(words) if rng.random() < 0.3 else rng.choice(CHAR_POOL)
            for _ in range(rng.randint(1, 120))
        ]
        out.append("".join(parts))
    return out


def corpus() -> list[str]:
    texts = json.loads((REFERENCE / "texts.json").read_text())
    refs = [t for group in texts.values() for t in (group.values() if isinstance(group, dict) else group)]
    sources = sorted(Path(bpe.__file__).parent.parent.rglob("*.py"))[:40]
    return [t for t in refs if isinstance(t, str)] + [p.read_text() for p in sources] + random_texts(300)


def backends(tokens, merges, pre):
    regexes, ignore = PRE_TOKENIZER_REGEXES[pre], pre in _IGNORE_MERGES
    return bpe.build_gpt2(tokens, merges, regexes, ignore), bpe.build_gpt2(
        tokens, merges, regexes, ignore, False
    )


def test_extension_is_built():
    assert bpe.available()  # the package's install builds it on every platform with a C compiler


@pytest.mark.parametrize("model", list(REFERENCE_MODELS))
@pytest.mark.parametrize("pre", ["model's own", "llama-bpe", "gpt2"])
def test_shipped_vocabularies_match_hf(metadata, model, pre):
    meta = metadata(model)
    pre = resolve_pre(meta["tokenizer.ggml.pre"]) if pre == "model's own" else pre
    compact, hf = backends(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.merges"], pre)
    assert isinstance(compact, bpe.CompactBPE) and isinstance(hf, bpe.HFBackend)
    texts = corpus()
    assert compact.encode_texts(texts) == hf.encode_texts(texts)


def test_tables_are_small(metadata):
    meta = metadata("smollm2-135m")
    compact, _ = backends(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.merges"], "smollm")
    assert compact.bpe.n_merges == len(meta["tokenizer.ggml.merges"])  # every merge's tokens were found
    assert compact.bpe.nbytes < 3 * 2**20  # HF's BPE model holds about 11 MiB for this vocabulary


def _vocab(merges: list[str], extra: tuple[str, ...] = ()) -> list[str]:
    return ALPHABET + [m.replace(" ", "") for m in merges] + list(extra)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("aaa", ["aa", "a"]), ("aaaa", ["aa", "aa"]), ("aaaaa", ["aa", "aa", "a"]), ("abab", ["ab", "ab"])],
)
def test_equal_ranks_merge_leftmost_first(text, expected):
    merges = ["a a", "a b"]
    tokens = _vocab(merges)
    for backend in backends(tokens, merges, "gpt2"):
        assert [tokens[i] for i in backend.encode_texts([text])[0]] == expected


def test_lower_rank_wins_over_position():
    merges = ["b c", "a b"]  # "bc" ranks first although "ab" is further left
    tokens = _vocab(merges)
    for backend in backends(tokens, merges, "gpt2"):
        assert [tokens[i] for i in backend.encode_texts(["abc"])[0]] == ["a", "bc"]


def test_ignore_merges_takes_whole_vocabulary_words():
    merges = ["a b"]
    tokens = _vocab(merges, extra=("abc",))
    for backend in backends(tokens, merges, "llama-bpe"):
        assert [tokens[i] for i in backend.encode_texts(["abc abd"])[0]] == ["abc", "Ġ", "ab", "d"]


def test_repeated_merge_keeps_its_first_rank():
    # as llama.cpp's bpe_ranks (llama-cpp-python 0.3.36 on such a file: "abc" -> "ab", "c"); HF's own map
    # would keep the last rank ("a", "bc"), so the fallback drops repeats before building it
    merges = ["a b", "b c", "a b"]
    tokens = _vocab(merges[:2])
    for backend in backends(tokens, merges, "gpt2"):
        assert [tokens[i] for i in backend.encode_texts(["abc"])[0]] == ["ab", "c"]


def test_duplicate_token_takes_the_later_id():
    merges = ["a b"]
    tokens = _vocab(merges, extra=("ab",))
    compact, hf = backends(tokens, merges, "gpt2")
    assert compact.encode_texts(["ab"]) == hf.encode_texts(["ab"]) == [[len(tokens) - 1]]


def test_bytes_missing_from_the_vocabulary_are_dropped():
    tokens = [c for c in ALPHABET if c not in "bĠ"] + ["ac"]
    merges = ["a c"]
    compact, hf = backends(tokens, merges, "gpt2")
    texts = ["abc", "a b c", "bbb"]
    assert compact.encode_texts(texts) == hf.encode_texts(texts)
    assert [tokens[i] for i in compact.encode_texts(["abc"])[0]] == ["ac"]


def test_merge_with_a_missing_token_is_never_applied():
    tokens = _vocab(["a b"])  # "x y" names "xy", which is not a token: HF refuses such a merge list
    compact = bpe.build_gpt2(tokens, ["x y", "a b"], PRE_TOKENIZER_REGEXES["gpt2"], False)
    assert compact.bpe.n_merges == 1
    assert [tokens[i] for i in compact.encode_texts(["xyab"])[0]] == ["x", "y", "ab"]


def test_long_piece_is_fast_and_exact():
    # one 200K-byte piece (a run of spaces), merged with a heap: n log n, not n^2
    merges = ["Ġ Ġ", "ĠĠ ĠĠ", "ĠĠĠĠ ĠĠĠĠ"]
    tokens = _vocab(merges)
    compact, hf = backends(tokens, merges, "gpt2")
    text = " " * 200_001 + "x"
    ids = compact.encode_texts([text])[0]
    assert ids == hf.encode_texts([text])[0]
    assert len(ids) == 25_000 + 2  # 200,000 spaces as 8-space tokens; the last space goes with "x": "Ġ", "x"


def test_tokenizer_uses_the_compact_backend(metadata):
    tok = Tokenizer(metadata("qwen2.5-coder-0.5b"))
    assert isinstance(tok._backend, bpe.CompactBPE)


def test_offsets_outside_the_buffer_are_refused():
    starts = np.array([0, 2, 99], np.int64)
    with pytest.raises(ValueError, match="outside"):
        bpe._bpe.BPE(b"abcd", starts, 0, b"", np.zeros(1, np.int64), 0)


def test_surrogates_fail_like_hf(metadata):
    meta = metadata("smollm2-135m")
    compact, hf = backends(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.merges"], "smollm")
    for backend in (compact, hf):
        with pytest.raises(Exception):  # noqa: B017, PT011 - each library raises its own type
            backend.encode_texts(["a\ud800b"])


@st.composite
def vocabularies(draw):
    """A byte-level alphabet plus tokens built by random merges (each merge's result joins the vocabulary)."""
    tokens, merges = list(ALPHABET), []
    letters = [B2U[b] for b in b"abcxyz !\n"] + [B2U[b] for b in "é日".encode()]
    pool = list(letters)
    for _ in range(draw(st.integers(0, 40))):
        a, b = draw(st.sampled_from(pool)), draw(st.sampled_from(pool))
        merges.append(f"{a} {b}")
        if a + b not in tokens:
            tokens.append(a + b)
        pool.append(a + b)
    return tokens, merges


@given(
    vocabularies(), st.lists(st.text("abcxyz !\né日😀", max_size=60), min_size=1, max_size=4), st.booleans()
)
def test_random_vocabularies_match_hf(vocab, texts, ignore):
    tokens, merges = vocab
    pre = "llama-bpe" if ignore else "gpt2"
    compact, hf = backends(tokens, merges, pre)
    assert compact.encode_texts(texts) == hf.encode_texts(texts)
