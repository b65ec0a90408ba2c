"""CLI verbs imatrix, quantize and perplexity: argument parsers and the rich front ends.

Importing this module is cheap (argparse only); the work is imported when a verb runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_parsers(sub) -> None:
    p = sub.add_parser("imatrix", help="importance matrix (mean squared activations) over a text")
    p.add_argument("model", help="GGUF path or short name")
    p.add_argument("-f", "--file", required=True, help="text file")
    p.add_argument("-o", "--output", required=True, help="imatrix file to write (legacy .dat format)")
    p.add_argument("-c", "--ctx", type=int, default=512, help="tokens per chunk (default 512)")
    p.add_argument("--chunks", type=int, default=None, help="at most this many chunks")
    p.add_argument("--process-output", action="store_true", help="collect output.weight too")

    p = sub.add_parser("quantize", help="requantize a GGUF (or convert a HF folder) to a type or mix")
    p.add_argument("input", help="GGUF file of any type, or a Hugging Face safetensors folder")
    p.add_argument("output", help="GGUF file to write")
    p.add_argument("type", help="mix (IQ4_KS, Q4_K_M, Q8_0 ...) or ggml type name (iq4_ks ...)")
    p.add_argument("--imatrix", default=None, help="imatrix (.dat or mainline GGUF)")
    p.add_argument("--custom-q", default=None, help='"regex=type,..." rules; the first match wins')
    p.add_argument("--pure", action="store_true", help="no per-tensor adjustments")
    p.add_argument("--token-embedding-type", default=None)
    p.add_argument("--output-tensor-type", default=None)

    p = sub.add_parser("perplexity", help="llama-perplexity: PPL over a text, KL divergence to a base")
    p.add_argument("model", help="GGUF path or short name")
    p.add_argument("-f", "--file", default=None, help="text file (not needed with --kl-divergence)")
    p.add_argument("-c", "--ctx", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--chunks", type=int, default=None, help="at most this many windows")
    p.add_argument("--kl-divergence-base", default=None, help="base logits file: written, or read")
    p.add_argument("--kl-divergence", action="store_true", help="compare with --kl-divergence-base")


def _console():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True), Console(stderr=True, highlight=False, soft_wrap=True)


def _read_text(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no such text file")
    return p.read_text(encoding="utf-8", errors="replace")


def _chunk_progress(err, total: int, what: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn(what),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        console=err,
        disable=not err.is_terminal,
    )


# ------------------------------------------------------------------------------------------ imatrix


def cmd_imatrix(args: argparse.Namespace) -> int:
    from vramfit.api import Model
    from vramfit.eval.perplexity import perplexity, windows
    from vramfit.hub import resolve
    from vramfit.kernels import dispatch
    from vramfit.quant.imatrix import Collector, write_dat

    out, err = _console()
    text = _read_text(args.file)
    if not Path(args.output).resolve().parent.is_dir():
        raise FileNotFoundError(f"output folder {Path(args.output).parent} does not exist")
    m = Model(resolve(args.model), args.ctx)
    tok = m.tokenizer
    chunks = windows(m.tokenize(text), args.ctx, args.chunks, tok.bos_id if tok.add_bos else None)
    col = Collector(args.process_output)
    dispatch.input_observers.append(col)
    t0 = time.perf_counter()
    try:
        with _chunk_progress(err, len(chunks), "imatrix") as bar:
            task = bar.add_task("", total=len(chunks), info="")
            res = perplexity(_logits_fn(m), chunks, on_chunk=lambda i, r: bar.update(task, completed=i,
                             info=f"PPL {r.ppl:.4f}"))  # fmt: skip
    finally:
        dispatch.input_observers.remove(col)
    im = col.result(Path(args.file).name, len(chunks))
    write_dat(im, args.output)
    out.print(
        f"{args.output}: {len(im.values)} entries from {len(chunks)} chunks of {args.ctx} tokens "
        f"in {time.perf_counter() - t0:.1f} s (PPL over the chunks {res.ppl:.4f})"
    )
    return 0


def _logits_fn(m):
    return lambda ids: m.engine.logits_all(list(ids)).numpy()


# ----------------------------------------------------------------------------------------- quantize


class _RichProgress:
    def __init__(self, err):
        from rich.progress import (
            BarColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn("{task.fields[tensor]:<32}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[count]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=err,
            disable=not err.is_terminal,
        )
        self.task = None

    def start(self, total: int) -> None:
        self.task = self.bar.add_task("", total=total, tensor="", count="")

    def tensor(self, choice, index: int, count: int) -> None:
        label = f"{choice.name} {(choice.type or 'copy').upper()}"
        self.bar.update(self.task, tensor=label, count=f"[{index + 1}/{count}]")

    def advance(self, n: int) -> None:
        self.bar.advance(self.task, n)


def cmd_quantize(args: argparse.Namespace) -> int:
    from vramfit.hub import resolve
    from vramfit.quant.pipeline import QuantizeRequest, quantize

    out, err = _console()
    req = QuantizeRequest(
        Path(args.input) if Path(args.input).exists() else resolve(args.input),
        Path(args.output),
        args.type,
        Path(args.imatrix) if args.imatrix else None,
        args.custom_q,
        args.pure,
        args.token_embedding_type,
        args.output_tensor_type,
    )
    prog = _RichProgress(err)
    with prog.bar:
        report = quantize(req, prog)
    out.print(quantize_table(report))
    for note in report.notes:
        err.print(f"[yellow]note:[/yellow] {note}")
    return 0


def quantize_table(report):
    from rich.table import Table

    t = Table(title=f"{report.path.name}: {report.mix} (file type {report.ftype})")
    for col in ("type", "tensors", "weights", "MiB", "bpw"):
        t.add_column(col, justify="left" if col == "type" else "right")
    for name, (n, w, b) in report.by_type().items():
        t.add_row(name, str(n), f"{w:,}", f"{b / 2**20:.2f}", f"{8 * b / max(w, 1):.3f}")
    size = report.path.stat().st_size
    t.caption = (
        f"file {size / 2**20:.2f} MiB, tensors {report.nbytes / 2**20:.2f} MiB, {report.bpw:.3f} bpw, "
        f"{report.seconds:.1f} s"
    )
    return t


# --------------------------------------------------------------------------------------- perplexity


def cmd_perplexity(args: argparse.Namespace) -> int:
    from vramfit.api import Model
    from vramfit.eval.perplexity import BaseLogits, PerplexityError, perplexity, windows
    from vramfit.hub import resolve

    out, err = _console()
    base = save = None
    if args.kl_divergence:
        if not args.kl_divergence_base:
            raise PerplexityError("--kl-divergence needs --kl-divergence-base FILE")
        base = BaseLogits(args.kl_divergence_base)
        m = Model(resolve(args.model), base.n_ctx)
        chunks = base.windows(args.chunks)
    else:
        if not args.file:
            raise PerplexityError("give a text file with -f (or --kl-divergence with a base file)")
        text = _read_text(args.file)
        if args.kl_divergence_base:
            save = Path(args.kl_divergence_base)
            if not save.resolve().parent.is_dir():
                raise FileNotFoundError(f"output folder {save.parent} does not exist")
        m = Model(resolve(args.model), args.ctx)
        tok = m.tokenizer
        chunks = windows(m.tokenize(text), args.ctx, args.chunks, tok.bos_id if tok.add_bos else None)
    err.print(f"[dim]{len(chunks)} chunks of {len(chunks[0])} tokens[/dim]")
    t0 = time.perf_counter()
    with _chunk_progress(err, len(chunks), "perplexity") as bar:
        task = bar.add_task("", total=len(chunks), info="")

        def on_chunk(i, r):
            bar.update(task, completed=i, info=f"PPL {r.ppl:.4f}")
            if not err.is_terminal:
                sys.stderr.write(f"[{i}]{r.ppl:.4f},")

        res = perplexity(_logits_fn(m), chunks, save_base=save, base=base, on_chunk=on_chunk)
    if not err.is_terminal:
        sys.stderr.write("\n")
    out.print(f"Final estimate: PPL = {res.ppl:.4f} +/- {res.ppl_error:.5f}")
    if res.kld is not None:
        _print_kld(out, res)
    err.print(f"[dim]{res.count} tokens scored in {time.perf_counter() - t0:.1f} s[/dim]")
    return 0


def _print_kld(out, res) -> None:
    import numpy as np

    k = res.kld
    out.print(f"Mean PPL(Q)     : {res.ppl:10.6f} +/- {res.ppl_error:.6f}")
    out.print(f"Mean PPL(base)  : {k.ppl_base:10.6f}")
    out.print(f"Mean KLD        : {k.mean_kld:10.6f} +/- {k.kld.std() / max(1, k.kld.size - 1) ** 0.5:.6f}")
    out.print(f"Maximum KLD     : {k.kld.max():10.6f}")
    out.print(f"99.9%   KLD     : {k.kld_999:10.6f}")
    out.print(f"Median  KLD     : {float(np.median(k.kld)):10.6f}")
    out.print(f"RMS Δp          : {100 * k.rms_dp:10.3f} %")
    out.print(f"Same top p      : {100 * k.same_top_p:10.3f} %")
