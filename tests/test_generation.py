"""Generation through the library API with real models (smollm2-135m, one qwen2.5-coder-0.5b chat).

The oracle for greedy decoding is a hand-rolled loop over `Model.logits`: take the argmax of the last
row, append it, recompute from scratch. Everything else is checked against that oracle or against
facts that do not come from the code path under test.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

import vramfit
from vramfit.kernels.dispatch import use_backend
from vramfit.runtime.engine import ContextOverflowError, Engine

PROMPT = "The capital of France is"
N_ORACLE = 12
QUESTION = [{"role": "user", "content": "What is 2+3? Reply with just the number."}]


@pytest.fixture(scope="module", autouse=True)
def exact_products():
    """The oracle recomputes every prefix in one batch while generate() decodes token by token; only
    the exact float32 backend makes those bit-comparable (8-bit activations of the fast CPU kernels
    round differently per batch shape, see tests/test_models.py for the fast path's own checks)."""
    with use_backend("reference"):
        yield


@pytest.fixture(scope="module")
def smol():
    return vramfit.load("smollm2-135m")


@pytest.fixture(scope="module")
def smol64():
    return vramfit.load("smollm2-135m", n_ctx=64)


@pytest.fixture(scope="module")
def qwen():
    return vramfit.load("qwen2.5-coder-0.5b", n_ctx=256)


@pytest.fixture(scope="module")
def oracle(smol):
    """(token ids, text) of N_ORACLE greedy tokens, one full forward per token."""
    seq = smol.tokenize(PROMPT, special=True)
    n_prompt = len(seq)
    for _ in range(N_ORACLE):
        seq.append(int(np.argmax(smol.logits(seq)[-1])))
    ids = seq[n_prompt:]
    assert not set(ids) & smol.tokenizer.eot_ids, "the oracle run should not hit an end token"
    return ids, smol.detokenize(ids)


def test_greedy_generate_equals_hand_rolled_argmax_loop(smol, oracle):
    ids, text = oracle
    out = smol.generate(PROMPT, max_tokens=N_ORACLE, temperature=0)
    assert out == text
    assert len(text.strip()) > 0
    stats = smol.last_stats
    assert (stats.generated_tokens, stats.finish_reason) == (N_ORACLE, "length")
    assert stats.prompt_tokens == len(smol.tokenize(PROMPT))


def test_max_tokens_is_respected(smol, oracle):
    ids, _ = oracle
    for n in (0, 1, 3):
        out = smol.generate(PROMPT, max_tokens=n, temperature=0)
        assert out == smol.detokenize(ids[:n])
        assert smol.last_stats.generated_tokens == n
        assert smol.last_stats.finish_reason == "length"
    # token ids in (truncation settings are irrelevant to greedy)
    assert smol.generate(smol.tokenize(PROMPT), max_tokens=3, temperature=0, top_k=2) == smol.detokenize(
        ids[:3]
    )


def test_stream_pieces_join_to_the_full_result(smol, oracle):
    _, text = oracle
    pieces = list(smol.generate(PROMPT, max_tokens=N_ORACLE, stream=True, temperature=0))
    assert len(pieces) > 1 and all(isinstance(p, str) and p for p in pieces)
    assert "".join(pieces) == text


def test_seeded_sampling_is_reproducible(smol):
    kw = dict(max_tokens=5, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=2024)
    # Cold cache both times: a warm prompt recomputes only its last token, whose logits may differ
    # in the last float bits from a full prefill (another summation order), and T=1.5 amplifies that.
    smol.engine.reset()
    first = smol.generate(PROMPT, **kw)
    smol.engine.reset()
    second = smol.generate(PROMPT, **kw)
    assert first == second
    assert smol.last_stats.generated_tokens == 5


def test_stop_string_ends_generation_and_is_not_emitted(smol, oracle):
    ids, text = oracle
    # a stop string straddling the boundary between the 4th and 5th generated tokens
    b = len(smol.detokenize(ids[:4]))
    stop = text[b - 2 : b + 2]
    assert len(stop) == 4
    expected = text[: text.index(stop)]
    out = smol.generate(PROMPT, max_tokens=N_ORACLE, stop=["never-in-output", stop], temperature=0)
    assert out == expected
    assert stop not in out
    assert smol.last_stats.finish_reason == "stop"
    assert smol.last_stats.generated_tokens < N_ORACLE
    streamed = "".join(smol.generate(PROMPT, max_tokens=N_ORACLE, stream=True, stop=[stop], temperature=0))
    assert streamed == expected


def test_invalid_sampling_params_raise(smol):
    with pytest.raises(ValueError):
        smol.generate(PROMPT, max_tokens=2, temperature=-1.0)
    with pytest.raises(ValueError):
        smol.generate(PROMPT, max_tokens=2, top_p=1.5)


def test_prompt_longer_than_context_raises(smol64):
    small = smol64
    assert small.n_ctx == 64
    ids = small.tokenize("one two three four five six seven eight nine ten " * 10)
    n = len(ids)
    assert n > 64
    for stream in (False, True):
        with pytest.raises(ContextOverflowError) as err:
            out = small.generate(ids, max_tokens=4, stream=stream, temperature=0)
            if stream:
                next(iter(out))
        assert str(n) in str(err.value) and "64" in str(err.value)
    with pytest.raises(ContextOverflowError) as err:
        small.logits(ids)
    assert str(n) in str(err.value) and "64" in str(err.value)


def test_chat_stops_at_end_of_turn(smol):
    out = smol.chat(QUESTION, max_tokens=48, temperature=0)
    stats = smol.last_stats
    assert stats.finish_reason == "stop"
    assert 0 < stats.generated_tokens < 48
    assert out.strip() and "<|im_end|>" not in out and "<|endoftext|>" not in out
    # independent check: after prompt + reply, the model's own argmax is an end-of-generation token
    prompt_ids = smol.tokenize(smol.render(QUESTION), special=True)
    reply_ids = smol.tokenize(out)
    assert smol.detokenize(reply_ids) == out
    nxt = int(np.argmax(smol.logits(prompt_ids + reply_ids)[-1]))
    assert nxt in smol.tokenizer.eot_ids


def test_second_chat_turn_reuses_the_prompt_prefix(smol):
    first = smol.chat(QUESTION, max_tokens=48, temperature=0)
    first_prompt = smol.tokenize(smol.render(QUESTION), special=True)
    convo = [*QUESTION, {"role": "assistant", "content": first}, {"role": "user", "content": "And 4+4?"}]
    second = smol.chat(convo, max_tokens=4, temperature=0)
    stats = smol.last_stats
    assert stats.prompt_tokens == len(smol.tokenize(smol.render(convo), special=True))
    assert len(first_prompt) <= stats.cached_tokens < stats.prompt_tokens

    # a fresh engine (empty KV cache, same weights) prefills everything and must agree
    fresh = copy.copy(smol)
    fresh.engine = Engine(smol.model)
    assert fresh.chat(convo, max_tokens=4, temperature=0) == second
    assert fresh.last_stats.cached_tokens == 0
    assert fresh.last_stats.generated_tokens == stats.generated_tokens


def test_qwen_chat_answers_arithmetic(qwen):
    out = qwen.chat(QUESTION, max_tokens=6, temperature=0)
    assert "5" in out
    assert qwen.last_stats.generated_tokens <= 6
