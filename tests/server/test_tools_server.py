"""Tool calls, tool_choice and reasoning through the whole server path (HTTP, openai client), with the
slot's engine replaced by a scripted one that "generates" given text pieces, so the expected calls are
known; and one real loop with Qwen2.5-Coder-0.5B, which is offered a tool, gets the result back and
answers, non-streamed and streamed."""

from __future__ import annotations

import json
import threading

import openai
import pytest

from tests.server.conftest import MODEL, ScriptedEngine, client_for, run_server
from vramfit.server.app import create_app
from vramfit.server.serving import Serving

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "metric": {"type": "boolean"},
            },
            "required": ["city"],
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, CLOCK]
ASK = [{"role": "user", "content": "Weather in Paris and the time?"}]

HERMES_TWO = [
    "I will check.",
    "\n<tool_",
    'call>\n{"name": "get_weather", "arg',
    'uments": {"city": "Paris", "days": 2}}\n</tool_call>\n<tool_call>\n{"name": "now", ',
    '"arguments": {}}\n</tool_call>',
]
XML_ONE = [
    "<tool_call>\n<function=get",
    "_weather>\n<parameter=city>\nSão Paulo\n</param",
    "eter>\n<parameter=days>\n3\n</parameter>\n<parameter=metric>\nfalse\n</parameter>\n</function>\n</tool_call>",
]


@pytest.fixture(scope="module")
def scripted(smol):
    serving = Serving(smol, MODEL)
    with run_server(create_app(serving)) as base:
        client = client_for(base)

        def script(pieces: list[str]) -> ScriptedEngine:
            serving.slots[0].engine = engine = ScriptedEngine(pieces)
            return engine

        script.serving = serving
        yield client, script


def _chunks(client, **kw) -> list:
    return list(client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, stream=True, **kw))


def _calls_from_chunks(chunks) -> list[dict]:
    """Rebuild tool calls from stream deltas, checking OpenAI's shape on the way."""
    calls: dict[int, dict] = {}
    for c in chunks:
        for tc in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            if tc.index not in calls:  # the first delta of a call: id, type and name, once
                assert tc.id and tc.type == "function" and tc.function.name
                calls[tc.index] = {
                    "id": tc.id,
                    "name": tc.function.name,
                    "arguments": tc.function.arguments or "",
                }
            else:
                assert tc.id is None and tc.function.name is None
                calls[tc.index]["arguments"] += tc.function.arguments or ""
    assert sorted(calls) == list(range(len(calls)))
    return [calls[i] for i in sorted(calls)]


def test_hermes_calls_non_streamed(scripted):
    client, script = scripted
    script(HERMES_TWO)
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "I will check.\n"
    calls = choice.message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "days": 2}),
        ("now", {}),
    ]
    assert all(c.id.startswith("call_") and c.type == "function" for c in calls)
    assert calls[0].id != calls[1].id


def test_hermes_calls_streamed_in_openai_delta_shape(scripted):
    client, script = scripted
    script(HERMES_TWO)
    chunks = _chunks(client)
    calls = _calls_from_chunks(chunks)
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris", "days": 2}),
        ("now", {}),
    ]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "I will check.\n"
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["tool_calls"]


def test_openai_stream_helper_accumulates_the_calls(scripted):
    client, script = scripted
    script(HERMES_TWO)
    with client.chat.completions.stream(model=MODEL, messages=ASK, tools=TOOLS) as stream:
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "days": 2}),
        ("now", {}),
    ]


def test_xml_call_typed_by_schema_streamed_and_not(scripted):
    client, script = scripted
    expected = [("get_weather", {"city": "São Paulo", "days": 3, "metric": False})]
    script(XML_ONE)
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS)
    assert [
        (c.function.name, json.loads(c.function.arguments)) for c in r.choices[0].message.tool_calls
    ] == expected
    assert r.choices[0].message.content is None
    script(XML_ONE)
    calls = _calls_from_chunks(_chunks(client))
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == expected


def test_reasoning_content(scripted):
    client, script = scripted
    pieces = ["<thi", "nk>\nParis is in France.", "\n</th", "ink>\n\nIt is sunny."]
    script(pieces)
    r = client.chat.completions.create(model=MODEL, messages=ASK)
    message = r.choices[0].message
    assert message.reasoning_content == "\nParis is in France.\n"
    assert message.content == "It is sunny."
    script(pieces)
    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "\nParis is in France.\n"
    assert "".join(d.content or "" for d in deltas) == "It is sunny."


