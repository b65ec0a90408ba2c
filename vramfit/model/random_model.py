"""Random but valid quantized weights: the building block of `vramfit make-random` (issue 6; the
whole-model writer and its CLI verb are still to come) and the input of the Triton kernel tests.

`random_rows(type_name, n_rows, n_per_row)` returns packed rows whose bytes are uniformly random except
the floating-point fields (fp16 block scales and mins, float32/fp16 row scales), which are set to
finite positive values scaled so the decoded weights have roughly the spread of a trained model's
(std about 0.02). Every bit pattern of quants, sub-block scales and grid shifts can therefore occur,
which is what kernel tests want, and no quantization work is done (a 27B-shaped matrix takes well
under a second).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vramfit.gguf.reader import VT
from vramfit.gguf.types import type_by_name

# byte offsets of the fp16 fields inside one block (d, and dmin/m where there is one)
_F16_FIELDS: dict[str, tuple[int, ...]] = {
    "q4_0": (0,), "q4_1": (0, 2), "q5_0": (0,), "q5_1": (0, 2), "q8_0": (0,), "q6_0": (0,),
    "iq4_nl": (0,), "q2_k": (80, 82), "q3_k": (108,), "q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,),
    "iq4_xs": (0,), "iq2_k": (0,), "iq3_k": (0,), "iq4_k": (0,), "iq5_k": (0,), "iq6_k": (0,),
    "iq4_ks": (), "iq4_kss": (), "iq5_ks": (), "iq2_ks": (), "iq3_ks": (), "iq2_kl": (),
}  # fmt: skip

TARGET_STD = 0.02


def random_types() -> list[str]:
    return sorted(_F16_FIELDS)


def _raw_rows(gt, n_rows: int, n_per_row: int, rng: np.random.Generator, unit: float) -> np.ndarray:
    """Random bytes with every float field set to unit * U[0.5, 1) (as fp16 or float32)."""
    name = gt.name.lower()
    row = gt.row_nbytes(n_per_row)
    raw = rng.integers(0, 256, size=(n_rows, row), dtype=np.uint8)
    nb = n_per_row // gt.block_size
    blocks = raw[:, gt.row_meta :].reshape(n_rows, nb, gt.type_size)
    for off in _F16_FIELDS[name]:
        v = (unit * rng.uniform(0.5, 1.0, size=(n_rows, nb))).astype(np.float16)
        blocks[:, :, off : off + 2] = v.view(np.uint8).reshape(n_rows, nb, 2)
    if gt.row_meta == 4:
        v = (unit * rng.uniform(0.5, 1.0, size=n_rows)).astype(np.float32)
        raw[:, :4] = v.view(np.uint8).reshape(n_rows, 4)
    elif gt.row_meta == 2:
        v = (unit * rng.uniform(0.5, 1.0, size=n_rows)).astype(np.float16)
        raw[:, :2] = v.view(np.uint8).reshape(n_rows, 2)
    return raw


_unit_cache: dict[str, float] = {}


def _unit(type_name: str) -> float:
    """The float-field scale that gives decoded weights a std of about TARGET_STD (measured once)."""
    name = type_name.lower()
    if name not in _unit_cache:
        from vramfit.quant import decode

        gt = type_by_name(name)
        k = max(256, gt.block_size)
        probe = _raw_rows(gt, 64, k, np.random.default_rng(0), 1e-3)
        std = float(np.std(decode(name, probe, k)))
        _unit_cache[name] = 1e-3 * TARGET_STD / std if std > 0 else 1e-3
    return _unit_cache[name]


def random_rows(
    type_name: str, n_rows: int, n_per_row: int, seed: int | np.random.Generator = 0
) -> np.ndarray:
    """Packed rows (n_rows, row_nbytes) uint8 of `type_name` with random, valid content."""
    name = type_name.lower()
    if name not in _F16_FIELDS:
        known = ", ".join(random_types())
        raise ValueError(f"random blocks for {type_name} are not supported (known: {known})")
    gt = type_by_name(name)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    return _raw_rows(gt, n_rows, n_per_row, rng, _unit(name))


def random_rows_torch(type_name: str, n_rows: int, n_per_row: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(random_rows(type_name, n_rows, n_per_row, seed))


# ------------------------------------------------------------------------------------------------
# Whole random models: `vramfit make-random --arch llama|qwen35 --preset tiny|8b|27b --type MIX OUT`


@dataclass(frozen=True)
class Preset:
    """The shapes of a model; qwen35 presets also set the Gated DeltaNet fields."""

    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    n_ctx_train: int
    rope_base: float
    tied: bool = False
    rope_dim: int = 0  # 0: the whole head
    dn_k_heads: int = 0  # ssm.group_count
    dn_v_heads: int = 0  # ssm.time_step_rank
    dn_head_dim: int = 0  # ssm.state_size (= value head dim)
    conv_kernel: int = 4
    attn_interval: int = 4


PRESETS: dict[tuple[str, str], Preset] = {
    # tiny: every row a multiple of 256, so every 256-block type can be used
    ("llama", "tiny"): Preset(2, 256, 512, 4, 2, 64, 512, 2048, 10000.0, tied=True),
    ("llama", "8b"): Preset(32, 4096, 14336, 32, 8, 128, 128256, 131072, 500000.0),  # Llama-3.1-8B
    ("qwen35", "tiny"): Preset(4, 256, 512, 4, 2, 64, 512, 4096, 1e7, True, 16, 2, 4, 64),
    # Qwen3.5-0.8B, Qwen3.5-9B and Qwen3.5/3.6-27B (shared/docs/qwen35-27b.md 1.1, 1.2)
    ("qwen35", "0.8b"): Preset(24, 1024, 3584, 8, 2, 256, 248320, 262144, 1e7, True, 64, 16, 16, 128),
    ("qwen35", "8b"): Preset(32, 4096, 12288, 16, 4, 256, 248320, 262144, 1e7, False, 64, 16, 32, 128),
    ("qwen35", "27b"): Preset(64, 5120, 17408, 24, 4, 256, 248320, 262144, 1e7, False, 64, 16, 48, 128),
}

# The community's 16 GiB mix for Qwen3.5-27B (sokann 4.151bpw, shared/docs/qwen35-27b.md 5.1), as
# --custom-q rules over an IQ4_KS base: FFN iq4_ks on layers 0-15 and every third layer after.
_FFN_IQ3 = "|".join(str(i) for i in range(16, 64) if (i - 15) % 3)
MIX_RULES = {
    "sokann-4.151": (
        r"token_embd\.weight=iq4_k,output\.weight=iq4_k,attn_(q|gate|qkv)\.weight=iq4_k,"
        r"attn_(k|v|output)\.weight=iq5_ks,ssm_out\.weight=iq5_ks,ssm_(alpha|beta)\.weight=q8_0,"
        rf"blk\.({_FFN_IQ3})\.ffn_(gate|up|down)\.weight=iq3_k,ffn_(gate|up|down)\.weight=iq4_ks"
    ),
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # numpy order, row length last
    type: str  # ggml type name (lower case)

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return type_by_name(self.type).nbytes(self.shape)


def _llama_tensors(p: Preset) -> list[tuple[str, tuple[int, ...]]]:
    e, hd = p.n_embd, p.head_dim
    out = [("token_embd.weight", (p.n_vocab, e))]
    for i in range(p.n_layer):
        b = f"blk.{i}."
        out += [
            (b + "attn_norm.weight", (e,)), (b + "attn_q.weight", (p.n_head * hd, e)),
            (b + "attn_k.weight", (p.n_head_kv * hd, e)), (b + "attn_v.weight", (p.n_head_kv * hd, e)),
            (b + "attn_output.weight", (e, p.n_head * hd)), (b + "ffn_norm.weight", (e,)),
            (b + "ffn_gate.weight", (p.n_ff, e)), (b + "ffn_up.weight", (p.n_ff, e)),
            (b + "ffn_down.weight", (e, p.n_ff)),
        ]  # fmt: skip
    out.append(("output_norm.weight", (e,)))
    return out if p.tied else out + [("output.weight", (p.n_vocab, e))]


def _qwen35_tensors(p: Preset) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes as llama.cpp's converter writes Qwen3.5 (docs/qwen35-27b.md 2.1)."""
    e, hd, d = p.n_embd, p.head_dim, p.dn_head_dim
    channels = 2 * p.dn_k_heads * d + p.dn_v_heads * d
    out = [("token_embd.weight", (p.n_vocab, e))]
    for i in range(p.n_layer):
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", (e,)), (b + "post_attention_norm.weight", (e,))]
        if (i + 1) % p.attn_interval:  # Gated DeltaNet
            out += [
                (b + "attn_qkv.weight", (channels, e)), (b + "attn_gate.weight", (p.dn_v_heads * d, e)),
                (b + "ssm_beta.weight", (p.dn_v_heads, e)), (b + "ssm_alpha.weight", (p.dn_v_heads, e)),
                (b + "ssm_dt.bias", (p.dn_v_heads,)), (b + "ssm_a", (p.dn_v_heads,)),
                (b + "ssm_conv1d.weight", (channels, p.conv_kernel)), (b + "ssm_norm.weight", (d,)),
                (b + "ssm_out.weight", (e, p.dn_v_heads * d)),
            ]  # fmt: skip
        else:  # gated full attention: q rows are per head [q | gate]
            out += [
                (b + "attn_q.weight", (2 * p.n_head * hd, e)), (b + "attn_k.weight", (p.n_head_kv * hd, e)),
                (b + "attn_v.weight", (p.n_head_kv * hd, e)), (b + "attn_output.weight", (e, p.n_head * hd)),
                (b + "attn_q_norm.weight", (hd,)), (b + "attn_k_norm.weight", (hd,)),
            ]  # fmt: skip
        out += [
            (b + "ffn_gate.weight", (p.n_ff, e)), (b + "ffn_up.weight", (p.n_ff, e)),
            (b + "ffn_down.weight", (e, p.n_ff)),
        ]  # fmt: skip
    out.append(("output_norm.weight", (e,)))
    return out if p.tied else out + [("output.weight", (p.n_vocab, e))]


