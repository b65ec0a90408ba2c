"""One decode step (one token) through all the decoder layers of a llama-family model in one C call.

For a single token the quantized products take most of the time, and the Python path
(LlamaModel.forward) spends another 50-150 us per layer on the small torch ops between them: norms,
rope, the cache store, attention, adds, silu. `_qgemm.decode_layers` (qlayer.c) runs the whole layer
stack in C with the same matmul kernels. This module describes a model to it once: ctypes mirrors of
qlayer.c's structs hold the packed weights' and vectors' addresses, and scratch buffers are allocated
here, so a step allocates nothing.

The step computes what the Python path does with the fast kernels (tests/test_cpu_layer.py compares
them), so it is used only where that path would run them: `FusedDecoder.build` checks the weights
and shapes once, `usable` the backend, the input observers and the KV cache type on every call.
"""

from __future__ import annotations

import ctypes
from ctypes import c_double, c_int64, c_void_p

import torch

from vramfit.kernels import dispatch
from vramfit.kernels.cpu import TYPE_IDS, _qgemm, available

MAX_PARTS = 3  # weights of one product, outputs adjacent (qkv: q, k, v; CPU weights are not stacked)


class _Weight(ctypes.Structure):
    _fields_ = [
        ("data", c_void_p),
        ("bias", c_void_p),
        ("rows", c_int64),
        ("row_nbytes", c_int64),
        ("type", c_int64),
    ]


class _Linear(ctypes.Structure):
    _fields_ = [("part", _Weight * MAX_PARTS), ("nparts", c_int64)]


class _Layer(ctypes.Structure):
    _fields_ = [(n, c_void_p) for n in ("attn_norm", "ffn_norm", "q_norm", "k_norm")] + [
        (n, _Linear) for n in ("qkv", "wo", "gate_up", "down")
    ]


_SIZES = ("n_layer", "n_embd", "n_ff", "n_head", "n_head_kv", "head_dim", "rope_dim", "max_ctx", "neox")
_SCRATCH = ("xn", "qkv", "att", "y", "ffn", "scores")


class _Model(ctypes.Structure):
    _fields_ = (
        [(n, c_int64) for n in _SIZES]
        + [("eps", c_double), ("scale", c_double), ("layers", c_void_p)]
        + [(n, c_void_p) for n in _SCRATCH]
    )


def _check_layout() -> None:
    mirror = tuple(ctypes.sizeof(s) for s in (_Weight, _Linear, _Layer, _Model))
    if mirror != _qgemm.layer_struct_sizes():
        raise RuntimeError(f"decode_layers structs: {mirror} here, {_qgemm.layer_struct_sizes()} in C")


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _vector_ok(t: torch.Tensor | None, n: int) -> bool:
    return t is None or (t.dtype == torch.float32 and t.is_contiguous() and t.shape == (n,))


def _parts(groups) -> list[tuple]:
    """(weight, bias) per stacked product of a FusedLinear's groups, or of a bare weight."""
    return [(w, b) for w, b, _ in groups] if isinstance(groups, list) else [(groups, None)]


def _linear(parts: list[tuple], k: int, n: int) -> _Linear | None:
    """The C description of a product of k inputs and n outputs, or None if the kernels don't take it."""
    if len(parts) > MAX_PARTS or sum(w.shape[0] for w, _ in parts) != n:
        return None
    lin = _Linear(nparts=len(parts))
    for i, (w, bias) in enumerate(parts):
        ok = dispatch.takes_cpu_kernels(w) and w.packed.is_contiguous() and w.shape[1] == k
        if not ok or not _vector_ok(bias, w.shape[0]):
            return None
        tid = TYPE_IDS[w.gtype.name.lower()]
        lin.part[i] = _Weight(w.packed.data_ptr(), _ptr(bias), w.shape[0], w.packed.shape[1], tid)
    return lin


def _layer(cfg, blk) -> _Layer | None:
    """One block's descriptor, or None where a weight or vector is one the C step does not take."""
    h, kv, d, e, f = cfg.n_head, cfg.n_head_kv, cfg.head_dim, cfg.n_embd, cfg.n_ff
    products = {
        "qkv": (_parts(blk.qkv.groups), e, (h + 2 * kv) * d),
        "wo": (_parts(blk.wo), h * d, e),
        "gate_up": (_parts(blk.gate_up.groups), e, 2 * f),
        "down": (_parts(blk.w_down), f, e),
    }
    linears = {name: _linear(*args) for name, args in products.items()}
    norms = {"attn_norm": e, "ffn_norm": e, "q_norm": d, "k_norm": d}
    vectors_ok = all(_vector_ok(getattr(blk, n), size) for n, size in norms.items())
    if None in linears.values() or not vectors_ok or (blk.q_norm is None) != (blk.k_norm is None):
        return None
    return _Layer(**{n: _ptr(getattr(blk, n)) for n in norms}, **linears)


