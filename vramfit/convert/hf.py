"""Hugging Face safetensors folder (llama, qwen2, qwen3, qwen3_5) -> a source for the quantize pipeline.

Tensor names, shapes and metadata follow llama.cpp's convert_hf_to_gguf.py: `blk.N.attn_q.weight` and
so on, 1-D tensors stored as float32, llama's q/k rows permuted so that its "norm" RoPE (adjacent
pairs) matches HF's rotate-half, and a byte-level BPE tokenizer from tokenizer.json (tokens padded to
the model's vocab size, added tokens typed control / user-defined, merges as "a b"). Every shard is
checked before any work; tensors are read lazily, one at a time.

Qwen3.5 / 3.6 (`qwen3_5`, text or the VLM wrapper whose text weights sit under `model.language_model.`)
becomes llama.cpp's `qwen35` as its conversion/qwen.py writes it: the +1 of the zero-centred norms
folded in (not into the gated `linear_attn.norm`), `ssm_a` = -exp(A_log), `ssm_dt.bias` = dt_bias,
the conv squeezed to (channels, kernel) and kept F32, and the DeltaNet value heads reordered from
HF's grouped order [k0v0 k0v1 .. k1v0 ..] to the tiled order [k0v0 k1v0 .. k0v1 ..] that ggml's
broadcast of the key heads expects. Vision tower and MTP weights are left out.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf.constants import GGUFValueType as VT

from vramfit.gguf.types import GGMLType, type_by_name

ARCHS = {
    "LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
    "Qwen3_5ForCausalLM": "qwen35", "Qwen3_5ForConditionalGeneration": "qwen35",
}  # fmt: skip
MODEL_TYPES = {"qwen3_5": "qwen35", "qwen3_5_text": "qwen35"}
PRE = {"llama": "llama-bpe", "qwen2": "qwen2", "qwen3": "qwen2", "qwen35": "qwen35"}
_LAYER = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}  # fmt: skip
_QWEN35_LAYER = {
    **_LAYER, "post_attention_layernorm": "post_attention_norm",
    "linear_attn.in_proj_qkv": "attn_qkv", "linear_attn.in_proj_z": "attn_gate",
    "linear_attn.in_proj_b": "ssm_beta", "linear_attn.in_proj_a": "ssm_alpha",
    "linear_attn.conv1d": "ssm_conv1d", "linear_attn.norm": "ssm_norm", "linear_attn.out_proj": "ssm_out",
}  # fmt: skip
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}  # fmt: skip
_DTYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16"}


class ConvertError(ValueError):
    """A Hugging Face folder that cannot be converted (missing files or shards, unsupported model)."""


@dataclass(frozen=True)
class HFTensor:
    name: str  # GGUF name
    hf_name: str
    file: Path
    shape: tuple[int, ...]
    type: GGMLType  # what tensor_bytes gives: float32 for vectors, the checkpoint's dtype otherwise
    permute_heads: int = 0  # llama q/k: number of heads to permute over
    fix: str = ""  # qwen35 value transform: "norm+1", "neg_exp", "conv"
    tile: tuple[int, int, int, int] | None = None  # qwen35 (dim, first index, n_k, head size) to tile

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))

    @property
    def n_rows(self) -> int:
        return self.n_elements // self.shape[-1]

    @property
    def nbytes(self) -> int:
        return self.type.nbytes(self.shape)


def gguf_name(hf: str, arch: str = "llama") -> str | None:
    """The GGUF name of a HF tensor, None for tensors that are not written (vision, MTP, buffers)."""
    if hf.startswith("model.language_model."):  # the text model inside a VLM wrapper
        hf = "model." + hf[len("model.language_model.") :]
    if hf in _GLOBAL:
        return _GLOBAL[hf]
    table = _QWEN35_LAYER if arch == "qwen35" else _LAYER
    if arch == "qwen35" and (m := re.fullmatch(r"model\.layers\.(\d+)\.linear_attn\.(A_log|dt_bias)", hf)):
        return f"blk.{m.group(1)}." + ("ssm_a" if m.group(2) == "A_log" else "ssm_dt.bias")
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf)
    if m and m.group(2) in table:
        return f"blk.{m.group(1)}.{table[m.group(2)]}.{m.group(3)}"
    return None


class HFSource:
    """The pipeline's view of a HF folder: metadata (+types), tensors, tensor_bytes, rows."""

    alignment = 32

    def __init__(self, folder: Path):
        self.folder = folder
        self.config = _read_json(folder / "config.json")
        # the text model's hyperparameters: a VLM wrapper (qwen3_5) nests them under text_config
        self.text = self.config.get("text_config") or self.config
        arch_cls = (self.config.get("architectures") or ["?"])[0]
        self.arch = ARCHS.get(arch_cls) or MODEL_TYPES.get(self.config.get("model_type", ""))
        if self.arch is None:
            raise ConvertError(
                f"{folder}: unsupported architecture {arch_cls} (llama, qwen2, qwen3, qwen3_5)"
            )
        self.tensors = self._tensor_table(_shards(folder))
        self.metadata: dict[str, Any] = {}
        self.metadata_types: dict[str, tuple[VT, VT | None]] = {}
        self._model_metadata()
        self._tokenizer_metadata()

    # -- tensors ------------------------------------------------------------------------------------

    def _tensor_table(self, shards: list[Path]) -> dict[str, HFTensor]:
        from safetensors import safe_open

        c = self.text
        n_head, n_kv = c["num_attention_heads"], c.get("num_key_value_heads", c["num_attention_heads"])
        out: dict[str, HFTensor] = {}
        for f in shards:
            with safe_open(f, framework="pt") as st:
                for hf in st.keys():
                    name = gguf_name(hf, self.arch)
                    if name is None:
                        continue
                    sl = st.get_slice(hf)
                    shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
                    if dtype not in _DTYPES:
                        raise ConvertError(f"{f.name}: tensor {hf} has dtype {dtype} (bf16, f16, f32 only)")
                    t = type_by_name("f32" if len(shape) == 1 else _DTYPES[dtype])
                    heads = 0
                    if self.arch == "llama" and (".attn_q." in name or ".attn_k." in name):
                        heads = n_head if ".attn_q." in name else n_kv
                    extra = self._qwen35_fix(name, shape) if self.arch == "qwen35" else {}
                    if extra.get("fix") == "conv":  # (C, 1, K) -> (C, K), kept F32 like llama.cpp
                        shape, t = (shape[0], shape[-1]), type_by_name("f32")
                    out[name] = HFTensor(name, hf, f, shape, t, heads, **extra)
        # transformers ties by the top-level config (the wrapper's, for a VLM)
        if self.config.get("tie_word_embeddings") and "output.weight" in out:
            del out["output.weight"]  # llama.cpp writes no output tensor for tied embeddings
        if "token_embd.weight" not in out:
            raise ConvertError(f"{self.folder}: no model.embed_tokens.weight in the safetensors files")
        return out

    def _qwen35_fix(self, name: str, shape: tuple[int, ...]) -> dict[str, Any]:
        """What conversion/qwen.py does to a qwen35 tensor: value transform and head tiling."""
        c = self.text
        n_k, n_v = c["linear_num_key_heads"], c["linear_num_value_heads"]
        d_k, d_v = c["linear_key_head_dim"], c["linear_value_head_dim"]
        if n_v % n_k:
            raise ConvertError(f"{self.folder}: {n_v} value heads are not a multiple of {n_k} key heads")
        fix = ""
        if name.endswith(".ssm_a"):
            fix = "neg_exp"
        elif ".ssm_conv1d." in name:
            fix = "conv"
        elif name.endswith("_norm.weight") and ".ssm_norm." not in name:
            fix = "norm+1"  # zero-centred RMSNorm: x_norm * (1 + w)
        tile = None
        if n_v > n_k:
            qk = 2 * n_k * d_k
            if ".attn_qkv." in name or ".ssm_conv1d." in name:
                tile = (0, qk, n_k, d_v)  # the value rows after q and k
            elif ".attn_gate." in name:
                tile = (0, 0, n_k, d_v)
            elif any(s in name for s in (".ssm_beta.", ".ssm_alpha.", ".ssm_dt.", ".ssm_a")):
                tile = (0, 0, n_k, 1)
            elif ".ssm_out." in name:
                tile = (1, 0, n_k, d_v)  # input columns
        return {"fix": fix, "tile": tile}

    def _array(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        t = self.tensors[name]
        with safe_open(t.file, framework="pt") as st:
            x = st.get_tensor(t.hf_name)
        if t.permute_heads:  # llama.cpp's LlamaModel.permute: rotate-half -> adjacent pairs
            h = t.permute_heads
            x = x.reshape(h, 2, x.shape[0] // h // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)
        if t.fix == "neg_exp":  # in float32, as llama.cpp's converter (it upcasts bf16 first)
            x = -torch.exp(x.float())
        elif t.fix == "norm+1":
            x = x.float() + 1
        elif t.fix == "conv":
            x = x.float().reshape(t.shape)
        if t.tile is not None:
            x = _tile_heads(x, *t.tile)
        return x

    def rows(self, name: str, r0: int, r1: int) -> np.ndarray:
        x = self._array(name).reshape(-1, self.tensors[name].shape[-1])[r0:r1]
        return x.float().numpy()

    def tensor_bytes(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        x = self._array(name)
        x = (
            x.float()
            if t.type.name == "F32"
            else x.to({"F16": torch.float16, "BF16": torch.bfloat16}[t.type.name])
        )
        return x.contiguous().view(torch.uint8).numpy().reshape(-1, t.type.row_nbytes(t.shape[-1]))

    # -- metadata -----------------------------------------------------------------------------------

    def _add(self, key: str, value: Any, vtype: VT, sub: VT | None = None) -> None:
        self.metadata[key] = value
        self.metadata_types[key] = (vtype, sub)

    def _model_metadata(self) -> None:
        c, a = self.text, self.arch
        n_head = c["num_attention_heads"]
        head_dim = c.get("head_dim") or c["hidden_size"] // n_head
        self._add("general.architecture", a, VT.STRING)
        self._add("general.name", self.folder.name, VT.STRING)
        n_kv = c.get("num_key_value_heads", n_head)
        n_ctx = c.get("max_position_embeddings", 4096)
        u32 = [
            ("block_count", c["num_hidden_layers"]), ("context_length", n_ctx),
            ("embedding_length", c["hidden_size"]), ("feed_forward_length", c["intermediate_size"]),
            ("attention.head_count", n_head), ("attention.head_count_kv", n_kv),
        ]  # fmt: skip
        for key, value in u32:
            self._add(f"{a}.{key}", int(value), VT.UINT32)
        # transformers 5 writes rope_theta (and the scaling) inside rope_parameters
        rope = c.get("rope_parameters") or {}
        theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
        self._add(f"{a}.rope.freq_base", float(theta), VT.FLOAT32)
        self._add(f"{a}.attention.layer_norm_rms_epsilon", float(c.get("rms_norm_eps", 1e-6)), VT.FLOAT32)
        if a in ("llama", "qwen35"):
            self._add(f"{a}.vocab_size", int(c["vocab_size"]), VT.UINT32)
        if a == "llama":
            self._add(f"{a}.rope.dimension_count", int(head_dim), VT.UINT32)
        if a in ("qwen3", "qwen35") or head_dim != c["hidden_size"] // n_head:
            self._add(f"{a}.attention.key_length", int(head_dim), VT.UINT32)
            self._add(f"{a}.attention.value_length", int(head_dim), VT.UINT32)
        if a == "qwen35":
            self._qwen35_metadata(c, rope, head_dim)
        self._rope_scaling(c.get("rope_scaling") or rope)

    def _qwen35_metadata(self, c: dict, rope: dict, head_dim: int) -> None:
        """The keys of llama.cpp's Qwen3NextModel / _Qwen35MRopeMixin (shared/docs/qwen35-27b.md 2)."""
        a = self.arch
        partial = rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 0.25))
        sections = list(rope.get("mrope_section", c.get("mrope_section", [11, 11, 10])))
        kinds = c.get("layer_types") or []
        if "full_attention" not in kinds:
            interval = int(c.get("full_attention_interval", 4))
        else:
            interval = kinds.index("full_attention") + 1
        want = ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(len(kinds))]
        if kinds and kinds != want:
            raise ConvertError(f"{self.folder}: layer_types are not every {interval}th layer full attention")
        n_v, d_v = c["linear_num_value_heads"], c["linear_value_head_dim"]
        u32 = [
            ("rope.dimension_count", int(head_dim * partial)),
            ("ssm.conv_kernel", c["linear_conv_kernel_dim"]), ("ssm.state_size", c["linear_key_head_dim"]),
            ("ssm.group_count", c["linear_num_key_heads"]), ("ssm.time_step_rank", n_v),
            ("ssm.inner_size", n_v * d_v), ("full_attention_interval", interval),
        ]  # fmt: skip
        for key, value in u32:
            self._add(f"{a}.{key}", int(value), VT.UINT32)
        sections = (sections + [0, 0, 0, 0])[:4]
        self._add(f"{a}.rope.dimension_sections", [int(x) for x in sections], VT.ARRAY, VT.INT32)

    def _rope_scaling(self, rs: dict) -> None:
        kind = rs.get("rope_type", rs.get("type"))
        if kind in ("linear", "yarn"):
            self._add(f"{self.arch}.rope.scaling.type", kind, VT.STRING)
            self._add(f"{self.arch}.rope.scaling.factor", float(rs["factor"]), VT.FLOAT32)
            if "original_max_position_embeddings" in rs:
                orig = int(rs["original_max_position_embeddings"])
                self._add(f"{self.arch}.rope.scaling.original_context_length", orig, VT.UINT32)
        elif kind not in (None, "default", "mrope"):
            raise ConvertError(f"rope scaling {kind!r} is not supported by the converter yet")

    def _tokenizer_metadata(self) -> None:
        tj = _read_json(self.folder / "tokenizer.json")
        model = tj.get("model", {})
        if model.get("type") != "BPE":
            raise ConvertError(f"{self.folder}: only byte-level BPE tokenizer.json is supported")
        vocab: dict[str, int] = model["vocab"]
        added = {t["content"]: t for t in tj.get("added_tokens", [])}
        n_vocab = int(self.text["vocab_size"])
        tokens = [f"[PAD{i}]" for i in range(n_vocab)]
        types = [5] * n_vocab  # UNUSED until filled
        for tok, i in {**vocab, **{k: v["id"] for k, v in added.items()}}.items():
            if i < n_vocab:
                tokens[i] = tok
                types[i] = (3 if added[tok].get("special") else 4) if tok in added else 1
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        self._add("tokenizer.ggml.model", "gpt2", VT.STRING)
        self._add("tokenizer.ggml.pre", _pre_tokenizer(tj, self.arch), VT.STRING)
        self._add("tokenizer.ggml.tokens", tokens, VT.ARRAY, VT.STRING)
        self._add("tokenizer.ggml.token_type", types, VT.ARRAY, VT.INT32)
        self._add("tokenizer.ggml.merges", merges, VT.ARRAY, VT.STRING)
        self._special_ids(tokens, added)

    def _special_ids(self, tokens: list[str], added: dict) -> None:
        tc = _read_json(self.folder / "tokenizer_config.json", required=False)
        ids = {tok: i for i, tok in enumerate(tokens)}
        for kind, key in (("bos", "bos_token"), ("eos", "eos_token"), ("padding", "pad_token")):
            tok = tc.get(key)
            tok = tok.get("content") if isinstance(tok, dict) else tok
            tid = ids.get(tok) if tok else self.text.get(f"{key}_id") if kind != "padding" else None
            if isinstance(tid, int):
                self._add(f"tokenizer.ggml.{kind}_token_id", tid, VT.UINT32)
        if "add_bos_token" in tc:
            self._add("tokenizer.ggml.add_bos_token", bool(tc["add_bos_token"]), VT.BOOL)
        if tc.get("chat_template"):
            self._add("tokenizer.chat_template", str(tc["chat_template"]), VT.STRING)


