"""Serving benchmark: `vramfit serve` under load, measured with the real `openai` client.

Starts `vramfit serve MODEL --port <free> --parallel 4 --ctx 2048` on 127.0.0.1 as a subprocess, waits
for /health, then measures:

1. load: requests/s and completion tokens/s at 1, 2 and 4 concurrent clients (streamed chat
   completions, varied prompts, seeded sampling), with p50/p95 time to first token;
2. prompt cache: time to first token for a long prompt on a miss (a unique prefix) and on a hit (the
   same conversation extended by one user turn), with the `cached_tokens` the server reports;
3. a 10-turn conversation: per turn prompt_tokens, cached_tokens, the new tokens actually prefilled,
   time to first token and total time.

The server is always stopped at the end. Everything talks to 127.0.0.1 only.
Run:  .venv/bin/python bench/serve_load.py [--model smollm2-135m] [--requests 8] [--turns 10]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import openai

HOST = "127.0.0.1"

TOPICS = [
    "the water cycle", "how a compiler works", "why the sky is blue", "the history of the bicycle",
    "photosynthesis", "binary search", "the rules of chess", "how vaccines work", "volcanoes",
    "the French revolution", "hash tables", "the moon landing", "coffee brewing", "black holes",
    "recursion", "honey bees",
]  # fmt: skip
ASKS = ["Explain {} in two sentences.", "Give three facts about {}.", "Write a short poem about {}.",
        "Summarize {} for a child."]  # fmt: skip

# ~60 words a paragraph; repeated (with numbered sections) to make a long, non-trivial system prompt.
PARAGRAPH = (
    "The repository holds a small inference engine for quantized language models. It reads GGUF files, "
    "plans how the weights and the key-value cache fit in memory, and runs the transformer layers on the "
    "CPU or on a GPU. The server keeps one slot per concurrent request, and each slot remembers the "
    "tokens it processed last so that a follow-up request only has to process what is new."
)


def long_text(n_paragraphs: int) -> str:
    return "\n\n".join(f"Section {i + 1}. {PARAGRAPH}" for i in range(n_paragraphs))


@dataclass
class Result:
    ttft: float  # seconds to the first content token
    total: float  # seconds to the end of the stream
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    text: str


def stream_chat(
    client: openai.OpenAI, model: str, messages: list[dict], max_tokens: int, seed: int
) -> Result:
    """One streamed chat completion; times the first content delta and reads the final usage chunk."""
    t0 = time.perf_counter()
    ttft = None
    parts: list[str] = []
    usage = None
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0.7, seed=seed, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                if ttft is None:
                    ttft = time.perf_counter() - t0
                parts.append(choice.delta.content)
    total = time.perf_counter() - t0
    if usage is None:
        raise RuntimeError("the stream ended without a usage chunk")
    details = usage.prompt_tokens_details
    cached = (details.cached_tokens or 0) if details is not None else 0
    return Result(ttft if ttft is not None else total, total, usage.prompt_tokens, cached,
                  usage.completion_tokens, "".join(parts))  # fmt: skip


# -- the server -----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    """`vramfit serve` in a subprocess; its output goes to a temporary log file."""

    def __init__(self, model: str, parallel: int, ctx: int, threads: int | None, start_timeout: float):
        self.port = free_port()
        self.base = f"http://{HOST}:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="serve_load_", suffix=".log", delete=False)
        cmd = [sys.executable, "-c", "import sys; from vramfit.cli import main; sys.exit(main())",
               "serve", model, "--host", HOST, "--port", str(self.port), "--parallel", str(parallel),
               "--ctx", str(ctx)]  # fmt: skip
        if threads:
            cmd += ["--threads", str(threads)]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.start_timeout = start_timeout

    def wait_ready(self) -> float:
        """Poll /health until 200 (bounded); returns the seconds it took."""
        t0 = time.monotonic()
        deadline = t0 + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.base + "/health", timeout=5).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"the server was not ready after {self.start_timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 30) -> str:
        self.log.flush()
        with open(self.log.name, errors="replace") as f:
            return "".join(f.readlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)
        self.log.close()
        os.unlink(self.log.name)


# -- 1. load ------------------------------------------------------------------------------------------


def pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


def load_test(client: openai.OpenAI, model: str, levels: list[int], n_requests: int, max_tokens: int) -> None:
    print(f"## Load: {n_requests} streamed chat completions per level, max_tokens={max_tokens}, "
          "temperature 0.7, seeded, varied prompts\n")  # fmt: skip
    print("| clients | requests | req/s | completion tok/s | p50 TTFT ms | p95 TTFT ms | errors |")
    print("|--:|--:|--:|--:|--:|--:|--:|")
    counter = iter(range(10**9))
    lock = threading.Lock()

    def one(_: int) -> Result:
        with lock:
            i = next(counter)
        topic, ask = TOPICS[i % len(TOPICS)], ASKS[(i // len(TOPICS)) % len(ASKS)]
        return stream_chat(
            client, model, [{"role": "user", "content": ask.format(topic)}], max_tokens, seed=i
        )

    for clients in levels:
        results: list[Result] = []
        errors = 0
        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            for fut in [pool.submit(one, k) for k in range(n_requests)]:
                try:
                    results.append(fut.result(timeout=600))
                except Exception as e:  # counted and shown; the benchmark goes on
                    errors += 1
                    print(f"  error: {type(e).__name__}: {e}", file=sys.stderr)
        wall = time.perf_counter() - t0
        toks = sum(r.completion_tokens for r in results)
        ttfts = [r.ttft * 1000 for r in results] or [float("nan")]
        print(f"| {clients} | {len(results)} | {len(results) / wall:.2f} | {toks / wall:.1f} | "
              f"{pct(ttfts, 50):.0f} | {pct(ttfts, 95):.0f} | {errors} |")  # fmt: skip
    print()


# -- 2. TTFT, cache miss against hit ----------------------------------------------------------------------


def cache_test(client: openai.OpenAI, model: str, reps: int, n_paragraphs: int, max_tokens: int) -> None:
    print(f"## Time to first token: cache miss vs hit ({reps} repetitions, long system prompt)\n")
    print(
        "| rep | miss prompt tok | miss cached | miss TTFT ms | hit prompt tok | hit cached | hit TTFT ms |"
    )
    print("|--:|--:|--:|--:|--:|--:|--:|")
    miss_t, hit_t = [], []
    body = long_text(n_paragraphs)
    for rep in range(reps):
        # The unique prefix leads the first message, so no slot shares more than the template's opening.
        nonce = uuid.uuid4().hex
        messages = [{"role": "system", "content": f"Session {nonce}. Read the notes below.\n\n{body}"},
                    {"role": "user", "content": "What does the server keep per slot?"}]  # fmt: skip
        miss = stream_chat(client, model, messages, max_tokens, seed=rep)
        follow_up = "And why does that make follow-up requests faster?"
        messages += [{"role": "assistant", "content": miss.text}, {"role": "user", "content": follow_up}]
        hit = stream_chat(client, model, messages, max_tokens, seed=rep)
        miss_t.append(miss.ttft * 1000)
        hit_t.append(hit.ttft * 1000)
        print(f"| {rep + 1} | {miss.prompt_tokens} | {miss.cached_tokens} | {miss.ttft * 1000:.0f} | "
              f"{hit.prompt_tokens} | {hit.cached_tokens} | {hit.ttft * 1000:.0f} |")  # fmt: skip
    m, h = statistics.median(miss_t), statistics.median(hit_t)
    print(f"\nmedian TTFT: miss {m:.0f} ms, hit {h:.0f} ms ({m / h:.1f}x faster with the cache)\n")


# -- 3. a multi-turn conversation ------------------------------------------------------------------------


def conversation(client: openai.OpenAI, model: str, turns: int, n_paragraphs: int, max_tokens: int) -> None:
    print(f"## {turns}-turn conversation (each turn: the previous reply plus a new user message)\n")
    print("| turn | prompt tokens | cached tokens | prefilled (new) | TTFT ms | total ms | completion tok |")
    print("|--:|--:|--:|--:|--:|--:|--:|")
    nonce = uuid.uuid4().hex
    messages = [{"role": "system", "content": f"Conversation {nonce}.\n\n{long_text(n_paragraphs)}"}]
    only_new = True
    prev_prompt = 0
    for turn in range(turns):
        topic = TOPICS[turn % len(TOPICS)]
        messages.append({"role": "user", "content": f"Turn {turn + 1}: tell me one thing about {topic}."})
        r = stream_chat(client, model, messages, max_tokens, seed=1000 + turn)
        messages.append({"role": "assistant", "content": r.text})
        new = r.prompt_tokens - r.cached_tokens
        # After the first turn everything up to the previous prompt must come from the cache.
        if turn > 0 and r.cached_tokens < prev_prompt:
            only_new = False
        prev_prompt = r.prompt_tokens
        print(f"| {turn + 1} | {r.prompt_tokens} | {r.cached_tokens} | {new} | {r.ttft * 1000:.0f} | "
              f"{r.total * 1000:.0f} | {r.completion_tokens} |")  # fmt: skip
    verdict = "yes" if only_new else "NO"
    print(f"\neach turn after the first reused at least the previous turn's whole prompt: {verdict}\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=8, help="requests per concurrency level")
    ap.add_argument("--levels", default="1,2,4", help="concurrent clients, comma separated")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--cache-reps", type=int, default=3, help="miss/hit pairs")
    ap.add_argument("--paragraphs", type=int, default=8, help="long-prompt size (~75 tokens each)")
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=None, help="server CPU threads (default: all cores)")
    ap.add_argument("--start-timeout", type=float, default=300.0, help="seconds to wait for /health")
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",") if x.strip()]

    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    print("# vramfit serve load benchmark\n")
    print(f"model: {args.model}   machine threads: {cores} (usable: {usable})   "
          f"server threads: {args.threads or 'all'}   "
          f"--parallel {args.parallel} --ctx {args.ctx}")  # fmt: skip

    server = Server(args.model, args.parallel, args.ctx, args.threads, args.start_timeout)
    try:
        print(f"server ready after {server.wait_ready():.1f} s on {server.base}\n")
        client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=300)
        model = client.models.list().data[0].id
        stream_chat(client, model, [{"role": "user", "content": "Hello"}], 4, seed=0)  # warm-up
        load_test(client, model, levels, args.requests, args.max_tokens)
        cache_test(client, model, args.cache_reps, args.paragraphs, args.max_tokens)
        conversation(client, model, args.turns, max(1, args.paragraphs // 2), args.max_tokens)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