def _shapes_ok(cfg) -> bool:
    """Shapes the C step handles: whole 8-float vectors per head, rope on pairs within the head."""
    d = cfg.head_dim
    return d % 8 == 0 and cfg.n_head % cfg.n_head_kv == 0 and cfg.rope.dim % 2 == 0 and cfg.rope.dim <= d


class FusedDecoder:
    """The C decode step of a llama-family model (blocks as model/llama.py's `Block`)."""

    def __init__(self, cfg, blocks: list, rope, n_ctx: int, layers: ctypes.Array):
        h, kv, d, e, f = cfg.n_head, cfg.n_head_kv, cfg.head_dim, cfg.n_embd, cfg.n_ff
        self.cfg, self.blocks, self.layers = cfg, blocks, layers  # the descriptors point into these
        self.freqs = torch.view_as_real(rope.freqs)  # (max_pos, rope_dim / 2, 2): cos, sin
        max_ctx = min(n_ctx, self.freqs.shape[0])
        # used only inside the C call, which holds the kernels' lock: steps of several engines
        # (server slots) over this model may share them
        self.scratch = {
            "xn": torch.empty(e, dtype=torch.float32),
            "qkv": torch.empty((h + 2 * kv) * d, dtype=torch.float32),
            "att": torch.empty(h * d, dtype=torch.float32),
            "y": torch.empty(e, dtype=torch.float32),
            "ffn": torch.empty(2 * f, dtype=torch.float32),
            "scores": torch.empty(h * max_ctx, dtype=torch.float32),
        }
        neox = int(cfg.rope.style == "neox")
        sizes = dict(zip(_SIZES, (cfg.n_layer, e, f, h, kv, d, cfg.rope.dim, max_ctx, neox), strict=True))
        self.desc = _Model(
            **sizes, eps=cfg.norm_eps, scale=d**-0.5, layers=ctypes.addressof(layers),
            **{n: t.data_ptr() for n, t in self.scratch.items()},
        )  # fmt: skip
        self._desc_ptr = ctypes.addressof(self.desc)
        self._x_shape, self._kv_shape = (1, e), (cfg.n_layer, kv, d)
        self._dense_seen = dispatch.dense_count()
        self._ok = True

    @classmethod
    def build(cls, cfg, blocks: list, rope, n_ctx: int) -> FusedDecoder | None:
        """The decoder, or None where a weight, vector or shape is one the C step does not take."""
        if not available() or not _shapes_ok(cfg):
            return None
        _check_layout()
        layers = [_layer(cfg, blk) for blk in blocks]
        if None in layers:
            return None
        return cls(cfg, blocks, rope, n_ctx, (_Layer * len(layers))(*layers))

    def usable(self, cache) -> bool:
        """Whether the Python path would run the fast kernels over this plain float32 cache now."""
        if dispatch.get_backend() not in ("auto", "cpu") or dispatch.input_observers:
            return False
        if dispatch.dense_count() != self._dense_seen:  # a weight got a float copy: one of ours?
            self._dense_seen = dispatch.dense_count()
            self._ok = all(_layer(self.cfg, blk) is not None for blk in self.blocks)
        return self._ok and cache.spec.is_plain

    def step(self, x: torch.Tensor, cache, pos: int, first: int = 0, stop: int | None = None) -> torch.Tensor:
        """x (1, n_embd) float32, the token at position pos, through layers first..stop-1 (all by
        default), in place; returns x. The cache gets the token's keys and values."""
        k, v = cache.k, cache.v
        n_layer, n_kv, n_ctx, d = k.shape
        if x.shape != self._x_shape or x.dtype != torch.float32 or not x.is_contiguous():
            raise ValueError(f"decode step: x must be a contiguous float32 {self._x_shape} tensor")
        if (n_layer, n_kv, d) != self._kv_shape or k.shape != v.shape:
            raise ValueError(f"decode step: a KV cache of {tuple(k.shape)} for {self._kv_shape}")
        # the (cos, sin) row of pos: C checks pos against max_ctx, which the table holds
        rot = self.freqs.data_ptr() + pos * self.freqs.stride(0) * 4
        stop = self.cfg.n_layer if stop is None else stop
        args = (pos, rot, k.data_ptr(), v.data_ptr(), n_ctx, first, stop, dispatch.get_threads())
        _qgemm.decode_layers(self._desc_ptr, x.data_ptr(), *args)
        return x
