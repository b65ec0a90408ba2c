"""Tool-call and reasoning parsers on crafted model outputs (Hermes JSON and Qwen3-Coder XML), whole
and streamed piece by piece. Expected values are written out by hand from the formats' definitions."""

from __future__ import annotations

import json

import pytest

from vramfit.server.parsing import OutputParser, forced_prefix, parse_output, tool_format, typed_value

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "metric": {"type": "boolean"},
                "ratio": {"type": "number"},
                "opts": {"type": "object"},
                "tags": {"type": "array"},
                "limit": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
            },
        },
    },
}
TOOLS = [WEATHER, {"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}]

HERMES_ONE = (
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
)
HERMES_TWO = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>\n'
    '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'
)
XML_ONE = (
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nNew York\n</parameter>\n"
    "<parameter=days>\n3\n</parameter>\n<parameter=metric>\ntrue\n</parameter>\n"
    '<parameter=ratio>\n0.5\n</parameter>\n<parameter=opts>\n{"unit": "C"}\n</parameter>\n'
    '<parameter=tags>\n["a", "b"]\n</parameter>\n<parameter=limit>\nnull\n</parameter>\n'
    "</function>\n</tool_call>"
)
XML_ONE_ARGS = {
    "city": "New York",
    "days": 3,
    "metric": True,
    "ratio": 0.5,
    "opts": {"unit": "C"},
    "tags": ["a", "b"],
    "limit": None,
}


def _args(call) -> dict:
    return json.loads(call.arguments)


def _stream(text: str, step: int = 1, **kw):
    """Feed `text` in pieces of `step` characters; return (all deltas, parser)."""
    p = OutputParser(kw.pop("tools", TOOLS), **kw)
    deltas = []
    for i in range(0, len(text), step):
        deltas += p.feed(text[i : i + step])
    deltas += p.finish()
    return deltas, p


def _rebuild(deltas) -> tuple[str, str, list[dict]]:
    """Reassemble content, reasoning and calls from deltas the way an OpenAI client does."""
    content, reasoning, calls = "", "", {}
    for d in deltas:
        if d.kind == "content":
            content += d.text
        elif d.kind == "reasoning":
            reasoning += d.text
        elif d.kind == "tool_start":
            assert d.index not in calls, "id and name must come once per call"
            calls[d.index] = {"id": d.id, "name": d.name, "arguments": ""}
        else:
            calls[d.index]["arguments"] += d.text
    return content, reasoning, [calls[i] for i in sorted(calls)]


def test_plain_text_is_content():
    out = parse_output("Hello, world. 1 < 2 and x<y.", TOOLS)
    assert (out.content, out.reasoning, out.tool_calls) == ("Hello, world. 1 < 2 and x<y.", "", [])


def test_hermes_single_call_with_leading_text():
    out = parse_output(HERMES_ONE, TOOLS)
    assert out.content == "Let me check.\n"
    assert [(c.name, _args(c)) for c in out.tool_calls] == [("get_weather", {"city": "Paris"})]
    assert out.tool_calls[0].id.startswith("call_")


def test_hermes_parallel_calls_get_distinct_ids():
    out = parse_output(HERMES_TWO, TOOLS)
    assert [(c.name, _args(c)) for c in out.tool_calls] == [
        ("get_weather", {"city": "Paris", "days": 2}),
        ("now", {}),
    ]
    assert out.tool_calls[0].id != out.tool_calls[1].id
    assert out.content == ""


def test_hermes_malformed_json_stays_content():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>'
    out = parse_output(text, TOOLS)
    assert out.tool_calls == []
    assert out.content == text


def test_hermes_missing_name_stays_content():
    text = '<tool_call>{"arguments": {}}</tool_call>'
    out = parse_output(text, TOOLS)
    assert (out.content, out.tool_calls) == (text, [])


def test_hermes_unterminated_at_end_of_output():
    ok = parse_output('<tool_call>\n{"name": "now", "arguments": {}}\n', TOOLS)
    assert [(c.name, _args(c)) for c in ok.tool_calls] == [("now", {})]
    cut = parse_output('<tool_call>\n{"name": "now", "argu', TOOLS)
    assert cut.tool_calls == []
    assert cut.content == '<tool_call>\n{"name": "now", "argu'


def test_hermes_arguments_given_as_a_json_string():
    out = parse_output('<tool_call>{"name": "now", "arguments": "{\\"tz\\": \\"UTC\\"}"}</tool_call>', TOOLS)
    assert _args(out.tool_calls[0]) == {"tz": "UTC"}


def test_bare_json_call_at_the_start_of_the_output():
    out = parse_output('\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n', TOOLS)
    assert [(c.name, _args(c)) for c in out.tool_calls] == [("get_weather", {"city": "Paris"})]
    assert out.content == ""


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "Bob", "age": 3}',  # data, not a call: no arguments, not a tool's name
        '{"name": "unknown_tool", "arguments": {}}',
        'Sure: {"name": "now", "arguments": {}}',  # not at the start
        '{"name": "now", "arguments": {',  # cut off
        '{"city": "Paris"}',
    ],
)
def test_bare_json_that_is_not_a_call_stays_content(text):
    out = parse_output(text, TOOLS)
    assert (out.content, out.tool_calls) == (text, [])


