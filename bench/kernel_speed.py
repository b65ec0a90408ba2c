"""Fast CPU kernels against the reference path, per weight type.

For each type: n=1 (decode matvec) time and GB/s of packed weight bytes read, and n=512 (prefill)
GFLOP/s, for vramfit.kernels.cpu.qmatmul and for the reference path of vramfit.kernels.dispatch
(the weight decoded once to float32 and cached, then `x @ W.T`). Min-of-N timing, since the machine
may be shared (with -t 1 the thread's CPU time, which ignores time spent descheduled).
Run:  .venv/bin/python bench/kernel_speed.py [-t 2] [--rows 4096] [--cols 4096]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from vramfit import quant
from vramfit.kernels import cpu

DEFAULT_TYPES = "q4_0,q4_1,q5_0,q8_0,iq4_nl,q4_K,q5_K,q6_K,iq4_xs,iq4_ks,iq4_k,iq5_ks"


CLOCK = time.perf_counter  # with one thread: time.thread_time, immune to being descheduled


def best_time(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = CLOCK()
        fn()
        best = min(best, CLOCK() - t)
    return best


def random_packed(type_name: str, rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """Random bytes with sane float scale fields (the equivalence tests' generator)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.test_cpu_kernels import random_rows

    return random_rows(type_name.lower(), rows, cols, gen)


def bench_type(type_name: str, rows: int, cols: int, threads: int, reps: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    packed = random_packed(type_name, rows, cols, gen)
    dense = torch.from_numpy(quant.decode(type_name, packed, cols))  # the reference path's cache
    x1, xp = torch.randn(1, cols, generator=gen), torch.randn(512, cols, generator=gen)
    o1, op = torch.empty(1, rows), torch.empty(512, rows)
    t1 = best_time(lambda: cpu.qmatmul(x1, packed, type_name, o1, threads), reps)
    r1 = best_time(lambda: torch.matmul(x1, dense.T, out=o1), reps)
    tp = best_time(lambda: cpu.qmatmul(xp, packed, type_name, op, threads), max(3, reps // 10))
    rp = best_time(lambda: torch.matmul(xp, dense.T, out=op), max(3, reps // 10))
    flops = 2 * 512 * rows * cols
    return {
        "type": type_name,
        "bpw": 8 * packed.shape[1] / cols,
        "us1": t1 * 1e6,
        "gbs": packed.numel() / t1 / 1e9,
        "ref_us1": r1 * 1e6,
        "gflops": flops / tp / 1e9,
        "ref_gflops": flops / rp / 1e9,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("-r", "--reps", type=int, default=50)
    ap.add_argument("--types", default=DEFAULT_TYPES)
    args = ap.parse_args()
    if not cpu.available():
        raise SystemExit("fast CPU kernels are not built for this machine")
    torch.set_num_threads(args.threads)
    global CLOCK
    if args.threads == 1:
        CLOCK = time.thread_time
    clock = "thread CPU time" if args.threads == 1 else "wall time"
    shape = f"{args.rows}x{args.cols} weights"
    print(f"{shape}, {args.threads} threads, ISA {cpu.isa()}, min of {args.reps}, {clock}")
    print(
        f"{'type':8} {'bpw':>5} | {'n=1 us':>8} {'GB/s':>6} {'ref us':>8} {'x':>5} |"
        f" {'n=512 GFLOP/s':>13} {'ref':>6} {'x':>5}"
    )
    for t in args.types.split(","):
        r = bench_type(t, args.rows, args.cols, args.threads, args.reps)
        print(
            f"{r['type']:8} {r['bpw']:5.2f} | {r['us1']:8.1f} {r['gbs']:6.1f} {r['ref_us1']:8.1f}"
            f" {r['ref_us1'] / r['us1']:5.1f} | {r['gflops']:13.0f} {r['ref_gflops']:6.0f}"
            f" {r['gflops'] / r['ref_gflops']:5.1f}"
        )


if __name__ == "__main__":
    main()
