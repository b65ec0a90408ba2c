"""Quantization recipes: which ggml type each tensor of a model gets.

Follows ik_llama.cpp's llama-quantize (iqk-formats.md section 6): the tensor filter (6.1), the
per-tensor adjustments of a mix (6.2; IQ4_KS from the spec, the K-quant mixes as mainline's
`llama_tensor_get_type` writes them), `--custom-q` rules (6.3, first match wins), the exact-name
`--token-embedding-type` / `--output-tensor-type` overrides, and the fallback for rows that are not
a multiple of 256. A last step, ours, replaces a type that has no encoder here yet by the nearest
richer type that has one, and says so in the plan's notes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from vramfit.gguf.types import FILE_TYPES, UnknownTypeError, type_by_name

QK_K = 256


class RecipeError(ValueError):
    """A bad mix name, --custom-q rule or type override."""


@dataclass(frozen=True)
class Mix:
    name: str  # as the user writes it: IQ4_KS, Q4_K_M ...
    ftype: int  # llama_ftype written to general.file_type (iqk-formats.md 1.2)
    default: str  # ggml type name every quantized tensor starts from

    @property
    def ik(self) -> bool:
        """ik-only mixes may use ik-only types; mainline mixes keep mainline type ids."""
        return self.ftype >= 100

    @property
    def quantized(self) -> bool:
        return self.default not in ("f32", "f16", "bf16")


_MIXES = [
    Mix("F32", 0, "f32"), Mix("F16", 1, "f16"), Mix("BF16", 32, "bf16"),
    Mix("Q4_0", 2, "q4_0"), Mix("Q4_1", 3, "q4_1"), Mix("Q8_0", 7, "q8_0"), Mix("Q5_0", 8, "q5_0"),
    Mix("Q5_1", 9, "q5_1"), Mix("Q2_K", 10, "q2_K"), Mix("Q3_K_M", 12, "q3_K"), Mix("Q4_K_S", 14, "q4_K"),
    Mix("Q4_K_M", 15, "q4_K"), Mix("Q5_K_S", 16, "q5_K"), Mix("Q5_K_M", 17, "q5_K"), Mix("Q6_K", 18, "q6_K"),
    Mix("IQ4_NL", 25, "iq4_nl"), Mix("IQ4_XS", 30, "iq4_xs"), Mix("Q6_0", 135, "q6_0"),
    Mix("IQ2_K", 138, "iq2_k"), Mix("IQ3_K", 139, "iq3_k"), Mix("IQ4_K", 140, "iq4_k"),
    Mix("IQ5_K", 141, "iq5_k"), Mix("IQ6_K", 142, "iq6_k"), Mix("IQ4_KS", 145, "iq4_ks"),
    Mix("IQ2_KS", 147, "iq2_ks"), Mix("IQ4_KSS", 148, "iq4_kss"), Mix("IQ5_KS", 150, "iq5_ks"),
    Mix("IQ3_KS", 154, "iq3_ks"), Mix("IQ2_KL", 155, "iq2_kl"),
]  # fmt: skip
MIXES: dict[str, Mix] = {m.name.lower(): m for m in _MIXES}
_ALIASES = {"q4_k": "q4_k_m", "q5_k": "q5_k_m", "q3_k": "q3_k_m"}  # as llama-quantize accepts them


def get_mix(name: str) -> Mix:
    """A mix by name (IQ4_KS, Q4_K_M, ...) or a bare ggml type name (iq4_ks, q8_0 ...)."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key in MIXES:
        return MIXES[key]
    try:
        t = type_by_name(name)
    except UnknownTypeError:
        known = ", ".join(m.name for m in _MIXES)
        raise RecipeError(f"unknown quantization type {name!r} (mixes: {known})") from None
    ftype = next((f for f, n in FILE_TYPES.items() if n == t.name), None)
    if ftype is None:
        raise RecipeError(f"type {t.name} cannot be a whole-model quantization type")
    return Mix(t.name, ftype, t.name.lower())


def parse_custom_q(spec: str | None) -> list[tuple[re.Pattern, str]]:
    """ "regex=type,regex=type" -> [(compiled regex, type name)]; split on commas, then the first '='."""
    rules: list[tuple[re.Pattern, str]] = []
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise RecipeError(f"--custom-q rule {item!r} has no '=' (expected regex=type)")
        pattern, tname = item.split("=", 1)
        rules.append((_compile(pattern), check_type(tname.strip(), f"--custom-q rule {item!r}")))
    return rules


