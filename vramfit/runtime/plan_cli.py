"""`vramfit plan`: the memory plan as a rich table and a one-line verdict, or as JSON."""

from __future__ import annotations

import argparse
import json
import warnings

from rich.table import Table

from vramfit.runtime.planner import CPU, CUDA, GiB, MiB, ModelInfo, Plan, PlanError, parse_size, plan


def resolve_vram(text: str) -> int | None:
    """--vram: a size, "cpu" (None: host memory, no limit) or "auto" (the GPU's total, else cpu)."""
    if text.lower() == "cpu":
        return None
    if text.lower() != "auto":
        return parse_size(text)
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.mem_get_info()[1]
    except Exception:  # noqa: BLE001 - any failure to ask the GPU means: plan for the CPU
        pass
    return None


def parse_ctx(text: str) -> int | str:
    if text.lower() == "max":
        return "max"
    try:
        n = int(text.lower().replace("k", "000")) if text.lower().endswith("k") else int(text)
    except ValueError:
        raise PlanError(f"--ctx must be a number of tokens or max, not {text!r}") from None
    return n


def make_plan(args: argparse.Namespace) -> tuple[Plan, ModelInfo]:
    """--mem plans for the CPU with that much memory (auto: what is available); else --vram."""
    from vramfit.gguf import GGUFFile
    from vramfit.hub import resolve
    from vramfit.runtime.fit import resolve_mem

    info = ModelInfo.from_gguf(GGUFFile(resolve(args.model)))
    if args.mem is not None:
        budget, device = resolve_mem(args.mem), CPU
    else:
        budget = resolve_vram(args.vram)
        device = CPU if budget is None else CUDA
    kv = args.ctk if args.ctk == "auto" else (args.ctk, args.ctv or args.ctk)
    p = plan(info, budget, parse_ctx(args.ctx), kv, args.parallel, device=device, offload=args.offload)
    return p, info


def run_plan(args: argparse.Namespace, out, err) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p, info = make_plan(args)
    if args.json:
        out.print_json(json.dumps(p.as_dict()))
    else:
        out.print(plan_table(p))
        out.print(kv_table(p, info))
    if not p.fits:
        err.print(f"vramfit: error: {p.verdict}; nearest: {' or '.join(p.nearest)}")
        return 2
    report_warnings(p, err)
    if not args.json:
        out.print(f"[bold]{p.verdict}[/bold]")
    return 0


def report(p: Plan, console) -> None:
    """What `run`, `chat` and `serve` print before loading: the itemised table, warnings, the verdict."""
    console.print(plan_table(p))
    report_warnings(p, console)
    console.print(f"[bold]{p.verdict}[/bold]")


def report_warnings(p: Plan, console) -> None:
    for w in p.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")


def _gib(n: int) -> str:
    return f"{n / GiB:.3f}" if n >= 64 * MiB else f"{n / GiB:.3f} ({n / MiB:.1f} MiB)"


def plan_table(p: Plan) -> Table:
    where = "host" if p.device == "cpu" else p.device
    t = Table(
        title=f"memory plan: {p.model} on {where}, context {p.ctx:,} x {p.parallel}, KV {p.k_type}/{p.v_type}"
    )
    t.add_column("item")
    t.add_column(f"{where} GiB", justify="right")
    if p.device != "cpu":
        t.add_column("host GiB", justify="right")
    t.add_column("note")
    for i in p.items:
        host = [_gib(i.host_bytes) if i.host_bytes else ""] if p.device != "cpu" else []
        cells = [i.what, _gib(i.device_bytes), *host, i.note]
        t.add_row(*cells)
    total = ["total", _gib(p.device_total)] + ([_gib(p.host_total)] if p.device != "cpu" else [])
    budget = f"of {p.budget / GiB:.2f} GiB" if p.budget else ""
    t.add_row(*total, budget, style="bold")
    return t


def kv_table(p: Plan, info: ModelInfo) -> Table:
    t = Table(title=f"KV cache types ({info.kv_layers} attention layers)")
    for col in ("K/V", "bytes/token/layer", "bytes/token", "max context"):
        t.add_column(col, justify="left" if col == "K/V" else "right")
    for o in p.kv_options:
        mark = " <" if (o.k, o.v) == (p.k_type, p.v_type) else ""
        over = " (> train)" if o.max_ctx > info.n_ctx_train else ""
        t.add_row(
            f"{o.k}/{o.v}{mark}",
            f"{o.bytes_per_token_layer:,}",
            f"{o.bytes_per_token:,}",
            f"{o.max_ctx:,}{over}",
        )
    return t
