"""The memory planner: a pure function from a model's shapes and a memory budget to an itemised plan.

`plan(info, vram_bytes, ctx, kv_type, parallel)` counts every byte the engine will allocate before it
allocates any (house style principles 6 and 7); runtime/memory.py holds the count of each item:

- weights per device. On a GPU the token embedding stays in host memory (a lookup reads one row per
  token, as llama.cpp does); with `offload` the least-read tensors follow it when the weights do not
  fit: the output matrix, then whole layers from the last one. On the CPU, what the mapping and the
  loader's copies keep resident.
- KV cache: for each attention layer, n_kv_heads * head_dim elements of K and of V per token, in the
  cache type's block size (q8_0: 34 bytes per 32 values ...), times the context and the sequences.
- recurrent state: conv + delta-rule state of each Gated DeltaNet layer, float32, per sequence.
- workspace: the activations alive at the peak of one prefill chunk (per slot on the CPU, where each
  slot prefills in its own thread).
- runtime (CPU: RoPE table, kernel scratch, threads) or CUDA context, the allocator's overhead, and a
  safety margin.

Then the largest context per KV cache type, the choice of type and context, warnings, and for a
budget that nothing fits, the nearest settings that do.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from vramfit.gguf.types import type_by_name
from vramfit.runtime.memory import (
    CPU,
    CUDA,
    Device,
    GiB,
    MiB,
    ModelInfo,
    TensorEntry,
    allocator_bytes,
    kv_bytes_per_token,
    kv_bytes_per_token_layer,
    runtime_bytes,
    weight_bytes,
    workspace_bytes,
)

__all__ = [
    "CPU", "CUDA", "Device", "GiB", "MiB", "ModelInfo", "Plan", "PlanError", "TensorEntry",
    "kv_bytes_per_token", "kv_bytes_per_token_layer", "parse_kv", "parse_size", "plan",
]  # fmt: skip

# KV cache types, best quality first (f32 only on the CPU, where the engine computes in it; on a GPU
# it buys nothing over f16)
KV_TYPES = ("f32", "f16", "bf16", "q8_0", "q6_0", "q5_0", "iq4_nl", "q4_0")
# (K, V) pairs "auto" tries, best quality first; V tolerates fewer bits than K
AUTO_PAIRS = (
    ("f16", "f16"), ("q8_0", "q8_0"), ("q8_0", "q6_0"), ("q6_0", "q5_0"), ("q5_0", "q5_0"),
    ("q4_0", "q4_0"),
)  # fmt: skip
DEFAULT_QUALITY = ("q8_0", "q8_0")  # "max" context is taken at this quality (near-lossless)
MIN_CTX = 4096  # "max" steps below DEFAULT_QUALITY only when it cannot hold this many tokens
CTX_STEP = 256  # contexts are multiples of this
MAX_SEARCH = 2**26  # the largest context the search for a maximum looks at


class PlanError(ValueError):
    """Input the planner cannot work with: an unknown or unusable KV type, a bad size."""


# ------------------------------------------------------------------------------------------------
# KV cache types


def parse_kv(kv_type: str | tuple[str, str], head_dim: int) -> tuple[str, str] | None:
    """ "auto" -> None; "q8_0" -> (q8_0, q8_0); "q8_0/q6_0" or a pair -> (K, V). Checks each type."""
    if kv_type == "auto":
        return None
    k, v = kv_type if isinstance(kv_type, tuple) else (kv_type.split("/") + [kv_type.split("/")[0]])[:2]
    for t in (k, v):
        if t not in KV_TYPES:
            raise PlanError(f"unknown KV cache type {t!r} (choose from {', '.join(KV_TYPES)}, or auto)")
        if head_dim % type_by_name(t).block_size:
            block = type_by_name(t).block_size
            raise PlanError(
                f"KV cache type {t} needs a head size that is a multiple of {block}, not {head_dim}"
            )
    return k, v


def _pairs(pair: tuple[str, str] | None, dev: Device, head_dim: int) -> tuple[list, list]:
    """(every pair reported with its max context: each type for K and V, the mixed pairs "auto" tries,
    the asked-for pair; largest first), and the pairs "auto" tries, best quality first. Types whose
    block the head size cannot hold are left out."""

    def usable(p: tuple[str, str]) -> bool:
        return all(head_dim % type_by_name(t).block_size == 0 for t in p)

    def size(p: tuple[str, str]) -> tuple:
        return (-sum(type_by_name(t).nbytes((256,)) for t in p), *map(KV_TYPES.index, p))

    auto = [p for p in ([("f32", "f32")] if dev.name == "cpu" else []) + list(AUTO_PAIRS) if usable(p)]
    same = [(t, t) for t in KV_TYPES if (t != "f32" or dev.name == "cpu") and usable((t, t))]
    every = sorted(set(auto) | set(same) | ({pair} if pair else set()), key=size)
    return every, auto


# ------------------------------------------------------------------------------------------------
# The plan


@dataclass
class Item:
    what: str
    device_bytes: int
    host_bytes: int = 0
    note: str = ""


@dataclass
class KVOption:
    k: str
    v: str
    bytes_per_token_layer: int
    bytes_per_token: int  # all layers, one sequence
    max_ctx: int  # largest context that fits (0 = none; uncapped by the training length)


@dataclass
class Plan:
    model: str
    device: str
    budget: int | None  # bytes of device memory; None = no limit
    ctx: int
    parallel: int
    batch: int
    k_type: str
    v_type: str
    items: list[Item]
    kv_options: list[KVOption]
    host_tensors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    fits: bool = True
    verdict: str = ""
    nearest: list[str] = field(default_factory=list)
    n_ctx_train: int = 0  # the model's training context ("max" never plans beyond it)

    @property
    def device_total(self) -> int:
        return sum(i.device_bytes for i in self.items)

    @property
    def host_total(self) -> int:
        return sum(i.host_bytes for i in self.items)

    def item(self, what: str) -> Item:
        return next(i for i in self.items if i.what == what)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["device_total"], d["host_total"] = self.device_total, self.host_total
        d["max_ctx"] = {f"{o.k}/{o.v}": o.max_ctx for o in self.kv_options}
        return d


class _Cost:
    """Every item of the plan for one KV type pair and one placement, as a function of the context."""

    def __init__(self, info: ModelInfo, dev: Device, batch: int, parallel: int, k: str, v: str, host):
        self.info, self.dev, self.batch, self.parallel, self.k, self.v = info, dev, batch, parallel, k, v
        self.host = frozenset(host)

    def items(self, ctx: int) -> list[Item]:
        i, d, n, k, v = self.info, self.dev, self.batch, self.k, self.v
        slots = self.parallel if d.name == "cpu" else 1  # CPU slots prefill in threads of their own
        w = weight_bytes(i, d, ctx, self.host)
        ws = workspace_bytes(i, n, ctx, d, k, v) * slots
        per_layer = kv_bytes_per_token_layer(i, k, v)
        items = [
            Item("weights", w.device, w.host, w.note),
            Item("kv cache", kv_bytes_per_token(i, k, v) * self.parallel * ctx,
                 note=f"{k}/{v}, {i.kv_layers} layers x {per_layer:,} B/token"),
            Item("stream buffers", _stream_bytes(i, self.host) if d.name == "cuda" else 0),
            Item("recurrent state", i.state_bytes * self.parallel,
                 note=f"{i.state_bytes / MiB:.1f} MiB per sequence"),
            Item("workspace", ws, note=f"prefill batch {n}" + (f" x {slots} slots" if slots > 1 else "")),
            Item("cuda context" if d.name == "cuda" else "runtime", runtime_bytes(i, d, n, ctx),
                 note="" if d.name == "cuda" else "RoPE table, kernel buffer, threads"),
            Item("allocator", allocator_bytes(i, d, n, ctx, k, v, ws // slots) * slots,
                 note="" if d.name == "cuda" else "heap malloc keeps (1.5 x largest activation)"),
        ]  # fmt: skip
        return [it for it in items if it.device_bytes or it.host_bytes or it.what == "kv cache"]

    def total(self, ctx: int) -> int:
        return sum(it.device_bytes for it in self.items(ctx))

    def max_ctx(self, budget: int | None) -> int:
        """The largest multiple of CTX_STEP whose total fits `budget` (None: the training length)."""
        if budget is None:
            return self.info.n_ctx_train
        lo, hi = 0, CTX_STEP
        while hi <= MAX_SEARCH and self.total(hi) <= budget:
            lo, hi = hi, 2 * hi
        while hi - lo > CTX_STEP:  # total(lo) fits (or lo == 0), total(hi) does not
            mid = (lo + hi) // 2 // CTX_STEP * CTX_STEP
            lo, hi = (mid, hi) if self.total(mid) <= budget else (lo, mid)
        return lo


def plan(
    info: ModelInfo,
    vram_bytes: int | None,
    ctx: int | str = "max",
    kv_type: str | tuple[str, str] = "auto",
    parallel: int = 1,
    batch: int | None = None,
    device: Device | None = None,
    offload: bool = False,
) -> Plan:
    """The itemised memory plan for `vram_bytes` of device memory (None: the CPU with no limit).
    `device` defaults to CUDA when a size is given; CPU with a size plans into that much host memory.
    batch: prefill chunk, by default the engine's for the device."""
    dev = device or (CPU if vram_bytes is None else CUDA)
    batch = batch or dev.prefill_batch
    if parallel < 1:
        raise PlanError("--parallel must be at least 1")
    if ctx != "max" and (not isinstance(ctx, int) or ctx < 1):
        raise PlanError(f"context must be a positive number of tokens or 'max', not {ctx!r}")
    pair = parse_kv(kv_type, info.head_dim)
    budget = None if vram_bytes is None else vram_bytes - _margin(dev, vram_bytes)
    batch = min(batch, info.n_ctx_train if ctx == "max" else ctx)
    first = pair or (("f32", "f32") if dev.name == "cpu" else DEFAULT_QUALITY)
    host = _host_tensors(info, dev, budget, batch, ctx, first, parallel, offload)
    every, auto = _pairs(pair, dev, info.head_dim)
    costs = [_Cost(info, dev, batch, parallel, k, v, host) for k, v in every]
    options = [_option(c, budget) for c in costs]
    by_pair = {(o.k, o.v): o for o in options}
    allowed = [by_pair[p] for p in ([pair] if pair else auto)]
    k, v, n_ctx, warnings = _choose(info, allowed, ctx, pair)
    cost = next(c for c in costs if (c.k, c.v) == (k, v))
    items = cost.items(n_ctx)
    if vram_bytes is not None and dev.margin_fraction:
        items.append(Item("safety margin", _margin(dev, vram_bytes)))
    p = Plan(info.name, dev.name, vram_bytes, n_ctx, parallel, batch, k, v, items, options, host, warnings,
             n_ctx_train=info.n_ctx_train)  # fmt: skip
    _verdict(p, info, costs, ctx, offload)
    return p