def _metadata(arch: str, preset: str, p: Preset, ftype: int) -> dict[str, Any]:
    md: dict[str, Any] = {
        "general.architecture": arch, "general.name": f"random-{arch}-{preset}",
        "general.file_type": ftype, "general.quantization_version": 2,
    }  # fmt: skip
    keys = {
        "block_count": p.n_layer, "context_length": p.n_ctx_train, "embedding_length": p.n_embd,
        "feed_forward_length": p.n_ff, "attention.head_count": p.n_head,
        "attention.head_count_kv": p.n_head_kv, "attention.key_length": p.head_dim,
        "attention.value_length": p.head_dim, "attention.layer_norm_rms_epsilon": 1e-6,
        "rope.freq_base": p.rope_base, "rope.dimension_count": p.rope_dim or p.head_dim,
        "vocab_size": p.n_vocab,
    }  # fmt: skip
    if arch == "qwen35":
        keys |= {
            "rope.dimension_sections": np.array([11, 11, 10, 0], dtype=np.int32),
            "ssm.conv_kernel": p.conv_kernel, "ssm.state_size": p.dn_head_dim,
            "ssm.group_count": p.dn_k_heads, "ssm.time_step_rank": p.dn_v_heads,
            "ssm.inner_size": p.dn_v_heads * p.dn_head_dim, "full_attention_interval": p.attn_interval,
        }  # fmt: skip
    md |= {f"{arch}.{k}": v for k, v in keys.items()}
    return md | _tokenizer(p.n_vocab)


