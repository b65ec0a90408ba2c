"""What the engine allocates, item by item: the byte counts behind the memory plan (runtime/planner.py).

Each count follows the code that makes the allocation, and bench/plan_accuracy.py holds the sum to the
process's measured peak:

- weights (`weight_bytes`): on the CPU the loader keeps every matrix as a view of the mapped GGUF,
  resident once the forward reads it; nothing is stacked or permuted into a copy (dispatch.FusedLinear
  writes each weight's columns of one output; NeoX RoPE rotates the halves in place), because Linux
  kernels that map the page cache's large folios whole bring released pages back as soon as a
  neighbour is read. 1-D tensors become float32 copies; an untied token embedding is read by row from
  the file, never mapped; matrices the fast CPU kernels do not take are decoded once to float32
  (dispatch.QWeight.dense) next to their packed rows.
- KV cache: n_kv_heads * head_dim values of K and of V per token per attention layer in the cache
  type's blocks (model/kvcache.py), allocated whole (torch.zeros writes every page).
- workspace (`workspace_bytes`): the float32 activations alive at the peak of one prefill chunk.
- runtime (`runtime_bytes`): the RoPE table, the fast kernels' buffer of quantized activations, thread
  stacks and the model's Python objects.
- allocator (`allocator_bytes`): on the CPU, what glibc's malloc keeps after the activations are freed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from vramfit.gguf.types import type_by_name

GiB, MiB = 2**30, 2**20
PAGE = 4096
MMAP_THRESHOLD_MAX = 32 * MiB  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit


@dataclass(frozen=True)
class Device:
    """What a device adds to the model's own bytes."""

    name: str  # "cuda" or "cpu"
    context_bytes: int = 0  # CUDA context, cuBLAS workspace, loaded kernels; CPU: threads, objects
    allocator_fraction: float = 0.0  # caching-allocator rounding/fragmentation, of the workspace
    allocator_bytes: int = 0
    margin_fraction: float = 0.0  # of the budget, never planned into
    margin_min: int = 0
    flash_attention: bool = False  # fused kernels read the KV cache in place, no masks
    embed_on_host: bool = False
    prefill_batch: int = 512  # tokens per prefill chunk (the engine's default for this device)


CUDA = Device("cuda", 384 * MiB, 0.05, 64 * MiB, 0.02, 256 * MiB, True, True)
# the CPU engine: beside the counted items, thread stacks, torch's per-thread attention buffers, the
# model's Python objects and the library code first run by the forward (measured with
# bench/plan_accuracy.py: about 10 MiB on the shipped models). The margin keeps room for what the plan
# does not count: the tokenizer (about 10 MiB for SmolLM2's 49K vocabulary, 30 MiB for Qwen2.5's 151K,
# mostly the tokenizers library's maps), other processes.
CPU = Device("cpu", context_bytes=10 * MiB, margin_fraction=0.02, margin_min=256 * MiB, prefill_batch=256)


