"""Peak memory while decoding on the CPU (issue 5): no more than 1.2x the GGUF file plus the KV cache.

Method: each model runs in a fresh subprocess with the default allocator settings. After torch and
the modules a load uses (vramfit.api: tokenizers, jinja2, the kernels) are imported and one torch op
has run (libraries and thread pools loaded, no model data yet), the peak resident set is reset (`5`
to /proc/self/clear_refs) and the baseline RSS is read. The engine then loads the model with the
given context (float32 KV cache, the default), prefills a prompt of --prompt tokens and
decodes --decode tokens one at a time. Measured = peak RSS (VmHWM) - baseline: mapped and touched
weights, their stacked copies, the KV cache, activations, kernel scratch and whatever the allocators
keep. Bound = 1.2 x file size + KV cache bytes.

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
import json, sys, torch
import vramfit, vramfit.api
from vramfit.eval.bench import _tokens

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
torch.ones(4) @ torch.ones(4)
name, ctx, n_prompt, n_decode = sys.argv[1], *map(int, sys.argv[2:5])
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS:")
m = vramfit.load(name, n_ctx=ctx)
ids = _tokens(n_prompt, m.tokenizer.vocab_size)
m.engine.eval(ids)
for tok in _tokens(n_decode, m.tokenizer.vocab_size):
    m.engine._step(tok)
print(json.dumps({"peak": status("VmHWM:") - base, "file": m.gguf.path.stat().st_size,
                  "kv": m.engine.cache.k_store.nbytes + m.engine.cache.v_store.nbytes}))
"""


def measure(name: str, ctx: int, n_prompt: int, n_decode: int) -> dict:
    args = [sys.executable, "-c", CHILD, name, str(ctx), str(n_prompt), str(n_decode)]
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
    print("| model | file MiB | KV MiB | bound MiB (1.2 file + KV) | peak MiB | peak / bound |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in a.models:
        r = measure(name, a.ctx, a.prompt, a.decode)
        bound = 1.2 * r["file"] + r["kv"]
        print(f"| {name} | {r['file'] / mib:.1f} | {r['kv'] / mib:.1f} | {bound / mib:.1f} | "
              f"{r['peak'] / mib:.1f} | {r['peak'] / bound:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
