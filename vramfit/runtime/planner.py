"""The memory planner: a pure function from a model's shapes and a memory budget to an itemised plan.

`plan(info, vram_bytes, ctx, kv_type, parallel)` counts every byte the engine will allocate before it
allocates any (house style principles 6 and 7):

- weights per device: every tensor's packed bytes. On a GPU the token embedding stays in host memory
  (a lookup reads one row per token, as llama.cpp does); with `offload` the least-read tensors follow
  it when the weights do not fit: the output matrix, then whole layers from the last one.
- KV cache: for each attention layer, n_kv_heads * head_dim elements of K and of V per token, in the
  cache type's block size (q8_0: 34 bytes per 32 values ...), times the context and the sequences.
- recurrent state: conv + delta-rule state of each Gated DeltaNet layer, float32, per sequence.
- workspace: the peak of the activations of one prefill batch (x, q/k/v, gate/up, the delta-rule chunk
  matrices, the last logits). On the CPU, attention scores over the whole context are materialised
  (n_head x batch x ctx floats); a GPU runs flash-style attention without them.
- CUDA context and allocator overhead, and a safety margin, on a GPU.

Then the largest context per KV cache type, the choice of type and context, warnings, and for a
budget that nothing fits, the nearest settings that do.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from vramfit.gguf.types import type_by_name

GiB, MiB = 2**30, 2**20

# KV cache types, best quality first (f32 only when asked for: it buys nothing over f16)
KV_TYPES = ("f32", "f16", "bf16", "q8_0", "q6_0", "q5_0", "iq4_nl", "q4_0")
# (K, V) pairs "auto" tries, best quality first; V tolerates fewer bits than K
AUTO_PAIRS = (
    ("f16", "f16"), ("q8_0", "q8_0"), ("q8_0", "q6_0"), ("q6_0", "q5_0"), ("q5_0", "q5_0"),
    ("q4_0", "q4_0"),
)  # fmt: skip
DEFAULT_QUALITY = ("q8_0", "q8_0")  # "max" context is taken at this quality (near-lossless)
MIN_CTX = 4096  # "max" steps below DEFAULT_QUALITY only when it cannot hold this many tokens
CTX_STEP = 256  # contexts are multiples of this
PAGE = 4096


class PlanError(ValueError):
    """Input the planner cannot work with: an unknown or unusable KV type, a bad size."""


@dataclass(frozen=True)
class Device:
    """What a device adds to the model's own bytes."""

    name: str  # "cuda" or "cpu"
    context_bytes: int = 0  # CUDA context, cuBLAS workspace, loaded kernels
    allocator_fraction: float = 0.0  # caching-allocator rounding/fragmentation, of the workspace
    allocator_bytes: int = 0
    margin_fraction: float = 0.0  # of the budget, never planned into
    margin_min: int = 0
    flash_attention: bool = False  # no (n_head, batch, ctx) score matrix
    embed_on_host: bool = False


CUDA = Device("cuda", 384 * MiB, 0.05, 64 * MiB, 0.02, 256 * MiB, True, True)
# the CPU engine's own runtime: the kernels' thread pool and scratch buffers, the RoPE table (measured
# with bench/plan_accuracy.py: about 15 MiB on the shipped models, 2 threads)
CPU = Device("cpu", context_bytes=16 * MiB)


@dataclass(frozen=True)
class TensorEntry:
    name: str
    nbytes: int
    layer: int | None  # block index, None for global tensors
    type: str = ""


