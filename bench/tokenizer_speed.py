"""Tokenizer benchmark: vramfit's compact BPE, HF tokenizers (our fallback) and llama-cpp-python.

For each model: time to build the tokenizer from the GGUF, time to encode a long text (vramfit's own
Python sources, 400K characters: a coding agent's prompt), resident memory the built tokenizer holds
(fresh process, RSS after minus before, freed heap returned first), and agreement with llama.cpp's
ids: on that text, and on a sweep of every Unicode code point (surrogates excepted) in six contexts
("{}", "a{}b", " {}x", "1{}2", "{}{}", " {} "), 4096 code points a chunk, 1632 chunks.

Run:  .venv/bin/python bench/tokenizer_speed.py [models ...] [--peer-python /path/to/python]
The peer is looked for in this interpreter, or in the one given with --peer-python.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

DEFAULT_MODELS = ["smollm2-135m", "qwen2.5-coder-0.5b"]
CONTEXTS = ("{}", "a{}b", " {}x", "1{}2", "{}{}", " {} ")


def sweep_texts():
    cps = [c for c in range(0x110000) if not 0xD800 <= c < 0xE000]
    for ctx in CONTEXTS:
        for s in range(0, len(cps), 4096):
            yield "\n".join(ctx.format(chr(c), chr(c)) for c in cps[s : s + 4096])


PEER_SCRIPT = (
    f"CONTEXTS = {CONTEXTS!r}\n"
    + inspect.getsource(sweep_texts)
    + textwrap.dedent(
        """
    import hashlib, json, sys, time
    from llama_cpp import Llama
    path, text = sys.argv[1], open(sys.argv[2], encoding="utf-8").read()
    t = time.perf_counter()
    llm = Llama(model_path=path, vocab_only=True, verbose=False)
    build = time.perf_counter() - t
    best = 1e9
    for _ in range(3):
        t = time.perf_counter()
        ids = llm.tokenize(text.encode(), add_bos=False, special=False)
        best = min(best, time.perf_counter() - t)
    def digest(s):
        ids = llm.tokenize(s.encode(), add_bos=False, special=False)
        return hashlib.sha1(json.dumps(ids).encode()).hexdigest()
    sweep = [digest(s) for s in sweep_texts()]
    print(json.dumps({"build": build, "encode": best, "ids": ids, "sweep": sweep}))
    """
    )
)

MEMORY_SCRIPT = textwrap.dedent(
    """
    import gc, sys
    from vramfit.gguf import GGUFFile
    from vramfit.hub import resolve
    from vramfit.runtime import bpe
    from vramfit.runtime.heap import release_free_heap
    from vramfit.runtime.tokenizer import PRE_TOKENIZER_REGEXES, _IGNORE_MERGES, resolve_pre

    def rss():
        gc.collect(); release_free_heap()
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS"))

    g = GGUFFile(resolve(sys.argv[1]))
    md, pre = g.metadata, resolve_pre(g.metadata.get("tokenizer.ggml.pre"))
    tokens, merges = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.merges"]
    bpe.build_gpt2(["a"], [], ["a"], False, sys.argv[2] == "compact").encode_texts(["a"])  # code paged in
    before = rss()
    compact = sys.argv[2] == "compact"
    b = bpe.build_gpt2(tokens, merges, PRE_TOKENIZER_REGEXES[pre], pre in _IGNORE_MERGES, compact)
    b.encode_texts(["warm up"])
    g.release_header()
    print(rss() - before)
    """
)


def long_text() -> str:
    root = Path(__file__).resolve().parent.parent / "vramfit"
    return "".join(p.read_text() for p in sorted(root.rglob("*.py")))[:400_000]


def ours(name: str, compact: bool, text: str) -> dict:
    from vramfit.gguf import GGUFFile
    from vramfit.hub import resolve
    from vramfit.runtime import bpe
    from vramfit.runtime.tokenizer import _IGNORE_MERGES, PRE_TOKENIZER_REGEXES, resolve_pre

    md = GGUFFile(resolve(name)).metadata
    pre = resolve_pre(md.get("tokenizer.ggml.pre"))
    t = time.perf_counter()
    args = (
        md["tokenizer.ggml.tokens"],
        md["tokenizer.ggml.merges"],
        PRE_TOKENIZER_REGEXES[pre],
        pre in _IGNORE_MERGES,
    )
    backend = bpe.build_gpt2(*args, compact)
    build = time.perf_counter() - t
    best = 1e9
    for _ in range(3):
        t = time.perf_counter()
        ids = backend.encode_texts([text])[0]
        best = min(best, time.perf_counter() - t)
    sweep = [
        hashlib.sha1(json.dumps(i).encode()).hexdigest() for i in backend.encode_texts(list(sweep_texts()))
    ]
    mem = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, name, "compact" if compact else "hf"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return {"build": build, "encode": best, "ids": ids, "sweep": sweep, "mem": int(mem.stdout.split()[-1])}


def peer(python: str, name: str, text_file: str) -> dict | None:
    from vramfit.hub import resolve

    out = subprocess.run(
        [python, "-c", PEER_SCRIPT, str(resolve(name)), text_file], capture_output=True, text=True
    )
    if out.returncode:
        print(f"peer failed on {name}: {out.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def row(name: str, engine: str, r: dict, n_tok: int, ref: dict | None) -> str:
    mem = f"{r['mem'] / 2**20:.1f}" if "mem" in r else "-"
    same = ("yes" if r["ids"] == ref["ids"] else "no") if ref else "-"
    sweep = f"{sum(a != b for a, b in zip(r['sweep'], ref['sweep'], strict=True))}" if ref else "-"
    speed = n_tok / r["encode"] / 1e6
    return (
        f"| {name} | {engine} | {r['build'] * 1000:.0f} | {r['encode'] * 1000:.0f} | {speed:.2f} "
        f"| {mem} | {same} | {sweep} / {len(r['sweep'])} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", default=DEFAULT_MODELS)
    ap.add_argument("--peer-python", default=sys.executable)
    a = ap.parse_args()
    text = long_text()
    text_file = Path("/tmp/vramfit-tokenize-bench.txt")
    text_file.write_text(text, encoding="utf-8")
    print(f"text: {len(text)} characters of vramfit's Python sources\n")
    print("| model | tokenizer | build ms | encode ms | M tokens/s | resident MiB | same ids as llama.cpp "
          "| sweep chunks differing from llama.cpp |")  # fmt: skip
    print("| --- | --- | ---: | ---: | ---: | ---: | --- | --- |")
    for name in a.models:
        ref = peer(a.peer_python, name, str(text_file))
        results = [("vramfit (compact)", ours(name, True, text)), ("HF tokenizers", ours(name, False, text))]
        results += [("llama-cpp-python", ref)] if ref else []
        n_tok = len(results[0][1]["ids"])
        for engine, r in results:
            print(row(name, engine, r, n_tok, ref))


if __name__ == "__main__":
    main()
