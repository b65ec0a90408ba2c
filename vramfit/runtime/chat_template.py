"""Chat templates: render a GGUF's `tokenizer.chat_template` (Jinja) the way HF transformers does.

Templates come with downloaded models and are untrusted, so they run in jinja2's
`ImmutableSandboxedEnvironment`: no access to dunder attributes (an attempt is an error here, not an
empty string as in plain jinja), no mutation of the inputs. The
environment matches `transformers.utils.chat_template_utils` (`trim_blocks`, `lstrip_blocks`, the
`loopcontrols` extension, `raise_exception`, `strftime_now`, a `tojson` filter that keeps non-ASCII text,
and a `{% generation %}` block that just renders its body). Inputs are copied into plain JSON-like
values first so the template never sees caller objects.

Every failure (syntax, a `raise_exception` call, a sandbox violation, any render error) is raised as
`ChatTemplateError` with a one-line message.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Used when a model ships no `tokenizer.chat_template`.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class ChatTemplateError(ValueError):
    """A chat template that does not compile or fails while rendering."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(_one_line(message))


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _make_dict(*args: Any, **kwargs: Any) -> dict:
    """`dict(...)` for templates, without exposing the dict type itself."""
    return dict(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore-prefixed names (no reaching CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - same signature trick as jinja's
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with an underscore")


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (HF's assistant-mask marker): renders the body as is."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _Sandbox(ImmutableSandboxedEnvironment):
    """Immutable sandbox that fails loudly on unsafe attribute access (jinja's renders it as "")."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = _Sandbox(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    env.globals["dict"] = _make_dict
    return env


@lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
    """Compile (and cache) a chat template; a syntax error raises ChatTemplateError."""
    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(
            f"chat template syntax error, line {e.lineno}: {_one_line(e.message or '')}"
        ) from e


def _plain(value: Any) -> Any:
    """Copy of `value` made of JSON-like types only (other objects become "<TypeName>")."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (bool, str, int, float):  # subclasses (enums, numpy scalars) lose their extra methods
        if isinstance(value, base):
            return base(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        return _plain(value.item())
    return f"<{type(value).__name__}>"


def _drop_none(message: Mapping[str, Any]) -> dict[str, Any]:
    # APIs send `content: null` / `tool_calls: null`; templates handle a missing key better
    return {k: v for k, v in message.items() if v is not None}


def render_chat(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    **extra: Any,
) -> str:
    """Render `messages` (dicts with role/content, maybe tool_calls...) with the chat `template`.

    tools: JSON-schema tool definitions, passed to the template as `tools` (None when absent).
    extra: further template variables (e.g. `enable_thinking=False`, `documents=[...]`).
    """
    compiled = compile_template(template)
    variables = {
        "messages": [_drop_none(m) for m in _plain(list(messages))],
        "tools": _plain(list(tools)) if tools is not None else None,
        "add_generation_prompt": add_generation_prompt,
        "bos_token": bos_token,
        "eos_token": eos_token,
        **_plain(extra),
    }
    try:
        return compiled.render(**variables)
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template error: {_one_line(e.message or type(e).__name__)}") from e
    except Exception as e:  # the template is code: any failure inside it is a template failure
        raise ChatTemplateError(f"chat template error: {type(e).__name__}: {_one_line(str(e))}") from e


def template_from_metadata(metadata: Mapping[str, Any]) -> str:
    """The GGUF's `tokenizer.chat_template`, or the ChatML fallback when it has none."""
    template = metadata.get("tokenizer.chat_template")
    return template if isinstance(template, str) and template.strip() else CHATML_TEMPLATE
