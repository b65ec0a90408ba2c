"""Encoder speed: torch codecs vs the C encoders (vramfit.quant.fast), with an imatrix.

ns/weight and M weights/s per type, on `--threads` threads (default 2): the C encoders on a
4096x4096 matrix, the torch ones on a smaller slice (they are far slower). Wall time and process CPU
time are both reported (on a busy machine CPU time / threads is the better estimate of a quiet
machine's wall time). Then the projected time to quantize a 1.5B-weight model in the IQ4_KS mix
(docs/iqk-formats.md section 6: IQ4_KS for most tensors, Q6_K / IQ5_K / Q8_0 for some) against
ik_llama.cpp's llama-quantize, measured at 153.5 s on a 2-core machine of this kind.

    .venv/bin/python bench/encode_speed.py [--types iq4_ks,q6_K] [--threads 2] [--no-torch]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import vramfit.quant as quant
from vramfit.quant import fast

PEER_SECONDS = 153.5
MODEL_WEIGHTS = 1.5e9
# share of the weights per type in the IQ4_KS mix of a ~1.5B model (approximate: token embedding
# and output in Q6_K / Q8_0, attn_v and some ffn_down in IQ5_K, the rest IQ4_KS)
MIX = {"iq4_ks": 0.78, "iq5_k": 0.08, "q6_K": 0.10, "q8_0": 0.04}


def _time(fn, threads):
    torch.set_num_threads(threads)
    fn()  # warm-up (small)
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", default=",".join(fast.types()))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--torch-rows", type=int, default=16)
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.rows, args.cols)).astype(np.float32)
    imat = rng.uniform(0.1, 5.0, args.cols).astype(np.float32)
    xt = x[: args.torch_rows]
    print(f"threads={args.threads}; C on {args.rows}x{args.cols}, torch on {args.torch_rows}x{args.cols}")
    cols = ("torch ns/w", "C ns/w wall", "C ns/w cpu/th", "C Mw/s", "speedup")
    print(f"{'type':8} " + " ".join(f"{c:>13}" for c in cols))
    c_ns = {}
    for name in args.types.split(","):
        t_ns = float("nan")
        if not args.no_torch:
            tw, _ = _time(lambda n=name: quant.encode(n, xt, imat, backend="torch"), args.threads)
            t_ns = tw / xt.size * 1e9
        cw, cc = _time(lambda n=name: fast.encode(n, x, imat, threads=args.threads), args.threads)
        ns_wall, ns_cpu = cw / x.size * 1e9, cc / args.threads / x.size * 1e9
        c_ns[name.lower()] = (ns_wall, ns_cpu)
        vals = (t_ns, ns_wall, ns_cpu, x.size / cw / 1e6, t_ns / ns_wall)
        print(f"{name:8} " + " ".join(f"{v:13.2f}" for v in vals))
    have = {k.lower(): v for k, v in MIX.items() if k.lower() in c_ns}
    if have:
        share = sum(have.values())
        wall = sum(c_ns[k][0] * f for k, f in have.items()) / share
        cpu = sum(c_ns[k][1] * f for k, f in have.items()) / share
        print(
            f"IQ4_KS mix ({', '.join(have)}): {wall:.1f} ns/weight wall, {cpu:.1f} cpu/thread"
            " -> 1.5B weights in "
            f"{wall * MODEL_WEIGHTS / 1e9:.1f} s wall ({cpu * MODEL_WEIGHTS / 1e9:.1f} s from cpu time) "
            f"vs llama-quantize {PEER_SECONDS} s ({PEER_SECONDS / MODEL_WEIGHTS * 1e9:.0f} ns/weight)"
        )


if __name__ == "__main__":
    main()