def _tokenizer(n_vocab: int) -> dict[str, Any]:
    """A byte-level BPE vocab with no merges: the 256 byte symbols, an end token, then fillers."""
    from vramfit.runtime.tokenizer import TokenType

    symbols = _gpt2_byte_symbols()
    fill = n_vocab - len(symbols) - 1
    tokens = symbols + ["<|endoftext|>"] + [f"[fill{i}]" for i in range(fill)]
    types = [TokenType.NORMAL] * len(symbols) + [TokenType.CONTROL] + [TokenType.UNUSED] * fill
    eos = len(symbols)
    return {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": np.array(types, dtype=np.int32), "tokenizer.ggml.merges": [],
        "tokenizer.ggml.eos_token_id": eos, "tokenizer.ggml.add_bos_token": False,
    }  # fmt: skip


def _gpt2_byte_symbols() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values, in byte order."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


@dataclass
class RandomModelSpec:
    arch: str
    preset: str
    metadata: dict[str, Any]
    tensors: list[TensorSpec]
    notes: list[str] = field(default_factory=list)

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def random_model_spec(
    arch: str, preset: str, mix: str = "iq4_ks", custom_q: str | None = None
) -> RandomModelSpec:
    """Metadata and the tensor table (with each tensor's type under `mix`) of a random model."""
    from vramfit.quant import recipes

    p = PRESETS.get((arch, preset))
    if p is None:
        known = ", ".join(f"{a}/{s}" for a, s in PRESETS)
        raise ValueError(f"no preset {arch}/{preset} (known: {known})")
    rules = MIX_RULES.get(mix.lower())
    m = recipes.get_mix("iq4_ks" if rules else mix)
    opts = recipes.Options(custom_q=recipes.parse_custom_q(rules or custom_q))
    shapes = _qwen35_tensors(p) if arch == "qwen35" else _llama_tensors(p)
    md = _metadata(arch, preset, p, m.ftype)
    choices = recipes.plan(shapes, m, opts, recipes.ModelFacts.from_metadata(md), encoders=False)
    tensors, notes = [], []
    for c in choices:
        t = c.type or "f32"
        if t not in _F16_FIELDS and t not in _FLOAT_TYPES:
            notes.append(f"{c.name}: no random blocks for {t}, q8_0 instead")
            t = "q8_0"
        tensors.append(TensorSpec(c.name, c.shape, t))
    return RandomModelSpec(arch, preset, md, tensors, notes)