@dataclass(frozen=True)
class TensorEntry:
    name: str
    nbytes: int
    layer: int | None  # block index, None for global tensors
    type: str = ""
    shape: tuple[int, ...] = ()  # numpy order, row length last; () when unknown

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape) if self.shape else 0


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
    rope_dim: int = 0  # rotary dims (the RoPE table holds rope_dim / 2 complex64 per position)

    @property
    def weight_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @classmethod
    def from_gguf(cls, gguf: Any) -> ModelInfo:
        tensors = [(t.name, t.nbytes, t.type.name, t.shape) for t in gguf.tensors.values()]
        return cls.from_metadata(gguf.metadata, tensors, gguf.path.name)

    @classmethod
    def from_metadata(cls, md: dict[str, Any], tensors: list[tuple], name: str = "") -> ModelInfo:
        """From GGUF metadata and the tensor table [(name, bytes, type[, shape])] (no weights are read)."""
        from vramfit.model.loader import model_class

        model = model_class(md["general.architecture"])
        cfg = model.config_class.from_metadata(md, len(md.get("tokenizer.ggml.tokens", [])) or 0)
        dn = getattr(cfg, "deltanet", None)
        n_rec = sum(cfg.is_recurrent(i) for i in range(cfg.n_layer)) if dn else 0
        state = (
            n_rec * ((dn.conv_kernel - 1) * dn.conv_channels + dn.n_v_heads * dn.d_k * dn.d_v) * 4
            if dn
            else 0
        )
        entries = tuple(
            TensorEntry(t[0], t[1], _layer_of(t[0]), t[2].lower(), tuple(t[3]) if len(t) > 3 else ())
            for t in tensors
        )
        return cls(
            name=str(md.get("general.name", name)), n_layer=cfg.n_layer, n_embd=cfg.n_embd,
            n_ff=cfg.n_ff, n_head=cfg.n_head, n_head_kv=cfg.n_head_kv, head_dim=cfg.head_dim,
            n_vocab=cfg.n_vocab, n_ctx_train=cfg.n_ctx_train, kv_layers=cfg.n_layer - n_rec,
            state_bytes=state, tied_output=all(t.name != "output.weight" for t in entries),
            tensors=entries, dn_v_heads=dn.n_v_heads if dn else 0, dn_head_dim=dn.d_v if dn else 0,
            dn_channels=dn.conv_channels if dn else 0, rope_dim=cfg.rope.dim,
        )  # fmt: skip


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "blk" and parts[1].isdigit() else None


# ------------------------------------------------------------------------------------------------
# KV cache


def kv_bytes_per_token_layer(info: ModelInfo, k: str, v: str) -> int:
    """K and V of one token in one attention layer."""
    n = info.n_head_kv * info.head_dim
    return type_by_name(k).nbytes((n,)) + type_by_name(v).nbytes((n,))


def kv_bytes_per_token(info: ModelInfo, k: str, v: str) -> int:
    return info.kv_layers * kv_bytes_per_token_layer(info, k, v)


# ------------------------------------------------------------------------------------------------
# Weights


@dataclass(frozen=True)
class WeightBytes:
    device: int
    host: int
    note: str


def weight_bytes(info: ModelInfo, dev: Device, n_ctx: int, host: frozenset[str]) -> WeightBytes:
    """Resident weight bytes on the device and in host memory (tensors in `host`)."""
    dev_w = sum(t.nbytes for t in info.tensors if t.name not in host)
    host_w = sum(t.nbytes for t in info.tensors if t.name in host)
    if dev.name != "cpu":
        return WeightBytes(dev_w, host_w, f"{len(host)} tensors in host memory" if host else "")
    unread, note = _unread_embedding(info, n_ctx)
    extra = _float_copies(info)
    return WeightBytes(dev_w - unread + extra, host_w, note)


def _unread_embedding(info: ModelInfo, n_ctx: int) -> tuple[int, str]:
    """An untied embedding is only looked up, and a lookup reads its rows from the file
    (dispatch.QWeight.read_rows_from_file): none of it is mapped. Through the mapping each row would
    map at least the fault-around window around it, and on Linux kernels that map the page cache's
    large folios whole (6.16+ on ext4, seen here) megabytes per row, a number no plan can know."""
    embed = next((t for t in info.tensors if t.name == "token_embd.weight"), None)
    if embed is None or info.tied_output:
        return 0, ""
    return (
        embed.nbytes,
        f"embedding read by row from the file: none of its {embed.nbytes / MiB:.1f} MiB mapped",
    )


@lru_cache(maxsize=16)
def _float_copies(info: ModelInfo) -> int:
    """float32 copies: 1-D tensors (norms, biases), the conv kernels, and the matrices the fast CPU
    kernels do not take (the reference path decodes them once and keeps the result)."""
    from vramfit.kernels import cpu as cpu_kernels

    total = 0
    for t in info.tensors:
        if not t.shape:
            continue
        if len(t.shape) == 1 or "ssm_conv1d" in t.name:
            total += 4 * t.n_elements
        elif t.name == "token_embd.weight" and not info.tied_output:
            continue  # read a row at a time, never decoded whole
        elif not cpu_kernels.supports(t.type, t.shape[-1]):
            total += 4 * t.n_elements
    return total


