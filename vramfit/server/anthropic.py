"""Anthropic-style `/v1/messages` (and `/v1/messages/count_tokens`) for agents that speak that API.

A Messages request is translated into the OpenAI chat request the rest of the server runs: `system`
becomes a system message, `tool_use` blocks become assistant tool calls, `tool_result` blocks become
tool messages, `tools[].input_schema` becomes function parameters, tool_choice auto/any/tool/none maps
to auto/required/named/none. The output parser's deltas become content blocks (thinking, text,
tool_use), streamed as message_start, content_block_start/delta/stop, message_delta, message_stop.
Errors use Anthropic's shape: {"type": "error", "error": {"type", "message"}}.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vramfit.server.parsing import Delta
from vramfit.server.protocol import APIError, ChatCompletionRequest, bad_request, new_id
from vramfit.server.serving import ChatPlan, Generation, Serving, collect

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    503: "overloaded_error",
}
STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use"}


class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore")


class AnthropicTool(_Loose):
    name: str
    description: str | None = None
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class AnthropicToolChoice(_Loose):
    type: Literal["auto", "any", "tool", "none"] = "auto"
    name: str | None = None
    disable_parallel_tool_use: bool = False


class AnthropicMessage(_Loose):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class MessagesRequest(_Loose):
    model: str | None = None
    max_tokens: int = Field(ge=1)
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    top_k: int | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None


class CountTokensRequest(_Loose):
    model: str | None = None
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[AnthropicTool] | None = None


# -- request translation --------------------------------------------------------------------------------


def _text(content: str | list[dict[str, Any]] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if bad := [b.get("type") for b in content if b.get("type") != "text"]:
        raise bad_request(f"content blocks of type {bad[0]!r} are not supported here")
    return "".join(b.get("text", "") for b in content)


def _user_messages(content: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    out, text = [], []
    for block in content:
        kind = block.get("type")
        if kind == "tool_result":
            result = _text(block.get("content"))
            result = f"Error: {result}" if block.get("is_error") else result
            out.append({"role": "tool", "tool_call_id": block.get("tool_use_id", ""), "content": result})
        elif kind == "text":
            text.append(block.get("text", ""))
        else:
            raise bad_request(f"user content blocks of type {kind!r} are not supported", param="messages")
    return out + ([{"role": "user", "content": "".join(text)}] if text else [])


def _assistant_message(content: str | list[dict[str, Any]]) -> dict[str, Any]:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    text, calls, thinking = [], [], []
    for block in content:
        kind = block.get("type")
        if kind == "text":
            text.append(block.get("text", ""))
        elif kind == "tool_use":
            fn = {"name": block.get("name", ""), "arguments": json.dumps(block.get("input", {}))}
            calls.append({"id": block.get("id"), "type": "function", "function": fn})
        elif kind in ("thinking", "redacted_thinking"):
            thinking.append(block.get("thinking", ""))
    msg: dict[str, Any] = {"role": "assistant", "content": "".join(text) or None}
    if calls:
        msg["tool_calls"] = calls
    if thinking:
        msg["reasoning_content"] = "".join(thinking)
    return msg


def _chat_messages(req: MessagesRequest | CountTokensRequest) -> list[dict[str, Any]]:
    messages = [{"role": "system", "content": _text(req.system)}] if req.system else []
    for m in req.messages:
        messages += _user_messages(m.content) if m.role == "user" else [_assistant_message(m.content)]
    return messages


def _tools(tools: list[AnthropicTool] | None) -> list[dict[str, Any]] | None:
    if not tools:
        return None
    return [{"type": "function", "function": {"name": t.name, "description": t.description,
             "parameters": t.input_schema}} for t in tools]  # fmt: skip


def to_chat_request(req: MessagesRequest) -> ChatCompletionRequest:
    choice, parallel = "auto", True
    if req.tool_choice is not None:
        tc = req.tool_choice
        parallel = not tc.disable_parallel_tool_use
        choice = {"auto": "auto", "any": "required", "none": "none"}.get(tc.type)
        if tc.type == "tool":
            choice = {"type": "function", "function": {"name": tc.name or ""}}
    body = {
        "model": req.model,
        "messages": _chat_messages(req),
        "max_tokens": req.max_tokens,
        "stop": req.stop_sequences,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "tools": _tools(req.tools),
        "tool_choice": choice if req.tools else None,
        "parallel_tool_calls": parallel,
    }
    return ChatCompletionRequest.model_validate({k: v for k, v in body.items() if v is not None})


# -- responses ------------------------------------------------------------------------------------------


def _usage(gen: Generation) -> dict[str, int]:
    st = gen.stats
    return {
        "input_tokens": st.prompt_tokens - st.cached_tokens,
        "output_tokens": st.generated_tokens,
        "cache_read_input_tokens": st.cached_tokens,
        "cache_creation_input_tokens": 0,
    }


def _stop(gen: Generation, tool_calls: bool) -> tuple[str, str | None]:
    if tool_calls:
        return "tool_use", None
    if gen.stop_sequence is not None:
        return "stop_sequence", gen.stop_sequence
    return STOP_REASONS.get(gen.stats.finish_reason, "end_turn"), None


def _tool_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


def _message(s: Serving, plan: ChatPlan, gen: Generation, texts: list[str]) -> dict[str, Any]:
    parser, _ = plan.parser()
    for t in texts:
        parser.feed(t)
    parser.finish()
    out = parser.result
    content: list[dict[str, Any]] = []
    if out.reasoning:
        content.append({"type": "thinking", "thinking": out.reasoning, "signature": ""})
    if out.content:
        content.append({"type": "text", "text": out.content})
    for c in out.tool_calls:
        content.append(
            {"type": "tool_use", "id": _tool_id(c.id), "name": c.name, "input": _input(c.arguments)}
        )
    reason, seq = _stop(gen, bool(out.tool_calls))
    return {"id": new_id("msg"), "type": "message", "role": "assistant", "model": s.name, "content": content,
            "stop_reason": reason, "stop_sequence": seq, "usage": _usage(gen)}  # fmt: skip


def _input(arguments: str) -> dict[str, Any]:
    """tool_use input must be an object: anything else is wrapped."""
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        return {"arguments": arguments}
    return value if isinstance(value, dict) else {"value": value}


def _event(kind: str, data: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind} | data, ensure_ascii=False)}\n\n"


class _Blocks:
    """Turns parser deltas into content_block_start/delta/stop events, one block per kind or call."""

    def __init__(self) -> None:
        self.index, self.open = -1, ""

    def events(self, d: Delta) -> list[str]:
        out = []
        key = {"content": "text", "reasoning": "thinking"}.get(d.kind, "tool")
        if d.kind == "tool_start" or key != self.open:
            out += self.close()
            self.index, self.open = self.index + 1, key
            out.append(_event("content_block_start", {"index": self.index, "content_block": _block(d)}))
        if d.kind == "content":
            delta = {"type": "text_delta", "text": d.text}
        elif d.kind == "reasoning":
            delta = {"type": "thinking_delta", "thinking": d.text}
        elif d.kind == "tool_args":
            delta = {"type": "input_json_delta", "partial_json": d.text}
        else:
            return out
        return out + [_event("content_block_delta", {"index": self.index, "delta": delta})]

    def close(self) -> list[str]:
        if not self.open:
            return []
        self.open = ""
        return [_event("content_block_stop", {"index": self.index})]


def _block(d: Delta) -> dict[str, Any]:
    if d.kind == "content":
        return {"type": "text", "text": ""}
    if d.kind == "reasoning":
        return {"type": "thinking", "thinking": ""}
    return {"type": "tool_use", "id": _tool_id(d.id), "name": d.name, "input": {}}


async def _stream(s: Serving, plan: ChatPlan, gen: Generation) -> AsyncIterator[str]:
    try:
        parser, first = plan.parser()
        blocks = _Blocks()
        start = {"id": new_id("msg"), "type": "message", "role": "assistant", "model": s.name, "content": [],
                 "stop_reason": None, "stop_sequence": None,
                 "usage": {"input_tokens": len(plan.job.prompt_ids), "output_tokens": 0}}  # fmt: skip
        yield _event("message_start", {"message": start})
        for d in first:
            for e in blocks.events(d):
                yield e
        try:
            async for p in gen.pieces():
                for d in parser.feed(p.text):
                    for e in blocks.events(d):
                        yield e
        except APIError as e:
            yield _event(
                "error", {"error": {"type": ERROR_TYPES.get(e.status, "api_error"), "message": e.message}}
            )
            return
        for d in parser.finish():
            for e in blocks.events(d):
                yield e
        for e in blocks.close():
            yield e
        reason, seq = _stop(gen, bool(parser.calls))
        yield _event(
            "message_delta", {"delta": {"stop_reason": reason, "stop_sequence": seq}, "usage": _usage(gen)}
        )
        yield _event("message_stop", {})
    finally:
        if not gen.finished.is_set():
            gen.cancel()


# -- routes ---------------------------------------------------------------------------------------------


def _error(e: APIError) -> JSONResponse:
    body = {"type": "error", "error": {"type": ERROR_TYPES.get(e.status, "api_error"), "message": e.message}}
    return JSONResponse(body, status_code=e.status)


def add_routes(app: FastAPI) -> None:
    from vramfit.server.app import _EventStream, authorized, parse_body, ready

    async def serving_for(request: Request) -> Serving:
        authorized(request)
        return ready(request, None)

    @app.post("/v1/messages")
    async def messages(request: Request):
        try:
            s = await serving_for(request)
            req = await parse_body(request, MessagesRequest)
            plan = await _to_plan(s, req)
            gen = await s.start(plan.job)
        except APIError as e:
            return _error(e)
        if req.stream:
            return _EventStream(_stream(s, plan, gen), gen)
        try:
            pieces = await collect(gen, request.is_disconnected)
        except APIError as e:
            return _error(e)
        return _message(s, plan, gen, [p.text for p in pieces])

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request):
        try:
            s = await serving_for(request)
            req = await parse_body(request, CountTokensRequest)
            s.check_model(req.model)
            prompt = s.render(_chat_messages(req), _tools(req.tools), None)
        except APIError as e:
            return _error(e)
        return {"input_tokens": len(s.model.tokenize(prompt, special=True))}


async def _to_plan(s: Serving, req: MessagesRequest) -> ChatPlan:
    try:
        chat = to_chat_request(req)
    except ValidationError as e:
        raise bad_request(
            f"invalid request: {e.errors(include_url=False)[0].get('msg', 'invalid')}"
        ) from None
    return await asyncio.to_thread(s.prepare_chat, chat)
