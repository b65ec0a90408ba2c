"""Peak memory while decoding on the CPU (issue 5): no more than 1.2x the GGUF file plus the KV cache.

Method: each model runs in fresh subprocesses with the default allocator settings, twice:
- cold: after torch and the modules a load uses (vramfit.api: tokenizers, jinja2, the kernels) are
  imported and one torch op has run, the peak resident set is reset (`5` to /proc/self/clear_refs)
  and the baseline RSS is read. Library code that the model's first forward runs (torch's kernels
  for the ops it uses, ~8 MiB) is then counted against the model.
- warm: the same, but the process has first loaded and run a tiny random llama (2 layers, 256 wide,
  written to a temporary GGUF) and dropped it, so that first-use library code and thread stacks are
  in the baseline, as the interpreter and torch's import already are. What the tiny model's buffers
  leave (the kernels' scratch only grows) is a few hundred KiB, which is not counted.
The engine then loads the model with the given context (float32 KV cache, the default), prefills a
prompt of --prompt tokens and decodes --decode tokens one at a time. Measured = peak RSS (VmHWM) -
baseline: mapped and touched weights, their stacked copies, the KV cache, the tokenizer, activations,
kernel scratch and whatever the allocators keep. Bound = 1.2 x file size + KV cache bytes.

Run:  .venv/bin/python bench/decode_memory.py [models ...] [--ctx 4096] [--prompt 512] [--decode 128]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

DEFAULT_MODELS = ["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]

CHILD = r"""
import gc, json, os, sys, tempfile, torch
import vramfit, vramfit.api
from vramfit.eval.bench import _tokens
from vramfit.runtime.heap import release_free_heap

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

def run(m, n_prompt, n_decode):
    m.engine.eval(_tokens(n_prompt, m.tokenizer.vocab_size))
    for tok in _tokens(n_decode, m.tokenizer.vocab_size):
        m.engine._step(tok)

torch.ones(4) @ torch.ones(4)
name, warm, ctx, n_prompt, n_decode = sys.argv[1], sys.argv[2] == "warm", *map(int, sys.argv[3:6])
if warm:
    from vramfit.model.random_model import random_model_spec, write_random_model
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "tiny.gguf")
        write_random_model(random_model_spec("llama", "tiny", "q4_1"), path)
        run(vramfit.load(path, n_ctx=256), 64, 4)
    gc.collect()
    release_free_heap()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS:")
m = vramfit.load(name, n_ctx=ctx)
run(m, n_prompt, n_decode)
print(json.dumps({"peak": status("VmHWM:") - base, "file": m.gguf.path.stat().st_size,
                  "kv": m.engine.cache.k_store.nbytes + m.engine.cache.v_store.nbytes}))
"""


def measure(name: str, mode: str, ctx: int, n_prompt: int, n_decode: int) -> dict:
    args = [sys.executable, "-c", CHILD, name, mode, str(ctx), str(n_prompt), str(n_decode)]
    out = subprocess.run(args, capture_output=True, text=True, check=True, env=dict(os.environ))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", default=DEFAULT_MODELS)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=128)
    a = ap.parse_args()
    mib = 2**20
    print(f"context {a.ctx}, prompt {a.prompt} tokens, {a.decode} decoded; float32 KV cache\n")
    print("| model | file MiB | KV MiB | bound MiB (1.2 file + KV) | peak MiB cold | peak / bound cold "
          "| peak MiB warm | peak / bound warm |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in a.models:
        cold = measure(name, "cold", a.ctx, a.prompt, a.decode)
        warm = measure(name, "warm", a.ctx, a.prompt, a.decode)
        bound = 1.2 * cold["file"] + cold["kv"]
        print(f"| {name} | {cold['file'] / mib:.1f} | {cold['kv'] / mib:.1f} | {bound / mib:.1f} | "
              f"{cold['peak'] / mib:.1f} | {cold['peak'] / bound:.2f} | "
              f"{warm['peak'] / mib:.1f} | {warm['peak'] / bound:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