@dataclass(frozen=True)
class ModelInfo:
    """The shapes the plan needs; from a GGUF (`from_gguf`) or typed in."""

    name: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    n_ctx_train: int
    kv_layers: int  # layers with a KV cache
    state_bytes: int = 0  # recurrent state per sequence (float32)
    tensors: tuple[TensorEntry, ...] = ()
    tied_output: bool = False  # the output matrix is the token embedding
    dn_v_heads: int = 0  # Gated DeltaNet shapes, for the prefill workspace
    dn_head_dim: int = 0
    dn_channels: int = 0

    @property
    def weight_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @classmethod
    def from_gguf(cls, gguf: Any) -> ModelInfo:
        tensors = [(t.name, t.nbytes, t.type.name) for t in gguf.tensors.values()]
        return cls.from_metadata(gguf.metadata, tensors, gguf.path.name)

    @classmethod
    def from_metadata(
        cls, md: dict[str, Any], tensors: list[tuple[str, int, str]], name: str = ""
    ) -> ModelInfo:
        """From GGUF metadata and the tensor table [(name, bytes, type)] (no weights are read)."""
        from vramfit.model.loader import model_class

        cfg = model_class(md["general.architecture"]).config_class.from_metadata(
            md, len(md.get("tokenizer.ggml.tokens", [])) or 0
        )
        dn = getattr(cfg, "deltanet", None)
        n_rec = sum(cfg.is_recurrent(i) for i in range(cfg.n_layer)) if dn else 0
        state = (
            n_rec * ((dn.conv_kernel - 1) * dn.conv_channels + dn.n_v_heads * dn.d_k * dn.d_v) * 4
            if dn
            else 0
        )
        names = {n for n, _, _ in tensors}
        return cls(
            name=str(md.get("general.name", name)), n_layer=cfg.n_layer, n_embd=cfg.n_embd,
            n_ff=cfg.n_ff, n_head=cfg.n_head, n_head_kv=cfg.n_head_kv, head_dim=cfg.head_dim,
            n_vocab=cfg.n_vocab, n_ctx_train=cfg.n_ctx_train, kv_layers=cfg.n_layer - n_rec,
            state_bytes=state, tied_output="output.weight" not in names,
            tensors=tuple(TensorEntry(n, b, _layer_of(n), t.lower()) for n, b, t in tensors),
            dn_v_heads=dn.n_v_heads if dn else 0, dn_head_dim=dn.d_v if dn else 0,
            dn_channels=dn.conv_channels if dn else 0,
        )  # fmt: skip


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "blk" and parts[1].isdigit() else None


# ------------------------------------------------------------------------------------------------
# KV cache arithmetic


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


def kv_bytes_per_token_layer(info: ModelInfo, k: str, v: str) -> int:
    """K and V of one token in one attention layer."""
    n = info.n_head_kv * info.head_dim
    return type_by_name(k).nbytes((n,)) + type_by_name(v).nbytes((n,))


def kv_bytes_per_token(info: ModelInfo, k: str, v: str) -> int:
    return info.kv_layers * kv_bytes_per_token_layer(info, k, v)


# ------------------------------------------------------------------------------------------------
# Workspace: the activations of one prefill batch


def workspace_bytes(info: ModelInfo, batch: int, ctx: int, dev: Device) -> int:
    """Peak float32 activations of one batch of `batch` tokens at context `ctx`: the larger of the
    attention phase and the MLP phase (the other's temporaries are freed by then), plus the logits."""
    q = info.n_head * info.head_dim
    kv = info.n_head_kv * info.head_dim
    attn = 4 * batch * (2 * info.n_embd + 3 * q + 2 * kv)  # x, h; q, gate/out; k, v
    attn += attention_bytes(info, batch, ctx, dev)
    mlp = 4 * batch * (2 * info.n_embd + 3 * info.n_ff)  # x, h; gate, up, their product
    if info.dn_v_heads:  # conv in/out, and per value head: z, o, and the chunk's (64 x 64) matrices
        dn = 2 * info.n_embd + 3 * info.dn_channels + 2 * info.dn_v_heads * (info.dn_head_dim + 64)
        mlp = max(mlp, 4 * batch * dn)
    logits = 4 * info.n_vocab  # the last position only
    return max(attn, mlp) + logits


def attention_bytes(info: ModelInfo, batch: int, ctx: int, dev: Device) -> int:
    """Attention temporaries. A GPU runs flash-style attention: per-tile partial sums. The CPU path
    (torch's SDPA with a boolean mask) holds over the whole context: the masked scores and their
    softmax (2 x n_head x batch x ctx floats), the additive float mask and the boolean one (batch x ctx),
    and the keys and values expanded to every query head (2 x n_head x ctx x head_dim floats)."""
    if dev.flash_attention:
        return 4 * info.n_head * batch * 2 * info.head_dim
    return 4 * ctx * (2 * info.n_head * batch + batch + 2 * info.n_head * info.head_dim) + batch * ctx


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


@dataclass(frozen=True)
class _Fixed:
    """Bytes that do not depend on the context, and bytes per token of context (all sequences)."""

    items: list[Item]
    per_ctx: int
    host: list[str]

    def total(self) -> int:
        return sum(i.device_bytes for i in self.items)


