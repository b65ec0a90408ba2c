"""IQ4_KS quality and quantize time, side by side with ik_llama.cpp's numbers (issue 4).

Protocol: the Qwen2.5-Coder-1.5B-Instruct Q4_K_M model decoded to F16 is the base; an imatrix from 40
chunks of 512 tokens (computed on the base) of Python 3.11's argparse.py, dataclasses.py, textwrap.py
and functools.py concatenated; perplexity over 24 chunks of 512 tokens of logging/__init__.py,
json/decoder.py, json/encoder.py and csv.py; KLD of the IQ4_KS mix against the base's logits.

Run:  .venv/bin/python bench/quant_quality.py [--model qwen2.5-coder-1.5b] [--work DIR]
      [--imatrix-chunks 40] [--ppl-chunks 24] [--ctx 512]
Steps whose output already exists in DIR are not redone.
"""

from __future__ import annotations

import argparse
import sysconfig
import time
from pathlib import Path

REFERENCE = {  # ik_llama.cpp, IQ4_KS mix with imatrix, same protocol (from the issue)
    "size_mib": 969.81, "ppl_q": 3.5065, "ppl_base": 3.4182, "mean_kld": 0.018186, "kld_999": 0.5766,
    "same_top": 0.9487, "quantize_s": 153.5,
}  # fmt: skip
IMATRIX_FILES = ["argparse.py", "dataclasses.py", "textwrap.py", "functools.py"]
PPL_FILES = ["logging/__init__.py", "json/decoder.py", "json/encoder.py", "csv.py"]


def concat(names: list[str], dst: Path) -> Path:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    dst.write_text("".join((stdlib / n).read_text(encoding="utf-8") for n in names), encoding="utf-8")
    return dst


def run_ppl(model_path: Path, chunks, save=None, base=None):
    import vramfit
    from vramfit.eval.perplexity import perplexity

    m = vramfit.load(model_path, n_ctx=len(chunks[0]))
    return perplexity(lambda ids: m.engine.logits_all(list(ids)).numpy(), chunks, save_base=save, base=base)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--work", default="bench-out/quant_quality")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--imatrix-chunks", type=int, default=40)
    ap.add_argument("--ppl-chunks", type=int, default=24)
    ap.add_argument("--peer-python", default=None, help="python with llama_cpp: its PPL")
    args = ap.parse_args()

    import vramfit
    from vramfit.eval.perplexity import BaseLogits, windows
    from vramfit.hub import resolve
    from vramfit.quant.imatrix import collect_imatrix, write_dat
    from vramfit.quant.pipeline import QuantizeRequest, quantize

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base_gguf, dat = work / "base-f16.gguf", work / "imatrix.dat"
    quant, kld = work / "iq4_ks.gguf", work / "base.kld"
    if not base_gguf.exists():
        quantize(QuantizeRequest(resolve(args.model), base_gguf, "F16"))
    if not dat.exists():
        m = vramfit.load(base_gguf, n_ctx=args.ctx)
        toks = m.tokenize(concat(IMATRIX_FILES, work / "imatrix.txt").read_text())
        bos = m.tokenizer.bos_id if m.tokenizer.add_bos else None
        write_dat(collect_imatrix(m.engine, windows(toks, args.ctx, args.imatrix_chunks, bos)), dat)
        del m
    t0 = time.perf_counter()
    report = quantize(QuantizeRequest(base_gguf, quant, "IQ4_KS", imatrix=dat))
    quant_s = time.perf_counter() - t0
    if not kld.exists():
        m = vramfit.load(base_gguf, n_ctx=args.ctx)
        toks = m.tokenize(concat(PPL_FILES, work / "ppl.txt").read_text())
        bos = m.tokenizer.bos_id if m.tokenizer.add_bos else None
        run_ppl(base_gguf, windows(toks, args.ctx, args.ppl_chunks, bos), save=kld)
        del m
    base = BaseLogits(kld)
    res = run_ppl(quant, base.windows(), base=base)
    k = res.kld
    # model size as llama.cpp reports it (the reference's 969.81 MiB): tensor data, without the header
    from vramfit.gguf import GGUFFile

    size = sum(t.nbytes for t in GGUFFile(quant).tensors.values()) / 2**20
    r = REFERENCE
    head = [
        "quant (IQ4_KS mix, imatrix)",
        "size",
        "PPL(Q)",
        "PPL(base)",
        "Mean KLD",
        "99.9% KLD",
        "Same top p",
    ]
    rows = [
        ["ik_llama.cpp", f"{r['size_mib']:.2f} MiB", f"{r['ppl_q']:.4f}", f"{r['ppl_base']:.4f}",
         f"{r['mean_kld']:.6f}", f"{r['kld_999']:.4f}", f"{100 * r['same_top']:.2f}%",
         f"{r['quantize_s']:.1f} s"],
        ["vramfit", f"{size:.2f} MiB", f"{res.ppl:.4f}", f"{k.ppl_base:.4f}", f"{k.mean_kld:.6f}",
         f"{k.kld_999:.4f}", f"{100 * k.same_top_p:.2f}%", f"{quant_s:.1f} s"],
    ]  # fmt: skip
    for row in [[*head, "quantize"], ["---"] + ["---:"] * 7, *rows]:
        print("| " + " | ".join(row) + " |")
    print(
        f"\nfile {quant.stat().st_size / 2**20:.2f} MiB with metadata; {report.bpw:.3f} bpw; "
        f"notes: {'; '.join(report.notes) or 'none'}"
    )
    if args.peer_python:
        peer = peer_ppl(args.peer_python, base_gguf, work / "ppl.txt", args.ctx, args.ppl_chunks)
        print(f"llama.cpp (llama-cpp-python) PPL, same base and text: {peer:.4f}; ours {k.ppl_base:.4f}")


# llama-perplexity's protocol in the peer: no BOS for this vocabulary, score the second half of each window
PEER_PPL = """
import sys, numpy as np
from llama_cpp import Llama
path, text, n_ctx, n_chunks = sys.argv[1], open(sys.argv[2]).read(), int(sys.argv[3]), int(sys.argv[4])
llm = Llama(path, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False)
toks = llm.tokenize(text.encode(), add_bos=False, special=False)
nll, cnt = 0.0, 0
for c in range(min(n_chunks, len(toks) // n_ctx)):
    w = toks[c * n_ctx : (c + 1) * n_ctx]
    llm.reset(); llm.eval(w)
    lg = np.array(llm.scores[:n_ctx], dtype=np.float64)
    lp = lg - lg.max(1, keepdims=True); lp -= np.log(np.exp(lp).sum(1, keepdims=True))
    for i in range(n_ctx // 2, n_ctx - 1):
        nll -= lp[i, w[i + 1]]; cnt += 1
print(np.exp(nll / cnt))
"""


def peer_ppl(python: str, base: Path, text: Path, n_ctx: int, n_chunks: int) -> float:
    import subprocess

    cmd = [python, "-c", PEER_PPL, str(base), str(text), str(n_ctx), str(n_chunks)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
