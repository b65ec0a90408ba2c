"""Chat templates: the shipped models' real templates against transformers' own rendering, and the sandbox."""

from __future__ import annotations

import json
from datetime import datetime

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from tests.conftest import REFERENCE_MODELS, load_reference
from vramfit.runtime.chat_template import (
    CHATML_TEMPLATE,
    ChatTemplateError,
    render_chat,
    template_from_metadata,
)
from vramfit.runtime.tokenizer import Tokenizer

MODELS = list(REFERENCE_MODELS)

CONVERSATION = [
    {"role": "system", "content": "You are terse. Réponds en français si on te le demande."},
    {"role": "user", "content": "Hi! What's 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And in words, with an emoji? 🎉"},
]
NO_SYSTEM = CONVERSATION[1:]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Température actuelle d'une ville",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "Nom de la ville, e.g. Zürich"}},
            "required": ["city"],
        },
    },
}
TOOL_CONVERSATION = [
    {"role": "user", "content": "Quel temps fait-il à Zürich ?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}
        ],
    },
    {"role": "tool", "content": '{"temp_c": 21}'},
    {"role": "tool", "content": '{"humidity": 0.4}'},
]


def hf_render(template: str, messages, tools=None, add_generation_prompt=True, **kwargs) -> str:
    """The oracle: transformers' apply_chat_template renderer."""
    rendered, _ = render_jinja_template(
        conversations=[messages],
        tools=tools,
        chat_template=template,
        add_generation_prompt=add_generation_prompt,
        **kwargs,
    )
    return rendered[0]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("messages", [CONVERSATION, NO_SYSTEM], ids=["system", "no_system"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_real_templates_match_transformers(metadata, model, messages, add_generation_prompt):
    template = metadata(model)["tokenizer.chat_template"]
    ours = render_chat(template, messages, add_generation_prompt=add_generation_prompt)
    assert ours == hf_render(template, messages, add_generation_prompt=add_generation_prompt)
    assert "Réponds" in ours or messages is NO_SYSTEM
    assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt


def test_qwen_tools_match_transformers(metadata):
    template = metadata("qwen2.5-coder-0.5b")["tokenizer.chat_template"]
    ours = render_chat(template, TOOL_CONVERSATION, tools=[WEATHER_TOOL])
    assert ours == hf_render(template, TOOL_CONVERSATION, tools=[WEATHER_TOOL])
    assert "<tools>\n" + json.dumps(WEATHER_TOOL, ensure_ascii=False) + "\n</tools>" in ours
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>' in ours
    assert ours.count("<tool_response>") == 2


def test_rendered_chat_tokenizes_to_reference_ids(metadata):
    # the reference "chat" prompt is exactly what Qwen's template renders for this conversation
    model = "qwen2.5-coder-0.5b"
    meta, arrays = load_reference(model)
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    prompt = render_chat(metadata(model)["tokenizer.chat_template"], messages)
    assert prompt == meta["logits"]["chat"]["text"]
    tok = Tokenizer(metadata(model))
    assert tok.encode(prompt, special=True) == arrays["chat_ids"].tolist()


def test_bos_eos_and_extra_variables_reach_template():
    template = (
        "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}{{ eos_token }}{{ greeting }}"
    )
    messages = [{"role": "user", "content": "x"}]
    ours = render_chat(template, messages, bos_token="<s>", eos_token="</s>", greeting="hey")
    assert ours == "<s>x</s>hey"
    assert ours == hf_render(template, messages, bos_token="<s>", eos_token="</s>", greeting="hey")


def test_none_fields_are_dropped_like_transformers():
    template = (
        "{% for m in messages %}{{ m.role }}{% if m.tool_calls is defined %}+calls{% endif %};{% endfor %}"
    )
    messages = [{"role": "assistant", "content": "hi", "tool_calls": None}]
    assert render_chat(template, messages) == "assistant;"


def test_chatml_fallback():
    assert template_from_metadata({}) == CHATML_TEMPLATE
    assert template_from_metadata({"tokenizer.chat_template": "{{ 1 }}"}) == "{{ 1 }}"
    messages = [{"role": "user", "content": "hi"}]
    ours = render_chat(template_from_metadata({}), messages)
    assert ours == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert ours == hf_render(CHATML_TEMPLATE, messages)


def test_trim_and_lstrip_blocks_like_transformers():
    template = "  {% for m in messages %}\n  [{{ m.content }}]\n  {% endfor %}\n"
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    ours = render_chat(template, messages)
    assert ours == "  [a]\n  [b]\n"
    assert ours == hf_render(template, messages)


def test_tojson_keeps_unicode_and_takes_indent():
    value = {"ville": "Zürich", "n": [1, 2]}
    template = "{{ v | tojson }}|{{ v | tojson(indent=2) }}"
    ours = render_chat(template, [], v=value)
    assert ours == json.dumps(value, ensure_ascii=False) + "|" + json.dumps(
        value, ensure_ascii=False, indent=2
    )
    assert ours == hf_render(template, [], v=value)


def test_strftime_now():
    assert render_chat("{{ strftime_now('%Y') }}", []) == str(datetime.now().year)


def test_loop_controls_and_generation_block():
    template = (
        "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}"
    )
    messages = [{"role": "user", "content": c} for c in "abc"]
    assert render_chat(template, messages) == "ab" == hf_render(template, messages)


def test_raise_exception_becomes_chat_template_error():
    template = (
        "{% if messages[0].role != 'user' %}"
        "{{ raise_exception('Conversation roles must alternate\nuser/assistant') }}{% endif %}"
    )
    with pytest.raises(ChatTemplateError) as err:
        render_chat(template, [{"role": "assistant", "content": "x"}])
    assert str(err.value) == "Conversation roles must alternate user/assistant"
    assert render_chat(template, [{"role": "user", "content": "x"}]) == ""


def test_syntax_error_is_one_line():
    with pytest.raises(ChatTemplateError) as err:
        render_chat("{% for m in messages %}\n{{ m.content }\n", [])
    assert "syntax error" in str(err.value)
    assert "\n" not in str(err.value)


def test_render_error_is_chat_template_error():
    with pytest.raises(ChatTemplateError, match="chat template error"):
        render_chat("{{ messages[0].content + 1 }}", [{"role": "user", "content": "x"}])


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__ }}",
        "{{ messages.__class__.__subclasses__() }}",
        "{{ raise_exception.__globals__ }}",
        "{% set ns = namespace(_x=1) %}{{ ns._x }}",
        "{{ messages.append({'role': 'user'}) }}",
    ],
)
def test_sandbox_blocks_escapes(template):
    messages = [{"role": "user", "content": "x"}]
    with pytest.raises(ChatTemplateError):
        render_chat(template, messages)
    assert messages == [{"role": "user", "content": "x"}]


def test_caller_objects_are_not_exposed():
    class Secret:
        def reveal(self) -> str:
            return "leaked"

    out = render_chat(
        "{{ messages[0].content }}|{{ obj }}", [{"role": "user", "content": Secret()}], obj=Secret()
    )
    assert out == "<Secret>|<Secret>"