def test_xml_call_values_typed_by_schema():
    out = parse_output("Checking.\n" + XML_ONE, TOOLS)
    assert out.content == "Checking.\n"
    assert [(c.name, _args(c)) for c in out.tool_calls] == [("get_weather", XML_ONE_ARGS)]


def test_xml_value_that_does_not_fit_its_type_stays_text():
    text = "<tool_call>\n<function=get_weather>\n<parameter=days>\nthree\n</parameter>\n"
    text += "</function>\n</tool_call>"
    assert _args(parse_output(text, TOOLS).tool_calls[0]) == {"days": "three"}


def test_xml_without_wrapper_and_without_parameter_close():
    text = "<function=get_weather>\n<parameter=city>\nOslo\n<parameter=days>\n2\n</function>\nDone."
    out = parse_output(text, TOOLS)
    assert [(c.name, _args(c)) for c in out.tool_calls] == [("get_weather", {"city": "Oslo", "days": 2})]
    assert out.content == "Done."


def test_xml_multiline_string_value_keeps_inner_newlines():
    text = "<tool_call>\n<function=now>\n<parameter=code>\nline1\n\nline2\n</parameter>\n"
    text += "</function>\n</tool_call>"
    assert _args(parse_output(text, TOOLS).tool_calls[0]) == {"code": "line1\n\nline2"}


def test_xml_unterminated_function_keeps_complete_parameters():
    text = "<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n<parameter=da"
    out = parse_output(text, TOOLS)
    assert [(c.name, _args(c)) for c in out.tool_calls] == [("get_weather", {"city": "Rome"})]


def test_think_becomes_reasoning():
    out = parse_output("<think>\nThe user wants 4.\n</think>\n\nThe answer is 4.", TOOLS)
    assert out.reasoning == "\nThe user wants 4.\n"
    assert out.content == "The answer is 4."


def test_prompt_ending_inside_think():
    out = parse_output("step one</think>Answer", TOOLS, in_think=True)
    assert (out.reasoning, out.content) == ("step one", "Answer")


def test_think_then_tool_call():
    out = parse_output("<think>need weather</think>\n" + HERMES_ONE, TOOLS)
    assert out.reasoning == "need weather"
    assert out.content == "Let me check.\n"
    assert out.tool_calls[0].name == "get_weather"


def test_tool_markup_is_content_when_tools_are_off():
    out = parse_output(HERMES_ONE, None, parse_tools=False)
    assert (out.content, out.tool_calls) == (HERMES_ONE, [])


def test_parallel_false_keeps_the_first_call_only():
    p = OutputParser(TOOLS, parallel=False)
    p.feed(HERMES_TWO)
    p.finish()
    assert [c.name for c in p.result.tool_calls] == ["get_weather"]