def _margin(dev: Device, vram: int) -> int:
    return max(dev.margin_min, int(dev.margin_fraction * vram)) if dev.margin_fraction else 0


def _option(cost: _Cost, budget: int | None) -> KVOption:
    i, k, v = cost.info, cost.k, cost.v
    return KVOption(
        k, v, kv_bytes_per_token_layer(i, k, v), kv_bytes_per_token(i, k, v), cost.max_ctx(budget)
    )


def _stream_bytes(info: ModelInfo, host: frozenset[str]) -> int:
    """Two device buffers of the largest streamed layer (copy of the next overlaps compute)."""
    layers: dict[int, int] = {}
    for t in info.tensors:
        if t.name in host and t.layer is not None:
            layers[t.layer] = layers.get(t.layer, 0) + t.nbytes
    return 2 * max(layers.values(), default=0)


def _host_tensors(info, dev, budget, batch, ctx, pair, parallel, offload) -> list[str]:
    """Tensors kept in host memory: the embedding on a GPU; with `offload`, then the output matrix and
    whole layers from the last, until the plan holds MIN_CTX (or the asked-for context)."""
    host = ["token_embd.weight"] if dev.embed_on_host and not info.tied_output else []
    if budget is None or not offload:
        return host
    want = min(MIN_CTX, info.n_ctx_train) if ctx == "max" else ctx
    candidates: list[str | list[str]] = [] if info.tied_output else ["output.weight"]
    for layer in range(info.n_layer - 1, -1, -1):
        candidates.append([t.name for t in info.tensors if t.layer == layer])
    for c in [None, *candidates]:
        if c is not None:
            host = host + (c if isinstance(c, list) else [c])
        if _Cost(info, dev, batch, parallel, *pair, host).total(want) <= budget:
            break
    return host


