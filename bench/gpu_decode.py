"""GPU kernel speed: the Triton fused dequantize-and-multiply against the card's copy bandwidth.

1. Copy bandwidth: a large device-to-device copy, counting bytes read + written (what a memory-bound
   kernel can hope to move).
2. For each supported type, 27B-shaped matrix-vector products (N=17408, K=5120: ffn up/gate; N=5120,
   K=17408: ffn down) at batch 1 (and batch 8): time, GB/s of packed weights read, fraction of the copy
   bandwidth. Several copies of each weight are cycled so that the 50 MB L2 cache does not serve them.
3. Prefill: the same shapes at n=512, TFLOP/s (2*n*N*K / time), next to torch's fp16 matmul on an
   already-dequantized weight (cuBLAS; the upper bound for a dequantize-then-GEMM scheme).

Run:  python bench/gpu_decode.py [--types iq4_ks,q4_k] [--sweep] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vramfit.kernels import triton as vt  # noqa: E402
from vramfit.model.random_model import random_rows  # noqa: E402

SHAPES = [(17408, 5120), (5120, 17408)]  # (N, K): Qwen3.5/3.6-27B FFN up/gate and down
L2_DEFEAT_BYTES = 512 << 20  # cycle weight copies totalling at least this


def _time(fn, iters: int = 30, warmup: int = 3) -> float:
    """Median seconds per call (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth() -> float:
    """GB/s of a 2 GiB device-to-device copy, bytes read + written."""
    n = 1 << 31
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    t = _time(lambda: dst.copy_(src), iters=20)
    return 2 * n / t / 1e9


def _weights(type_name: str, n: int, k: int) -> list[torch.Tensor]:
    base = torch.from_numpy(random_rows(type_name, n, k, seed=n)).cuda()
    copies = max(1, -(-L2_DEFEAT_BYTES // base.numel()))
    return [base] + [base.clone() for _ in range(copies - 1)]


def bench_matvec(type_name: str, n: int, k: int, m: int, config: dict | None = None) -> tuple[float, int]:
    ws = _weights(type_name, n, k)
    x = torch.randn(m, k, device="cuda")
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(ws)
        vt.qmatmul(x, ws[state["i"]], type_name, config)

    t = _time(call)
    return t, ws[0].numel()


def bench_prefill(
    type_name: str, n: int, k: int, m: int = 512, config: dict | None = None
) -> tuple[float, float]:
    w = torch.from_numpy(random_rows(type_name, n, k, seed=n)).cuda()
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    t = _time(lambda: vt.qmatmul(x, w, type_name, config), iters=20)
    return t, 2.0 * m * n * k / t / 1e12


def cublas_fp16(n: int, k: int, m: int = 512) -> float:
    a = torch.randn(m, k, device="cuda", dtype=torch.float16)
    b = torch.randn(n, k, device="cuda", dtype=torch.float16)
    t = _time(lambda: a @ b.T, iters=20)
    return 2.0 * m * n * k / t / 1e12


def sweep(type_name: str, bw: float) -> list[dict]:
    """Launch parameters: decode batch 1 and 8 on the ffn-down shape, prefill n=512 on ffn-up."""
    rows = []
    n, k = SHAPES[1]
    cfgs = [(1, {"mode": 0, "block_m": 1, "block_n": bn, "num_warps": nw, "unroll": u})
            for bn in (8, 16) for nw in (4, 8) for u in (1, 2)]  # fmt: skip
    cfgs += [(8, {"mode": 2, "block_m": 16, "block_n": bn, "num_warps": 4}) for bn in (16, 32, 64)]
    for m, cfg in cfgs:
        try:
            t, nbytes = bench_matvec(type_name, n, k, m, cfg)
        except Exception as e:  # a config that does not compile (registers, shared memory)
            print(f"  sweep {type_name} m={m} {cfg}: {type(e).__name__}", flush=True)
            continue
        gbs = nbytes / t / 1e9
        rows.append({"type": type_name, "m": m, **cfg, "us": t * 1e6, "GB/s": gbs, "frac": gbs / bw})
        print(
            f"  sweep {type_name} m={m} {cfg}: {t * 1e6:8.1f} us {gbs:7.1f} GB/s {gbs / bw:5.1%}", flush=True
        )
    n, k = SHAPES[0]
    for bm, bn, nw, ns in ((64, 64, 8, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 128, 4, 3)):
        cfg = {"mode": 2, "block_m": bm, "block_n": bn, "num_warps": nw, "num_stages": ns}
        try:
            t, tf = bench_prefill(type_name, n, k, config=cfg)
        except Exception as e:
            print(f"  sweep {type_name} prefill {cfg}: {type(e).__name__}", flush=True)
            continue
        rows.append({"type": type_name, "m": 512, **cfg, "ms": t * 1e3, "TFLOPs": tf})
        print(f"  sweep {type_name} prefill {cfg}: {t * 1e3:7.3f} ms {tf:6.1f} TFLOP/s", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--types", default=",".join(vt.type_names()))
    ap.add_argument("--sweep", default="", help="types whose decode launch parameters are swept")
    ap.add_argument("--no-prefill", action="store_true")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    if not vt.available():
        print("needs triton and a CUDA device")
        return 1
    t0 = time.time()
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, "
          f"triton {vt.triton.__version__}")  # fmt: skip
    bw = copy_bandwidth()
    torch.cuda.empty_cache()
    print(f"copy bandwidth (read+write): {bw:.0f} GB/s")
    result = {"device": props.name, "copy_GBps": bw, "decode": [], "prefill": [], "sweep": []}
    for s in filter(None, args.sweep.split(",")):
        result["sweep"] += sweep(s, bw)
    print(f"{'type':8} {'N':>6} {'K':>6} {'m':>2} {'us':>9} {'GB/s':>8} {'of copy':>8}")
    for type_name in args.types.split(","):
        for n, k in SHAPES:
            for m in (1, 8):
                try:
                    t, nbytes = bench_matvec(type_name, n, k, m)
                except Exception as e:  # report and go on with the other types
                    print(f"{type_name:8} {n:6} {k:6} {m:2} failed: {type(e).__name__}: {str(e)[:300]}")
                    continue
                gbs = nbytes / t / 1e9
                result["decode"].append({"type": type_name, "N": n, "K": k, "m": m, "us": t * 1e6,
                                         "GB/s": gbs, "frac": gbs / bw})  # fmt: skip
                line = f"{type_name:8} {n:6} {k:6} {m:2} {t * 1e6:9.1f} {gbs:8.1f} {gbs / bw:8.1%}"
                print(line, flush=True)
        torch.cuda.empty_cache()
    if not args.no_prefill:
        print(f"{'prefill n=512':14} {'N':>6} {'K':>6} {'ms':>8} {'TFLOP/s':>8}")
        for n, k in SHAPES:
            print(f"{'cublas fp16':14} {n:6} {k:6} {'':>8} {cublas_fp16(n, k):8.1f}")
        for type_name in args.types.split(","):
            for n, k in SHAPES:
                try:
                    t, tf = bench_prefill(type_name, n, k)
                except Exception as e:
                    print(f"{type_name:14} {n:6} {k:6} failed: {type(e).__name__}: {str(e)[:300]}")
                    continue
                result["prefill"].append({"type": type_name, "N": n, "K": k, "ms": t * 1e3, "TFLOPs": tf})
                print(f"{type_name:14} {n:6} {k:6} {t * 1e3:8.3f} {tf:8.1f}", flush=True)
    print(f"total {time.time() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
