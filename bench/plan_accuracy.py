"""Predicted vs measured peak memory on the CPU (issue 8): the planner's total for a context, a prefill
batch and a KV type against the peak resident memory of the engine doing that work.

What is measured. The file is read once into the page cache (as after any earlier run; a fault on a
cached file page then maps the 64 KiB window around it, which the plan counts). Each model runs in a
fresh subprocess: the GGUF's metadata is parsed, torch runs one small product and the baseline RSS is
read. The engine then does what `vramfit run` does after that point, minus the tokenizer: it loads the
model (maps the file, makes the stacked copies, releases the originals' pages) and allocates the KV
cache at the planned size; a warm-up evaluates 16 tokens (every weight read once, as in any steady
state after the first request). Then the peak resident set is reset (`5` to /proc/self/clear_refs),
and the engine prefills --ctx - --decode tokens from an empty cache in chunks of --batch (ids drawn
uniformly from the whole vocabulary, so each token reads its own embedding row: the plan's bound) and
decodes --decode tokens. Measured = peak RSS (VmHWM) since the reset - baseline: the mapped weight
pages, the copies, the KV cache, the activations, the kernels' buffers, thread stacks, and what the C
allocator keeps. Not measured: the interpreter, torch and the parsed metadata (in the baseline), and
the tokenizer (the plan's safety margin covers it).

"measured" runs with glibc's default malloc settings, as users run the engine. "live" (--live) runs the
same work with MALLOC_MMAP_THRESHOLD_=65536 and one arena, so that freed activations go back to the
system at once and the peak follows the live allocations; it is compared with the plan minus its
allocator item, which checks the allocator item separately from the rest.

Predicted = `plan(...)` on the CPU (no budget) with the same context, batch and KV type.

Run:  .venv/bin/python bench/plan_accuracy.py [--models smollm2-135m,qwen2.5-coder-0.5b] [--ctx 2048]
      [--batch 256] [--kv f32,q8_0] [--live]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

# glibc returns freed blocks over 64 KiB to the system at once and keeps one arena
LIVE_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "1"}

CHILD = r"""
import json, sys, torch
from vramfit.gguf import GGUFFile
from vramfit.hub import resolve
from vramfit.model.loader import load_model
from vramfit.runtime.engine import Engine
from vramfit.runtime.planner import CPU, ModelInfo, plan

name, kv = sys.argv[1], sys.argv[4]
ctx, batch, n_decode = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[5])


def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024


gguf = GGUFFile(resolve(name))
info = ModelInfo.from_gguf(gguf)
k, _, v = kv.partition("/")
p = plan(info, None, ctx, (k, v or k), batch=batch, device=CPU)
torch.ones(64, 64) @ torch.ones(64, 64)  # load BLAS before the baseline
base = status("VmRSS")
model, _ = load_model(gguf.path, ctx, gguf=gguf, kv_type=kv)
eng = Engine(model, prefill_chunk=batch)
gen = torch.Generator().manual_seed(0)
ids = torch.randint(0, info.n_vocab, (ctx - n_decode,), generator=gen).tolist()
with torch.inference_mode():
    eng.eval(ids[:16])  # warm-up: every weight read once
    eng.reset()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak from here on
    eng.eval(ids)
    for t in range(n_decode):
        eng.eval(ids + list(range(100, 101 + t)))
measured = status("VmHWM") - base
items = {i.what: i.device_bytes for i in p.items}
print(json.dumps({"predicted": p.device_total, "measured": measured, "items": items}))
"""


def measure(name: str, ctx: int, batch: int, kv: str, decode: int, env: dict[str, str]) -> dict:
    from vramfit.hub import resolve

    with open(resolve(name), "rb") as f:  # the whole file in the page cache, as after any earlier run
        while f.read(1 << 24):  # (here, not in the child, whose allocator state this would change)
            pass
    cmd = [sys.executable, "-c", CHILD, name, str(ctx), str(batch), kv, str(decode)]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ | env)
    return json.loads(res.stdout.splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m,qwen2.5-coder-0.5b,qwen2.5-coder-1.5b")
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=256)  # the CPU engine's prefill chunk
    ap.add_argument("--decode", type=int, default=4)
    ap.add_argument("--kv", default="f32,q8_0")
    ap.add_argument("--live", action="store_true", help="also measure with malloc returning frees at once")
    args = ap.parse_args()
    mib = 2**20
    print(f"context {args.ctx}, prefill batch {args.batch}, {args.decode} decode steps; MiB\n")
    cols = ["model", "KV", "weights", "kv", "work", "runtime", "alloc", "predicted", "measured", "error"]
    cols += ["live", "error (no alloc)"] if args.live else []
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for name in args.models.split(","):
        for kv in args.kv.split(","):
            r = measure(name, args.ctx, args.batch, kv, args.decode, {})
            it = r["items"]
            row = [name, kv] + [f"{it.get(k, 0) / mib:.1f}" for k in
                                ("weights", "kv cache", "workspace", "runtime", "allocator")]  # fmt: skip
            row += [f"{r['predicted'] / mib:.1f}", f"{r['measured'] / mib:.1f}",
                    f"{100 * (r['predicted'] / r['measured'] - 1):+.1f}%"]  # fmt: skip
            if args.live:
                live = measure(name, args.ctx, args.batch, kv, args.decode, LIVE_MALLOC)["measured"]
                no_alloc = r["predicted"] - it.get("allocator", 0)
                row += [f"{live / mib:.1f}", f"{100 * (no_alloc / live - 1):+.1f}%"]
            print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
