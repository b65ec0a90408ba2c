"""What each KV cache type saves and costs: perplexity and KL divergence to the float32 cache, with and
without the Walsh-Hadamard rotations (issue 8).

Protocol: SmolLM2-135M-Instruct (Q4_1, the shipped test model), the text of Python's LICENSE.txt (shipped
with every CPython; fixed per Python version), windows of --ctx tokens scored on their second half
(llama-perplexity's protocol, `vramfit.eval.perplexity`); the float32-cache logits are the KLD base.

Run:  .venv/bin/python bench/kv_quality.py [--model smollm2-135m] [--ctx 512] [--chunks 4]
      [--backend auto|reference] [--types q8_0,q4_0]
"""

from __future__ import annotations

import argparse
import sysconfig
import tempfile
import time
from pathlib import Path

BLOCK_TYPES = ["q8_0", "q6_0", "q5_0", "iq4_nl", "q4_0"]


def variants(types: list[str]) -> list[tuple[str, str, bool, bool]]:
    """(K, V, K rotated, V rotated): float caches plain; block types plain, K rotated, both rotated."""
    out = [(t, t, False, False) for t in ("f32", "f16", "bf16") if t in types]
    for t in (t for t in types if t in BLOCK_TYPES):
        out += [(t, t, False, False), (t, t, True, False), (t, t, True, True)]
    if "q8_0" in types and "q6_0" in types:
        out.append(("q8_0", "q6_0", True, False))
    if "q6_0" in types and "q5_0" in types:
        out.append(("q6_0", "q5_0", True, False))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--backend", default="auto", choices=["auto", "reference", "cpu"])
    ap.add_argument("--types", default="f32,f16,bf16," + ",".join(BLOCK_TYPES))
    args = ap.parse_args()

    import vramfit
    from vramfit.eval.perplexity import BaseLogits, perplexity, windows
    from vramfit.hub import resolve
    from vramfit.kernels.dispatch import set_backend
    from vramfit.model.kvcache import KVSpec

    set_backend(args.backend)
    path = resolve(args.model)
    text = (Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt").read_text(encoding="utf-8")
    m0 = vramfit.load(path, n_ctx=args.ctx)
    chunks = windows(
        m0.tokenize(text), args.ctx, args.chunks, m0.tokenizer.bos_id if m0.tokenizer.add_bos else None
    )
    c = m0.config
    base_file = Path(tempfile.mkdtemp()) / "f32.logits"
    print(f"{path.name}: {len(chunks)} windows of {args.ctx} tokens of LICENSE.txt, backend {args.backend}")
    print(f"{'K/V':<14}{'rot':<6}{'B/token':>9}{'vs f32':>8}{'PPL':>10}{'+-':>8}{'dPPL %':>8}{'mean KLD':>10}"
          f"{'99.9% KLD':>11}{'same top':>10}{'s':>7}")  # fmt: skip
    base_ppl = None
    for k, v, kh, vh in [("f32", "f32", False, False)] + [
        x for x in variants(args.types.split(",")) if x[0] != "f32"
    ]:
        spec = KVSpec(k, v, kh, vh)
        m = vramfit.load(path, n_ctx=args.ctx, kv_type=spec)
        t0 = time.perf_counter()
        fn = lambda ids, m=m: m.engine.logits_all(list(ids)).numpy()  # noqa: E731
        if base_ppl is None:
            r = perplexity(fn, chunks, save_base=base_file)
            base_ppl = r.ppl
        else:
            r = perplexity(fn, chunks, base=BaseLogits(base_file))
        secs = time.perf_counter() - t0
        bpt = spec.bytes_per_token(c.n_layer, c.n_head_kv, c.head_dim)
        f32 = KVSpec().bytes_per_token(c.n_layer, c.n_head_kv, c.head_dim)
        rot = ("K" if kh else "") + ("V" if vh else "") or "-"
        kld = r.kld
        kld_s = f"{kld.mean_kld:>10.5f}{kld.kld_999:>11.4f}{100 * kld.same_top_p:>9.2f}%" if kld else " " * 30
        print(f"{k + '/' + v:<14}{rot:<6}{bpt:>9,}{bpt / f32:>8.3f}{r.ppl:>10.4f}{r.ppl_error:>8.4f}"
              f"{100 * (r.ppl / base_ppl - 1):>8.2f}{kld_s}{secs:>7.1f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
