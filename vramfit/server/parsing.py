"""Parse a model's streamed text into content, reasoning and tool calls (OpenAI's delta shape).

Formats, from the Qwen chat templates and their reference parsers:
- Hermes JSON (Qwen2.5, Qwen3): `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`
- Qwen3-Coder / Qwen3.5 XML: `<tool_call>\n<function=NAME>\n<parameter=P>\nvalue\n</parameter>\n
  </function>\n</tool_call>`, each value typed by the tool's JSON schema (a bare `<function=` block
  without the `<tool_call>` wrapper is accepted too)
- a bare `{"name": ..., "arguments": ...}` object as the whole start of the output (what small
  Qwen2.5 models write when they drop the tags), as llama.cpp's Hermes parser accepts it
- `<think>...</think>` becomes reasoning; a prompt that ends inside `<think>` starts in reasoning.

The parser is incremental: `feed(text)` returns the deltas that are certain so far (text that could be
the start of a tag is held back), `finish()` the rest. Non-streaming responses feed the whole text at
once, so both paths give the same result. A JSON call is announced when its closing tag arrives; an
XML call is announced at `<function=NAME>` and its arguments stream parameter by parameter.
A malformed JSON call comes back as plain content, never dropped.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
FUNC_OPEN, FUNC_CLOSE = "<function=", "</function>"
PARAM_OPEN, PARAM_CLOSE = "<parameter=", "</parameter>"


@dataclass
class Delta:
    """kind: "content" | "reasoning" | "tool_start" (index, id, name) | "tool_args" (index, text)."""

    kind: str
    text: str = ""
    index: int = 0
    id: str = ""
    name: str = ""


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""  # JSON text, complete once the call is closed

    def as_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass
class ParsedOutput:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def tool_format(chat_template: str) -> str:
    """ "xml" for templates that ask for Qwen3-Coder style calls, else "hermes"."""
    return "xml" if FUNC_OPEN in chat_template and "<parameter=" in chat_template else "hermes"


def forced_prefix(fmt: str, name: str | None) -> str:
    """Assistant-turn text that makes the model call a tool (`name`, or any with None)."""
    if name is None:
        return CALL_OPEN + "\n"
    if fmt == "xml":
        return f"{CALL_OPEN}\n{FUNC_OPEN}{name}>\n"
    return f'{CALL_OPEN}\n{{"name": {json.dumps(name)}, "arguments": '


def _hold(buf: str, markers: tuple[str, ...]) -> int:
    """Length of the longest suffix of buf that is a proper prefix of one of the markers."""
    best = 0
    for m in markers:
        for n in range(min(len(buf), len(m) - 1), best, -1):
            if m.startswith(buf[-n:]):
                best = n
                break
    return best


def _find_first(buf: str, markers: tuple[str, ...]) -> tuple[int, str]:
    hits = [(i, m) for m in markers if (i := buf.find(m)) >= 0]
    return min(hits) if hits else (-1, "")


class OutputParser:
    """Incremental parser for one completion. `tools`: the request's OpenAI tool list (for the
    schemas that type XML parameters); parse_tools=False leaves tool markup as content."""

    def __init__(
        self,
        tools: list[dict[str, Any]] | None = None,
        parse_tools: bool = True,
        in_think: bool = False,
        parallel: bool = True,
    ):
        self.schemas = _param_schemas(tools or [])
        self.parse_tools = parse_tools
        self.parallel = parallel
        self.state = "think" if in_think else "text"
        self.buf = ""
        self.wrapped = False  # the current XML call sits inside <tool_call>
        self.strip_content = False  # drop whitespace after </think> and between calls
        self.bare_ok = parse_tools  # nothing but whitespace written yet: a bare JSON call may follow
        self.calls: list[ToolCall] = []
        self.out = ParsedOutput()
        self._n_params = 0

    # -- public ---------------------------------------------------------------------------------------

    def feed(self, text: str) -> list[Delta]:
        self.buf += text
        deltas: list[Delta] = []
        while self.buf and self._step(deltas):
            pass
        return self._record(deltas)

    def finish(self) -> list[Delta]:
        """End of output: flush held-back text; close an unfinished call where it can be parsed."""
        deltas: list[Delta] = []
        buf, self.buf = self.buf, ""
        if self.state == "think":
            deltas.append(Delta("reasoning", buf))
        elif self.state == "text":
            self._content(deltas, buf)
        elif self.state == "call":
            self._close_json_call(deltas, buf, closed=False)
        elif self.state == "bare":
            if (parsed := self._bare_calls(buf)) is not None:
                self._emit_json_calls(deltas, parsed)
            else:
                self._content(deltas, buf)
        elif self.state in ("xml_body", "xml_head"):
            if self.state == "xml_body":
                self._xml_params(deltas, buf, final=True)
                self._end_xml(deltas)
            else:
                self._content(deltas, (CALL_OPEN + "\n" if self.wrapped else "") + FUNC_OPEN + buf)
        self.state = "done"
        return self._record([d for d in deltas if d.text or d.kind == "tool_start"])

    @property
    def result(self) -> ParsedOutput:
        self.out.tool_calls = self.calls
        return self.out

    # -- state machine --------------------------------------------------------------------------------

    def _step(self, deltas: list[Delta]) -> bool:
        """Consume what can be decided from self.buf; False when more text is needed."""
        return getattr(self, f"_on_{self.state}")(deltas)

    def _markers(self) -> tuple[str, ...]:
        return (THINK_OPEN, CALL_OPEN, FUNC_OPEN) if self.parse_tools else (THINK_OPEN,)

    def _on_text(self, deltas: list[Delta]) -> bool:
        if self.bare_ok:
            head = self.buf.lstrip()
            if not head:
                return False
            if head.startswith("{"):
                self.state = "bare"
                return True
            self.bare_ok = False
        i, m = _find_first(self.buf, self._markers())
        if i < 0:
            keep = _hold(self.buf, self._markers())
            self._content(deltas, self.buf[: len(self.buf) - keep])
            self.buf = self.buf[len(self.buf) - keep :]
            return False
        self._content(deltas, self.buf[:i])
        self.buf = self.buf[i + len(m) :]
        if m == THINK_OPEN:
            self.state = "think"
        elif m == CALL_OPEN:
            self.state, self.wrapped = "call", True
        else:
            self.state, self.wrapped = "xml_head", False
        return True

    def _on_bare(self, deltas: list[Delta]) -> bool:
        """Output that opens with `{"name": ...` (small Qwen2.5 models often drop the tags)."""
        head = self.buf.lstrip()
        rest = head[1:].lstrip()
        if not (rest.startswith('"name"') or '"name"'.startswith(rest)):
            self.state, self.bare_ok = "text", False
            return True
        try:
            _, end = json.JSONDecoder().raw_decode(head)
        except json.JSONDecodeError:
            return False  # incomplete (or broken: finish() then gives it back as content)
        if (parsed := self._bare_calls(head[:end])) is None:
            self.state, self.bare_ok = "text", False
            return True
        self._emit_json_calls(deltas, parsed)
        self.buf, self.state = head[end:], self._after_call()
        return True

    def _bare_calls(self, text: str) -> list[tuple[str, str]] | None:
        """Stricter than inside tags: an offered tool's name and an "arguments" key, else it is data."""
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            return None
        if not (isinstance(obj, dict) and obj.get("name") in self.schemas and "arguments" in obj):
            return None
        return _parse_json_calls(text)

    def _on_think(self, deltas: list[Delta]) -> bool:
        i = self.buf.find(THINK_CLOSE)
        if i < 0:
            keep = _hold(self.buf, (THINK_CLOSE,))
            deltas.append(Delta("reasoning", self.buf[: len(self.buf) - keep]))
            self.buf = self.buf[len(self.buf) - keep :]
            return False
        deltas.append(Delta("reasoning", self.buf[:i]))
        self.buf = self.buf[i + len(THINK_CLOSE) :]
        self.state, self.strip_content = "text", True
        return True

    def _on_call(self, deltas: list[Delta]) -> bool:
        body = self.buf.lstrip()
        if body.startswith(FUNC_OPEN):
            self.buf, self.state = body[len(FUNC_OPEN) :], "xml_head"
            return True
        if FUNC_OPEN.startswith(body) and body:
            return False  # could still become an XML call
        i = self.buf.find(CALL_CLOSE)
        if i < 0:
            return False
        body, self.buf = self.buf[:i], self.buf[i + len(CALL_CLOSE) :]
        self._close_json_call(deltas, body, closed=True)
        return True

    def _on_xml_head(self, deltas: list[Delta]) -> bool:
        i = self.buf.find(">")
        if i < 0:
            return False
        name, self.buf = self.buf[:i].strip(), self.buf[i + 1 :]
        self._start_call(deltas, name)
        self._n_params, self.state = 0, "xml_body"
        return True

    def _on_xml_body(self, deltas: list[Delta]) -> bool:
        i = self.buf.find(FUNC_CLOSE)
        if i < 0:
            self.buf = self._xml_params(deltas, self.buf, final=False)
            return False
        self._xml_params(deltas, self.buf[:i], final=True)
        self.buf = self.buf[i + len(FUNC_CLOSE) :]
        self._end_xml(deltas)
        return True

    def _on_xml_tail(self, deltas: list[Delta]) -> bool:
        body = self.buf.lstrip()
        if not body or (CALL_CLOSE.startswith(body) and body != CALL_CLOSE):
            return False
        if body.startswith(CALL_CLOSE):
            body = body[len(CALL_CLOSE) :]
        self.buf, self.state = body, self._after_call()
        return True

    def _on_done(self, deltas: list[Delta]) -> bool:
        self.buf = ""  # parallel_tool_calls=false: everything after the first call is dropped
        return False

    # -- pieces ---------------------------------------------------------------------------------------

    def _content(self, deltas: list[Delta], text: str) -> None:
        if self.strip_content:
            text = text.lstrip()
            if not text:
                return
            self.strip_content = False
        if text:
            deltas.append(Delta("content", text))
            self.bare_ok = self.bare_ok and not text.strip()

    def _start_call(self, deltas: list[Delta], name: str) -> ToolCall:
        call = ToolCall(new_call_id(), name)
        self.calls.append(call)
        deltas.append(Delta("tool_start", index=len(self.calls) - 1, id=call.id, name=name))
        return call

    def _args(self, deltas: list[Delta], text: str) -> None:
        self.calls[-1].arguments += text
        deltas.append(Delta("tool_args", text, index=len(self.calls) - 1))

    def _after_call(self) -> str:
        self.strip_content = True
        return "text" if self.parallel else "done"

    def _close_json_call(self, deltas: list[Delta], body: str, closed: bool) -> None:
        parsed = _parse_json_calls(body)
        if parsed is None:
            self.bare_ok = False
            self._content(deltas, CALL_OPEN + body + (CALL_CLOSE if closed else ""))
        else:
            self._emit_json_calls(deltas, parsed)
        self.state = self._after_call() if parsed else "text"

    def _emit_json_calls(self, deltas: list[Delta], parsed: list[tuple[str, str]]) -> None:
        for name, args in parsed[: None if self.parallel else 1]:
            self._start_call(deltas, name)
            self._args(deltas, args)

    def _xml_params(self, deltas: list[Delta], buf: str, final: bool) -> str:
        """Emit every complete parameter in buf; return the unconsumed rest."""
        while True:
            start = buf.find(PARAM_OPEN)
            head_end = buf.find(">", start) if start >= 0 else -1
            if head_end < 0:
                return buf
            name = buf[start + len(PARAM_OPEN) : head_end].strip()
            rest = buf[head_end + 1 :]
            j, m = _find_first(rest, (PARAM_CLOSE, PARAM_OPEN))
            if j < 0 and not final:
                return buf
            value = rest if j < 0 else rest[:j]
            buf = "" if j < 0 else rest[j + (len(m) if m == PARAM_CLOSE else 0) :]
            self._emit_param(deltas, name, _strip_newline(value))

    def _emit_param(self, deltas: list[Delta], name: str, raw: str) -> None:
        schema = self.schemas.get(self.calls[-1].name, {}).get(name)
        piece = (
            json.dumps(name, ensure_ascii=False)
            + ": "
            + json.dumps(typed_value(raw, schema), ensure_ascii=False)
        )
        self._args(deltas, ("{" if self._n_params == 0 else ", ") + piece)
        self._n_params += 1

    def _end_xml(self, deltas: list[Delta]) -> None:
        self._args(deltas, "}" if self._n_params else "{}")
        self.state = "xml_tail" if self.wrapped else self._after_call()

    def _record(self, deltas: list[Delta]) -> list[Delta]:
        merged: list[Delta] = []
        for d in deltas:
            if d.kind in ("content", "reasoning") and not d.text:
                continue
            if d.kind == "content":
                self.out.content += d.text
            elif d.kind == "reasoning":
                self.out.reasoning += d.text
            if merged and d.kind in ("content", "reasoning") and merged[-1].kind == d.kind:
                merged[-1] = Delta(d.kind, merged[-1].text + d.text)
            else:
                merged.append(d)
        return merged


