"""HTTP routes of `vramfit serve`: OpenAI-compatible chat and text completions (JSON and SSE), models,
health, Prometheus metrics (Anthropic-style /v1/messages lives in anthropic.py); errors in OpenAI's
shape {"error": {"message", "type", "param", "code"}}.

Streams follow OpenAI's chunk format: a first chunk with the role, content / reasoning_content /
tool_calls deltas, a chunk with finish_reason, with `stream_options.include_usage` a last chunk with
empty choices and the usage, then `data: [DONE]`. A client that hangs up cancels its generation.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from vramfit.server.parsing import Delta
from vramfit.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    new_id,
    now,
)
from vramfit.server.serving import ChatPlan, Generation, Piece, Serving, TokenLogprob, collect

log = logging.getLogger("vramfit.server")
ROUTES = {"/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/messages",
          "/v1/messages/count_tokens"}  # fmt: skip
FINGERPRINT = "fp_vramfit"


class ServerState:
    """What the routes share: the Serving once the model is loaded, request counts, settings."""

    def __init__(self, serving: Serving | None, api_key: str | None):
        self.serving, self.api_key = serving, api_key
        self.load_error: str | None = None
        self.requests: Counter = Counter()


def create_app(
    serving: Serving | None = None,
    load: Callable[[], Serving] | None = None,
    api_key: str | None = None,
    cors: list[str] | None = None,
) -> FastAPI:
    """An app around a ready `serving`, or one that runs `load()` in a thread at start-up (and answers
    /health with 503 until it is done)."""
    state = ServerState(serving, api_key)

    async def lifespan(app: FastAPI):
        if load is not None and state.serving is None:
            threading.Thread(target=_load_into, args=(state, load), daemon=True).start()
        yield

    app = FastAPI(title="vramfit", lifespan=lifespan)
    app.state.server = state
    if cors:
        app.add_middleware(CORSMiddleware, allow_origins=cors, allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(_CountRequests, state=state)
    _add_error_handlers(app)
    _add_routes(app, state)
    return app


def _load_into(state: ServerState, load: Callable[[], Serving]) -> None:
    try:
        state.serving = load()
        log.info("model loaded: %s (context %d)", state.serving.name, state.serving.n_ctx)
    except Exception as e:  # reported by /health; requests get 503
        log.exception("loading the model failed")
        state.load_error = f"{type(e).__name__}: {e}"


# -- errors ---------------------------------------------------------------------------------------------


def _error(status: int, message: str, type_: str, code: str | None = None, param=None) -> JSONResponse:
    return JSONResponse(APIError(status, message, type_, code, param).body(), status_code=status)


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One readable line for pydantic errors, and the first offending parameter."""
    parts, param = [], None
    for e in errors[:5]:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        field = ".".join(loc)
        param = param or field or None
        parts.append(f"{field or 'body'}: {e.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "invalid request: " + "; ".join(parts) + more, param


async def parse_body(request: Request, schema: type[BaseModel]) -> Any:
    """The JSON body validated by `schema`, whatever the Content-Type (curl -d sends a form type)."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" (line {e.lineno}, column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        why = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
        raise APIError(400, f"malformed JSON in the request body: {why}{where}", "invalid_request_error",
                       "invalid_json") from None  # fmt: skip
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, not {type(data).__name__}",
                       "invalid_request_error", "invalid_json")  # fmt: skip
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        message, param = _validation_message(e.errors(include_url=False))
        raise APIError(400, message, "invalid_request_error", None, param) from None


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(list(e.errors()))
        return _error(400, message, "invalid_request_error", None, param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return _error(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                      "invalid_request_error", code)  # fmt: skip

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        log.exception("request failed")
        return _error(500, f"internal error: {type(e).__name__}: {e}", "server_error")


class _CountRequests:
    """Pure ASGI middleware (it must not buffer streams): counts responses by route and status."""

    def __init__(self, app: Any, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope.get("path", "")
            self.state.requests[(path if path in ROUTES else "other", str(status))] += 1


# -- dependencies ---------------------------------------------------------------------------------------


def authorized(request: Request) -> None:
    key = request.app.state.server.api_key
    if key is None:
        return
    header = request.headers.get("authorization", "")
    given = header[7:].strip() if header.lower().startswith("bearer ") else request.headers.get("x-api-key")
    if not given or not secrets.compare_digest(given.encode(), key.encode()):
        raise APIError(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")


def ready(request: Request, _: Annotated[None, Depends(authorized)]) -> Serving:
    state: ServerState = request.app.state.server
    if state.serving is None:
        why = f"the model failed to load: {state.load_error}" if state.load_error else "the model is loading"
        raise APIError(503, why, "server_error", "model_not_ready")
    return state.serving


Ready = Annotated[Serving, Depends(ready)]


# -- routes ---------------------------------------------------------------------------------------------


def _add_routes(app: FastAPI, state: ServerState) -> None:

    @app.get("/health")
    async def health() -> JSONResponse:
        s = state.serving
        if s is None:
            body = (
                {"status": "error", "error": state.load_error} if state.load_error else {"status": "loading"}
            )
            return JSONResponse(body, status_code=503)
        return JSONResponse({"status": "ok", "slots_idle": len(s.slots) - s.busy, "slots_processing": s.busy,
                             "queue_depth": s.waiting})  # fmt: skip

    @app.get("/metrics", dependencies=[Depends(authorized)])
    async def metrics() -> PlainTextResponse:
        s = state.serving
        text = s.metrics.render(s, state.requests) if s else "# model loading\n"
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(s: Ready) -> dict:
        card = ModelCard(id=s.name, context_length=s.n_ctx, max_model_len=s.n_ctx)
        return ModelList(data=[card]).model_dump()

    @app.post("/v1/chat/completions")
    async def chat(request: Request, s: Ready):
        req = await parse_body(request, ChatCompletionRequest)
        plan = await asyncio.to_thread(s.prepare_chat, req)
        gen = await s.start(plan.job)
        if req.stream:
            return _sse(_chat_chunks(s, req, plan, gen), gen)
        pieces = await collect(gen, request.is_disconnected)
        return _chat_response(s, req, plan, gen, pieces)

    @app.post("/v1/completions")
    async def completions(request: Request, s: Ready):
        req = await parse_body(request, CompletionRequest)
        job, prompt_text = await asyncio.to_thread(s.prepare_completion, req)
        gen = await s.start(job)
        if req.stream:
            return _sse(_completion_chunks(s, req, gen, prompt_text), gen)
        pieces = await collect(gen, request.is_disconnected)
        return _completion_response(s, req, gen, pieces, prompt_text)

    from vramfit.server.anthropic import add_routes as add_messages_routes

    add_messages_routes(app)


# -- shared response pieces -----------------------------------------------------------------------------


def usage(gen: Generation) -> dict[str, Any]:
    st = gen.stats
    return {
        "prompt_tokens": st.prompt_tokens,
        "completion_tokens": st.generated_tokens,
        "total_tokens": st.prompt_tokens + st.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": st.cached_tokens},
    }


def _finish(gen: Generation, tool_calls: bool = False) -> str:
    return "tool_calls" if tool_calls else (gen.stats.finish_reason or "stop")


def _lp_entry(s: Serving, lp: TokenLogprob) -> dict[str, Any]:
    tok = s.model.tokenizer

    def one(t: int, v: float) -> dict[str, Any]:
        return {"token": tok.token_piece(t), "logprob": v, "bytes": list(tok.token_bytes(t))}

    return one(lp.token, lp.logprob) | {"top_logprobs": [one(t, v) for t, v in lp.top]}


class _EventStream(StreamingResponse):
    """SSE response that cancels its generation however the response ends (a client that hangs up
    before the first chunk included)."""

    def __init__(self, content: AsyncIterator[str], gen: Generation):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.gen = gen

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.gen.finished.is_set():
                self.gen.cancel()


def _sse(chunks: AsyncIterator[dict], gen: Generation) -> _EventStream:
    async def encode() -> AsyncIterator[str]:
        try:
            async for c in chunks:
                yield f"data: {json.dumps(c, ensure_ascii=False)}\n\n"
        except APIError as e:  # after the headers went out, errors travel as an event
            yield f"data: {json.dumps(e.body(), ensure_ascii=False)}\n\n"
        finally:
            if not gen.finished.is_set():
                gen.cancel()
        yield "data: [DONE]\n\n"

    return _EventStream(encode(), gen)


# -- chat -----------------------------------------------------------------------------------------------


def _delta(d: Delta) -> dict[str, Any]:
    if d.kind == "content":
        return {"content": d.text}
    if d.kind == "reasoning":
        return {"reasoning_content": d.text}
    if d.kind == "tool_start":
        fn = {"name": d.name, "arguments": ""}
        return {"tool_calls": [{"index": d.index, "id": d.id, "type": "function", "function": fn}]}
    return {"tool_calls": [{"index": d.index, "function": {"arguments": d.text}}]}


async def _chat_chunks(s: Serving, req: ChatCompletionRequest, plan: ChatPlan, gen: Generation):
    cid, created = new_id("chatcmpl"), now()

    def chunk(delta: dict, finish: str | None = None, lps: list | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": {"content": lps} if lps else None,
                  "finish_reason": finish}  # fmt: skip
        c = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": s.name,
             "system_fingerprint": FINGERPRINT, "choices": [choice]}  # fmt: skip
        return c | {"usage": None} if req.include_usage else c

    parser, first = plan.parser()
    yield chunk({"role": "assistant", "content": ""})
    for d in first:
        yield chunk(_delta(d))
    pending: list[dict] = []
    async for p in gen.pieces():
        if p.logprob is not None:
            pending.append(_lp_entry(s, p.logprob))
        for d in parser.feed(p.text):
            yield chunk(_delta(d), lps=pending)
            pending = []
    for d in parser.finish():
        yield chunk(_delta(d), lps=pending)
        pending = []
    yield chunk({}, _finish(gen, bool(parser.calls)), lps=pending)
    if req.include_usage:
        yield {"id": cid, "object": "chat.completion.chunk", "created": created, "model": s.name,
               "system_fingerprint": FINGERPRINT, "choices": [], "usage": usage(gen)}  # fmt: skip


def _chat_response(
    s: Serving, req: ChatCompletionRequest, plan: ChatPlan, gen: Generation, pieces: list[Piece]
):
    parser, _ = plan.parser()
    for p in pieces:
        parser.feed(p.text)
    parser.finish()
    out = parser.result
    message: dict[str, Any] = {
        "role": "assistant",
        "content": out.content or (None if out.tool_calls else ""),
    }
    if out.reasoning:
        message["reasoning_content"] = out.reasoning
    if out.tool_calls:
        message["tool_calls"] = [c.as_openai() for c in out.tool_calls]
    lps = [_lp_entry(s, p.logprob) for p in pieces if p.logprob is not None]
    choice = {"index": 0, "message": message, "logprobs": {"content": lps} if req.logprobs else None,
              "finish_reason": _finish(gen, bool(out.tool_calls))}  # fmt: skip
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": now(), "model": s.name,
            "system_fingerprint": FINGERPRINT, "choices": [choice], "usage": usage(gen)}  # fmt: skip


# -- text completions -----------------------------------------------------------------------------------


def _legacy_logprobs(s: Serving, pieces: list[Piece], offset: int) -> dict[str, Any]:
    """The /v1/completions logprobs object (tokens, token_logprobs, top_logprobs, text_offset)."""
    tok = s.model.tokenizer
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for p in pieces:
        if p.logprob is None:
            continue
        out["tokens"].append(tok.token_piece(p.logprob.token))
        out["token_logprobs"].append(p.logprob.logprob)
        out["top_logprobs"].append({tok.token_piece(t): v for t, v in p.logprob.top})
        out["text_offset"].append(offset)
        offset += len(p.text)
    return out


async def _completion_chunks(s: Serving, req: CompletionRequest, gen: Generation, prompt_text: str):
    cid, created = new_id("cmpl"), now()

    def chunk(text: str, finish: str | None = None, pieces: list[Piece] = ()) -> dict[str, Any]:
        lps = _legacy_logprobs(s, list(pieces), 0) if req.logprobs is not None and pieces else None
        choice = {"index": 0, "text": text, "logprobs": lps, "finish_reason": finish}
        c = {"id": cid, "object": "text_completion", "created": created, "model": s.name, "choices": [choice]}
        return c | {"usage": None} if req.include_usage else c

    if req.echo:
        yield chunk(prompt_text)
    async for p in gen.pieces():
        if p.text or p.logprob is not None:
            yield chunk(p.text, pieces=[p])
    yield chunk("", _finish(gen))
    if req.include_usage:
        yield {"id": cid, "object": "text_completion", "created": created, "model": s.name, "choices": [],
               "usage": usage(gen)}  # fmt: skip


def _completion_response(
    s: Serving, req: CompletionRequest, gen: Generation, pieces: list[Piece], prompt: str
):
    head = prompt if req.echo else ""
    text = head + "".join(p.text for p in pieces)
    lps = _legacy_logprobs(s, pieces, len(head)) if req.logprobs is not None else None
    choice = {"index": 0, "text": text, "logprobs": lps, "finish_reason": _finish(gen)}
    return {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": s.name,
            "choices": [choice], "usage": usage(gen)}  # fmt: skip


# -- running --------------------------------------------------------------------------------------------


def serve(
    model: str,
    host: str = "127.0.0.1",
    port: int = 8080,
    n_ctx: int | None = None,
    parallel: int = 1,
    api_key: str | None = None,
    cors: list[str] | None = None,
    *,
    ctk: str | None = None,
    ctv: str | None = None,
    khad: bool = False,
    vhad: bool = False,
    mem: str | None = None,
    device: str | None = None,
    aliases: tuple[str, ...] = (),
) -> None:
    """Plan the load of `model` (runtime/fit.py: the context and KV cache types that fit `mem`, default
    the available memory of `device`, for `parallel` slots; the plan goes to stderr, and PlanError when
    nothing fits), then load it in the background and serve it until interrupted (`vramfit serve`).
    aliases: more model names requests may use ("*": any)."""
    import uvicorn
    from rich.console import Console

    from vramfit.api import Model
    from vramfit.gguf import GGUFFile
    from vramfit.hub import resolve
    from vramfit.model.loader import resolve_device
    from vramfit.runtime.fit import fit, resolve_mem
    from vramfit.runtime.plan_cli import report

    path = resolve(model)
    gguf = GGUFFile(path)
    dev = resolve_device(device)
    f = fit(gguf, n_ctx, ctk, ctv, khad, vhad, resolve_mem(mem, dev), parallel, dev)
    report(f.plan, Console(stderr=True, highlight=False, soft_wrap=True))

    def load_serving() -> Serving:
        name = model.rsplit("/", 1)[-1].removesuffix(".gguf")
        loaded = Model(path, f.ctx, f.kv, gguf=gguf, device=dev)
        return Serving(loaded, name, parallel, aliases=tuple(aliases))

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    app = create_app(load=load_serving, api_key=api_key, cors=cors)
    uvicorn.run(app, host=host, port=port, log_level="info")