def _compile(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise RecipeError(f"--custom-q regex {pattern!r}: {e}") from None


def check_type(name: str, where: str) -> str:
    try:
        return type_by_name(name).name.lower()
    except UnknownTypeError:
        raise RecipeError(f"{where}: unknown tensor type {name!r}") from None


@dataclass
class Options:
    custom_q: list[tuple[re.Pattern, str]] = field(default_factory=list)
    pure: bool = False
    token_embedding_type: str | None = None
    output_tensor_type: str | None = None
    has_imatrix: bool = False


@dataclass(frozen=True)
class ModelFacts:
    """What the rules need to know about the model besides tensor names."""

    arch: str = "llama"
    n_gqa: int = 1  # n_head / n_head_kv
    n_expert: int = 0
    n_layer: int = 0
    is_70b: bool = False

    @classmethod
    def from_metadata(cls, md: dict) -> ModelFacts:
        arch = str(md.get("general.architecture", ""))
        n_head = int(md.get(f"{arch}.attention.head_count", 1) or 1)
        n_kv = int(md.get(f"{arch}.attention.head_count_kv", n_head) or n_head)
        n_layer = int(md.get(f"{arch}.block_count", 0))
        n_expert = int(md.get(f"{arch}.expert_count", 0))
        return cls(arch, max(1, n_head // max(n_kv, 1)), n_expert, n_layer, arch == "llama" and n_layer == 80)


@dataclass(frozen=True)
class Choice:
    name: str
    shape: tuple[int, ...]  # numpy order, row length last
    type: str | None  # ggml type name, None = copied unchanged
    note: str = ""


def should_quantize(name: str, shape: Sequence[int]) -> bool:
    """The llama-quantize tensor filter (6.1)."""
    if not name.endswith("weight") or len(shape) < 2 or name.endswith("_norm.weight"):
        return False
    if "ffn_gate_inp.weight" in name:
        return False
    skip = ("pos_embd", "token_types", "ssm_conv1d", "ssm_x", "ssm_dt", "attn_rel_b")
    return not any(s in name for s in skip)


def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


class _Counters:
    """llama-quantize counts attn_v and ffn_down tensors in file order (i_attention_wv, i_ffn_down)."""

    def __init__(self, names: Sequence[str]):
        self.n_v = sum("attn_v.weight" in n for n in names)
        self.n_down = sum("ffn_down" in n for n in names)
        self.i_v = 0
        self.i_down = 0


def plan(
    tensors: Sequence[tuple[str, tuple[int, ...]]],
    mix: Mix,
    opts: Options,
    facts: ModelFacts,
    encoders: bool = True,
) -> list[Choice]:
    """The type of every tensor, in the given (file) order. `encoders=False` gives llama-quantize's
    choice even where no encoder exists here yet."""
    names = [n for n, _ in tensors]
    has_output = "output.weight" in names
    ctr = _Counters(names)
    out = []
    for name, shape in tensors:
        if not should_quantize(name, shape):
            out.append(Choice(name, tuple(shape), None))
            continue
        t = mix.default
        if not opts.pure and mix.quantized:
            t = _rules(name, shape[-1], t, mix, opts, facts, has_output, ctr)
            t = next((ct for rx, ct in opts.custom_q if rx.search(name)), t)
        if opts.token_embedding_type and name == "token_embd.weight":
            t = opts.token_embedding_type
        if opts.output_tensor_type and name == "output.weight":
            t = opts.output_tensor_type
        t = divisibility_fallback(t, shape[-1])
        t, note = encoder_fallback(t, shape[-1], allow_ik=mix.ik) if encoders else (t, "")
        out.append(Choice(name, tuple(shape), t, note))
    return out


def _rules(name, ne0, t, mix: Mix, opts: Options, f: ModelFacts, has_output: bool, ctr: _Counters) -> str:
    """llama_tensor_get_type for the supported mixes (6.2 for IQ4_KS)."""
    m = mix.name.upper()
    if name == "output.weight" or (not has_output and name == "token_embd.weight"):
        if opts.output_tensor_type:
            return opts.output_tensor_type
        if ne0 % QK_K or f.arch == "falcon":
            return "q8_0"
        if m == "IQ4_KS":
            return "q6_K" if has_output else "iq5_k"
        return t if type_by_name(t).bpw >= 6.5 else "q6_K"
    if name == "token_embd.weight":
        return t
    if "ssm_alpha.weight" in name or "ssm_beta.weight" in name:
        # Gated DeltaNet decay / write-strength projections: tiny (n_v_heads rows) and sensitive;
        # the community's Qwen3.5 mixes keep them at q8_0 (shared/docs/qwen35-27b.md 4.3, 5)
        return t if type_by_name(t).bpw >= type_by_name("q8_0").bpw else "q8_0"
    if "attn_v.weight" in name:
        i, ctr.i_v = ctr.i_v, ctr.i_v + 1
        return _attn_v(t, m, f, i, ctr.n_v)
    if "attn_k" in name and m == "IQ4_KS":
        return "q8_0" if f.n_expert >= 4 else t
    if "ffn_down" in name:
        i, ctr.i_down = ctr.i_down, ctr.i_down + 1
        i_layer, n_layer = (i, ctr.n_down)
        if f.n_expert > 1 and (mm := re.match(r"blk\.(\d+)\.", name)):
            i_layer, n_layer = int(mm.group(1)), f.n_layer
        return _ffn_down(t, m, opts.has_imatrix, i_layer, n_layer)
    if "attn_output.weight" in name:
        if m == "IQ4_KS":
            return "q5_K" if f.n_expert >= 4 and f.arch != "falcon" else t
        return "q5_K" if f.n_expert == 8 and m.startswith(("Q4_K", "Q5_K", "Q3_K")) else t
    if "attn_qkv.weight" in name and m in ("Q4_K_M", "Q3_K_M"):
        return "q5_K" if m == "Q4_K_M" else "q4_K"
    return t


def _attn_v(t: str, m: str, f: ModelFacts, i: int, n: int) -> str:
    if m == "IQ4_KS":
        if f.n_expert >= 4:
            return "q8_0"
        if f.is_70b:
            return t
        return "iq5_k" if f.n_gqa >= 2 else t
    if m in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
        t = "q6_K"
    elif m == "Q4_K_S" and i < 4:
        t = "q5_K"
    elif m == "Q3_K_M":
        t = "q5_K" if i < 2 else "q4_K"
    if f.is_70b and t in ("q3_K", "q4_K"):
        t = "q5_K"
    return "q8_0" if f.n_expert == 8 else t


def _ffn_down(t: str, m: str, has_imatrix: bool, i_layer: int, n_layer: int) -> str:
    if m == "IQ4_KS":
        return "q5_K" if not has_imatrix and i_layer < n_layer // 8 else t
    if m in ("Q4_K_M", "Q5_K_M") and use_more_bits(i_layer, n_layer):
        return "q6_K"
    if m == "Q4_K_S" and i_layer < n_layer // 8:
        return "q5_K"
    if m == "Q3_K_M" and i_layer < n_layer // 16:
        return "q5_K"
    return t


# change_type_if_necessary: replacements for 256-block types when ne0 % 256 != 0 (6.2)
_ROW_FALLBACK = {
    "iq4_ks": "iq4_nl", "iq4_kss": "iq4_nl", "iq4_k": "q5_0", "iq5_ks": "q5_0", "iq5_k": "q6_0",
    "iq6_k": "q8_0", "iq2_k": "iq4_nl", "iq2_ks": "iq4_nl", "iq2_kl": "iq4_nl", "iq3_k": "iq4_nl",
    "iq3_ks": "iq4_nl", "q2_k": "iq4_nl", "q3_k": "iq4_nl", "iq4_xs": "iq4_nl", "q4_k": "q5_0",
    "q5_k": "q5_1", "q6_k": "q8_0",
}  # fmt: skip


def divisibility_fallback(t: str, ne0: int) -> str:
    gt = type_by_name(t)
    if ne0 % gt.block_size == 0:
        return gt.name.lower()
    nt = _ROW_FALLBACK.get(gt.name.lower(), "q8_0" if gt.block_size > 32 else "f16")
    return nt if ne0 % type_by_name(nt).block_size == 0 else "f16"


# Types to try, in order, when a type has no encoder yet: the nearest richer ones. Entries marked
# with a leading '+' are ik-only and used only for ik mixes.
_ENC_FALLBACK = {
    "q2_k": ["+iq3_k", "q3_k", "+iq4_k", "q4_k", "q5_0", "q8_0"],
    "q3_k": ["+iq4_k", "q4_k", "q5_0", "q8_0"],
    "q4_k": ["+iq4_k", "q5_0", "q8_0"],
    "q5_k": ["+iq5_k", "q5_1", "q8_0"],
    "q6_k": ["+iq6_k", "q8_0"],
    "q6_0": ["q8_0"],
    "iq4_xs": ["+iq4_ks", "iq4_nl", "q5_0", "q8_0"],
    "iq4_kss": ["+iq4_ks", "iq4_nl", "q8_0"],
    "iq2_k": ["+iq3_k", "+iq4_ks", "iq4_nl", "q8_0"],
    "iq2_ks": ["+iq2_k", "+iq3_k", "+iq4_ks", "iq4_nl", "q8_0"],
    "iq2_kl": ["+iq3_k", "+iq4_ks", "iq4_nl", "q8_0"],
    "iq3_k": ["+iq4_ks", "+iq4_k", "iq4_nl", "q8_0"],
    "iq3_ks": ["+iq3_k", "+iq4_ks", "iq4_nl", "q8_0"],
}


def has_encoder(t: str) -> bool:
    from vramfit.quant import UnsupportedTypeError, get_codec

    try:
        codec = get_codec(t)
    except UnsupportedTypeError:
        return False
    return type(codec).encode is not _base_encode()


def _base_encode():
    from vramfit.quant.registry import Codec

    return Codec.encode


def encoder_fallback(t: str, ne0: int, allow_ik: bool) -> tuple[str, str]:
    """(type to write, note): `t` itself when it can be encoded, else the first candidate that can."""
    if has_encoder(t):
        return t, ""
    for cand in _ENC_FALLBACK.get(t.lower(), ["q8_0"]) + ["q8_0", "f16"]:
        if cand.startswith("+"):
            if not allow_ik:
                continue
            cand = cand[1:]
        cand = type_by_name(cand).name.lower()
        if ne0 % type_by_name(cand).block_size == 0 and has_encoder(cand):
            return cand, f"{type_by_name(t).name} has no encoder yet: {type_by_name(cand).name} instead"
    raise RecipeError(f"no encoder for {t} and none of its replacements")
