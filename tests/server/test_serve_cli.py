"""`vramfit serve` wiring: the parser's options reach `vramfit.server.app.serve` (not started here; the
app itself is exercised over HTTP in the other server tests), and CORS headers when --cors is given."""

from __future__ import annotations

import httpx
import pytest

from tests.server.conftest import MODEL, run_server
from vramfit import cli
from vramfit.server.app import create_app
from vramfit.server.protocol import APIError
from vramfit.server.serving import Serving


def test_serve_options_reach_the_server(monkeypatch):
    seen = {}
    monkeypatch.setattr("vramfit.server.app.serve", lambda *a, **k: seen.update(args=a, kw=k))
    argv = ["serve", MODEL, "--host", "127.0.0.1", "--port", "9001", "--ctx", "512", "--parallel", "3",
            "--api-key", "k", "--cors", "http://a.example", "--cors", "http://b.example", "--device", "cpu",
            "-ctk", "q8_0", "--mem", "2GiB", "--alias", "gpt-4o", "--alias", "claude"]  # fmt: skip
    assert cli.main(argv) == 0
    assert seen["args"] == (MODEL, "127.0.0.1", 9001, 512, 3, "k", ["http://a.example", "http://b.example"])
    assert seen["kw"] == {"device": "cpu", "ctk": "q8_0", "mem": "2GiB", "aliases": ("gpt-4o", "claude")}


def test_serve_defaults(monkeypatch):
    seen = {}
    monkeypatch.setattr("vramfit.server.app.serve", lambda *a: seen.setdefault("args", a))
    assert cli.main(["serve", MODEL]) == 0
    assert seen["args"] == (MODEL, "127.0.0.1", 8080, None, 1, None, None)


def test_serve_rejects_zero_slots(capsys):
    assert cli.main(["serve", MODEL, "--parallel", "0"]) == 2
    assert "--parallel must be at least 1" in capsys.readouterr().err


def test_cors_preflight_and_header(smol):
    with run_server(create_app(Serving(smol, MODEL), cors=["http://app.example"], api_key="k")) as url:
        pre = httpx.options(url + "/v1/chat/completions", timeout=30, headers={
            "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})  # fmt: skip
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] == "http://app.example"
        r = httpx.get(
            url + "/v1/models", timeout=30, headers={"Origin": "http://app.example", "x-api-key": "k"}
        )
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
        other = httpx.get(url + "/health", timeout=30, headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_aliases_and_any_model_name(smol):
    # llama-server answers whatever "model" says; here only with --alias NAME, or "*" for any name
    named = Serving(smol, MODEL, aliases=("gpt-4o",))
    named.check_model("gpt-4o")
    named.check_model(MODEL)
    with pytest.raises(APIError) as e:
        named.check_model("claude-sonnet")
    assert e.value.status == 404
    Serving(smol, MODEL, aliases=("*",)).check_model("claude-sonnet")
