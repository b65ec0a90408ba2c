"""Predicted vs measured peak memory on the CPU (issue 8): the planner's total for a context and a prefill
batch against what the engine actually holds at its peak.

Method: each model runs in a fresh subprocess. After the GGUF's metadata is parsed and torch has run one
warm-up op (libraries and thread pools loaded), the peak resident set is reset (`5` to
/proc/self/clear_refs) and the baseline RSS is read. The engine then loads the weights, allocates its
cache at the planned size, prefills --ctx tokens in batches of --batch and decodes --decode tokens.
The child runs with glibc's mmap threshold at 64 KiB and one
arena (MALLOC below), so freed activations go back to the system and the resident set follows the live
allocations rather than the C allocator's cache. Measured = peak RSS (VmHWM) - baseline: the weights
it maps and touches (every tensor is read by the
forward), its copies (stacked q/k/v and gate/up), the KV cache and recurrent state, and the transient
activations. Predicted = `plan(...)` on the CPU with the same context, batch and KV type.

Run:  .venv/bin/python bench/plan_accuracy.py [--models smollm2-135m,qwen2.5-coder-0.5b] [--ctx 2048]
      [--batch 512] [--kv f32,q8_0]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

# glibc returns freed blocks over 64 KiB to the system at once and keeps one arena, so the resident set
# follows the live allocations instead of what the C allocator caches
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "1"}

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
kv_pair = kv if "/" in kv else f"{kv}/{kv}"
p = plan(info, None, ctx, tuple(kv_pair.split("/")), batch=batch, device=CPU)
torch.ones(64, 64) @ torch.ones(64, 64)  # load BLAS and the thread pool before the baseline
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS")
model, _ = load_model(gguf.path, ctx, gguf=gguf, kv_type=kv)
eng = Engine(model, prefill_chunk=batch)
gen = torch.Generator().manual_seed(0)
ids = [int(i) % info.n_vocab for i in torch.randint(0, 30000, (ctx - n_decode,), generator=gen)]
with torch.inference_mode():
    eng.eval(ids)
    for t in range(n_decode):
        eng.eval(ids + list(range(100, 101 + t)))
measured = status("VmHWM") - base
items = {i.what: i.device_bytes for i in p.items}
print(json.dumps({"predicted": p.device_total, "measured": measured, "items": items}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m,qwen2.5-coder-0.5b,qwen2.5-coder-1.5b")
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--decode", type=int, default=4)
    ap.add_argument("--kv", default="f32,q8_0")
    args = ap.parse_args()
    mib = 2**20
    print(f"context {args.ctx}, prefill batch {args.batch}, {args.decode} decode steps; MiB")
    print(
        f"{'model':<22}{'KV':<7}{'weights':>9}{'kv':>8}{'state':>7}{'work':>7}{'predicted':>11}{'measured':>10}{'error':>8}"
    )
    for name in args.models.split(","):
        for kv in args.kv.split(","):
            cmd = [sys.executable, "-c", CHILD, name, str(args.ctx), str(args.batch), kv, str(args.decode)]
            out = subprocess.run(
                cmd, check=True, capture_output=True, text=True, env=os.environ | MALLOC
            ).stdout
            r = json.loads(out.splitlines()[-1])
            it = r["items"]
            err = r["predicted"] / r["measured"] - 1
            print(f"{name:<22}{kv:<7}{it['weights'] / mib:>9.1f}{it['kv cache'] / mib:>8.1f}"
                  f"{it.get('recurrent state', 0) / mib:>7.1f}{it['workspace'] / mib:>7.1f}"
                  f"{r['predicted'] / mib:>11.1f}{r['measured'] / mib:>10.1f}{100 * err:>7.1f}%",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
