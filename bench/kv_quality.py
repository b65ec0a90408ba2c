"""What each KV cache type saves and costs: perplexity and KL divergence to the float32 cache, with and
without the Walsh-Hadamard rotations (issue 8). Prints a markdown table.

Protocol: a real small model (default Qwen2.5-Coder-0.5B-Instruct Q4_K_M: 24 layers, 2 KV heads of 64),
the text of Python's LICENSE.txt (shipped with every CPython; fixed per Python version), windows of
--ctx tokens scored on their second half (llama-perplexity's protocol, `vramfit.eval.perplexity`). The
float32 cache is the base: its logits are saved and every other cache is compared with them (mean and
99.9th percentile KLD, how often the top token is the same). Each block type is run plain, with K
rotated (q and k rotated alike: scores unchanged) and with K and V rotated (the attention output
rotated back), f16 and bf16 plain and with both rotated; the community's mixed pairs (q8_0/q6_0,
q6_0/q5_0) with K rotated. 3 windows of 512 tokens take about 5 minutes on 2 cores. bytes/token is the
cache of all layers for one token (model/kvcache.py `KVSpec.bytes_per_token`). The weights are loaded
once; each cache is a fresh engine over them.

Run:  .venv/bin/python bench/kv_quality.py [--model qwen2.5-coder-0.5b] [--ctx 512] [--chunks 3]
      [--backend auto|reference] [--types f16,q8_0,q4_0] > bench/results/kv_quality.md
"""

from __future__ import annotations

import argparse
import platform
import sysconfig
import tempfile
import time
from pathlib import Path

FLOAT_TYPES = ["f16", "bf16"]
BLOCK_TYPES = ["q8_0", "q6_0", "q5_0", "iq4_nl", "q4_0"]
MIXED = [("q8_0", "q6_0"), ("q6_0", "q5_0")]


def variants(types: list[str]) -> list[tuple[str, str, bool, bool]]:
    """(K, V, K rotated, V rotated), largest first: each block type plain, K rotated, K and V rotated;
    each float type plain and K and V rotated (a rotation only moves float rounding); the mixed pairs
    of two listed types with K rotated."""
    out = []
    for t in (t for t in FLOAT_TYPES if t in types):
        out += [(t, t, False, False), (t, t, True, True)]
    for t in (t for t in BLOCK_TYPES if t in types):
        out += [(t, t, False, False), (t, t, True, False), (t, t, True, True)]
    out += [(k, v, True, False) for k, v in MIXED if k in types and v in types]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=3)
    ap.add_argument("--backend", default="auto", choices=["auto", "reference", "cpu"])
    ap.add_argument("--types", default=",".join(FLOAT_TYPES + BLOCK_TYPES))
    args = ap.parse_args()

    import vramfit
    from vramfit.eval.perplexity import BaseLogits, perplexity, windows
    from vramfit.hub import resolve
    from vramfit.kernels.dispatch import set_backend
    from vramfit.model.kvcache import KVSpec
    from vramfit.runtime.engine import Engine

    set_backend(args.backend)
    path = resolve(args.model)
    text = (Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt").read_text(encoding="utf-8")
    m = vramfit.load(path, n_ctx=args.ctx)
    bos = m.tokenizer.bos_id if m.tokenizer.add_bos else None
    chunks = windows(m.tokenize(text), args.ctx, args.chunks, bos)
    c = m.config
    f32 = KVSpec().bytes_per_token(c.n_layer, c.n_head_kv, c.head_dim)
    base_file = Path(tempfile.mkdtemp()) / "f32.logits"
    print(f"# KV cache types: perplexity and KLD to the float32 cache\n\n{path.name} ({c.n_layer} layers, "
          f"{c.n_head_kv} KV heads of {c.head_dim}), {len(chunks)} windows of {args.ctx} tokens of "
          f"Python {platform.python_version()}'s LICENSE.txt, second halves scored; kernel backend "
          f"{args.backend}; `bench/kv_quality.py --ctx {args.ctx} --chunks {args.chunks}`\n")  # fmt: skip
    print("| K/V | rotated | bytes/token | vs f32 | PPL | ± | ΔPPL | mean KLD | 99.9% KLD | same top | s |")
    print("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    base_ppl = None
    for k, v, kh, vh in [("f32", "f32", False, False), *variants(args.types.split(","))]:
        spec = KVSpec(k, v, kh, vh)
        m.model.kv_type = spec  # the engine's cache: new_cache() allocates this storage
        engine = Engine(m.model)
        t0 = time.perf_counter()
        fn = lambda ids, e=engine: e.logits_all(list(ids)).numpy()  # noqa: E731
        if base_ppl is None:
            r = perplexity(fn, chunks, save_base=base_file)
            base_ppl = r.ppl
        else:
            r = perplexity(fn, chunks, base=BaseLogits(base_file))
        secs = time.perf_counter() - t0
        bpt = spec.bytes_per_token(c.n_layer, c.n_head_kv, c.head_dim)
        rot = "+".join(x for x, on in (("K", kh), ("V", vh)) if on) or "-"
        kld = r.kld
        kld_s = (
            f"{kld.mean_kld:.5f} | {kld.kld_999:.4f} | {100 * kld.same_top_p:.2f}%" if kld else "base | | "
        )
        print(f"| {k}/{v} | {rot} | {bpt:,} | {bpt / f32:.3f} | {r.ppl:.4f} | {r.ppl_error:.4f} | "
              f"{100 * (r.ppl / base_ppl - 1):+.2f}% | {kld_s} | {secs:.1f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