def plan(
    info: ModelInfo,
    vram_bytes: int | None,
    ctx: int | str = "max",
    kv_type: str | tuple[str, str] = "auto",
    parallel: int = 1,
    batch: int = 512,
    device: Device | None = None,
    offload: bool = False,
) -> Plan:
    """The itemised memory plan. `vram_bytes` None plans for the CPU with no limit."""
    dev = device or (CPU if vram_bytes is None else CUDA)
    if parallel < 1:
        raise PlanError("--parallel must be at least 1")
    if ctx != "max" and (not isinstance(ctx, int) or ctx < 1):
        raise PlanError(f"context must be a positive number of tokens or 'max', not {ctx!r}")
    pair = parse_kv(kv_type, info.head_dim)
    budget = None if vram_bytes is None else vram_bytes - _margin(dev, vram_bytes)
    batch = min(batch, info.n_ctx_train if ctx == "max" else ctx)
    host_tensors = _host_tensors(info, dev, budget, batch, ctx, pair or DEFAULT_QUALITY, parallel, offload)
    options = [_option(info, dev, budget, batch, parallel, k, v, host_tensors) for k, v in _pairs(pair)]
    allowed = options if pair is None else [o for o in options if (o.k, o.v) == pair]
    k, v, n_ctx, warnings = _choose(info, allowed, ctx, pair)
    items = _items(info, dev, vram_bytes, batch, n_ctx, parallel, k, v, host_tensors)
    p = Plan(
        info.name, dev.name, vram_bytes, n_ctx, parallel, batch, k, v, items, options, host_tensors, warnings
    )
    _verdict(p, info, options, ctx, pair, offload)
    return p


def _margin(dev: Device, vram: int) -> int:
    return max(dev.margin_min, int(dev.margin_fraction * vram)) if dev.margin_fraction else 0


def _pairs(pair: tuple[str, str] | None) -> list[tuple[str, str]]:
    """Every pair "auto" considers (each reported with its max context), and the asked-for one."""
    pairs = list(AUTO_PAIRS) + [("iq4_nl", "iq4_nl")]
    return pairs if pair is None or pair in pairs else [pair, *pairs]


def _fixed(
    info: ModelInfo, dev: Device, batch: int, parallel: int, k: str, v: str, host: list[str]
) -> _Fixed:
    """Everything but the KV cache, at context 0, and what each token of context adds."""
    on_host = set(host)
    dev_w = sum(t.nbytes for t in info.tensors if t.name not in on_host)
    host_w = sum(t.nbytes for t in info.tensors if t.name in on_host)
    ws = workspace_bytes(info, batch, 0, dev)
    per_ctx_ws = workspace_bytes(info, batch, 1, dev) - ws
    items = [
        Item("weights", dev_w, host_w, f"{len(on_host)} tensors in host memory" if on_host else ""),
        Item("stream buffers", _stream_bytes(info, host) if dev.name == "cuda" else 0),
        Item(
            "recurrent state",
            info.state_bytes * parallel,
            note=f"{info.state_bytes / MiB:.1f} MiB per sequence",
        ),
        Item("workspace", ws, note=f"prefill batch {batch}"),
        Item("cuda context" if dev.name == "cuda" else "runtime", dev.context_bytes),
        Item("allocator", int(dev.allocator_fraction * ws) + dev.allocator_bytes),
    ]
    return _Fixed(items, kv_bytes_per_token(info, k, v) * parallel + per_ctx_ws, host)


def _stream_bytes(info: ModelInfo, host: list[str]) -> int:
    """Two device buffers of the largest streamed layer (copy of the next overlaps compute)."""
    layers: dict[int, int] = {}
    for t in info.tensors:
        if t.name in set(host) and t.layer is not None:
            layers[t.layer] = layers.get(t.layer, 0) + t.nbytes
    return 2 * max(layers.values(), default=0)


def _host_tensors(info, dev, budget, batch, ctx, pair, parallel, offload) -> list[str]:
    """Tensors kept in host memory: the embedding on a GPU; with `offload`, then the output matrix and
    whole layers from the last, until the plan holds MIN_CTX (or the asked-for context)."""
    host = ["token_embd.weight"] if dev.embed_on_host and not info.tied_output else []
    if budget is None or not offload:
        return host
    want = min(MIN_CTX, info.n_ctx_train) if ctx == "max" else ctx
    candidates = [] if info.tied_output else ["output.weight"]
    for layer in range(info.n_layer - 1, -1, -1):
        candidates.append([t.name for t in info.tensors if t.layer == layer])
    for c in [None, *candidates]:
        if c is not None:
            host = host + (c if isinstance(c, list) else [c])
        f = _fixed(info, dev, batch, parallel, *pair, host)
        if f.total() + want * f.per_ctx <= budget:
            break
    return host


