"""Hugging Face safetensors folder (llama, qwen2, qwen3) -> a source for the quantize pipeline.

Tensor names, shapes and metadata follow llama.cpp's convert_hf_to_gguf.py: `blk.N.attn_q.weight` and
so on, 1-D tensors stored as float32, llama's q/k rows permuted so that its "norm" RoPE (adjacent
pairs) matches HF's rotate-half, and a byte-level BPE tokenizer from tokenizer.json (tokens padded to
the model's vocab size, added tokens typed control / user-defined, merges as "a b"). Every shard is
checked before any work; tensors are read lazily, one at a time.
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

ARCHS = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
PRE = {"llama": "llama-bpe", "qwen2": "qwen2", "qwen3": "qwen2"}
_LAYER = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
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

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))

    @property
    def n_rows(self) -> int:
        return self.n_elements // self.shape[-1]

    @property
    def nbytes(self) -> int:
        return self.type.nbytes(self.shape)


def gguf_name(hf: str) -> str | None:
    if hf in _GLOBAL:
        return _GLOBAL[hf]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf)
    if m and m.group(2) in _LAYER:
        return f"blk.{m.group(1)}.{_LAYER[m.group(2)]}.{m.group(3)}"
    return None


class HFSource:
    """The pipeline's view of a HF folder: metadata (+types), tensors, tensor_bytes, rows."""

    alignment = 32

    def __init__(self, folder: Path):
        self.folder = folder
        self.config = _read_json(folder / "config.json")
        arch_cls = (self.config.get("architectures") or ["?"])[0]
        if arch_cls not in ARCHS:
            raise ConvertError(f"{folder}: unsupported architecture {arch_cls} (llama, qwen2, qwen3)")
        self.arch = ARCHS[arch_cls]
        self.tensors = self._tensor_table(_shards(folder))
        self.metadata: dict[str, Any] = {}
        self.metadata_types: dict[str, tuple[VT, VT | None]] = {}
        self._model_metadata()
        self._tokenizer_metadata()

    # -- tensors ------------------------------------------------------------------------------------

    def _tensor_table(self, shards: list[Path]) -> dict[str, HFTensor]:
        from safetensors import safe_open

        c = self.config
        n_head, n_kv = c["num_attention_heads"], c.get("num_key_value_heads", c["num_attention_heads"])
        out: dict[str, HFTensor] = {}
        for f in shards:
            with safe_open(f, framework="pt") as st:
                for hf in st.keys():
                    name = gguf_name(hf)
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
                    out[name] = HFTensor(name, hf, f, shape, t, heads)
        if c.get("tie_word_embeddings") and "output.weight" in out:
            del out["output.weight"]  # llama.cpp writes no output tensor for tied embeddings
        if "token_embd.weight" not in out:
            raise ConvertError(f"{self.folder}: no model.embed_tokens.weight in the safetensors files")
        return out

    def _array(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        t = self.tensors[name]
        with safe_open(t.file, framework="pt") as st:
            x = st.get_tensor(t.hf_name)
        if t.permute_heads:  # llama.cpp's LlamaModel.permute: rotate-half -> adjacent pairs
            h = t.permute_heads
            x = x.reshape(h, 2, x.shape[0] // h // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)
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
        c, a = self.config, self.arch
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
        self._add(f"{a}.rope.freq_base", float(c.get("rope_theta", 10000.0)), VT.FLOAT32)
        self._add(f"{a}.attention.layer_norm_rms_epsilon", float(c.get("rms_norm_eps", 1e-6)), VT.FLOAT32)
        if a == "llama":
            self._add(f"{a}.vocab_size", int(c["vocab_size"]), VT.UINT32)
            self._add(f"{a}.rope.dimension_count", int(head_dim), VT.UINT32)
        if a == "qwen3" or head_dim != c["hidden_size"] // n_head:
            self._add(f"{a}.attention.key_length", int(head_dim), VT.UINT32)
            self._add(f"{a}.attention.value_length", int(head_dim), VT.UINT32)
        self._rope_scaling(c.get("rope_scaling") or {})

    def _rope_scaling(self, rs: dict) -> None:
        kind = rs.get("rope_type", rs.get("type"))
        if kind in ("linear", "yarn"):
            self._add(f"{self.arch}.rope.scaling.type", kind, VT.STRING)
            self._add(f"{self.arch}.rope.scaling.factor", float(rs["factor"]), VT.FLOAT32)
            if "original_max_position_embeddings" in rs:
                orig = int(rs["original_max_position_embeddings"])
                self._add(f"{self.arch}.rope.scaling.original_context_length", orig, VT.UINT32)
        elif kind not in (None, "default"):
            raise ConvertError(f"rope scaling {kind!r} is not supported by the converter yet")

    def _tokenizer_metadata(self) -> None:
        tj = _read_json(self.folder / "tokenizer.json")
        model = tj.get("model", {})
        if model.get("type") != "BPE":
            raise ConvertError(f"{self.folder}: only byte-level BPE tokenizer.json is supported")
        vocab: dict[str, int] = model["vocab"]
        added = {t["content"]: t for t in tj.get("added_tokens", [])}
        n_vocab = int(self.config["vocab_size"])
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
            tid = ids.get(tok) if tok else self.config.get(f"{key}_id") if kind != "padding" else None
            if isinstance(tid, int):
                self._add(f"tokenizer.ggml.{kind}_token_id", tid, VT.UINT32)
        if "add_bos_token" in tc:
            self._add("tokenizer.ggml.add_bos_token", bool(tc["add_bos_token"]), VT.BOOL)
        if tc.get("chat_template"):
            self._add("tokenizer.chat_template", str(tc["chat_template"]), VT.STRING)


def _pre_tokenizer(tj: dict, arch: str) -> str:
    """llama.cpp names the pre-tokenizer by hashing its output; we look at the split regexes instead."""
    pre = json.dumps(tj.get("pre_tokenizer") or {})
    if "\\\\p{N}{1,3}" in pre:
        return "llama-bpe"
    if "\\\\p{N}|" in pre:
        return "qwen2"
    if '"Split"' not in pre and '"ByteLevel"' in pre:
        return "gpt2"  # ByteLevel with its own (GPT-2) regex
    return PRE[arch]


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
