"""Many requests against one server: mixed streaming, clients that hang up mid-stream, bad bodies and
oversized prompts, from 4 threads at once onto 2 slots. The slots' engines are scripted (the server
machinery is under test, not the model): every request gets its expected answer, none is lost, every
generation ends (completed or cancelled) and resident memory stays flat."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.server.conftest import MODEL, ScriptedEngine, client_for, metrics, run_server, wait_until
from vramfit.server.app import create_app
from vramfit.server.serving import Serving

PIECES = [f" w{i}" for i in range(12)]
N = 200


def _rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.fixture(scope="module")
def server(smol):
    serving = Serving(smol, MODEL, parallel=2)
    for slot in serving.slots:
        slot.engine = ScriptedEngine(PIECES, delay=0.002)
    with run_server(create_app(serving)) as base:
        yield base, serving


def _one(i: int, client: openai.OpenAI, base: str) -> str:
    """Request i, of a kind chosen by i; returns what happened."""
    messages = [{"role": "user", "content": f"request {i}"}]
    kind = i % 5
    if kind == 0:
        r = client.chat.completions.create(model=MODEL, messages=messages)
        assert r.choices[0].message.content == "".join(PIECES) and r.usage.completion_tokens == len(PIECES)
        return "complete"
    if kind == 1:
        chunks = list(client.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                                     stream_options={"include_usage": True}))  # fmt: skip
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "".join(PIECES)
        assert chunks[-1].usage.completion_tokens == len(PIECES)
        return "complete"
    if kind == 2:
        stream = client.chat.completions.create(model=MODEL, messages=messages, stream=True)
        for n, _ in enumerate(stream):
            if n == 2:
                break
        stream.close()
        return "hung up"
    if kind == 3:
        r = httpx.post(base + "/v1/chat/completions", content=b'{"messages": [{"role": "user"', timeout=60)
        assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
        return "400"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 300}])
    assert e.value.body["code"] == "context_length_exceeded"
    return "400"


def test_many_mixed_requests_from_four_clients(server):
    base, serving = server
    client = client_for(base)
    before = metrics(base)
    rss: dict[int, float] = {}
    lock = threading.Lock()

    def run(i: int) -> str:
        out = _one(i, client, base)
        with lock:
            if i in (50, N - 1):
                rss[i] = _rss_mb()
        return out

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(run, range(N)))
    assert (
        outcomes.count("complete") == 80 and outcomes.count("hung up") == 40 and outcomes.count("400") == 80
    )
    started = 120  # kinds 0, 1 and 2 reach a slot; bad bodies and oversized prompts do not
    assert wait_until(lambda: serving.busy == 0)

    def ended() -> float:
        m = metrics(base)
        return sum(m[k] - before[k] for k in ("vramfit_completed_total", "vramfit_cancelled_total"))

    assert wait_until(lambda: ended() == started)
    after = metrics(base)
    assert after["vramfit_completed_total"] - before["vramfit_completed_total"] >= 80
    assert after["vramfit_queue_depth"] == 0
    assert rss[N - 1] - rss[50] < 50, rss
