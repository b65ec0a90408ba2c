"""CPU decode benchmark: vramfit against llama-cpp-python (when installed) on the same GGUF files.

Prints a llama-bench style table (pp<N>, tg<N> in tokens/s) for each engine and the ratio
vramfit / peer. Run:  .venv/bin/python bench/decode_cpu.py [models ...] [-p 512] [-n 128] [-r 3]
The peer is looked for in this interpreter, or in another one given with --peer-python.
--hybrid adds a Qwen3.5-0.8B-shaped model (Gated DeltaNet + gated attention, random weights, Q4_K_M,
written to a temporary file by `make-random`): the hybrid architecture has no shippable small weights.
--iq4ks adds an IQ4_KS file of Qwen2.5-Coder-1.5B made by `vramfit quantize` (a temporary file).
--ik-bench PATH makes the peer ik_llama.cpp: its `llama-bench` binary, built from source outside the
project (cmake -B build -DGGML_NATIVE=ON -DGGML_IQK_FA_ALL_QUANTS=OFF; cmake --build build --target
llama-bench), run on the same files with `-t THREADS -p N -n N -r R -o json` in the same invocation.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap

import torch

DEFAULT_MODELS = ["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]

# Runs inside the peer's interpreter; prints JSON rows. llama-bench semantics: pp = one batch of N
# tokens from an empty cache, tg = N single-token decode steps from an empty cache.
PEER_SCRIPT = textwrap.dedent(
    """
    import json, statistics, sys, time
    from llama_cpp import Llama
    path, n_p, n_g, reps, threads = sys.argv[1], *map(int, sys.argv[2:6])
    llm = Llama(path, n_ctx=max(n_p, n_g) + 16, n_batch=max(n_p, 1), n_threads=threads,
                n_threads_batch=threads, verbose=False, logits_all=False)
    toks = [(i * 7919) % 1000 + 100 for i in range(max(n_p, n_g))]
    def pp():
        llm.reset(); llm._ctx.kv_cache_clear() if hasattr(llm._ctx, "kv_cache_clear") else None
        t = time.perf_counter(); llm.eval(toks[:n_p]); return n_p / (time.perf_counter() - t)
    def tg():
        llm.reset(); llm._ctx.kv_cache_clear() if hasattr(llm._ctx, "kv_cache_clear") else None
        t = time.perf_counter()
        for tok in toks[:n_g]:
            llm.eval([tok])
        return n_g / (time.perf_counter() - t)
    rows = []
    for name, n, fn in (("pp", n_p, pp), ("tg", n_g, tg)):
        if n <= 0:
            continue
        fn()
        s = [fn() for _ in range(reps)]
        rows.append({"test": f"{name}{n}", "tps_mean": statistics.mean(s),
                     "tps_std": statistics.stdev(s) if len(s) > 1 else 0.0})
    print(json.dumps(rows))
    """
)


def run_ours(name: str, n_p: int, n_g: int, reps: int) -> list[dict]:
    import vramfit
    from vramfit.eval.bench import run_bench

    m = vramfit.load(name, n_ctx=max(n_p, n_g) + 16)
    return [r.as_dict() for r in run_bench(m, n_p, n_g, reps)]


def run_peer(python: str, path: str, n_p: int, n_g: int, reps: int, threads: int) -> list[dict] | None:
    cmd = [python, "-c", PEER_SCRIPT, path, str(n_p), str(n_g), str(reps), str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        print(f"peer failed on {path}: {(res.stderr.strip().splitlines() or ['?'])[-1]}", file=sys.stderr)
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_ik(binary: str, path: str, n_p: int, n_g: int, reps: int, threads: int) -> list[dict] | None:
    """ik_llama.cpp's llama-bench on `path`: rows {test, tps_mean, tps_std} as ours."""
    cmd = [
        binary,
        "-m",
        path,
        "-t",
        str(threads),
        "-p",
        str(n_p),
        "-n",
        str(n_g),
        "-r",
        str(reps),
        "-o",
        "json",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        print(
            f"llama-bench failed on {path}: {(res.stderr.strip().splitlines() or ['?'])[-1]}", file=sys.stderr
        )
        return None
    rows = []
    # its JSON can be interleaved with warnings printed to stdout (e.g. "WARNING: ... ggml_calloc!")
    text = "\n".join(ln for ln in res.stdout.splitlines() if not ln[:1].isalpha())
    for r in json.loads(text[text.index("[") :]):
        test = f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"
        rows.append({"test": test, "tps_mean": r["avg_ts"], "tps_std": r["stddev_ts"]})
    return rows


def peer_available(python: str) -> bool:
    res = subprocess.run([python, "-c", "import llama_cpp"], capture_output=True)
    return res.returncode == 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", default=DEFAULT_MODELS)
    ap.add_argument("-p", "--n-prompt", type=int, default=512)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument("--peer-python", default=sys.executable, help="interpreter with llama_cpp installed")
    ap.add_argument("--hybrid", action="store_true", help="also a random Qwen3.5-0.8B-shaped model")
    ap.add_argument("--iq4ks", action="store_true", help="also Qwen2.5-Coder-1.5B quantized to IQ4_KS")
    ap.add_argument(
        "--ik-bench", help="ik_llama.cpp's llama-bench binary: the peer instead of llama-cpp-python"
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.iq4ks:
            from vramfit.cli import main as cli

            args.models.append(f"{tmp}/qwen2.5-coder-1.5b-iq4_ks.gguf")
            if cli(["quantize", "qwen2.5-coder-1.5b", args.models[-1], "IQ4_KS"]) != 0:
                raise SystemExit("quantize to IQ4_KS failed")
        if args.hybrid:
            from vramfit.model.random_model import random_model_spec, write_random_model

            args.models.append(f"{tmp}/qwen35-0.8b-random.gguf")
            write_random_model(random_model_spec("qwen35", "0.8b", "Q4_K_M"), args.models[-1])
        bench_all(args)


def bench_all(args: argparse.Namespace) -> None:
    from vramfit.hub import resolve

    threads = torch.get_num_threads()
    if args.ik_bench:
        peer_name = "ik_llama.cpp"
        print(f"threads: {threads}; peer ik_llama.cpp: {args.ik_bench}\n")
    else:
        peer_name = "llama-cpp-python"
        have_peer = peer_available(args.peer_python)
        print(f"threads: {threads}; peer llama-cpp-python: {'yes' if have_peer else 'not installed'}\n")
    print(f"| model | test | vramfit t/s | {peer_name} t/s | ratio |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in args.models:
        path = str(resolve(name))
        ours = run_ours(name, args.n_prompt, args.n_gen, args.repetitions)
        if args.ik_bench:
            peer = run_ik(args.ik_bench, path, args.n_prompt, args.n_gen, args.repetitions, threads)
        else:
            peer = run_peer(args.peer_python, path, args.n_prompt, args.n_gen, args.repetitions, threads)
        peer_by_test = {r["test"]: r for r in peer or []}
        for r in ours:
            p = peer_by_test.get(r["test"])
            ours_s = f"{r['tps_mean']:.2f} ± {r['tps_std']:.2f}"
            peer_s = f"{p['tps_mean']:.2f} ± {p['tps_std']:.2f}" if p else "-"
            ratio = f"{r['tps_mean'] / p['tps_mean']:.2f}" if p else "-"
            print(f"| {r['model']} | {r['test']} | {ours_s} | {peer_s} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
