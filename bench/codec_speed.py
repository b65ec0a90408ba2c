"""Codec throughput: decode and encode (plain and with an imatrix), million weights per second.

    .venv/bin/python bench/codec_speed.py [--rows 4096] [--cols 4096] [--threads 2] [--types q4_K,iq4_ks]

Runs on the CPU with torch.set_num_threads(threads) over a gaussian (rows x cols) float32 matrix and
prints one table row per type, then the projected time to encode 1.5B weights in IQ4_KS with an
imatrix, next to ik_llama.cpp's llama-quantize (IQ4_KS mix of a 1.5B model with imatrix: 153.5 s on
the same machine kind).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import vramfit.quant as quant

TYPES = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q6_0", "iq4_nl", "iq4_xs"]
TYPES += ["q2_K", "q3_K", "q4_K", "q5_K", "q6_K", "iq4_ks", "iq4_k", "iq5_ks", "iq5_k", "iq6_k"]
REFERENCE_S, REFERENCE_WEIGHTS = 153.5, 1.5e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default=",".join(TYPES))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((args.rows, args.cols), dtype=np.float32) * 0.02)
    imat = torch.from_numpy(rng.uniform(0.1, 10.0, args.cols).astype(np.float32))
    n = x.numel() / 1e6
    print(f"{args.rows}x{args.cols} float32, {args.threads} threads; million weights per second")
    print(f"{'type':8s} {'decode':>9s} {'encode':>9s} {'enc+imat':>9s}")
    rates = {}
    for name in args.types.split(","):
        codec = quant.get_codec(name)
        q = codec.encode(x[:8], None)  # warm-up
        t_plain = _timed(lambda c=codec: c.encode(x, None))
        q = codec.encode(x, imat)
        t_imat = _timed(lambda c=codec: c.encode(x, imat))
        t_dec = _timed(lambda c=codec, q=q: c.decode(q, args.cols))
        rates[name] = n / t_imat
        print(f"{name:8s} {n / t_dec:9.1f} {n / t_plain:9.2f} {n / t_imat:9.2f}", flush=True)
    if "iq4_ks" in rates:
        proj = REFERENCE_WEIGHTS / (rates["iq4_ks"] * 1e6)
        print(
            f"IQ4_KS with imatrix: 1.5B weights in {proj:.0f} s projected "
            f"(ik_llama.cpp llama-quantize: {REFERENCE_S} s for its 1.5B IQ4_KS mix)"
        )


if __name__ == "__main__":
    main()
