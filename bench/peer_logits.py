"""Files we write run in llama.cpp: tiny random GGUFs (`make-random`) and our quantizations of a real
model, with logits from both engines.

Random models: for each architecture and weight type, a tiny model written by vramfit; the same 14 tokens
evaluated in vramfit and in llama-cpp-python (its own interpreter: --peer-python); the largest logit
difference against the logits' scale, and whether the argmax agrees at every position.
Quantized: --real MODEL (default qwen2.5-coder-0.5b) requantized by `vramfit quantize` to each of
--types; a short real text evaluated in both engines, next to the same numbers for the original file.

Run:  .venv/bin/python bench/peer_logits.py --peer-python /path/to/python [--real MODEL] [--types Q8_0,...]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

IDS = [5, 17, 99, 200, 3, 44, 120, 7, 9, 300, 301, 302, 15, 16]
TEXT = (
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"
    "The capital of France is Paris. It lies on the Seine, and about two million people live there."
)
CASES = [("llama", "f32"), ("llama", "q8_0"), ("llama", "q4_1"), ("qwen35", "f32"), ("qwen35", "q8_0")]

PEER = textwrap.dedent(
    """
    import numpy as np, sys
    from llama_cpp import Llama
    llm = Llama(model_path=sys.argv[1], n_ctx=256, logits_all=True, verbose=False)
    ids = [int(i) for i in sys.argv[3].split(",")]
    llm.eval(ids)
    np.save(sys.argv[2], np.array(llm.scores[: len(ids)]))
    """
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer-python", default=sys.executable)
    ap.add_argument("--real", default="qwen2.5-coder-0.5b")
    ap.add_argument("--types", default="Q8_0,Q4_K_M,IQ4_XS")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        random_models(a.peer_python, Path(d))
        print()
        quantized(a.peer_python, Path(d), a.real, a.types.split(","))


def compare(peer_python: str, path: Path, ids: list[int], n_ctx: int) -> tuple[np.ndarray, np.ndarray] | str:
    """(ours, llama.cpp's) logits for `ids`, or the peer's error line."""
    import vramfit

    ref_file = path.with_suffix(".npy")
    cmd = [peer_python, "-c", PEER, str(path), str(ref_file), ",".join(map(str, ids))]
    run = subprocess.run(cmd, capture_output=True)
    if run.returncode:
        return f"peer failed: {run.stderr.decode().strip().splitlines()[-1:]}"
    return vramfit.load(path, n_ctx=n_ctx).logits(ids), np.load(ref_file)


def random_models(peer_python: str, d: Path) -> None:
    from vramfit.model.random_model import random_model_spec, write_random_model

    print("| arch | weights | max abs logit difference | max abs logit | argmax agrees |")
    print("| --- | --- | ---: | ---: | --- |")
    for arch, mix in CASES:
        path = d / f"{arch}-{mix}.gguf"
        write_random_model(random_model_spec(arch, "tiny", mix), path)
        got = compare(peer_python, path, IDS, 64)
        if isinstance(got, str):
            print(f"| {arch} | {mix} | {got} | | |")
            continue
        ours, ref = got
        agree = bool((ours.argmax(1) == ref.argmax(1)).all())
        print(f"| {arch} | {mix} | {np.abs(ours - ref).max():.2e} | {np.abs(ref).max():.3f} | {agree} |")


def quantized(peer_python: str, d: Path, model: str, types: list[str]) -> None:
    import vramfit
    from vramfit.cli import main as cli
    from vramfit.hub import resolve

    src = resolve(model)
    ids = vramfit.load(src, n_ctx=64).tokenize(TEXT)
    print(f"{model}, {len(ids)} tokens of text; the files quantized by `vramfit quantize` from {src.name}\n")
    print("| file | max abs logit difference | mean abs difference | max abs logit | argmax agrees |")
    print("| --- | ---: | ---: | ---: | ---: |")
    files = [("original", Path(src))]
    for t in types:
        out = d / f"{model}-{t}.gguf"
        with contextlib.redirect_stdout(io.StringIO()):  # its per-type summary table
            rc = cli(["quantize", str(src), str(out), t])
        if rc != 0:
            raise SystemExit(f"quantize to {t} failed")
        files.append((f"vramfit {t}", out))
    for name, path in files:
        got = compare(peer_python, path, ids, 256)
        if isinstance(got, str):
            print(f"| {name} | {got} | | | |")
            continue
        ours, ref = got
        diff = np.abs(ours - ref)
        agree = (ours.argmax(1) == ref.argmax(1)).mean()
        print(f"| {name} | {diff.max():.3f} | {diff.mean():.4f} | {np.abs(ref).max():.2f} | {agree:.0%} |")


if __name__ == "__main__":
    main()
