"""Library API: `vramfit.load(path_or_name)` returns a `Model` that tokenizes, scores and generates.

Each CLI verb wraps these calls, so a Python user gets the same behaviour as the command line.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vramfit.gguf import GGUFFile
from vramfit.hub import resolve
from vramfit.model.loader import load_model, resolve_device
from vramfit.runtime.chat_template import render_chat, template_from_metadata
from vramfit.runtime.engine import Engine, Stats
from vramfit.runtime.sampling import SamplingParams
from vramfit.runtime.tokenizer import Tokenizer


class Model:
    """A loaded GGUF model with its tokenizer, chat template and one generation engine."""

    def __init__(
        self, path: str | Path, n_ctx: int | None = None, kv_type=None, gguf: GGUFFile | None = None,
        device: str | None = None,
    ):  # fmt: skip
        """kv_type: KV cache storage, a `KVSpec`, "q8_0", "q8_0/q6_0" or None (float32); gguf: the file
        already open (its metadata parsed), else it is opened here; device: "auto" (None: a CUDA GPU
        when there is one, else the CPU), "cpu", "cuda"."""
        self.path = Path(path)
        self.gguf = gguf or GGUFFile(self.path)
        self.device = resolve_device(device)
        self.model, _ = load_model(self.path, n_ctx, gguf=self.gguf, kv_type=kv_type, device=self.device)
        self.config = self.model.cfg
        self.tokenizer = Tokenizer(self.gguf.metadata)
        self.chat_template = template_from_metadata(self.gguf.metadata)
        self.gguf.release_header()  # the vocabulary's pages, read while the tokenizer was built
        self.engine = Engine(self.model)
        self.last_stats = Stats()

    @property
    def n_ctx(self) -> int:
        return self.engine.n_ctx

    @property
    def metadata(self) -> dict[str, Any]:
        return self.gguf.metadata

    def tokenize(self, text: str, special: bool = False, add_bos: bool | None = None) -> list[int]:
        return self.tokenizer.encode(text, special=special, add_bos=add_bos)

    def detokenize(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special=skip_special)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """float32 (len(ids), n_vocab): the next-token logits at every position, from a fresh start."""
        return self.engine.logits_all([int(i) for i in ids]).numpy()

    def generate(
        self,
        prompt: str | Sequence[int],
        max_tokens: int = 128,
        stream: bool = False,
        stop: Sequence[str] = (),
        special: bool = True,
        **sampling: Any,
    ) -> str | Iterator[str]:
        """Complete `prompt` (text, parsed with special tokens by default, or token ids).

        `sampling` takes SamplingParams fields: temperature, top_k, top_p, min_p, repeat_penalty,
        repeat_last_n, presence_penalty, frequency_penalty, seed."""
        ids = self.tokenize(prompt, special=special) if isinstance(prompt, str) else list(prompt)
        self.last_stats = Stats()  # reset now, not when a stream starts being read
        pieces = self._stream(ids, max_tokens, SamplingParams(**sampling), tuple(stop), self.last_stats)
        return pieces if stream else "".join(pieces)

    def chat(
        self,
        messages: list[dict[str, Any]],
        max_tokens: int = 512,
        stream: bool = False,
        tools: list[dict[str, Any]] | None = None,
        stop: Sequence[str] = (),
        **sampling: Any,
    ) -> str | Iterator[str]:
        """Reply to a conversation rendered with the model's chat template."""
        return self.generate(self.render(messages, tools), max_tokens, stream, stop, True, **sampling)

    def render(self, messages: list[dict[str, Any]], tools=None, add_generation_prompt=True) -> str:
        tok = self.tokenizer
        bos = tok.tokens[tok.bos_id] if tok.bos_id is not None else ""
        eos = tok.tokens[tok.eos_id] if tok.eos_id is not None else ""
        return render_chat(self.chat_template, messages, tools, add_generation_prompt, bos, eos)

    def _stream(self, ids: list[int], max_tokens: int, params: SamplingParams, stop, stats) -> Iterator[str]:
        events = self.engine.generate(
            ids,
            max_tokens,
            params,
            stop_ids=set(self.tokenizer.eot_ids),
            detok=_Detok(self.tokenizer),
            stop_strings=stop,
            stats=stats,
        )
        for ev in events:
            if ev.text:
                yield ev.text


class _Detok:
    """Adapts the tokenizer's incremental decoder to the engine's push/flush protocol."""

    def __init__(self, tok: Tokenizer):
        self._dec = tok.incremental_decoder(skip_special=False)

    def push(self, token: int) -> str:
        return self._dec.feed(token)

    def flush(self) -> str:
        return self._dec.flush()


def load(
    path_or_name: str | Path, n_ctx: int | None = None, kv_type=None, device: str | None = None
) -> Model:
    """Open a GGUF by path, short name (`smollm2-135m`, ...) or `hf:OWNER/REPO/FILE.gguf`.
    kv_type: KV cache storage ("q8_0", "q8_0/q6_0", a `vramfit.model.kvcache.KVSpec`); default float32.
    device: "auto" (None), "cpu" or "cuda"."""
    return Model(resolve(str(path_or_name)), n_ctx, kv_type, device=device)
