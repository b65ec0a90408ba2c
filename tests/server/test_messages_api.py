"""Anthropic-style /v1/messages over HTTP (httpx): a real model (smollm2-135m) for text, stop sequences,
usage and streaming events; a scripted engine for tool_use and thinking blocks."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.server.conftest import MODEL, ScriptedEngine, run_server, wait_until
from tests.server.test_tools_server import HERMES_TWO, TOOLS
from vramfit.server.app import create_app
from vramfit.server.serving import Serving

SYSTEM = "You are a helpful assistant."
HELLO = [{"role": "user", "content": "Write a long story about a dragon and a knight."}]
ANTHROPIC_TOOLS = [
    {"name": t["function"]["name"], "description": "", "input_schema": t["function"]["parameters"]}
    for t in TOOLS
]


@pytest.fixture(scope="module")
def server(smol):
    serving = Serving(smol, MODEL)
    with run_server(create_app(serving)) as base:
        yield base, serving


def _post(base: str, body: dict) -> httpx.Response:
    return httpx.post(base + "/v1/messages", json=body, timeout=120)


def _events(base: str, body: dict) -> list[tuple[str, dict]]:
    with httpx.stream("POST", base + "/v1/messages", json=body | {"stream": True}, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode()
    out = []
    for block in text.strip().split("\n\n"):
        kind, data = block.split("\n")
        assert kind.startswith("event: ") and data.startswith("data: ")
        payload = json.loads(data.removeprefix("data: "))
        assert payload["type"] == kind.removeprefix("event: ")
        out.append((payload["type"], payload))
    return out


def _empty(serving: Serving) -> None:
    """Same cache state for outputs compared for equality (see test_openai_api.empty_caches)."""
    assert wait_until(lambda: serving.busy == 0)
    for slot in serving.slots:
        slot.engine.reset()


def _scripted(serving: Serving, pieces: list[str]) -> ScriptedEngine:
    serving.slots[0].engine = engine = ScriptedEngine(pieces)
    return engine


@pytest.fixture
def real(server):
    base, serving = server
    engine = serving.slots[0].engine
    yield base, serving
    serving.slots[0].engine = engine


def test_text_message_and_usage(real, smol):
    base, serving = real
    body = {"model": MODEL, "max_tokens": 5, "system": SYSTEM, "messages": HELLO, "temperature": 0}
    r = _post(base, body)
    assert r.status_code == 200
    m = r.json()
    assert (m["type"], m["role"], m["model"]) == ("message", "assistant", MODEL)
    assert [b["type"] for b in m["content"]] == ["text"] and m["content"][0]["text"]
    assert (m["stop_reason"], m["stop_sequence"]) == ("max_tokens", None)
    n = len(smol.tokenize(smol.render([{"role": "system", "content": SYSTEM}] + HELLO), special=True))
    u = m["usage"]
    assert u["input_tokens"] + u["cache_read_input_tokens"] == n and u["output_tokens"] == 5


def test_stream_events_match_the_message(real):
    base, serving = real
    body = {"model": MODEL, "max_tokens": 6, "messages": HELLO, "temperature": 0}
    _empty(serving)
    whole = _post(base, body).json()
    _empty(serving)
    events = _events(base, body)
    kinds = [k for k, _ in events]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) == {"content_block_delta"}
    text = "".join(e["delta"]["text"] for k, e in events if k == "content_block_delta")
    assert text == whole["content"][0]["text"]
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] == "max_tokens" and delta["usage"]["output_tokens"] == 6


def test_stop_sequences(real):
    base, serving = real
    body = {"model": MODEL, "max_tokens": 12, "messages": HELLO, "temperature": 0}
    _empty(serving)
    text = _post(base, body).json()["content"][0]["text"]
    words = text.split()
    assert len(words) >= 4, text
    stop = " " + words[3]
    _empty(serving)
    m = _post(base, body | {"stop_sequences": [stop, "never appears"]}).json()
    assert m["content"][0]["text"] == text[: text.index(stop)]
    assert (m["stop_reason"], m["stop_sequence"]) == ("stop_sequence", stop)


def test_count_tokens(real, smol):
    base, _ = real
    body = {"model": MODEL, "system": SYSTEM, "messages": HELLO}
    r = httpx.post(base + "/v1/messages/count_tokens", json=body, timeout=60)
    n = len(smol.tokenize(smol.render([{"role": "system", "content": SYSTEM}] + HELLO), special=True))
    assert r.json() == {"input_tokens": n}


def test_errors_in_anthropic_shape(real):
    base, _ = real
    r = _post(base, {"model": MODEL, "messages": HELLO})  # no max_tokens
    assert r.status_code == 400
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in r.json()["error"]["message"]
    r = _post(base, {"model": "claude-opus", "max_tokens": 4, "messages": HELLO})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.post(base + "/v1/messages", content=b"{nope", timeout=60)
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]


def test_tool_use_blocks(real):
    base, serving = real
    body = {"model": MODEL, "max_tokens": 50, "messages": HELLO, "tools": ANTHROPIC_TOOLS}
    _scripted(serving, HERMES_TWO)
    m = _post(base, body).json()
    assert m["stop_reason"] == "tool_use"
    assert [b["type"] for b in m["content"]] == ["text", "tool_use", "tool_use"]
    assert m["content"][0]["text"] == "I will check.\n"
    uses = m["content"][1:]
    assert [(b["name"], b["input"]) for b in uses] == [
        ("get_weather", {"city": "Paris", "days": 2}),
        ("now", {}),
    ]
    assert all(b["id"].startswith("toolu_") for b in uses) and uses[0]["id"] != uses[1]["id"]


def test_tool_use_streamed(real):
    base, serving = real
    body = {"model": MODEL, "max_tokens": 50, "messages": HELLO, "tools": ANTHROPIC_TOOLS}
    _scripted(serving, HERMES_TWO)
    events = _events(base, body)
    starts = [e["content_block"] for k, e in events if k == "content_block_start"]
    assert [(b["type"], b.get("name")) for b in starts] == [("text", None), ("tool_use", "get_weather"),
                                                            ("tool_use", "now")]  # fmt: skip
    partial: dict[int, str] = {}
    for k, e in events:
        if k == "content_block_delta" and e["delta"]["type"] == "input_json_delta":
            partial[e["index"]] = partial.get(e["index"], "") + e["delta"]["partial_json"]
    assert {i: json.loads(v) for i, v in partial.items()} == {1: {"city": "Paris", "days": 2}, 2: {}}
    stops = [e["index"] for k, e in events if k == "content_block_stop"]
    assert stops == [0, 1, 2]
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_tool_result_round_trip_reaches_the_prompt(real, smol):
    base, serving = real
    engine = _scripted(serving, ["It is sunny in Paris."])
    messages = HELLO + [
        {"role": "assistant", "content": [
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
        ]},
    ]  # fmt: skip
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny, 21 C"}
    messages.append({"role": "user", "content": [result]})
    m = _post(base, {"model": MODEL, "max_tokens": 20, "messages": messages, "tools": ANTHROPIC_TOOLS}).json()
    assert m["content"] == [{"type": "text", "text": "It is sunny in Paris."}]
    assert m["stop_reason"] == "end_turn"
    assert "sunny, 21 C" in smol.detokenize(engine.prompts[-1])


def test_thinking_block(real):
    base, serving = real
    _scripted(serving, ["<think>sky check</think>", "\n\nSunny."])
    m = _post(base, {"model": MODEL, "max_tokens": 20, "messages": HELLO}).json()
    assert m["content"] == [
        {"type": "thinking", "thinking": "sky check", "signature": ""},
        {"type": "text", "text": "Sunny."},
    ]
