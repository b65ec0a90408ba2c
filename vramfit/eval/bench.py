"""llama-bench style speed test: pp<N> (prompt processing) and tg<N> (token generation) in tokens/s.

pp times one prefill of N tokens from an empty cache; tg times N single-token decode steps from an
empty cache, as llama-bench does. One untimed warm-up run precedes the timed repetitions.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from vramfit.gguf.types import file_type_name
from vramfit.kernels.dispatch import get_threads


@dataclass
class BenchRow:
    model: str
    size_bytes: int
    n_params: int
    backend: str
    threads: int
    test: str
    tps_mean: float
    tps_std: float
    samples: list[float]

    def as_dict(self) -> dict:
        return asdict(self)


def describe(m) -> tuple[str, int, int]:
    """(model label like llama.cpp's, tensor bytes, parameter count)."""
    md = m.metadata
    tensors = m.gguf.tensors.values()
    n_params = sum(t.n_elements for t in tensors)
    size = sum(t.nbytes for t in tensors)
    label = md.get("general.size_label") or f"{n_params / 1e9:.1f}B"
    return f"{m.gguf.architecture} {label} {file_type_name(md.get('general.file_type'))}", size, n_params


def _tokens(n: int, n_vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(42)
    return torch.randint(0, n_vocab, (n,), generator=g).tolist()


def time_pp(m, n: int) -> float:
    m.engine.reset()
    ids = _tokens(n, m.tokenizer.vocab_size)
    t0 = time.perf_counter()
    m.engine.eval(ids)
    return n / (time.perf_counter() - t0)


def time_tg(m, n: int) -> float:
    m.engine.reset()
    ids = _tokens(n, m.tokenizer.vocab_size)
    t0 = time.perf_counter()
    m.engine.eval(ids[:1])
    for tok in ids[1:]:
        m.engine._step(tok)
    return n / (time.perf_counter() - t0)


def run_bench(m, n_prompt: int = 512, n_gen: int = 128, reps: int = 3) -> list[BenchRow]:
    """Rows for pp{n_prompt} and tg{n_gen} (either skipped when 0)."""
    label, size, n_params = describe(m)
    need = max(n_prompt, n_gen)
    if need > m.n_ctx:
        raise ValueError(f"benchmark needs {need} tokens of context, the model has {m.n_ctx} (use --ctx)")
    rows = []
    for test, n, fn in (("pp", n_prompt, time_pp), ("tg", n_gen, time_tg)):
        if n <= 0:
            continue
        fn(m, min(n, 16))  # warm-up: first touch of the weights, allocator, thread pool
        samples = [fn(m, n) for _ in range(reps)]
        std = statistics.stdev(samples) if len(samples) > 1 else 0.0
        rows.append(BenchRow(label, size, n_params, "CPU", get_threads(), f"{test}{n}",
                             statistics.mean(samples), std, samples))  # fmt: skip
    return rows


def format_table(rows: list[BenchRow]) -> str:
    head = "| model | size | params | backend | threads | test | t/s |"
    lines = [head, "| --- | ---: | ---: | --- | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.size_bytes / 2**20:.2f} MiB | {r.n_params / 1e6:.2f} M | {r.backend} | "
            f"{r.threads} | {r.test} | {r.tps_mean:.2f} ± {r.tps_std:.2f} |"
        )
    return "\n".join(lines)