_FLOAT_TYPES = {"f32": np.float32, "f16": np.float16, "bf16": None}


def _vector(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Plausible 1-D parameters: norms near 1, negative decay rates, small dt biases."""
    if name.endswith("ssm_a"):
        return -rng.uniform(0.5, 8.0, n).astype(np.float32)
    if name.endswith("ssm_dt.bias"):
        return rng.normal(0.0, 0.5, n).astype(np.float32)
    return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)


def random_tensor(t: TensorSpec, seed: int) -> np.ndarray:
    """The bytes of one tensor: packed random rows, or float values."""
    rng = np.random.default_rng(seed)
    if len(t.shape) == 1:
        return _vector(t.name, t.shape[0], rng)
    if t.type in _FLOAT_TYPES:
        std = 0.2 if "ssm_conv1d" in t.name else TARGET_STD
        x = (std * rng.standard_normal(t.shape)).astype(np.float32)
        if t.type == "bf16":
            return (x.view(np.uint32) >> 16).astype(np.uint16)
        return x.astype(_FLOAT_TYPES[t.type])
    n_rows = int(np.prod(t.shape[:-1]))
    return random_rows(t.type, n_rows, t.shape[-1], rng)


class _Lazy:
    """A tensor the writer lays out now and generates when its bytes are written."""

    def __init__(self, spec: TensorSpec, seed: int):
        self.spec, self.seed, self.size = spec, seed, spec.nbytes

    def tobytes(self) -> bytes:
        return random_tensor(self.spec, self.seed).tobytes()


def _metadata_type(value: Any) -> tuple[VT | None, None]:
    """Scalar integers as uint32, the type llama.cpp requires of every integer key here (it refuses a file
    whose `general.file_type` or `block_count` is int32); anything else as the writer guesses it."""
    if isinstance(value, int | np.integer) and not isinstance(value, bool) and 0 <= value < 2**32:
        return VT.UINT32, None
    return None, None


def write_random_model(spec: RandomModelSpec, path: str | Path, seed: int = 0) -> int:
    """Write `spec` as a GGUF, one tensor at a time (memory stays at one tensor). Returns bytes."""
    from vramfit.gguf.writer import GGUFWriter

    w = GGUFWriter(path)
    for key, value in spec.metadata.items():
        w.add(key, value, *_metadata_type(value))
    for i, t in enumerate(spec.tensors):
        w.tensors.append((t.name, t.shape, type_by_name(t.type), _Lazy(t, seed * 100003 + i)))
    w.write()
    return Path(path).stat().st_size


__all__ = [
    "PRESETS",
    "random_model_spec",
    "random_rows",
    "random_rows_torch",
    "random_types",
    "write_random_model",
]