def _choose(info: ModelInfo, options: list[KVOption], ctx, pair) -> tuple[str, str, int, list[str]]:
    """(K type, V type, context, warnings): the asked-for context at the best quality that holds it;
    for "max", the best quality that reaches the training length, else DEFAULT_QUALITY's largest
    context (lower types only when that is under MIN_CTX)."""
    warnings = []
    train = info.n_ctx_train
    if ctx != "max":
        if ctx > train:
            warnings.append(f"context {ctx} is beyond the model's training length {train}: quality may drop")
        o = next((o for o in options if o.max_ctx >= ctx), options[-1])
        return o.k, o.v, ctx, warnings
    full = next((o for o in options if o.max_ctx >= train), None)
    if full is not None:
        return full.k, full.v, train, warnings
    if pair is None:
        start = next((i for i, o in enumerate(options) if (o.k, o.v) == DEFAULT_QUALITY), 0)
        o = next((o for o in options[start:] if o.max_ctx >= MIN_CTX), options[start])
    else:
        o = options[0]
    return o.k, o.v, min(o.max_ctx, train), warnings


def _verdict(p: Plan, info: ModelInfo, costs: list[_Cost], ctx, offload: bool) -> None:
    kv = f"{p.k_type}/{p.v_type}"
    where = "CPU" if p.device == "cpu" else p.device.upper()
    if p.budget is None:
        p.verdict = f"{where}: {p.device_total / GiB:.2f} GiB for context {p.ctx:,} with {kv} KV cache"
        return
    p.fits = p.device_total <= p.budget and p.ctx >= CTX_STEP
    used = f"{p.device_total / GiB:.2f} of {p.budget / GiB:.2f} GiB"
    host = f", {len(p.host_tensors)} tensors in host memory" if len(p.host_tensors) > 1 else ""
    if p.fits:
        p.verdict = f"fits: context {p.ctx:,} with {kv} KV cache, {used}{host}"
        return
    p.nearest = _nearest(p, info, costs, offload)
    need, have = _size(p.device_total), _size(p.budget)
    what = "--vram" if p.device == "cuda" else "the memory budget"
    if p.ctx < CTX_STEP:
        p.verdict = f"does not fit: the weights and buffers need {need} before any context, {what} is {have}"
    else:
        p.verdict = f"does not fit: context {p.ctx:,} with {kv} KV needs {need}, {what} is {have}"