BARE = '{"name": "get_weather", "arguments": {"city": "Oslo"}}\n{"name": "now", "arguments": {}}'


@pytest.mark.parametrize(
    "text", [HERMES_ONE, HERMES_TWO, XML_ONE, BARE, '{"name": "Bob"} x', "<think>a<b</think>x<tool" + "box>"]
)
@pytest.mark.parametrize("step", [1, 2, 7])
def test_streamed_deltas_rebuild_the_whole_text_parse(text, step):
    deltas, _ = _stream(text, step)
    whole = parse_output(text, TOOLS)
    content, reasoning, calls = _rebuild(deltas)
    assert (content, reasoning) == (whole.content, whole.reasoning)
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        (c.name, _args(c)) for c in whole.tool_calls
    ]


def test_streamed_parallel_calls_have_indices_and_one_header_each():
    deltas, _ = _stream(HERMES_TWO, 3)
    starts = [(d.index, d.name) for d in deltas if d.kind == "tool_start"]
    assert starts == [(0, "get_weather"), (1, "now")]
    ids = {d.id for d in deltas if d.kind == "tool_start"}
    assert len(ids) == 2
    assert all(d.id == "" and d.name == "" for d in deltas if d.kind == "tool_args")


def test_streamed_content_never_shows_part_of_a_tag():
    p = OutputParser(TOOLS)
    assert [d.text for d in p.feed("Hello <tool")] == ["Hello "]
    assert [(d.kind, d.text) for d in p.feed("box> ok")] == [("content", "<toolbox> ok")]
    assert p.feed("<tool_ca") == []


def test_xml_arguments_stream_before_the_call_closes():
    p = OutputParser(TOOLS)
    first = p.feed("<tool_call>\n<function=get_weather>\n<parameter=city>\nLima\n</parameter>\n")
    assert [(d.kind, d.name, d.text) for d in first] == [
        ("tool_start", "get_weather", ""),
        ("tool_args", "", '{"city": "Lima"'),
    ]
    rest = p.feed("</function>\n</tool_call>") + p.finish()
    assert [(d.kind, d.text) for d in rest] == [("tool_args", "}")]
    assert _args(p.result.tool_calls[0]) == {"city": "Lima"}


def test_forced_prefixes_parse_with_the_model_continuation():
    hermes = OutputParser(TOOLS)
    hermes.feed(forced_prefix("hermes", "get_weather"))
    hermes.feed('{"city": "Kyiv"}}\n</tool_call>')
    hermes.finish()
    assert [(c.name, _args(c)) for c in hermes.result.tool_calls] == [("get_weather", {"city": "Kyiv"})]
    xml = OutputParser(TOOLS)
    head = xml.feed(forced_prefix("xml", "now"))
    assert [(d.kind, d.name) for d in head] == [("tool_start", "now")]
    xml.feed("</function>\n</tool_call>")
    xml.finish()
    assert _args(xml.result.tool_calls[0]) == {}


def test_tool_format_from_template():
    assert tool_format("... <function=example_function_name>\n<parameter=example_parameter_1> ...") == "xml"
    assert tool_format('<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}') == "hermes"


@pytest.mark.parametrize(
    "raw, schema, expected",
    [
        ("42", {"type": "integer"}, 42),
        ("4.0", {"type": "integer"}, 4),
        ("abc", {"type": "integer"}, "abc"),
        ("3.5", {"type": "number"}, 3.5),
        ("TRUE", {"type": "boolean"}, True),
        ("false", {"type": ["boolean", "null"]}, False),
        ('{"a": 1}', {"type": "object"}, {"a": 1}),
        ("[1, 2]", {"type": "array"}, [1, 2]),
        ("[1, 2]", {"type": "object"}, "[1, 2]"),
        ("null", {"anyOf": [{"type": "integer"}, {"type": "null"}]}, None),
        ("7", {"type": "string"}, "7"),
        ("7", None, "7"),
    ],
)
def test_typed_value(raw, schema, expected):
    assert typed_value(raw, schema) == expected
