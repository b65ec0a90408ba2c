"""The `vramfit` command end to end, as a user runs it (subprocesses, real models)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vramfit.gguf import GGUFFile, GGUFWriter, type_by_name


def vramfit(*args: str, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "vramfit.cli", *args]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr  # one line, no traceback
    assert lines[0].startswith("vramfit: error: ")
    for needle in needles:
        assert needle in lines[0]


def test_run_greedy_completion(model_path):
    model_path("smollm2-135m")
    res = vramfit("run", "smollm2-135m", "-p", "The capital of France is", "-n", "16", "--temp", "0")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("The capital of France is")
    assert "Paris" in res.stdout
    assert "generated 16 tokens" in res.stderr or "stop: stop" in res.stderr


def test_chat_holds_a_multi_turn_conversation(model_path):
    model_path("qwen2.5-coder-0.5b")
    turns = "My name is Ada. Reply with one short sentence.\nWhat is my name? Answer with just the name.\n"
    res = vramfit("chat", "qwen2.5-coder-0.5b", "--temp", "0", "-n", "40", stdin=turns)
    assert res.returncode == 0, res.stderr
    replies = [line for line in res.stdout.splitlines() if line.strip()]
    assert len(replies) >= 2
    assert "Ada" in res.stdout.split("\n", 1)[1] or "Ada" in replies[-1]
    # the second turn reuses the first turn's cached prompt
    stats = [line for line in res.stderr.splitlines() if line.startswith("prompt ")]
    assert len(stats) == 2
    cached = int(stats[1].split("(")[1].split()[0])
    assert cached > 20


def test_inspect_lists_tensors(model_path):
    path = model_path("smollm2-135m")
    res = vramfit("inspect", str(path))
    assert res.returncode == 0, res.stderr
    assert "general.architecture" in res.stdout
    assert "token_embd.weight" in res.stdout
    assert "Q4_1" in res.stdout and "Q8_0" in res.stdout
    n_tensors = len(GGUFFile(path).tensors)
    assert f"{n_tensors} tensors" in res.stdout


def test_bench_json_rows(model_path):
    model_path("smollm2-135m")
    res = vramfit("bench", "smollm2-135m", "-p", "32", "-n", "8", "-r", "2", "--json")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert [r["test"] for r in rows] == ["pp32", "tg8"]
    for r in rows:
        assert r["tps_mean"] > 0 and len(r["samples"]) == 2
        assert r["model"].startswith("llama 135M Q4_1")


def test_bench_table(model_path):
    model_path("smollm2-135m")
    res = vramfit("bench", "smollm2-135m", "-p", "16", "-n", "4", "-r", "1")
    assert res.returncode == 0, res.stderr
    assert "| model | size | params | backend | threads | test | t/s |" in res.stdout
    assert "| pp16 |" in res.stdout and "| tg4 |" in res.stdout


def test_pull_known_model(model_path):
    path = model_path("smollm2-135m")
    res = vramfit("pull", "smollm2-135m")
    assert res.returncode == 0, res.stderr
    assert str(path) in res.stdout


# ---- bad input: one line naming the problem, exit status 2 ----


def test_missing_file():
    assert_one_line_error(vramfit("run", "/no/such/model.gguf", "-p", "x"), "no such file")


def test_unknown_model_name():
    assert_one_line_error(vramfit("run", "no-such-model", "-p", "x"), "no-such-model", "smollm2-135m")


def test_hf_reference_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VRAMFIT_HOME", str(tmp_path))
    assert_one_line_error(vramfit("pull", "hf:someone/some-model/model.gguf"), "hf:someone/some-model")


def test_not_a_gguf(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello, I am not a model\n")
    assert_one_line_error(vramfit("run", str(p), "-p", "x"), "not a GGUF")


def test_directory(tmp_path):
    assert_one_line_error(vramfit("inspect", str(tmp_path)), "directory")


@pytest.mark.parametrize("keep", [3, 100, 2_000_000])
def test_truncated_gguf(tmp_path, model_path, keep):
    src = model_path("smollm2-135m").read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(src[:keep])
    assert_one_line_error(vramfit("run", str(p), "-p", "x"), "truncated" if keep > 4 else "GGUF")


def _tiny_gguf(path: Path, arch: str, type_id: int | None = None) -> None:
    w = GGUFWriter(path)
    w.add("general.architecture", arch)
    w.add_tensor("token_embd.weight", (2, 32), type_by_name("f32"), np.zeros((2, 32), np.float32))
    w.write()
    if type_id is not None:  # patch the type field of the only tensor info
        data = bytearray(path.read_bytes())
        name = b"token_embd.weight"
        at = data.index(name) + len(name) + 4 + 2 * 8  # n_dims u32, two u64 dims
        struct.pack_into("<I", data, at, type_id)
        path.write_bytes(bytes(data))


def test_unknown_architecture(tmp_path):
    p = tmp_path / "alien.gguf"
    _tiny_gguf(p, "alienformer")
    assert_one_line_error(vramfit("run", str(p), "-p", "x"), "unknown architecture", "alienformer")


def test_unknown_tensor_type(tmp_path):
    p = tmp_path / "badtype.gguf"
    _tiny_gguf(p, "llama", type_id=999)
    assert_one_line_error(vramfit("run", str(p), "-p", "x"), "unknown ggml tensor type id 999", "token_embd")


def test_prompt_longer_than_context(model_path):
    model_path("smollm2-135m")
    res = vramfit("run", "smollm2-135m", "-c", "16", "-p", "word " * 40, "-n", "4")
    assert_one_line_error(res, "context")


# ---- the memory plan before loading (run, chat, serve) ----


def test_run_plans_the_load_on_stderr(model_path, metadata):
    model_path("smollm2-135m")
    train = metadata("smollm2-135m")["llama.context_length"]
    res = vramfit("run", "smollm2-135m", "-p", "The capital of France is", "-n", "4", "--temp", "0")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("The capital of France is") and "memory plan" not in res.stdout
    # plenty of memory: the whole training context with the exact (float32) cache
    assert "memory plan: " in res.stderr and f"context {train:,} x 1, KV f32/f32" in res.stderr
    verdict = [line for line in res.stderr.splitlines() if line.startswith("fits: ")]
    assert len(verdict) == 1 and f"context {train:,} with f32/f32 KV cache" in verdict[0]


def test_chat_with_little_memory_gets_a_smaller_quantized_cache(model_path):
    from vramfit.gguf import GGUFFile
    from vramfit.runtime.planner import CPU, MiB, ModelInfo, plan

    info = ModelInfo.from_gguf(GGUFFile(model_path("qwen2.5-coder-0.5b")))
    expect = plan(info, 780 * MiB, "max", "auto", device=CPU)
    assert expect.ctx < info.n_ctx_train and expect.k_type == "q8_0"
    res = vramfit("chat", "qwen2.5-coder-0.5b", "--mem", "780MiB", stdin="")
    assert res.returncode == 0, res.stderr
    assert f"(ctx {expect.ctx})" in res.stderr  # what the loaded engine reports
    assert "KV q8_0/q8_0" in res.stderr and f"fits: context {expect.ctx:,} with q8_0/q8_0" in res.stderr


def test_run_refuses_when_nothing_fits(model_path):
    model_path("smollm2-135m")
    res = vramfit("run", "smollm2-135m", "--mem", "10MiB", "-p", "x")
    assert_one_line_error(res, "does not fit", "10 MiB", "nearest: at least")
    res = vramfit("run", "smollm2-135m", "--vram", "1GiB", "-c", "1000000", "-p", "x")
    assert_one_line_error(res, "does not fit: context 1,000,000", "nearest: --ctx ")


def test_run_context_beyond_training_warns_and_runs(model_path, metadata):
    model_path("smollm2-135m")
    train = metadata("smollm2-135m")["llama.context_length"]
    res = vramfit("run", "smollm2-135m", "-c", str(train + 1024), "-p", "Hi", "-n", "2", "--temp", "0")
    assert res.returncode == 0, res.stderr
    warns = [line for line in res.stderr.splitlines() if line.startswith("warning: ")]
    assert warns == [f"warning: context {train + 1024} is beyond the model's training length {train}: "
                     "quality may drop"]  # fmt: skip


@pytest.mark.parametrize(
    "flags, needle",
    [(["-ctk", "q7_0"], "unknown KV cache type 'q7_0'"), (["-ctv", "fp8"], "unknown KV cache type 'fp8'"),
     (["--mem", "lots"], "cannot read the size 'lots'")],
)  # fmt: skip
def test_run_bad_kv_and_memory_flags(model_path, flags, needle):
    model_path("smollm2-135m")
    assert_one_line_error(vramfit("run", "smollm2-135m", *flags, "-p", "x"), needle)


def test_kv_type_the_head_size_cannot_hold(tmp_path):
    from vramfit.model.random_model import random_model_spec, write_random_model

    spec = random_model_spec("llama", "tiny")
    spec.metadata["llama.attention.key_length"] = 48  # heads of 48: no 32-blocks, no Hadamard
    path = tmp_path / "head48.gguf"
    write_random_model(spec, path)
    res = vramfit("run", str(path), "-ctk", "q8_0", "-p", "x")
    assert_one_line_error(res, "KV cache type q8_0 needs a head size that is a multiple of 32, not 48")
    res = vramfit("run", str(path), "-khad", "-p", "x")
    assert_one_line_error(res, "the Hadamard rotation needs a power-of-two head size, not 48")


def test_serve_plans_before_it_starts(monkeypatch, capsys, model_path):
    from vramfit import cli

    model_path("smollm2-135m")
    started = []
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: started.append(kw))
    assert cli.main(["serve", "smollm2-135m", "--parallel", "2", "-ctk", "q8_0", "--port", "9002"]) == 0
    err = capsys.readouterr().err
    assert started == [{"host": "127.0.0.1", "port": 9002, "log_level": "info"}]
    assert "context 8,192 x 2, KV q8_0/q8_0" in err and "x 2 slots" in err
    assert cli.main(["serve", "smollm2-135m", "--mem", "10MiB"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vramfit: error: does not fit") and len(started) == 1