# ------------------------------------------------------------------------------------------------
# Workspace: the activations of one prefill chunk


def workspace_bytes(
    info: ModelInfo, batch: int, ctx: int, dev: Device, k: str = "f32", v: str = "f32"
) -> int:
    """float32 activations alive at the peak of a prefill chunk of `batch` tokens ending at `ctx`.

    Alive through every layer: x and the previous chunk's hidden state (Engine.eval holds it while the
    next chunk runs); in the hybrid model also the norm h and the previous layer's gate/up product (its
    forward's `gate, up` are rebound only when the next product is done; llama.py's `layer` drops them
    on return). On top, the largest of
    - the MLP: llama family, the gate/up product, the SwiGLU output and the down product; hybrid, the
      norm h and the new gate/up product beside the old one;
    - attention: h, the rotated q and its RoPE copy, k and v, the output and its reshaped copy, plus
      `attention_bytes` (in the hybrid model also the output gate);
    - a Gated DeltaNet layer: conv in/out, and per value head z, o and the chunk's (64 x 64) matrices."""
    n, e, f = batch, info.n_embd, info.n_ff
    q, kv = info.n_head * info.head_dim, info.n_head_kv * info.head_dim
    hybrid = bool(info.dn_v_heads)
    live = 4 * n * (2 * e + (e + 2 * f if hybrid else 0))
    mlp = 4 * n * (e + 2 * f if hybrid else e + 3 * f)
    # the C kernel writes the (n, q) output directly; torch's SDPA output is transposed and copied
    outs = 1 if _c_attention(info, dev) else 2
    attn = 4 * n * (e + (1 + outs) * q + 2 * kv + (q if info.dn_v_heads else 0))
    attn += attention_bytes(info, batch, ctx, dev, k, v)
    dn = 0
    if info.dn_v_heads:
        dn = 4 * n * (3 * info.dn_channels + 2 * info.dn_v_heads * (info.dn_head_dim + 64))
    logits = 4 * info.n_vocab  # the last position only
    return live + max(mlp, attn, dn) + logits


