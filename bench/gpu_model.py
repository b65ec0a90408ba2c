"""Whole-model speed on a device (issue 6): pp512 and tg128 through the engine, like llama-bench.

The model is a GGUF given with --gguf, or a random one with a real model's shapes and type mix written
on the spot (`make-random`: --arch llama|qwen35, --preset tiny|8b|27b, --type iq4_ks ...). Decode reads
every weight once per token (the token embedding only one row, unless it is also the output matrix), so
tg128 is also shown as GB/s of weights read and as a fraction of the card's copy bandwidth (read +
written, bench/gpu_decode.py), the issue's 85% target. --check N compares the device's logits for N
prompt tokens with the CPU engine's (same top-1, max |diff| against the logit scale).

Run on a GPU:    python bench/gpu_model.py --arch llama --preset 8b --type iq4_ks [--check 16]
Try it on a CPU: TRITON_INTERPRET=1 python bench/gpu_model.py --device cpu --preset tiny -p 16 -n 4
                 (the "triton" backend runs the products in Triton's interpreter: slow, for the logic)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vramfit  # noqa: E402
from vramfit.kernels import dispatch  # noqa: E402
from vramfit.model.random_model import random_model_spec, write_random_model  # noqa: E402


def weight_bytes_per_token(gguf) -> int:
    """Bytes of packed weights one decode step reads."""
    tensors = gguf.tensors
    total = sum(t.nbytes for t in tensors.values())
    emb = tensors.get("token_embd.weight")
    if emb is not None and "output.weight" in tensors:  # untied: only the token's row is read
        total -= emb.nbytes - emb.nbytes // emb.shape[0]
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_pp(m, n_prompt: int, reps: int) -> list[float]:
    ids = [(i * 7919) % m.tokenizer.vocab_size for i in range(n_prompt)]
    out = []
    for _ in range(reps):
        m.engine.reset()
        _sync(m.device)
        t = time.perf_counter()
        m.engine.eval(ids)  # returns the last logits on the host: synchronised
        out.append(n_prompt / (time.perf_counter() - t))
    return out


def run_tg(m, n_gen: int, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        m.engine.reset()
        m.engine.eval([1])
        t = time.perf_counter()
        for i in range(n_gen):
            m.engine._step((i * 31 + 5) % m.tokenizer.vocab_size)  # logits to the host each step
        out.append(n_gen / (time.perf_counter() - t))
    return out


def check(path: Path, m, n_tokens: int, backend: str) -> str:
    """Device logits against the CPU engine's (`backend`: reference = float32 weights and products)."""
    ids = [(i * 104729) % m.tokenizer.vocab_size for i in range(n_tokens)]
    got = m.engine.logits_all(ids)
    cpu = vramfit.load(path, n_ctx=max(64, n_tokens), device="cpu")
    with dispatch.use_backend(backend):
        ref = cpu.engine.logits_all(ids)
    diff = (got - ref).abs().max().item()
    scale = ref.abs().max().item()
    same = bool(torch.equal(got.argmax(-1), ref.argmax(-1)))
    top1 = "identical" if same else "DIFFERENT"
    return f"check: {n_tokens} tokens, top-1 {top1}, max |diff| {diff:.3g} (logits up to {scale:.3g})"


def _row(name: str, device, test: str, tps: list[float], gbs: str = "", frac: str = "") -> str:
    speed = f"{statistics.mean(tps):.2f} ± {statistics.pstdev(tps):.2f}"
    return f"| {name} | {device} | {test} | {speed} | {gbs} | {frac} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, default=None)
    ap.add_argument("--arch", default="llama")
    ap.add_argument("--preset", default="8b")
    ap.add_argument("--type", default="iq4_ks", help="make-random mix (iq4_ks, q4_k_m, sokann-4.151, ...)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("-c", "--ctx", type=int, default=4096)
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument("--check", type=int, default=0, metavar="N", help="compare N tokens' logits with the CPU")
    ap.add_argument("--check-backend", default="reference", help="the CPU side: reference (float32) or auto")
    a = ap.parse_args()
    if a.device == "cpu":
        dispatch.set_backend("triton")  # the GPU path's kernels on the CPU (needs TRITON_INTERPRET=1)
    with tempfile.TemporaryDirectory() as tmp:
        path = a.gguf
        if path is None:
            path = Path(tmp) / f"{a.arch}-{a.preset}-{a.type}.gguf"
            t = time.perf_counter()
            size = write_random_model(random_model_spec(a.arch, a.preset, a.type), path)
            print(
                f"wrote {path.name}: {size / 2**30:.2f} GiB in {time.perf_counter() - t:.0f} s",
                file=sys.stderr,
            )
        t = time.perf_counter()
        m = vramfit.load(path, n_ctx=a.ctx, device=a.device)
        print(f"loaded on {m.device} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        bw = None
        if m.device.type == "cuda":
            from gpu_decode import copy_bandwidth

            bw = copy_bandwidth()
            print(f"{torch.cuda.get_device_name(m.device)}: copy bandwidth {bw:.0f} GB/s", file=sys.stderr)
        per_token = weight_bytes_per_token(m.gguf)
        name = f"{m.gguf.architecture} {path.stat().st_size / 2**30:.2f} GiB"
        print("| model | device | test | t/s | weights GB/s | of copy bandwidth |")
        print("| --- | --- | ---: | ---: | ---: | ---: |")
        pp = run_pp(m, a.n_prompt, a.repetitions)
        print(_row(name, m.device, f"pp{a.n_prompt}", pp))
        tg = run_tg(m, a.n_gen, a.repetitions)
        gbs = statistics.mean(tg) * per_token / 1e9
        print(_row(name, m.device, f"tg{a.n_gen}", tg, f"{gbs:.1f}", f"{gbs / bw:.0%}" if bw else ""))
        if a.check:
            print(check(path, m, a.check, a.check_backend))


if __name__ == "__main__":
    main()