def _pre_tokenizer(tj: dict, arch: str) -> str:
    """llama.cpp names the pre-tokenizer by hashing its output; we look at the split regexes instead."""
    pre = json.dumps(tj.get("pre_tokenizer") or {})
    if "\\\\p{N}|" in pre and "\\\\p{M}" in pre:
        return "qwen35"  # qwen2's split with combining marks kept with their letters
    if "\\\\p{N}{1,3}" in pre:
        return "llama-bpe"
    if "\\\\p{N}|" in pre:
        return "qwen2"
    if '"Split"' not in pre and '"ByteLevel"' in pre:
        return "gpt2"  # ByteLevel with its own (GPT-2) regex
    return PRE[arch]


def _tile_heads(x: torch.Tensor, dim: int, first: int, n_k: int, head: int) -> torch.Tensor:
    """Along `dim`, from index `first` on: value heads grouped by key head (HF, head h reads key head
    h // ratio) -> tiled (llama.cpp, head h reads key head h % n_k)."""
    x = x.movedim(dim, 0)
    v = x[first:]
    ratio = v.shape[0] // (n_k * head)
    v = v.reshape(n_k, ratio, head, *v.shape[1:]).transpose(0, 1).reshape(v.shape)
    return torch.cat((x[:first], v)).movedim(0, dim)


def _read_json(path: Path, required: bool = True) -> dict:
    if not path.is_file():
        if required:
            raise ConvertError(f"{path.parent}: missing {path.name}")
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def _shards(folder: Path) -> list[Path]:
    """The safetensors files of the model; every shard named by the index must be present."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(_read_json(index)["weight_map"].values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ConvertError(
                f"{folder}: missing shard {missing[0]} ({len(missing)} of {len(names)} missing)"
            )
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConvertError(f"{folder}: no *.safetensors files")
    return files


def open_hf(folder: str | Path) -> HFSource:
    return HFSource(Path(folder))