def attention_bytes(
    info: ModelInfo, batch: int, ctx: int, dev: Device, k: str = "f32", v: str = "f32"
) -> int:
    """Attention temporaries beyond q/k/v and the output. Every path is flash-style (no batch x ctx
    score matrix). A GPU's fused kernels read the cache in place: per-tile partial sums. On the CPU a
    cache not stored as float32 is read back as float32 (model/kvcache.py `KVStore.read`): n_kv_heads x
    ctx x head_dim floats for K and for V; then the AVX-512 flash kernel (kernels/cpu/qattn_avx512.c)
    keeps a transposed copy of the keys (a buffer that only grows), the AVX2 one (qops_avx2.c) a row of
    scores per thread, while torch's SDPA (no fast kernels, odd head sizes) holds a boolean causal mask
    and the float mask it derives from it (5 bytes x batch x ctx)."""
    if dev.flash_attention:
        return 4 * info.n_head * batch * 2 * info.head_dim
    decoded = sum(t != "f32" for t in (k, v)) * 4 * info.n_head_kv * ctx * info.head_dim
    kind = _c_attention(info, dev, batch)
    if kind == "flash":
        return decoded + 4 * info.n_head_kv * -(-ctx // 32) * 32 * info.head_dim
    if kind == "rows":
        from vramfit.kernels import dispatch

        return decoded + 4 * (ctx + 8) * dispatch.get_threads()
    return 5 * batch * ctx + decoded


def _c_attention(info: ModelInfo, dev: Device, batch: int = 2) -> str | None:
    """Which C kernel runs CPU attention over `batch` queries (model/layers.py `attention`), or None."""
    from vramfit.kernels import cpu as cpu_kernels

    return cpu_kernels.attention_variant(info.head_dim, batch) if dev.name == "cpu" else None


def workspace_allocations(info: ModelInfo, batch: int, ctx: int, k: str, v: str) -> list[int]:
    """The sizes of the single large activation allocations of a prefill chunk (for `allocator_bytes`)."""
    n, e, f = batch, info.n_embd, info.n_ff
    sizes = [4 * n * 2 * f, 4 * n * f, 4 * n * e, 4 * n * info.n_head * info.head_dim]
    if not _c_attention(info, CPU):
        sizes.append(4 * batch * ctx)  # torch's float causal mask
    if k != "f32" or v != "f32":
        sizes.append(4 * info.n_head_kv * ctx * info.head_dim)
    if info.dn_v_heads:
        sizes.append(4 * n * info.dn_channels)
    return sizes


# ------------------------------------------------------------------------------------------------
# Runtime and allocator (CPU)


def runtime_bytes(info: ModelInfo, dev: Device, batch: int, n_ctx: int) -> int:
    """Buffers the engine keeps beside the model: the device's own (threads, objects, CUDA context), and
    on the CPU the RoPE table (complex64 per position and rotary pair) and the fast kernels' buffer of
    quantized activations."""
    if dev.name != "cpu":
        return dev.context_bytes
    rope = n_ctx * (info.rope_dim // 2) * 8
    return dev.context_bytes + rope + kernel_scratch_bytes(info, batch)


def kernel_scratch_bytes(info: ModelInfo, batch: int) -> int:
    """The C kernels quantize a chunk's activations into one buffer that only grows
    (kernels/cpu/qgemm_impl.h, the tiles' `ilayout` on both ISAs: rows of K are cut in chunks kc of 2048
    when K > 3072 on AVX2, 8192 when K > 16384 on AVX-512; per chunk and row kc codes, a scale per 32,
    a sum per 16 and per 32, each rounded to 64 bytes)."""
    from vramfit.kernels import cpu as cpu_kernels

    if not cpu_kernels.available():
        return 0
    widths = {
        t.shape[-1] for t in info.tensors if len(t.shape) == 2 and cpu_kernels.supports(t.type, t.shape[-1])
    }
    wide = cpu_kernels.isa() == "avx512vnni"

    def act(k: int) -> int:
        kc = (8192 if k > 16384 else k) if wide else (2048 if k > 3072 else k)
        stride = _round64(kc) + 2 * _round64(kc // 32 * 4) + _round64(kc // 16 * 4)
        return -(-k // kc) * batch * stride

    return -(-max(map(act, widths), default=0) // PAGE) * PAGE


def _round64(n: int) -> int:
    return (n + 63) // 64 * 64


def allocator_bytes(info: ModelInfo, dev: Device, batch: int, ctx: int, k: str, v: str, ws: int) -> int:
    """Memory the allocator holds beyond the live activations. CUDA: the caching allocator's rounding.
    CPU: glibc's malloc serves a block from mmap (returned when freed) only above its mmap threshold,
    which rises to the largest mmap'ed block freed so far (at most 32 MiB); smaller blocks come from the
    heap, whose free top is given back only beyond twice that threshold. So at the peak the heap may hold
    up to 2 x the largest activation under 32 MiB unused; the item is 1.5 x, fitted to what
    bench/plan_accuracy.py measures on the shipped models (its holes come and go with the order of the
    frees: 0.5 to 3 times that activation)."""
    if dev.name != "cpu":
        return int(dev.allocator_fraction * ws) + dev.allocator_bytes
    sizes = [s for s in workspace_allocations(info, batch, ctx, k, v) if s <= MMAP_THRESHOLD_MAX]
    return 3 * max(sizes, default=0) // 2
