"""CLI verb implementations. Each wraps a library call; output for people goes through rich."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from contextlib import contextmanager

from rich.console import Console
from rich.table import Table

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


@contextmanager
def _status(msg: str):
    if err.is_terminal:
        with err.status(msg):
            yield
    else:
        yield


def _load(args: argparse.Namespace, planned: bool = False):
    """Open the model of `args`. planned (run, chat): first plan the load for the memory there is,
    print the plan to stderr, and refuse in one line when nothing fits."""
    from vramfit.api import Model
    from vramfit.gguf import GGUFFile
    from vramfit.hub import resolve

    path = resolve(args.model)
    if getattr(args, "threads", None):
        from vramfit.kernels.dispatch import set_threads

        set_threads(args.threads)
    device = getattr(args, "device", None)
    if planned:
        gguf = GGUFFile(path)
        f = _fit(args, gguf)
        with _status(f"loading {path.name}"):
            return Model(path, f.ctx, f.kv, gguf=gguf, device=device)
    kv = {}
    if getattr(args, "ctk", None):
        from vramfit.model.kvcache import KVSpec

        kv["kv_type"] = KVSpec.parse(args.ctk, args.ctv, args.khad, args.vhad)
    with _status(f"loading {path.name}"):
        return Model(path, args.ctx, **kv, device=device)


def _fit(args: argparse.Namespace, gguf, parallel: int = 1):
    from vramfit.model.loader import resolve_device
    from vramfit.runtime.fit import fit, resolve_mem
    from vramfit.runtime.plan_cli import report

    device = resolve_device(getattr(args, "device", None))
    mem = resolve_mem(args.mem, device)
    f = fit(gguf, args.ctx, args.ctk, args.ctv, args.khad, args.vhad, mem, parallel, device)
    report(f.plan, err)
    return f


def _print_stats(m) -> None:
    s = m.last_stats
    err.print(
        f"[dim]prompt {s.prompt_tokens} tokens ({s.cached_tokens} cached), {s.prefill_tps:.1f} t/s | "
        f"generated {s.generated_tokens} tokens, {s.decode_tps:.1f} t/s | stop: {s.finish_reason}[/dim]"
    )


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def cmd_run(args: argparse.Namespace) -> int:
    from vramfit.cli import _sampling

    m = _load(args, planned=True)
    if args.chat:
        prompt = m.render([{"role": "user", "content": args.prompt}])
    else:
        prompt = args.prompt
        _write(prompt)
    for piece in m.generate(prompt, args.n_predict, stream=True, stop=args.stop, **_sampling(args)):
        _write(piece)
    _write("\n")
    _print_stats(m)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from vramfit.cli import _sampling

    m = _load(args, planned=True)
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    err.print(f"[dim]chatting with {m.path.name} (ctx {m.n_ctx}); /reset clears, /exit or Ctrl-D quits[/dim]")
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "/bye"):
            break
        if text == "/reset":
            history = history[:1] if args.system else []
            err.print("[dim]history cleared[/dim]")
            continue
        history.append({"role": "user", "content": line})
        prompt = _fit_history(m, history, args.n_predict)
        reply = []
        for piece in m.generate(prompt, args.n_predict, stream=True, stop=args.stop, **_sampling(args)):
            _write(piece)
            reply.append(piece)
        _write("\n")
        _print_stats(m)
        history.append({"role": "assistant", "content": "".join(reply).strip()})
    return 0


def _fit_history(m, history: list[dict], n_predict: int) -> str:
    """Render the conversation, dropping the oldest turns (never the system message or the last user
    message) until it leaves room for the reply."""
    budget = m.n_ctx - min(n_predict, m.n_ctx // 2)
    while True:
        prompt = m.render(history)
        n = len(m.tokenize(prompt, special=True))
        first = 1 if history[0]["role"] == "system" else 0
        if n <= budget or len(history) - first <= 1:
            return prompt
        del history[first]
        err.print("[dim]context full: dropped the oldest message[/dim]")


def cmd_inspect(args: argparse.Namespace) -> int:
    from vramfit.gguf import GGUFFile
    from vramfit.hub import resolve

    g = GGUFFile(resolve(args.model))
    out.print(f"[bold]{g.path}[/bold]  GGUF v{g.version}, {len(g.tensors)} tensors, alignment {g.alignment}")
    if layers := _layer_summary(g):
        out.print(layers)
    meta = Table(title="metadata", show_lines=False)
    meta.add_column("key")
    meta.add_column("value", overflow="fold")
    for key, value in g.metadata.items():
        meta.add_row(key, _show_value(key, value, args.all_metadata))
    out.print(meta)
    out.print(_tensor_table(g))
    return 0


def _layer_summary(g) -> str:
    """ "64 layers: 16 attention (3, 7, ...), 48 recurrent (Gated DeltaNet)" for hybrid models, from
    the tensors each block holds; MTP blocks (nextn_predict_layers) are counted apart."""
    arch = g.architecture
    n_block = g.metadata.get(f"{arch}.block_count")
    if not isinstance(n_block, int):
        return ""
    n_mtp = int(g.metadata.get(f"{arch}.nextn_predict_layers", 0) or 0)
    n_layer = n_block - n_mtp
    mtp = f" + {n_mtp} MTP" if n_mtp else ""
    recurrent = [i for i in range(n_layer) if f"blk.{i}.ssm_a" in g.tensors]
    if not recurrent:
        return f"{n_layer} layers{mtp}"
    attention = [i for i in range(n_layer) if f"blk.{i}.attn_k.weight" in g.tensors]
    kind = "Gated DeltaNet" if f"blk.{recurrent[0]}.ssm_alpha.weight" in g.tensors else "SSM"
    return (
        f"{n_layer} layers{mtp}: {len(attention)} attention ({', '.join(map(str, attention))}), "
        f"{len(recurrent)} recurrent ({kind})"
    )


def _show_value(key: str, value, full: bool) -> str:
    if isinstance(value, Sequence) and not isinstance(value, str):
        if full:
            return repr(list(value))
        head = ", ".join(repr(v) for v in value[:4])
        return f"[{len(value)} items: {head}{', ...' if len(value) > 4 else ''}]"
    if isinstance(value, str) and len(value) > 120 and not full:
        return repr(value[:100]) + f" ... ({len(value)} chars)"
    return repr(value) if isinstance(value, str) else str(value)


def _tensor_table(g) -> Table:
    t = Table(title="tensors")
    for col in ("name", "type", "shape", "bytes", "bpw"):
        t.add_column(col, justify="right" if col in ("bytes", "bpw") else "left")
    by_type: dict[str, list[int]] = {}
    for info in g.tensors.values():
        bpw = 8 * info.nbytes / max(info.n_elements, 1)
        shape = "[" + ", ".join(str(d) for d in reversed(info.shape)) + "]"  # ggml order, ne0 first
        t.add_row(info.name, info.type.name, shape, f"{info.nbytes:,}", f"{bpw:.3f}")
        acc = by_type.setdefault(info.type.name, [0, 0, 0])
        acc[0], acc[1], acc[2] = acc[0] + 1, acc[1] + info.n_elements, acc[2] + info.nbytes
    n_el = sum(v[1] for v in by_type.values())
    n_b = sum(v[2] for v in by_type.values())
    summary = ", ".join(f"{k}: {v[0]}" for k, v in sorted(by_type.items()))
    t.caption = (
        f"{n_el / 1e6:.2f} M weights, {n_b / 2**20:.2f} MiB, {8 * n_b / max(n_el, 1):.3f} bpw ({summary})"
    )
    return t


def cmd_pull(args: argparse.Namespace) -> int:
    from vramfit.gguf import GGUFFile
    from vramfit.hub import pull

    path = pull(args.name)
    g = GGUFFile(path)  # checks that what arrived is a readable GGUF
    out.print(f"{path}  ({path.stat().st_size / 2**20:.1f} MiB, {g.architecture}, {len(g.tensors)} tensors)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from vramfit.eval.bench import format_table, run_bench

    if args.ctx is None:
        args.ctx = max(args.n_prompt, args.n_gen, 16)
    m = _load(args)
    rows = run_bench(m, args.n_prompt, args.n_gen, args.repetitions)
    if args.json:
        _write(json.dumps([r.as_dict() for r in rows], indent=2) + "\n")
    else:
        out.print(format_table(rows))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from vramfit.server.app import serve

    if args.parallel < 1:
        err.print("vramfit: error: --parallel must be at least 1")
        return 2
    # only what the user set: serve() plans the rest (context, cache types, memory)
    given = {k: getattr(args, k) for k in ("ctk", "ctv", "mem", "device") if getattr(args, k) is not None}
    given |= {k: True for k in ("khad", "vhad") if getattr(args, k)}
    given |= {"aliases": tuple(args.alias)} if args.alias else {}
    serve(args.model, args.host, args.port, args.ctx, args.parallel, args.api_key, args.cors or None, **given)
    return 0


def cmd_imatrix(args: argparse.Namespace) -> int:
    from vramfit.quant.verbs import cmd_imatrix

    return cmd_imatrix(args)


def cmd_quantize(args: argparse.Namespace) -> int:
    from vramfit.quant.verbs import cmd_quantize

    return cmd_quantize(args)


def cmd_perplexity(args: argparse.Namespace) -> int:
    from vramfit.quant.verbs import cmd_perplexity

    return cmd_perplexity(args)


def cmd_make_random(args: argparse.Namespace) -> int:
    import time

    from vramfit.model.random_model import random_model_spec, write_random_model

    spec = random_model_spec(args.arch, args.preset, args.type, args.custom_q)
    for note in spec.notes:
        err.print(f"[dim]{note}[/dim]")
    t0 = time.perf_counter()
    with _status(f"writing {args.output}"):
        size = write_random_model(spec, args.output, args.seed)
    bpw, secs = 8 * spec.nbytes / spec.n_params, time.perf_counter() - t0
    out.print(
        f"{args.output}: {spec.arch} {spec.preset}, {spec.n_params / 1e9:.3f} B parameters, "
        f"{size / 2**30:.3f} GiB ({bpw:.3f} bpw), {len(spec.tensors)} tensors, {secs:.1f} s"
    )
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from vramfit.runtime.plan_cli import run_plan

    return run_plan(args, out, err)
