"""The OpenAI-compatible server with a real model (smollm2-135m, context 256, 2 slots), driven over HTTP by
the official `openai` client (and httpx for raw bodies).

Oracles come from outside the server code: greedy outputs of one request are compared with the same
request streamed or cut by a stop string; logprobs with a fresh engine's logits; token counts with the
library tokenizer; cancellation with the server's slot and metrics counters.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from tests.server.conftest import CTX, MODEL, client_for, metrics, one_torch_thread, run_server, wait_until
from vramfit.runtime.engine import Engine
from vramfit.runtime.sampling import SamplingParams
from vramfit.server.app import create_app
from vramfit.server.serving import Serving

HI = [{"role": "user", "content": "Hi! Who are you?"}]
STORY = [{"role": "user", "content": "Write a long story about a dragon and a knight."}]
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def server(smol):
    serving = Serving(smol, MODEL, parallel=2)
    with run_server(create_app(serving)) as base:
        yield base, serving


@pytest.fixture(scope="module")
def base(server):
    return server[0]


@pytest.fixture(scope="module")
def client(base):
    return client_for(base)


@pytest.fixture
def empty_caches(server):
    """Returns a function that empties every slot's prompt cache (the server must be idle).

    Outputs compared for equality are produced from the same cache state: the CPU kernels compute a
    prefill tail of <= 8 tokens on another path than a longer one (logits differ by up to ~0.7), so
    a greedy output may change with how much of its prompt was cached."""
    serving = server[1]

    def empty() -> None:
        assert wait_until(lambda: serving.busy == 0)
        for slot in serving.slots:
            slot.engine.reset()

    return empty


def _prompt_ids(smol, messages) -> list[int]:
    return smol.tokenize(smol.render(messages), special=True)


# -- chat ------------------------------------------------------------------------------------------------


def test_chat_non_streaming(client, smol):
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=6, **GREEDY)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == MODEL
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(_prompt_ids(smol, HI))
    assert 1 <= r.usage.completion_tokens <= 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_stream_matches_non_stream_and_reports_usage_last(client, empty_caches):
    empty_caches()
    whole = client.chat.completions.create(model=MODEL, messages=STORY, max_tokens=8, **GREEDY)
    empty_caches()
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=STORY,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 8
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens
    assert len({c.id for c in chunks}) == 1


def test_stream_without_include_usage_has_no_usage(client):
    chunks = list(
        client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2, stream=True, **GREEDY)
    )
    assert all(c.usage is None for c in chunks) and all(c.choices for c in chunks)


def test_max_tokens_and_max_completion_tokens(client, empty_caches):
    empty_caches()
    a = client.chat.completions.create(model=MODEL, messages=STORY, max_tokens=3, **GREEDY)
    empty_caches()
    b = client.chat.completions.create(model=MODEL, messages=STORY, max_completion_tokens=4, **GREEDY)
    assert (a.usage.completion_tokens, a.choices[0].finish_reason) == (3, "length")
    assert (b.usage.completion_tokens, b.choices[0].finish_reason) == (4, "length")
    assert b.choices[0].message.content.startswith(a.choices[0].message.content)


def test_second_turn_reuses_the_first_from_cache(client, smol):
    first = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=5, **GREEDY)
    turn2 = HI + [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "Tell me more."},
    ]
    second = client.chat.completions.create(model=MODEL, messages=turn2, max_tokens=2, **GREEDY)
    cached = second.usage.prompt_tokens_details.cached_tokens
    n1 = len(_prompt_ids(smol, HI))
    # at least the whole first prompt (its last token is recomputed for its logits) comes from the cache
    assert n1 - 1 <= cached < second.usage.prompt_tokens
    assert second.usage.prompt_tokens == len(_prompt_ids(smol, turn2))


def test_ten_turn_conversation_prefills_only_new_tokens(client, empty_caches):
    empty_caches()
    messages: list[dict] = []
    previous = 0
    for turn in range(10):
        messages.append({"role": "user", "content": f"Turn {turn}: say a word."})
        r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, **GREEDY)
        cached = r.usage.prompt_tokens_details.cached_tokens
        if turn == 0:
            assert cached == 0
        else:  # everything the previous turn sent is reused (its last token is recomputed at most)
            assert cached >= previous - 1, (turn, cached, previous)
        previous = r.usage.prompt_tokens
        messages.append({"role": "assistant", "content": r.choices[0].message.content})
    assert previous < CTX


def test_stop_string_in_a_stream(client, empty_caches):
    empty_caches()
    base = client.chat.completions.create(model=MODEL, messages=STORY, max_tokens=12, **GREEDY)
    text = base.choices[0].message.content
    words = text.split()
    assert len(words) >= 4, text
    stop = " " + words[3]
    expected = text[: text.index(stop)]
    empty_caches()
    chunks = list(client.chat.completions.create(model=MODEL, messages=STORY, max_tokens=12, stop=[stop],
                                                 stream=True, **GREEDY))  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seed_makes_sampling_repeatable(client, empty_caches):
    kw = dict(
        model=MODEL,
        messages=STORY,
        max_tokens=6,
        temperature=1.0,
        top_p=1.0,
        extra_body={"top_k": 0, "min_p": 0.0},
    )
    empty_caches()
    a = client.chat.completions.create(seed=1234, **kw)
    empty_caches()
    b = client.chat.completions.create(seed=1234, **kw)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_logprobs_match_a_fresh_engine(client, smol):
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=3, logprobs=True, top_logprobs=3,
                                       **GREEDY)  # fmt: skip
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens
    assert "".join(e.token for e in entries) == r.choices[0].message.content
    for e in entries:  # greedy: the chosen token is the most likely one
        assert len(e.top_logprobs) == 3
        assert (e.token, e.logprob) == (e.top_logprobs[0].token, e.top_logprobs[0].logprob)
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob
        assert bytes(e.bytes).decode() == e.token
    ids = _prompt_ids(smol, HI)
    with one_torch_thread():
        ref = torch.log_softmax(Engine(smol.model).logits_all(ids)[-1], 0)
    assert entries[0].logprob == pytest.approx(float(ref.max()), abs=1e-3)
    assert [t.logprob for t in entries[0].top_logprobs] == pytest.approx(
        ref.topk(3).values.tolist(), abs=1e-3
    )


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "hobbies": {"type": "array", "items": {"type": "string"}},
        "pet": {"enum": ["cat", "dog", None]},
    },
    "required": ["name", "age", "hobbies", "pet"],
    "additionalProperties": False,
}


def test_json_schema_output_validates(client):
    messages = [{"role": "user", "content": "Describe a person as JSON with name, age, hobbies and pet."}]
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    r = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=150,
        response_format=rf,
        frequency_penalty=1.0,  # the 135M model otherwise loops on one hobby until max_tokens
        **GREEDY,
    )
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    person = json.loads(r.choices[0].message.content)
    assert set(person) == {"name", "age", "hobbies", "pet"}
    assert isinstance(person["name"], str) and type(person["age"]) is int
    assert isinstance(person["hobbies"], list) and all(isinstance(h, str) for h in person["hobbies"])
    assert person["pet"] in ("cat", "dog", None)


def test_json_object_output_parses(client):
    messages = [
        {"role": "user", "content": "Return a JSON object with a key 'color' set to your favourite color."}
    ]
    # greedy decoding of a 135M model can repeat a word for ever; a frequency penalty lets it close
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=80, frequency_penalty=1.0,
                                       response_format={"type": "json_object"}, **GREEDY)  # fmt: skip
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_bad_response_format_schema_is_400(client):
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "tuple"}}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HI, max_tokens=1, response_format=rf)
    assert e.value.body["param"] == "response_format" and "tuple" in e.value.body["message"]


# -- text completions ------------------------------------------------------------------------------------


def test_completion_stop_string_cuts_the_greedy_text(client, empty_caches):
    prompt = "1, 2, 3, 4, 5,"
    empty_caches()
    base = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, **GREEDY)
    text = base.choices[0].text
    assert " 8" in text, text
    empty_caches()
    cut = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, stop=[" 8"], **GREEDY)
    assert cut.choices[0].text == text[: text.index(" 8")]
    assert cut.choices[0].finish_reason == "stop"


def test_completion_stream_echo_and_legacy_logprobs(client, empty_caches):
    prompt = "The capital of France is"
    empty_caches()
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, logprobs=2, **GREEDY)
    lp = whole.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == whole.choices[0].text
    assert lp.text_offset[0] == 0 and all(
        max(t.values()) == v for t, v in zip(lp.top_logprobs, lp.token_logprobs, strict=True)
    )
    empty_caches()
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, echo=True, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))  # fmt: skip
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == prompt + whole.choices[0].text
    assert (
        chunks[-1].usage.completion_tokens == 4
        and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    )


def test_logit_bias_bans_and_forces_tokens(client, smol):
    prompt = "The capital of France is"
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, **GREEDY).choices[0].text
    (banned,) = smol.tokenize(first)
    (forced,) = smol.tokenize(" London")
    r = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=1, logit_bias={str(banned): -100}, **GREEDY
    )
    assert r.choices[0].text != first
    r = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=1, logit_bias={str(forced): 100}, **GREEDY
    )
    assert r.choices[0].text == " London"


# -- errors ----------------------------------------------------------------------------------------------


def test_prompt_longer_than_the_context(client, smol):
    messages = [{"role": "user", "content": "word " * 300}]
    n = len(_prompt_ids(smol, messages))
    assert n > CTX
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    assert e.value.status_code == 400
    err = e.value.body
    assert err["code"] == "context_length_exceeded" and err["type"] == "invalid_request_error"
    assert str(CTX) in err["message"] and str(n) in err["message"]


def test_lone_surrogate_in_a_message_is_answered(base):
    # valid JSON, but "\ud800" is half a UTF-16 pair: the text gets U+FFFD in its place, not a 500
    body = b'{"messages": [{"role": "user", "content": "hi \\ud800 there"}], "max_tokens": 2}'
    r = httpx.post(base + "/v1/chat/completions", content=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


def test_null_content_renders_as_empty(client):
    # an assistant turn that only called tools has "content": null; templates read message.content
    messages = [*HI, {"role": "assistant", "content": None}, {"role": "user", "content": "And?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    assert r.usage.completion_tokens == 2


def test_seed_outside_what_a_generator_takes_is_400(base):
    r = httpx.post(base + "/v1/chat/completions", json={"messages": HI, "seed": 2**70}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed"


def test_a_failing_generation_answers_500_and_frees_its_slot(base, server, monkeypatch):
    import vramfit.server.serving as serving_module

    def broken(*args, **kwargs):
        raise RuntimeError("sampler setup failed")

    monkeypatch.setattr(serving_module, "ApiSampler", broken)
    r = httpx.post(base + "/v1/chat/completions", json={"messages": HI, "max_tokens": 2}, timeout=30)
    assert r.status_code == 500 and "sampler setup failed" in r.json()["error"]["message"]
    monkeypatch.undo()
    assert wait_until(lambda: server[1].busy == 0)  # released, not stuck
    r = httpx.post(base + "/v1/chat/completions", json={"messages": HI, "max_tokens": 2}, timeout=30)
    assert r.status_code == 200


def test_malformed_json_and_schema_violations(base):
    r = httpx.post(base + "/v1/chat/completions", content=b'{"model": "x", "messages": [', timeout=30)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and "malformed JSON" in err["message"]
    assert "line 1, column 29" in err["message"]
    r = httpx.post(base + "/v1/chat/completions", json={"model": MODEL}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(base + "/v1/chat/completions", json={"messages": HI, "temperature": 7}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = httpx.post(base + "/v1/completions", content=b"[1, 2]", timeout=30)
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=1)
    assert e.value.body["code"] == "model_not_found"


def test_unknown_route_is_an_openai_error(base):
    r = httpx.get(base + "/v1/nothing", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"


# -- models, health, metrics, auth -----------------------------------------------------------------------


def test_models_lists_the_real_context(client):
    (card,) = client.models.list().data
    assert card.id == MODEL and card.context_length == CTX


def test_metrics_count_tokens(base, client):
    before = metrics(base)
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2, **GREEDY)
    after = metrics(base)
    assert (
        after["vramfit_prompt_tokens_total"] - before["vramfit_prompt_tokens_total"] == r.usage.prompt_tokens
    )
    delta_gen = after["vramfit_generation_tokens_total"] - before["vramfit_generation_tokens_total"]
    assert delta_gen == r.usage.completion_tokens
    cached = after["vramfit_cached_tokens_total"] - before["vramfit_cached_tokens_total"]
    assert cached == r.usage.prompt_tokens_details.cached_tokens
    assert after["vramfit_slots_total"] == 2 and after["vramfit_queue_depth"] == 0
    text = httpx.get(base + "/metrics", timeout=30).text
    assert 'vramfit_requests_total{endpoint="/v1/chat/completions",status="200"}' in text


def test_health_is_503_until_loaded(smol):
    release = threading.Event()

    def load():
        release.wait(30)
        return Serving(smol, MODEL)

    with run_server(create_app(load=load)) as url:
        r = httpx.get(url + "/health", timeout=30)
        assert (r.status_code, r.json()["status"]) == (503, "loading")
        with pytest.raises(openai.InternalServerError) as e:
            client_for(url).models.list()
        assert e.value.status_code == 503
        release.set()
        assert wait_until(lambda: httpx.get(url + "/health", timeout=30).status_code == 200)
        assert client_for(url).models.list().data[0].context_length == CTX


def test_api_key(server):
    _, serving = server
    with run_server(create_app(serving, api_key="sekret")) as url:
        with pytest.raises(openai.AuthenticationError) as e:
            client_for(url, "wrong").models.list()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        assert client_for(url, "sekret").models.list().data[0].id == MODEL
        assert httpx.get(url + "/v1/models", headers={"x-api-key": "sekret"}, timeout=30).status_code == 200
        assert httpx.get(url + "/health", timeout=30).status_code == 200


# -- concurrency and cancellation ------------------------------------------------------------------------


def test_concurrent_requests_on_two_slots_match_a_fresh_engine(client, smol, empty_caches):
    # distinct first words: any two of these prompts share only the system prefix, so every prefill
    # tail is long (see empty_caches) and the answers must equal those of a fresh engine
    prompts = [
        "Colors are everywhere around us. Name one color.",
        "Fruits are sweet and healthy. Name one fruit.",
        "Cities can be huge and busy. Name one city.",
        "Animals live in many places. Name one animal.",
    ]
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    expected = []
    with one_torch_thread():
        for messages in conversations:
            events = Engine(smol.model).generate(
                _prompt_ids(smol, messages), 3, SamplingParams(temperature=0)
            )
            expected.append(smol.detokenize([e.token for e in events]))

    def ask(messages: list[dict]) -> str:
        r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, **GREEDY)
        return r.choices[0].message.content

    empty_caches()
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(ask, conversations)) == expected


def _idle(base: str) -> bool:
    h = httpx.get(base + "/health", timeout=30).json()
    return h["slots_processing"] == 0


def test_client_disconnect_mid_stream_stops_generation(base, client):
    assert wait_until(lambda: _idle(base))
    before = metrics(base)
    stream = client.chat.completions.create(
        model=MODEL, messages=STORY, max_tokens=200, stream=True, **GREEDY
    )
    received = 0
    for chunk in stream:
        received += bool(chunk.choices and chunk.choices[0].delta.content)
        if received == 2:
            break
    stream.close()
    assert wait_until(
        lambda: metrics(base)["vramfit_cancelled_total"] == before["vramfit_cancelled_total"] + 1
    )
    assert wait_until(lambda: _idle(base))
    generated = metrics(base)["vramfit_generation_tokens_total"] - before["vramfit_generation_tokens_total"]
    assert 2 <= generated < 200


def test_client_timeout_on_a_non_streamed_request_stops_generation(base):
    assert wait_until(lambda: _idle(base))
    before = metrics(base)["vramfit_cancelled_total"]
    body = {"model": MODEL, "messages": STORY, "max_tokens": 200, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base + "/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
    assert wait_until(lambda: metrics(base)["vramfit_cancelled_total"] == before + 1)
    assert wait_until(lambda: _idle(base))


def test_sse_lines_are_json_then_done(base):
    body = {"model": MODEL, "messages": HI, "max_tokens": 2, "temperature": 0, "stream": True}
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(ln.removeprefix("data: ")) for ln in lines[:-1]]
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
