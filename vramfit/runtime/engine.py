"""Prefill/decode over one sequence, with prompt-prefix reuse and streamed, stop-aware generation.

The engine keeps the tokens whose keys and values are in the cache; a new prompt that shares a prefix
with them only prefills the rest (a chat REPL re-sends the whole conversation every turn).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from vramfit.runtime.heap import release_free_heap
from vramfit.runtime.sampling import Sampler, SamplingParams

TRIM_AFTER = 64  # prefill chunks at least this long hand their freed activations back (~1 ms a trim)


class ContextOverflowError(ValueError):
    pass


@dataclass
class Event:
    """One generated token: its id and the text it completes (may be "" while a character or a
    possible stop string is still incomplete)."""

    token: int
    text: str


@dataclass
class Stats:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    finish_reason: str = ""

    @property
    def decode_tps(self) -> float:
        return self.generated_tokens / self.decode_s if self.decode_s else 0.0

    @property
    def prefill_tps(self) -> float:
        n = self.prompt_tokens - self.cached_tokens
        return n / self.prefill_s if self.prefill_s else 0.0


@dataclass
class Engine:
    model: object
    # tokens per prefill step, by default 256 on the CPU (as fast as 512 on the C kernels, half the
    # activations: bench/decode_memory.py) and 512 on a GPU; the memory planner's devices plan the same
    prefill_chunk: int | None = None
    tokens: list[int] = field(default_factory=list)  # what the cache holds, position by position

    def __post_init__(self) -> None:
        torch.set_num_threads(1)  # small ops on one thread; big ones ask for more (dispatch.parallel_torch)
        self.device = torch.device(getattr(self.model, "device", None) or "cpu")
        if self.prefill_chunk is None:
            self.prefill_chunk = 256 if self.device.type == "cpu" else 512
        self.cache = self.model.new_cache()
        self.n_ctx = self.model.n_ctx
        release_free_heap()  # what loading the weights and the tokenizer left behind

    def reset(self) -> None:
        self.tokens = []

    @torch.inference_mode()
    def eval(self, ids: list[int]) -> torch.Tensor:
        """Make the cache hold `ids`, reusing the longest cached prefix; return the last logits."""
        if len(ids) > self.n_ctx:
            raise ContextOverflowError(
                f"prompt has {len(ids)} tokens but the context is {self.n_ctx} (use a larger --ctx)"
            )
        if not ids:
            raise ValueError("empty prompt: nothing to evaluate")
        keep = self._reusable(ids)
        self.tokens = self.tokens[:keep]
        hidden = None
        for s in range(keep, len(ids), self.prefill_chunk):
            chunk = ids[s : s + self.prefill_chunk]
            hidden = self.model.forward(self._ids(chunk), self.cache, s)
            self.tokens.extend(chunk)
            if len(chunk) >= TRIM_AFTER:
                # hand back the chunk's freed activations: the next chunk's attention buffers are larger
                # and would leave these as holes, and a long-running server should not keep them
                release_free_heap()
        return self.model.logits(hidden[-1:])[0].float().cpu()

    def _ids(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def _reusable(self, ids: list[int]) -> int:
        """How many cached tokens `ids` can keep. At least the last token is recomputed for its
        logits; a recurrent state (cache.supports_truncate False) cannot be cut back, so it is kept
        only whole."""
        keep = min(_common_prefix(self.tokens, ids), len(ids) - 1)
        if keep < len(self.tokens) and not getattr(self.cache, "supports_truncate", True):
            return 0
        return keep

    @torch.inference_mode()
    def logits_all(self, ids: list[int]) -> torch.Tensor:
        """Logits for every position of `ids` from a fresh start: (len(ids), n_vocab)."""
        if len(ids) > self.n_ctx:
            raise ContextOverflowError(f"{len(ids)} tokens exceed the context of {self.n_ctx}")
        self.tokens = []
        out = []
        for s in range(0, len(ids), self.prefill_chunk):
            chunk = ids[s : s + self.prefill_chunk]
            out.append(self.model.logits(self.model.forward(self._ids(chunk), self.cache, s)).float().cpu())
            self.tokens.extend(chunk)
        return torch.cat(out)

    def generate(
        self,
        prompt: list[int],
        max_tokens: int,
        params: SamplingParams,
        stop_ids: set[int] = frozenset(),
        detok=None,
        stop_strings: tuple[str, ...] = (),
        stats: Stats | None = None,
        sampler: Sampler | None = None,
    ) -> Iterator[Event]:
        """Yields events until max_tokens, a stop token or a stop string. `detok` is an incremental
        decoder with push(id) -> str and flush() -> str; without it events carry no text. `sampler`
        replaces Sampler(params) (the server's adds logit bias and records logprobs)."""
        stats = stats if stats is not None else Stats()
        stats.prompt_tokens = len(prompt)
        stats.cached_tokens = self._reusable(prompt)
        t0 = time.perf_counter()
        logits = self.eval(prompt)
        stats.prefill_s = time.perf_counter() - t0
        sampler, history = sampler or Sampler(params), list(prompt)
        guard = _StopGuard(stop_strings)
        stats.finish_reason = "length"
        t0 = time.perf_counter()
        hit = False
        for _ in range(max_tokens):
            tok = sampler(logits, history)
            if tok in stop_ids:
                stats.finish_reason = "stop"
                break
            history.append(tok)
            stats.generated_tokens += 1
            text, hit = guard.push(detok.push(tok) if detok else "")
            yield Event(tok, text)
            if hit:
                stats.finish_reason = "stop"
                break
            if len(self.tokens) >= self.n_ctx:
                break
            logits = self._step(tok)
        if not hit:  # the text held back for a possible stop string or an unfinished character
            tail, hit = guard.push(detok.flush() if detok else "")
            if hit:
                stats.finish_reason = "stop"
            if tail := tail + guard.flush():
                yield Event(-1, tail)
        stats.decode_s = time.perf_counter() - t0

    @torch.inference_mode()
    def _step(self, tok: int) -> torch.Tensor:
        pos = len(self.tokens)
        hidden = self.model.forward(self._ids([tok]), self.cache, pos)
        logits = self.model.logits(hidden)[0].float().cpu()
        self.tokens.append(tok)
        return logits


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class _StopGuard:
    """Holds back text that could be the start of a stop string; reports when one is completed."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        buf = self.pending + text
        # the stop completed first in the text wins (of those ending together, the longest), not the
        # first one in the list: the cut must not depend on list order or on how text is split
        found = [(i + len(s), i) for s in self.stops if (i := buf.find(s)) >= 0]
        if found:
            self.pending = ""
            return buf[: min(found)[1]], True
        hold = max((_overlap(buf, s) for s in self.stops), default=0)
        self.pending = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of stop."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if stop.startswith(text[-n:]):
            return n
    return 0