def test_tool_choice_none_leaves_markup_as_content(scripted):
    client, script = scripted
    script(HERMES_TWO)
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none")
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].message.content == "".join(HERMES_TWO)
    assert r.choices[0].finish_reason == "stop"


def test_named_tool_choice_forces_the_call(scripted, smol):
    client, script = scripted
    engine = script(['{"city": "Lyon"}}', "\n</tool_call>"])
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice)
    prompt = smol.detokenize(engine.prompts[-1])
    assert prompt.endswith('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": ')
    calls = r.choices[0].message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Lyon"})
    ]
    engine = script(['{"city": "Lyon"}}', "\n</tool_call>"])
    stream_calls = _calls_from_chunks(_chunks(client, tool_choice=choice))
    assert [(c["name"], json.loads(c["arguments"])) for c in stream_calls] == [
        ("get_weather", {"city": "Lyon"})
    ]


def test_required_tool_choice_opens_a_call(scripted, smol):
    client, script = scripted
    engine = script(['{"name": "now", "arguments": {}}\n</tool_call>'])
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required")
    assert smol.detokenize(engine.prompts[-1]).endswith("<|im_start|>assistant\n<tool_call>\n")
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["now"]


def test_parallel_tool_calls_false_keeps_one(scripted):
    client, script = scripted
    script(HERMES_TWO)
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, parallel_tool_calls=False)
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["get_weather"]


def test_bad_tool_choice_is_400(scripted):
    client, _ = scripted
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )
    assert "nope" in e.value.body["message"]


# -- a real model ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen_client():
    import vramfit

    serving = Serving(vramfit.load("qwen2.5-coder-0.5b", n_ctx=512), "qwen2.5-coder-0.5b")
    with run_server(create_app(serving)) as base:
        yield client_for(base)


def _weather(city: str) -> str:
    return json.dumps({"city": city, "temperature_c": 21, "sky": "sunny"})


@pytest.mark.parametrize("stream", [False, True])
def test_qwen_tool_loop(qwen_client, stream):
    """The model asks for the weather, the client runs the tool and sends the result back."""
    tools = [WEATHER]
    messages = [{"role": "user", "content": "What is the weather in Paris right now?"}]
    kw = dict(model="qwen2.5-coder-0.5b", tools=tools, temperature=0, max_tokens=40)
    if stream:
        chunks = list(qwen_client.chat.completions.create(messages=messages, stream=True, **kw))
        calls = _calls_from_chunks(chunks)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
    else:
        choice = qwen_client.chat.completions.create(messages=messages, **kw).choices[0]
        calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                 for c in choice.message.tool_calls or []]  # fmt: skip
        finish = [choice.finish_reason]
    assert finish == ["tool_calls"]
    assert [c["name"] for c in calls] == ["get_weather"]
    args = json.loads(calls[0]["arguments"])
    assert args["city"].startswith("Paris")
    call = {"id": calls[0]["id"], "type": "function",
            "function": {"name": "get_weather", "arguments": calls[0]["arguments"]}}  # fmt: skip
    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    messages.append({"role": "tool", "tool_call_id": calls[0]["id"], "content": _weather(args["city"])})
    second = qwen_client.chat.completions.create(messages=messages, **kw)
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    message = second.choices[0].message
    assert message.content or message.tool_calls


class HeldEngine(ScriptedEngine):
    """Yields its first piece, then holds the slot until released (at most 30 s)."""

    def __init__(self, pieces: list[str]):
        super().__init__(pieces)
        self.release = threading.Event()

    def generate(self, prompt, max_tokens, params, stats=None, **kw):
        for i, event in enumerate(super().generate(prompt, max_tokens, params, stats=stats, **kw)):
            if i == 1:
                self.release.wait(30)
            yield event


def test_overload_is_503_when_no_slot_is_free_and_the_queue_is_full(scripted):
    client, script = scripted
    serving = script.serving
    engine = serving.slots[0].engine = HeldEngine(["one", " two"])
    serving.max_queue = 0
    try:
        stream = client.chat.completions.create(model=MODEL, messages=ASK, stream=True)
        first = next(iter(stream))  # the role chunk: the request holds the only slot now
        assert first.choices[0].delta.role == "assistant"
        with pytest.raises(openai.InternalServerError) as e:
            client.chat.completions.create(model=MODEL, messages=ASK)
        assert e.value.status_code == 503 and e.value.body["code"] == "overloaded"
        engine.release.set()
        rest = "".join(c.choices[0].delta.content or "" for c in stream)
        assert rest == "one two"
    finally:
        engine.release.set()
        serving.max_queue = 256
