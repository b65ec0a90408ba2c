"""GGUF -> model: finds the architecture class by `general.architecture` and hands it the tensors.

Weights stay packed and memory-mapped (zero-copy); 1-D tensors (norms, biases) become float32. On
another device (a GPU) each tensor is copied there as it is read, still packed, and its mapped pages
are dropped; the model's own stacking and row reordering then happen on the device.
"""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vramfit.gguf import GGUFFile
from vramfit.kernels.dispatch import QWeight
from vramfit.model.kvcache import KVSpec
from vramfit.quant import UnsupportedTypeError, get_codec

# general.architecture -> "module:Class", imported only when used
ARCHITECTURES = {
    "llama": "vramfit.model.llama:LlamaModel",
    "qwen2": "vramfit.model.qwen2:Qwen2Model",
    "qwen3": "vramfit.model.qwen2:Qwen2Model",
    "qwen35": "vramfit.model.qwen35:Qwen35Model",
}


class ModelError(ValueError):
    """A GGUF that cannot be turned into a model: unknown architecture, missing key or tensor."""


_MISSING = object()


def require(md: dict[str, Any], key: str, default: Any = _MISSING) -> Any:
    if key in md:
        return md[key]
    if default is _MISSING or default is None:
        raise ModelError(f"missing metadata key {key}")
    return default


def _as_torch(arr: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only mmap: we never write to it
        return torch.from_numpy(arr)


class WeightSource:
    """Typed access to the tensors of an open GGUF file, on `device` (default: the CPU, zero-copy)."""

    def __init__(self, gguf: GGUFFile, device: torch.device | str | None = None):
        self.gguf = gguf
        self.device = torch.device(device or "cpu")
        # on a GPU an untied token embedding stays mapped in host memory (a lookup reads one row per
        # token; the memory planner's CUDA device counts it there)
        untied = "output.weight" in gguf.tensors
        self.on_host = {"token_embd.weight"} if self.device.type != "cpu" and untied else set()

    def _placed(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cpu" or name in self.on_host:
            return t
        t = t.to(self.device)
        self.gguf.release(name)  # the device holds the bytes now
        return t

    def __contains__(self, name: str) -> bool:
        return name in self.gguf.tensors

    def error(self, msg: str) -> ModelError:
        return ModelError(f"{self.gguf.path}: {msg}")

    def _info(self, name: str):
        if name not in self.gguf.tensors:
            raise self.error(f"missing tensor {name}")
        return self.gguf.tensors[name]

    def release(self, names: list[str]) -> None:
        self.gguf.release(*names)

    def rows_from_file(self, w: QWeight) -> None:
        """Row lookups of w (a weight kept in host memory) read the file instead of the mapping."""
        if w.packed.device.type == "cpu":
            w.read_rows_from_file(
                open(self.gguf.path, "rb"), self.gguf.data_offset + self._info(w.name).offset
            )  # noqa: SIM115

    def is_vector(self, name: str) -> bool:
        return len(self._info(name).shape) == 1

    def qweight(self, name: str) -> QWeight:
        t = self._info(name)
        if len(t.shape) != 2:
            raise self.error(f"tensor {name} has shape {list(t.shape)}, expected a matrix")
        try:
            get_codec(t.type)
        except UnsupportedTypeError as e:
            raise self.error(f"tensor {name}: {e}") from None
        packed = self._placed(name, _as_torch(self.gguf.tensor_bytes(name)))
        return QWeight(packed, t.type, (t.shape[0], t.shape[1]), name)

    def vector(self, name: str) -> torch.Tensor:
        t = self._info(name)
        packed = _as_torch(self.gguf.tensor_bytes(name))
        try:
            return self._placed(name, get_codec(t.type).decode(packed, t.shape[-1]).reshape(-1).clone())
        except UnsupportedTypeError as e:
            raise self.error(f"tensor {name}: {e}") from None


def resolve_device(name: str | torch.device | None) -> torch.device:
    """ "auto"/None: a CUDA device when torch sees one and Triton is installed, else the CPU; "cpu",
    "cuda", "cuda:N" as given (a ModelError when that device is not there)."""
    if name is None or str(name).lower() == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        from vramfit.kernels import triton as triton_kernels

        return torch.device("cuda" if triton_kernels.importable() else "cpu")
    try:
        dev = torch.device(str(name).lower())
    except RuntimeError:
        raise ModelError(f"unknown device {name!r} (auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"device {name}: torch sees no CUDA device here (use --device cpu)")
        from vramfit.kernels import triton as triton_kernels  # (imported only for a GPU: it is slow)

        if not triton_kernels.importable():
            raise ModelError(f"device {name}: triton is not installed (pip install 'vramfit[gpu]')")
    if dev.type not in ("cpu", "cuda", "meta"):
        raise ModelError(f"device {name}: only cpu and cuda are supported")
    return dev


def model_class(arch: str) -> type:
    target = ARCHITECTURES.get(arch)
    if target is None:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ModelError(f"unknown architecture {arch!r} (supported: {known})")
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)


def load_model(
    path: str | Path, n_ctx: int | None = None, gguf: GGUFFile | None = None, kv_type=None, device=None
):
    """Returns (model, gguf). n_ctx defaults to min(training context, 4096); kv_type is the KV cache
    storage (see model/kvcache.py: "q8_0", "q8_0/q6_0", a KVSpec; default float32); device: where the
    weights, the RoPE table and the caches live (default the CPU; "cuda" runs the Triton kernels)."""
    gguf = gguf or GGUFFile(path)
    md = gguf.metadata
    arch = md.get("general.architecture")
    if not arch:
        raise ModelError(f"{gguf.path}: missing metadata key general.architecture")
    cls = model_class(arch)
    n_vocab = len(md.get("tokenizer.ggml.tokens", [])) or 0
    cfg = cls.config_class.from_metadata(md, n_vocab)
    n_ctx = n_ctx or min(cfg.n_ctx_train, 4096)
    kv = KVSpec.of(kv_type)
    kv.check(cfg.head_dim)  # before the weights are touched
    src = WeightSource(gguf, device)
    model = cls(cfg, src, n_ctx)
    model.kv_type = kv  # new_cache() allocates this storage
    model.device = src.device  # ... on this device
    model.rope.to(src.device)
    return model, gguf
