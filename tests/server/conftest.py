"""Server fixtures: smollm2-135m loaded once per session; real uvicorn servers on 127.0.0.1 (a free port)
in background threads, stopped when the fixture ends."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import uvicorn

from vramfit.runtime.engine import Event

MODEL = "smollm2-135m"
CTX = 256


@pytest.fixture(scope="session")
def smol():
    import vramfit

    return vramfit.load(MODEL, n_ctx=CTX)


class ScriptedEngine:
    """Stands in for a slot's Engine: yields the scripted text pieces, records the prompts it got."""

    def __init__(self, pieces: list[str], delay: float = 0.0):
        self.pieces, self.tokens, self.prompts, self.delay = pieces, [], [], delay

    def generate(
        self, prompt, max_tokens, params, stop_ids=(), detok=None, stop_strings=(), stats=None, sampler=None
    ):
        self.prompts.append(list(prompt))
        stats.prompt_tokens, stats.finish_reason = len(prompt), "stop"
        for i, text in enumerate(self.pieces[:max_tokens]):
            time.sleep(self.delay)
            stats.generated_tokens += 1
            yield Event(1000 + i, text)


@contextlib.contextmanager
def run_server(app) -> Iterator[str]:
    """Serve `app` on 127.0.0.1 in a thread; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


def client_for(base: str, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=api_key, max_retries=0, timeout=120)


def metrics(base: str) -> dict[str, float]:
    """The unlabelled samples of /metrics, by name."""
    text = httpx.get(base + "/metrics", timeout=30).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.split()
            out[name] = float(value)
    return out


@contextlib.contextmanager
def one_torch_thread():
    """For oracle computations in the test thread: on a loaded 2-core machine torch's intra-op threads
    spin against each other and make a 40-token prefill take seconds instead of a fraction of one."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def wait_until(predicate, timeout: float = 30.0, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()