def parse_output(text: str, tools=None, parse_tools: bool = True, in_think: bool = False) -> ParsedOutput:
    """Whole-text parse (the non-streaming path)."""
    p = OutputParser(tools, parse_tools, in_think)
    p.feed(text)
    p.finish()
    return p.result


# -- helpers --------------------------------------------------------------------------------------------


def _strip_newline(value: str) -> str:
    if value.startswith("\n"):
        value = value[1:]
    if value.endswith("\n"):
        value = value[:-1]
    return value


def _parse_json_calls(body: str) -> list[tuple[str, str]] | None:
    """[(name, arguments JSON)] from a Hermes call body (one object, several, or a list), or None."""
    dec, text, objs = json.JSONDecoder(), body.strip(), []
    try:
        while text:
            obj, end = dec.raw_decode(text)
            objs.extend(obj if isinstance(obj, list) else [obj])
            text = text[end:].lstrip()
    except json.JSONDecodeError:
        return None
    calls = []
    for obj in objs:
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):
            try:
                json.loads(args)
            except json.JSONDecodeError:
                args = json.dumps(args, ensure_ascii=False)
        else:
            args = json.dumps(args, ensure_ascii=False)
        calls.append((obj["name"], args))
    return calls or None


def _param_schemas(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """tool name -> {parameter name -> JSON schema}."""
    out = {}
    for t in tools:
        fn = t.get("function", t) if isinstance(t, dict) else {}
        props = (fn.get("parameters") or {}).get("properties") or {}
        if isinstance(fn.get("name"), str) and isinstance(props, dict):
            out[fn["name"]] = props
    return out


def _schema_types(schema: dict[str, Any] | None) -> list[str]:
    if not isinstance(schema, dict):
        return []
    t = schema.get("type")
    types = [t] if isinstance(t, str) else list(t) if isinstance(t, list) else []
    for key in ("anyOf", "oneOf"):
        for sub in schema.get(key) or []:
            types += _schema_types(sub)
    if "enum" in schema and not types:
        types.append("string")
    return types


def typed_value(raw: str, schema: dict[str, Any] | None) -> Any:
    """An XML parameter's text as the JSON value its schema asks for; text when it does not fit."""
    types = _schema_types(schema)
    if not types or "string" in types:
        return raw
    s = raw.strip()
    for t in types:
        if t == "integer":
            try:
                return int(s)
            except ValueError:
                try:
                    f = float(s)
                    if f.is_integer():
                        return int(f)
                except ValueError:
                    pass
        elif t == "number":
            try:
                f = float(s)
                return int(f) if f.is_integer() and "." not in s and "e" not in s.lower() else f
            except ValueError:
                pass
        elif t == "boolean" and s.lower() in ("true", "false"):
            return s.lower() == "true"
        elif t == "null" and s.lower() in ("null", "none"):
            return None
        elif t in ("object", "array"):
            try:
                v = json.loads(s)
                if isinstance(v, dict if t == "object" else list):
                    return v
            except json.JSONDecodeError:
                pass
    return raw