def _option(info, dev, budget, batch, parallel, k, v, host) -> KVOption:
    f = _fixed(info, dev, batch, parallel, k, v, host)
    if budget is None:
        n = info.n_ctx_train
    else:
        n = max(0, (budget - f.total()) // f.per_ctx) // CTX_STEP * CTX_STEP
    return KVOption(k, v, kv_bytes_per_token_layer(info, k, v), kv_bytes_per_token(info, k, v), n)


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
        start = next(i for i, o in enumerate(options) if (o.k, o.v) == DEFAULT_QUALITY)
        o = next((o for o in options[start:] if o.max_ctx >= MIN_CTX), options[start])
    else:
        o = options[0]
    return o.k, o.v, min(o.max_ctx, train), warnings


def _items(info, dev, vram, batch, n_ctx, parallel, k, v, host) -> list[Item]:
    f = _fixed(info, dev, batch, parallel, k, v, host)
    items = [i for i in f.items if i.device_bytes or i.host_bytes]
    if dev.name == "cpu" and not info.tied_output:  # the mapped embedding: only the rows read are resident
        embed = next((t.nbytes for t in info.tensors if t.name == "token_embd.weight"), 0)
        rows = min(embed, min(n_ctx, info.n_vocab) * PAGE)  # at most a page per distinct token
        items[0].device_bytes -= embed - rows
        items[
            0
        ].note = f"embedding mapped: {rows / MiB:.1f} of {embed / MiB:.1f} MiB resident (one page per token)"
    kv = kv_bytes_per_token(info, k, v) * parallel * n_ctx
    note = f"{k}/{v}, {info.kv_layers} layers x {kv_bytes_per_token_layer(info, k, v):,} B/token"
    items.insert(1, Item("kv cache", kv, note=note))
    ws = next(i for i in items if i.what == "workspace")
    ws.device_bytes = workspace_bytes(info, batch, n_ctx, dev)
    if vram is not None and dev.margin_fraction:
        items.append(Item("safety margin", _margin(dev, vram)))
    return items


def _verdict(p: Plan, info: ModelInfo, options: list[KVOption], ctx, pair, offload: bool) -> None:
    kv = f"{p.k_type}/{p.v_type}"
    if p.budget is None:
        p.verdict = f"CPU: {p.device_total / GiB:.2f} GiB for context {p.ctx:,} with {kv} KV cache"
        return
    p.fits = p.device_total <= p.budget and p.ctx >= CTX_STEP
    used = f"{p.device_total / GiB:.2f} of {p.budget / GiB:.2f} GiB"
    host = f", {len(p.host_tensors)} tensors in host memory" if len(p.host_tensors) > 1 else ""
    if p.fits:
        p.verdict = f"fits: context {p.ctx:,} with {kv} KV cache, {used}{host}"
        return
    p.nearest = _nearest(p, info, options, ctx, offload)
    need = p.device_total / GiB
    vram = p.budget / GiB
    p.verdict = f"does not fit: context {p.ctx:,} with {kv} KV needs {need:.2f} GiB, --vram is {vram:.2f} GiB"


def _nearest(p: Plan, info: ModelInfo, options: list[KVOption], ctx, offload: bool) -> list[str]:
    out = []
    ok = [o for o in options if o.max_ctx >= CTX_STEP]
    if ok:
        best = max(ok, key=lambda o: o.max_ctx)
        same = next((o for o in ok if (o.k, o.v) == (p.k_type, p.v_type)), None)
        if same:
            out.append(f"--ctx {same.max_ctx} (with {same.k}/{same.v})")
        if best is not same:
            out.append(f"--ctk {best.k} --ctv {best.v} --ctx {min(best.max_ctx, p.ctx)}")
    if not offload:
        w = sum(t.nbytes for t in info.tensors)
        out.append(f"--offload (weights {w / GiB:.2f} GiB; the least-read tensors stay in host memory)")
    if not ok:
        low = options[-1]
        f = _fixed(
            info, CUDA if p.device == "cuda" else CPU, p.batch, p.parallel, low.k, low.v, p.host_tensors
        )
        need = f.total() + MIN_CTX * f.per_ctx + (_margin(CUDA, p.budget) if p.device == "cuda" else 0)
        out.append(f"at least {need / GiB:.2f} GiB of device memory (context {MIN_CTX} with {low.k}/{low.v})")
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
