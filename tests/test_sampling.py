"""Sampler and stop-string guard on synthetic inputs: no model is loaded here.

Expected values are computed by hand (or with plain math/numpy) from llama.cpp's definitions:
penalties -> top-k -> top-p -> min-p -> temperature -> draw, temperature 0 = argmax.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vramfit.runtime.engine import _StopGuard
from vramfit.runtime.sampling import Sampler, SamplingParams

# probabilities chosen so that every cumulative sum / ratio used below is far from a cut boundary
PROBS = [0.4, 0.3, 0.15, 0.1, 0.05]
# the same distribution in a scrambled vocabulary order: token id -> probability
ORDER = [3, 0, 4, 1, 2]  # token ORDER[r] has PROBS[r]


def _logits_from_probs(probs, order=None, shift=1.7) -> torch.Tensor:
    """Logits (any constant shift) whose softmax is `probs`, placed at token ids `order`."""
    order = list(range(len(probs))) if order is None else order
    out = torch.empty(len(probs), dtype=torch.float32)
    for rank, tok in enumerate(order):
        out[tok] = math.log(probs[rank]) + shift
    return out


def _params(**kw) -> SamplingParams:
    """Every cut disabled unless asked for; penalties off."""
    base = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0)
    base.update(kw)
    return SamplingParams(**base)


def _kept(logits: torch.Tensor, **kw) -> set[int]:
    ids, _ = Sampler(_params(**kw)).truncate(logits.clone())
    return {int(i) for i in ids}


def _draws(logits: torch.Tensor, n: int, history=(), **kw) -> list[int]:
    sampler = Sampler(_params(**kw))
    return [sampler(logits, list(history)) for _ in range(n)]


# ---------------------------------------------------------------- greedy and top-k


def test_greedy_picks_argmax():
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        logits = torch.randn(1000, generator=gen) * 3
        expected = int(np.argmax(logits.numpy()))
        # greedy ignores the truncation settings and the seed entirely
        for kw in ({}, dict(top_k=5, top_p=0.5, min_p=0.3), dict(seed=None)):
            sampler = Sampler(SamplingParams(temperature=0.0, **kw))
            assert sampler(logits, []) == expected


def test_top_k_1_is_greedy_at_any_temperature():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(500, generator=gen)
    expected = int(np.argmax(logits.numpy()))
    for temperature in (0.05, 0.7, 1.0, 5.0, 1000.0):
        for seed in range(5):
            draws = _draws(logits, 10, top_k=1, temperature=temperature, seed=seed)
            assert draws == [expected] * 10


def test_top_k_keeps_the_k_largest():
    logits = _logits_from_probs(PROBS, ORDER)
    assert _kept(logits, top_k=2) == {3, 0}
    assert _kept(logits, top_k=4) == {3, 0, 4, 1}
    assert _kept(logits, top_k=100) == set(range(5))  # k larger than the vocabulary
    assert _kept(logits, top_k=0) == set(range(5))  # <= 0 disables


# ---------------------------------------------------------------- top-p and min-p


@pytest.mark.parametrize(
    "top_p, n_kept",
    [
        # cumulative mass in rank order: 0.4, 0.7, 0.85, 0.95, 1.0
        (0.0, 1),  # always at least one token
        (0.3, 1),  # 0.4 >= 0.3
        (0.5, 2),  # 0.4 < 0.5 <= 0.7
        (0.8, 3),  # 0.7 < 0.8 <= 0.85
        (0.9, 4),  # 0.85 < 0.9 <= 0.95
        (0.97, 5),
        (1.0, 5),  # disabled
    ],
)
def test_top_p_keeps_smallest_prefix_reaching_p(top_p, n_kept):
    logits = _logits_from_probs(PROBS, ORDER)
    assert _kept(logits, top_p=top_p) == set(ORDER[:n_kept])


def test_top_p_works_on_the_top_k_renormalised_mass():
    """llama.cpp re-normalises after top-k: over the top 2, masses are 0.4/0.7=0.571 and 1.0."""
    logits = _logits_from_probs(PROBS, ORDER)
    assert _kept(logits, top_p=0.55) == set(ORDER[:2])  # 0.4 < 0.55 over the whole vocabulary
    assert _kept(logits, top_k=2, top_p=0.55) == set(ORDER[:1])  # 0.571 >= 0.55 after top-k


@pytest.mark.parametrize(
    "min_p, n_kept",
    [
        # probabilities relative to the top one (0.5): 1, 0.5, 0.24, 0.16, 0.1
        (0.0, 5),  # disabled
        (0.05, 5),
        (0.13, 4),
        (0.2, 3),  # an absolute cut at 0.2 would keep only two tokens
        (0.4, 2),
        (0.6, 1),
        (1.0, 1),
    ],
)
def test_min_p_is_relative_to_the_top_probability(min_p, n_kept):
    probs = [0.5, 0.25, 0.12, 0.08, 0.05]
    logits = _logits_from_probs(probs, ORDER)
    assert _kept(logits, min_p=min_p) == set(ORDER[:n_kept])


def test_draws_stay_inside_the_kept_set_and_cover_it():
    logits = _logits_from_probs(PROBS, ORDER)
    for kw, n_kept in ((dict(top_k=3), 3), (dict(top_p=0.5), 2), (dict(min_p=0.5), 2)):
        seen = set(_draws(logits, 400, temperature=1.0, seed=3, **kw))
        assert seen == set(ORDER[:n_kept]), kw


# ---------------------------------------------------------------- the draw itself


def _chi_square(counts: Counter, expected_probs: dict[int, float], n: int) -> float:
    assert set(counts) <= set(expected_probs), "drew a token outside the kept set"
    return sum((counts.get(t, 0) - n * p) ** 2 / (n * p) for t, p in expected_probs.items())


@pytest.mark.parametrize(
    "temperature, top_k",
    [(1.0, 0), (0.6, 0), (2.5, 0), (0.8, 4), (1.5, 3)],
)
def test_draw_frequencies_match_tempered_softmax(temperature, top_k):
    raw = [2.0, 1.0, 0.5, 0.0, -1.0, -2.5]
    order = [4, 1, 5, 0, 3, 2]  # vocabulary position of each raw logit
    logits = torch.empty(len(raw))
    for tok, v in zip(order, raw, strict=True):
        logits[tok] = v
    kept = len(raw) if top_k == 0 else top_k
    weights = [math.exp(v / temperature) for v in raw[:kept]]
    expected = {order[i]: w / sum(weights) for i, w in enumerate(weights)}

    n = 12000
    counts = Counter(_draws(logits, n, temperature=temperature, top_k=top_k, seed=1234))
    stat = _chi_square(counts, expected, n)
    # chi-square with (kept - 1) <= 5 degrees of freedom: 20.5 is its 0.1% upper quantile;
    # the seed is fixed, so this is deterministic, not flaky
    assert stat < 20.5, (stat, counts, expected)
    # and a wrong temperature (or none) would be rejected by the same test
    wrong = [math.exp(v) for v in raw[:kept]] if temperature != 1.0 else [math.exp(v / 2) for v in raw[:kept]]
    wrong_expected = {order[i]: w / sum(wrong) for i, w in enumerate(wrong)}
    assert _chi_square(counts, wrong_expected, n) > 100


def test_same_seed_same_sequence_different_seed_differs():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(200, generator=gen)
    a = _draws(logits, 60, temperature=1.5, seed=42)
    b = _draws(logits, 60, temperature=1.5, seed=42)
    c = _draws(logits, 60, temperature=1.5, seed=43)
    assert a == b
    assert a != c
    assert len(set(a)) > 5  # really sampling, not a constant


# ---------------------------------------------------------------- penalties


def _penalized(logits: torch.Tensor, history: list[int], **kw) -> np.ndarray:
    return Sampler(_params(**kw)).penalize(logits.clone(), history).numpy()


def test_repeat_penalty_divides_positive_multiplies_negative_in_window_only():
    logits = torch.tensor([2.0, -1.0, 3.0, -2.0, 0.5, 4.0, -0.5, 1.0])
    history = [5, 6, 0, 1, 1, 3, 0]  # last 4: 1, 1, 3, 0 (tokens 5 and 6 fall outside)
    got = _penalized(logits, history, repeat_penalty=2.0, repeat_last_n=4)
    expected = [2.0 / 2, -1.0 * 2, 3.0, -2.0 * 2, 0.5, 4.0, -0.5, 1.0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)

    # -1: the whole history; token 1 occurs twice but is penalised once
    got = _penalized(logits, history, repeat_penalty=2.0, repeat_last_n=-1)
    expected = [1.0, -2.0, 3.0, -4.0, 0.5, 2.0, -1.0, 1.0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)

    # 0: an empty window disables the penalties
    got = _penalized(logits, history, repeat_penalty=2.0, repeat_last_n=0)
    np.testing.assert_allclose(got, logits.numpy(), rtol=0, atol=0)


def test_presence_and_frequency_penalties_as_in_llama_cpp():
    logits = torch.tensor([2.0, -1.0, 3.0, -2.0, 0.5, 4.0])
    history = [4, 4, 4, 2, 2, 0, 3, 2]  # window of 6: 4, 2, 2, 0, 3, 2
    got = _penalized(logits, history, repeat_last_n=6, frequency_penalty=0.5, presence_penalty=0.25)
    # logit -= count * freq + (count > 0) * presence, counts in the window: 0:1, 2:3, 3:1, 4:1
    expected = [
        2.0 - (1 * 0.5 + 0.25),
        -1.0,
        3.0 - (3 * 0.5 + 0.25),
        -2.0 - (1 * 0.5 + 0.25),
        0.5 - (1 * 0.5 + 0.25),
        4.0,
    ]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)

    # combined with the repeat penalty, which comes first (llama.cpp's order)
    got = _penalized(
        logits, history, repeat_last_n=6, repeat_penalty=1.5, frequency_penalty=0.5, presence_penalty=0.25
    )
    expected = [
        2.0 / 1.5 - 0.75,
        -1.0,
        3.0 / 1.5 - 1.75,
        -2.0 * 1.5 - 0.75,
        0.5 / 1.5 - 0.75,
        4.0,
    ]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_penalties_steer_greedy_and_leave_input_untouched():
    logits = torch.tensor([5.0, 4.5, 1.0, -3.0])
    before = logits.clone()
    greedy = SamplingParams(temperature=0.0, repeat_penalty=1.2, repeat_last_n=8)
    assert Sampler(greedy)(logits, []) == 0
    assert Sampler(greedy)(logits, [0]) == 1  # 5.0 / 1.2 = 4.17 < 4.5
    assert Sampler(SamplingParams(temperature=0.0, frequency_penalty=0.3))(logits, [0, 0]) == 1
    assert torch.equal(logits, before)


def test_invalid_params_raise():
    with pytest.raises(ValueError):
        SamplingParams(temperature=-0.1)
    with pytest.raises(ValueError):
        SamplingParams(top_p=1.01)
    with pytest.raises(ValueError):
        SamplingParams(top_p=-0.5)
    with pytest.raises(ValueError):
        SamplingParams(min_p=1.5)
    # the boundaries themselves are valid
    SamplingParams(temperature=0.0, top_p=1.0, min_p=0.0)
    SamplingParams(top_p=0.0, min_p=1.0)


# ---------------------------------------------------------------- stop strings


def _run_guard(stops, pieces) -> tuple[list[str], bool]:
    """Drive the guard the way Engine.generate does: stop at a hit, else flush at the end."""
    guard = _StopGuard(tuple(stops))
    out = []
    for piece in pieces:
        text, hit = guard.push(piece)
        out.append(text)
        if hit:
            return out, True
    out.append(guard.flush())
    return out, False


def test_stop_split_across_pieces_is_caught_and_not_emitted():
    out, hit = _run_guard(["</s>"], ["Hello <", "/", "s", "> more text"])
    assert hit
    assert out == ["Hello ", "", "", ""]  # the '<', '/', 's' are held, then dropped with the stop
    assert "".join(out) == "Hello "

    out, hit = _run_guard(["User:"], ["a\nUs", "er", ": hi"])
    assert hit and "".join(out) == "a\n"


def test_lookalike_prefix_is_emitted_once_disproven():
    out, hit = _run_guard(["STOP"], ["ab ST", "OX", " end ST"])
    assert not hit
    assert out == ["ab ", "STOX", " end ", "ST"]  # held 'ST' comes out with 'OX'; the last at flush
    assert "".join(out) == "ab STOX end ST"

    # a prefix that fails, immediately followed by a real start
    out, hit = _run_guard(["aab"], ["xa", "a", "a", "b", "!"])
    assert hit
    assert "".join(out) == "xa"


def test_multiple_stop_strings():
    stops = ["\n\n", "User:", "###"]
    out, hit = _run_guard(stops, ["Answer: 4", "\nUse", "r:"])
    assert hit and "".join(out) == "Answer: 4\n"
    out, hit = _run_guard(stops, ["Answer: 4\n", "\nUser:"])
    assert hit and "".join(out) == "Answer: 4"
    out, hit = _run_guard(stops, ["x ##", "# User:"])
    assert hit and "".join(out) == "x "
    # two stops completed by the same piece: the one that occurs first in the text wins,
    # whatever their order in the list
    out, hit = _run_guard(["User:", "###"], ["ok ### then User: bye"])
    assert hit and "".join(out) == "ok "
    out, hit = _run_guard(["b", "a"], ["xaYb"])
    assert hit and "".join(out) == "x"


def test_no_stop_strings_passes_everything_through():
    pieces = ["Hel", "lo", " <", "/s>", "", "\n\n", "é"]
    for stops in ([], [""]):
        guard = _StopGuard(tuple(stops))
        assert [guard.push(p) for p in pieces] == [(p, False) for p in pieces]
        assert guard.flush() == ""


def _expected_cut(text: str, stops: list[str]) -> tuple[str, bool]:
    """Oracle: scan the text one character at a time (as a stream would see it) and cut before the
    first stop string to be completed; of several completed by the same character, the longest
    (it starts first). When no stop contains another, that is simply the earliest occurrence."""
    stops = [s for s in stops if s]
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            return text[: end - max(map(len, done))], True
    return text, False


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="ab\nS:", max_size=40),
    stops=st.lists(st.text(alphabet="ab\nS:", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=12),
)
def test_output_is_text_cut_before_first_stop(text, stops, cuts):
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    out, hit = _run_guard(stops, pieces)
    assert ("".join(out), hit) == _expected_cut(text, stops)
    # and it never emits text that could still turn out to be part of a stop string
    emitted = ""
    for piece_out in out:
        emitted += piece_out
        for s in stops:
            assert s not in emitted


def test_expected_cut_oracle_on_hand_cases():
    """The oracle itself, on cases worked out by hand."""
    assert _expected_cut("hello world", ["o w"]) == ("hell", True)
    assert _expected_cut("hello world", ["xyz"]) == ("hello world", False)
    assert _expected_cut("abcd", ["cd", "bc"]) == ("a", True)
    assert _expected_cut("abc", ["abc", "b"]) == ("a", True)  # "b" completes first
    assert _expected_cut("abc", ["bc", "abc"]) == ("", True)  # both complete at 'c': the longer
