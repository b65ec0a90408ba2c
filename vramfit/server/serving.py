"""Engine calls for the server: requests become jobs, jobs run on slots, slots keep their prompt cache.

Each of the `--parallel` slots owns an Engine (its own KV cache over the shared weights). A request
waits on a semaphore for a free slot and takes the free one whose cached tokens share the longest prefix
with its prompt, so an agent's next turn lands where its conversation is cached. Generation runs in a
worker thread that hands tokens to the event loop; `Generation.cancel()` (the client went away) stops
it before the next token, and the slot is released only when the thread has finished with its engine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from vramfit.runtime.chat_template import ChatTemplateError, render_chat
from vramfit.runtime.engine import ContextOverflowError, Engine, Stats, _common_prefix
from vramfit.runtime.sampling import Sampler, SamplingParams
from vramfit.server.constrain import ANY_OBJECT, JsonConstraint, Node, SchemaError, Vocabulary, compile_schema
from vramfit.server.parsing import Delta, OutputParser, forced_prefix, tool_format
from vramfit.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    NamedToolChoice,
    SamplingFields,
    bad_request,
)

log = logging.getLogger("vramfit.server")

SAMPLING_FIELDS = (
    "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repeat_last_n",
    "seed",
)  # fmt: skip


# -- sampling with logit bias and logprobs -------------------------------------------------------------


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]


class ApiSampler(Sampler):
    """The engine's sampler plus OpenAI's logit_bias (added after the penalties; -100 bans a token)
    and logprobs: log-softmax of the biased, penalized logits before temperature and truncation."""

    def __init__(
        self,
        params: SamplingParams,
        logit_bias: dict[int, float] | None = None,
        n_logprobs: int | None = None,
        constraint: JsonConstraint | None = None,
    ):
        super().__init__(params)
        self.constraint = constraint
        self.bias = None
        if logit_bias:
            vals = [-math.inf if b <= -100 else b for b in logit_bias.values()]
            self.bias = torch.tensor(list(logit_bias), dtype=torch.long), torch.tensor(vals)
        self.n_logprobs = n_logprobs
        self.records: deque[TokenLogprob] = deque()
        self.last = -1  # the last token drawn (an end-of-turn id when the model stopped by itself)

    def __call__(self, logits: torch.Tensor, history: list[int]) -> int:
        logits = self.penalize(logits.clone(), history)
        tok = self.constraint.choose(logits, self) if self.constraint else self.pick(logits)
        if self.n_logprobs is not None:
            lp = torch.log_softmax(logits.float(), 0)
            vals, ids = torch.topk(lp, self.n_logprobs) if self.n_logprobs else (lp[:0], lp[:0])
            top = [(int(i), float(v)) for i, v in zip(ids, vals, strict=True)]
            self.records.append(TokenLogprob(tok, float(lp[tok]), top))
        self.last = tok
        return tok

    def pick(self, logits: torch.Tensor) -> int:
        """Greedy or a draw after top-k/top-p/min-p, from already penalized logits."""
        return int(logits.argmax()) if self.p.temperature <= 0 else self.draw(self.truncate(logits))

    def penalize(self, logits: torch.Tensor, history: list[int]) -> torch.Tensor:
        logits = super().penalize(logits, history)
        if self.bias is not None:
            logits[self.bias[0]] += self.bias[1]
        return logits


# -- jobs and their running generations -----------------------------------------------------------------


@dataclass
class Job:
    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams
    stops: tuple[str, ...] = ()
    logit_bias: dict[int, float] | None = None
    n_logprobs: int | None = None  # None: no logprobs; 0: the chosen token's only
    schema: Node | None = None  # response_format: the output must be this JSON


@dataclass
class Piece:
    """Text for one token (token -1: text held back until the end), with its logprob if asked."""

    text: str
    token: int
    logprob: TokenLogprob | None = None


@dataclass
class ChatPlan:
    """A chat request made ready: the job, and how to parse what the model writes."""

    job: Job
    prefix: str = ""  # forced tool-call opening, already in the prompt; the parser sees it first
    tools: list[dict[str, Any]] | None = None
    parse_tools: bool = False
    in_think: bool = False
    parallel: bool = True

    def parser(self) -> tuple[OutputParser, list[Delta]]:
        """A fresh parser, and the deltas of the forced prefix (sent before any generated text)."""
        p = OutputParser(self.tools, self.parse_tools, self.in_think, self.parallel)
        return p, (p.feed(self.prefix) if self.prefix else [])


_DONE = object()


class Generation:
    """One running job. `async for piece in gen.pieces()`; `stats` is complete after the last piece."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.finished = threading.Event()
        self.stats = Stats()
        self.stop_sequence: str | None = None  # the stop string that ended the output, if one did
        self.slot = -1

    def put(self, item: object) -> None:
        """From the worker thread."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shutting down): stop generating
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()

    async def pieces(self) -> AsyncIterator[Piece]:
        while (item := await self.queue.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item


@dataclass
class Slot:
    index: int
    engine: Engine
    busy: bool = False


# -- metrics --------------------------------------------------------------------------------------------


@dataclass
class Metrics:
    totals: Counter = field(default_factory=Counter)
    last_prefill_tps: float = 0.0
    last_decode_tps: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_generation(self, stats: Stats, cancelled: bool) -> None:
        with self.lock:
            t = self.totals
            t["prompt_tokens"] += stats.prompt_tokens
            t["cached_tokens"] += stats.cached_tokens
            t["prefill_tokens"] += stats.prompt_tokens - stats.cached_tokens
            t["generation_tokens"] += stats.generated_tokens
            t["prefill_seconds"] += stats.prefill_s
            t["decode_seconds"] += stats.decode_s
            t["cache_hits" if stats.cached_tokens > 0 else "cache_misses"] += 1
            t["cancelled" if cancelled else "completed"] += 1
            if stats.prefill_s:
                self.last_prefill_tps = stats.prefill_tps
            if stats.decode_s:
                self.last_decode_tps = stats.decode_tps

    def render(self, serving: Serving, requests: Counter) -> str:
        """Prometheus text exposition format."""
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            lines.extend([f"# HELP vramfit_{name} {help_}", f"# TYPE vramfit_{name} {kind}"])
            lines.extend(f"vramfit_{name}{labels} {value:g}" for labels, value in samples)

        with self.lock:
            t = dict(self.totals)
        reqs = [(f'{{endpoint="{e}",status="{c}"}}', n) for (e, c), n in sorted(requests.items())]
        metric("requests_total", "counter", "HTTP requests by endpoint and status", reqs)
        for key, help_ in (
            ("prompt_tokens", "prompt tokens received"),
            ("cached_tokens", "prompt tokens served from a slot's cache"),
            ("prefill_tokens", "prompt tokens computed"),
            ("generation_tokens", "tokens generated"),
            ("prefill_seconds", "seconds spent in prefill"),
            ("decode_seconds", "seconds spent in decode"),
            ("cache_hits", "generations that reused a cached prefix"),
            ("cache_misses", "generations that reused nothing"),
            ("completed", "generations run to the end"),
            ("cancelled", "generations stopped because the client went away"),
        ):
            metric(f"{key}_total", "counter", help_, [("", t.get(key, 0))])
        metric("prefill_tokens_per_second", "gauge", "prefill speed of the last generation",
               [("", self.last_prefill_tps)])  # fmt: skip
        metric("decode_tokens_per_second", "gauge", "decode speed of the last generation",
               [("", self.last_decode_tps)])  # fmt: skip
        metric("queue_depth", "gauge", "requests waiting for a slot", [("", serving.waiting)])
        metric("slots_busy", "gauge", "slots generating", [("", serving.busy)])
        metric("slots_total", "gauge", "slots (--parallel)", [("", len(serving.slots))])
        return "\n".join(lines) + "\n"


# -- the serving object ---------------------------------------------------------------------------------


class Serving:
    """The loaded model, its slots and metrics; turns validated requests into running generations."""

    def __init__(
        self, model: Any, name: str, parallel: int = 1, max_queue: int = 256, aliases: tuple[str, ...] = ()
    ):
        """aliases: more names requests may give in "model" ("*": any name, as llama-server takes)."""
        if parallel < 1:
            raise ValueError("--parallel must be at least 1")
        self.model, self.name, self.max_queue = model, name, max_queue
        self.aliases = {name, model.path.name, model.path.stem, *aliases}
        self.slots = [Slot(0, model.engine)] + [Slot(i, Engine(model.model)) for i in range(1, parallel)]
        self.n_ctx = model.n_ctx
        self.fmt = tool_format(model.chat_template)
        self.metrics = Metrics()
        self.waiting = 0
        self._vocabulary: Vocabulary | None = None
        self._sem = asyncio.Semaphore(parallel)

    @property
    def vocabulary(self) -> Vocabulary:
        """Token bytes for constrained decoding, built on first use."""
        if self._vocabulary is None:
            self._vocabulary = Vocabulary(self.model.tokenizer)
        return self._vocabulary

    @property
    def busy(self) -> int:
        return sum(s.busy for s in self.slots)

    # -- request -> job -----------------------------------------------------------------------------

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.aliases and "*" not in self.aliases:
            raise APIError(404, f"The model '{name}' does not exist (this server has '{self.name}')",
                           "invalid_request_error", "model_not_found", "model")  # fmt: skip

    def prepare_chat(self, req: ChatCompletionRequest) -> ChatPlan:
        self.check_model(req.model)
        schema = _response_schema(req)
        use_tools = bool(req.tools) and req.tool_choice != "none" and schema is None
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if use_tools else None
        prompt = self.render([_message_dict(m) for m in req.messages], tools, req.chat_template_kwargs)
        prefix = ""
        if use_tools and req.tool_choice == "required":
            prefix = forced_prefix(self.fmt, None)
        elif use_tools and isinstance(req.tool_choice, NamedToolChoice):
            prefix = forced_prefix(self.fmt, req.tool_choice.function["name"])
        prompt += prefix
        n_lp = (req.top_logprobs or 0) if req.logprobs else None
        job = self._job(self.model.tokenize(prompt, special=True), req, n_lp)
        job.schema = schema
        in_think = prompt.rstrip().endswith("<think>")
        return ChatPlan(job, prefix, tools, use_tools, in_think, req.parallel_tool_calls)

    def prepare_completion(self, req: CompletionRequest) -> tuple[Job, str]:
        """(job, prompt text for echo)."""
        self.check_model(req.model)
        if req.suffix:
            raise bad_request("suffix (fill-in-the-middle) is not supported", param="suffix")
        if isinstance(req.prompt, str):
            ids, text = self.model.tokenize(req.prompt, special=True), req.prompt
        else:
            vocab = self.model.tokenizer.vocab_size
            if any(not 0 <= t < vocab for t in req.prompt):
                raise bad_request(f"prompt token ids must be in [0, {vocab})", param="prompt")
            ids, text = list(req.prompt), self.model.detokenize(req.prompt)
        return self._job(ids, req, req.logprobs), text

    def render(self, messages: list[dict], tools: list[dict] | None, extra: dict | None) -> str:
        tok = self.model.tokenizer
        bos = tok.tokens[tok.bos_id] if tok.bos_id is not None else ""
        eos = tok.tokens[tok.eos_id] if tok.eos_id is not None else ""
        try:
            return render_chat(self.model.chat_template, messages, tools, True, bos, eos, **(extra or {}))
        except ChatTemplateError as e:
            raise bad_request(
                f"the chat template could not render these messages: {e}", param="messages"
            ) from e

    def _job(self, ids: list[int], req: SamplingFields, n_logprobs: int | None) -> Job:
        if not ids:
            raise bad_request("the prompt is empty", param="prompt")
        n = len(ids)
        if n > self.n_ctx:
            raise bad_request(
                f"This model's maximum context length is {self.n_ctx} tokens. However, your prompt "
                f"has {n} tokens. Please shorten it.",
                code="context_length_exceeded",
                param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
            )
        room = self.n_ctx - n + 1  # a full context still yields its one next token
        limit = req.token_limit
        max_tokens = room if limit is None else min(limit, room)
        return Job(
            ids, max_tokens, sampling_params(req), tuple(req.stop_list), self._logit_bias(req), n_logprobs
        )

    def _logit_bias(self, req: SamplingFields) -> dict[int, float] | None:
        if not req.logit_bias:
            return None
        bias = {int(k): float(v) for k, v in req.logit_bias.items()}
        vocab = self.model.tokenizer.vocab_size
        if bad := [k for k in bias if not 0 <= k < vocab]:
            raise bad_request(f"logit_bias token id {bad[0]} is outside the vocabulary (size {vocab})",
                              param="logit_bias")  # fmt: skip
        return bias

    # -- running --------------------------------------------------------------------------------------

    async def start(self, job: Job) -> Generation:
        """Wait for a slot (503 when too many wait) and start generating in a worker thread."""
        if self._sem.locked() and self.waiting >= self.max_queue:
            raise APIError(503, f"server overloaded: {self.waiting} requests are waiting for a slot",
                           "server_error", "overloaded")  # fmt: skip
        self.waiting += 1
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
        free = [s for s in self.slots if not s.busy]
        slot = max(free, key=lambda s: _common_prefix(s.engine.tokens, job.prompt_ids))
        slot.busy = True
        gen = Generation(asyncio.get_running_loop())
        gen.slot = slot.index
        worker = threading.Thread(target=self._work, args=(slot, job, gen), daemon=True)
        try:
            worker.start()
        except BaseException:
            self._release(slot)
            raise
        return gen

    def _release(self, slot: Slot) -> None:
        slot.busy = False
        self._sem.release()

    def _work(self, slot: Slot, job: Job, gen: Generation) -> None:
        """Worker thread: run the engine, hand pieces to the loop, stop when cancelled. Whatever fails,
        the request gets an answer and the slot is released."""
        events = None
        try:
            self._log_cache(slot, job.prompt_ids)
            constraint = JsonConstraint(job.schema, self.vocabulary) if job.schema is not None else None
            sampler = ApiSampler(job.params, job.logit_bias, job.n_logprobs, constraint)
            tok = self.model.tokenizer
            events = slot.engine.generate(
                job.prompt_ids, job.max_tokens, job.params, stop_ids=set(tok.eot_ids), detok=_Detok(tok),
                stop_strings=job.stops, stats=gen.stats, sampler=sampler,
            )  # fmt: skip
            self._drain(events, sampler, job, gen)
        except ContextOverflowError as e:
            gen.put(bad_request(str(e), code="context_length_exceeded"))
        except Exception as e:  # reported to the client as a 500; the server keeps serving
            log.exception("generation failed")
            gen.put(APIError(500, f"generation failed: {type(e).__name__}: {e}", "server_error"))
        finally:
            if events is not None:
                events.close()
            self._finish(slot, gen)

    def _drain(self, events, sampler: ApiSampler, job: Job, gen: Generation) -> None:
        tok = self.model.tokenizer
        generated: list[int] = []
        while not gen.cancelled.is_set():
            ev = next(events, None)
            if ev is None:
                break
            lp = sampler.records.popleft() if ev.token >= 0 and sampler.records else None
            generated += [ev.token] if ev.token >= 0 else []
            gen.put(Piece(ev.text, ev.token, lp))
        if gen.stats.finish_reason == "stop" and sampler.last not in tok.eot_ids:
            gen.stop_sequence = _first_stop(tok.decode(generated), job.stops)

    def _finish(self, slot: Slot, gen: Generation) -> None:
        self.metrics.add_generation(gen.stats, gen.cancelled.is_set())
        if gen.cancelled.is_set():
            log.info("slot %d: generation cancelled after %d tokens", slot.index, gen.stats.generated_tokens)
        gen.finished.set()
        try:
            gen.loop.call_soon_threadsafe(self._release, slot)
        except RuntimeError:
            slot.busy = False
        gen.put(_DONE)

    def _log_cache(self, slot: Slot, prompt: list[int]) -> None:
        cached = slot.engine.tokens
        keep = min(_common_prefix(cached, prompt), len(prompt) - 1)
        if keep > 0:
            log.info("slot %d: cache hit, %d of %d prompt tokens reused", slot.index, keep, len(prompt))
        elif not cached:
            log.info("slot %d: cache miss (slot empty), %d tokens to prefill", slot.index, len(prompt))
        else:
            log.info("slot %d: cache miss (prompt differs from the cached %d tokens at token 0)",
                     slot.index, len(cached))  # fmt: skip


async def collect(gen: Generation, disconnected: Callable[[], Awaitable[bool]] | None) -> list[Piece]:
    """All pieces of a non-streamed generation; cancels it when `disconnected()` turns true."""
    watcher = asyncio.create_task(_watch(gen, disconnected)) if disconnected else None
    try:
        return [p async for p in gen.pieces()]
    finally:
        if not gen.finished.is_set():
            gen.cancel()
        if watcher:
            watcher.cancel()


async def _watch(gen: Generation, disconnected: Callable[[], Awaitable[bool]]) -> None:
    while not gen.finished.is_set():
        if await disconnected():
            gen.cancel()
            return
        await asyncio.sleep(0.2)


# -- helpers --------------------------------------------------------------------------------------------


def _response_schema(req: ChatCompletionRequest) -> Node | None:
    rf = req.response_format
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return ANY_OBJECT
    try:
        return compile_schema(rf.json_schema.schema_ or {})
    except SchemaError as e:
        raise bad_request(f"response_format json_schema: {e}", param="response_format") from e


def _first_stop(text: str, stops: tuple[str, ...]) -> str | None:
    """The stop string completed first in `text` (the engine's rule), or None."""
    found = [(i + len(s), -len(s), s) for s in stops if (i := text.find(s)) >= 0]
    return min(found)[2] if found else None


class _Detok:
    """The tokenizer's incremental decoder in the engine's push/flush protocol."""

    def __init__(self, tok: Any):
        self._dec = tok.incremental_decoder(skip_special=False)

    def push(self, token: int) -> str:
        return self._dec.feed(token)

    def flush(self) -> str:
        return self._dec.flush()


def sampling_params(req: SamplingFields) -> SamplingParams:
    kw = {f: v for f in SAMPLING_FIELDS if (v := getattr(req, f)) is not None}
    penalty = req.repetition_penalty if req.repetition_penalty is not None else req.repeat_penalty
    if penalty is not None:
        kw["repeat_penalty"] = penalty
    try:
        return SamplingParams(**kw)
    except ValueError as e:
        raise bad_request(str(e)) from e


def _message_dict(m: Any) -> dict[str, Any]:
    """An OpenAI message as chat templates expect it: text content, tool-call arguments as objects."""
    d = m.model_dump(exclude_none=True)
    d.setdefault("content", "")  # null content (an assistant turn that only calls tools): templates read it
    if d["role"] == "developer":
        d["role"] = "system"
    if isinstance(d.get("content"), list):
        parts = d["content"]
        if any(p.get("type") not in ("text", "input_text") for p in parts):
            raise bad_request("only text content parts are supported", param="messages")
        d["content"] = "".join(p.get("text", "") for p in parts)
    for call in d.get("tool_calls") or []:
        args = call["function"].get("arguments")
        if isinstance(args, str):
            try:
                parsed = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                continue  # the template gets the string as it came
            if isinstance(parsed, dict):
                call["function"]["arguments"] = parsed
    return d