def _size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.0f} MiB"


def _nearest(p: Plan, info: ModelInfo, costs: list[_Cost], offload: bool) -> list[str]:
    out = []
    ok = [o for o in p.kv_options if o.max_ctx >= CTX_STEP]
    if ok:
        best = max(ok, key=lambda o: (o.max_ctx, (o.k, o.v) in AUTO_PAIRS))  # of equals, auto's pair
        same = next((o for o in ok if (o.k, o.v) == (p.k_type, p.v_type)), None)
        if same:
            out.append(f"--ctx {same.max_ctx} (with {same.k}/{same.v})")
        if best is not same:
            out.append(f"--ctk {best.k} --ctv {best.v} --ctx {min(best.max_ctx, p.ctx)}")
    if not offload and p.device == "cuda":
        w = sum(t.nbytes for t in info.tensors)
        out.append(f"--offload (weights {w / GiB:.2f} GiB; the least-read tensors stay in host memory)")
    if not ok:
        low = costs[-1]
        want = min(MIN_CTX, info.n_ctx_train)
        dev = CUDA if p.device == "cuda" else CPU
        need = low.total(want)
        need += max(dev.margin_min, int(need * dev.margin_fraction / (1 - dev.margin_fraction)))
        out.append(f"at least {_size(need)} of memory (context {want} with {low.k}/{low.v})")
    return out


def parse_size(text: str) -> int:
    """ "16GiB", "16G" (GiB), "16000MiB", "15.5GB" (decimal), a byte count -> bytes."""
    units = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "kb": 1000, "m": MiB, "mib": MiB, "mb": 10**6,
             "g": GiB, "gib": GiB, "gb": 10**9, "t": 2**40, "tib": 2**40, "tb": 10**12}  # fmt: skip
    s = text.strip().lower()
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num) :].strip()
    try:
        value = float(num)
    except ValueError:
        value = math.nan
    if unit not in units or not math.isfinite(value) or value <= 0:
        raise PlanError(f"cannot read the size {text!r} (examples: 16GiB, 12000MiB, 15.5GB)")
    return int(value * units[unit])
