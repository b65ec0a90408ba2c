"""Quantized KV cache (f16/bf16/q8_0/q6_0/q5_0/q4_0/iq4_nl) and the Hadamard rotations on the CPU
reference path: attention against a float32 cache, exactness of the rotations, allocation size, and
logits of real and random models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import vramfit
from vramfit.cli import main
from vramfit.kernels.dispatch import use_backend
from vramfit.model.kvcache import KVSpec, KVTypeError, hadamard
from vramfit.model.layers import KVCache, attention
from vramfit.model.random_model import random_model_spec, write_random_model


def _bits_tol(bits: int) -> float:
    # 2x the RMS error of a uniform b-bit quantizer over a block's range (about +-2.5 sigma)
    return 2 * 5 / (2**bits * math.sqrt(12))


TOL = {"f16": 2**-10, "bf16": 2**-7, "q8_0": _bits_tol(8), "q6_0": _bits_tol(6), "q5_0": _bits_tol(5),
       "q4_0": _bits_tol(4), "iq4_nl": _bits_tol(4)}  # fmt: skip
N_KV, HEADS, D, CTX = 2, 4, 64, 48


def _qkv(seed: int, outlier: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(CTX, HEADS, D, generator=g)
    k = torch.randn(CTX, N_KV, D, generator=g)
    v = torch.randn(CTX, N_KV, D, generator=g)
    k[..., 5] *= outlier  # one large channel, as real keys have
    return q, k, v


def _attend(spec, q, k, v, split: int = 40) -> torch.Tensor:
    """Prefill of `split` tokens then one-token decode steps, through the cache."""
    cache = KVCache(1, N_KV, D, CTX, spec)
    cache.store(0, 0, k[:split], v[:split])
    outs = [attention(q[:split], cache, 0, 0, D**-0.5)]
    for t in range(split, CTX):
        cache.store(0, t, k[t : t + 1], v[t : t + 1])
        outs.append(attention(q[t : t + 1], cache, 0, t, D**-0.5))
    return torch.cat(outs)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kv", list(TOL))
def test_attention_with_each_kv_type_is_close_to_float32(kv):
    q, k, v = _qkv(0)
    ref = _attend(None, q, k, v)
    err = _rel(_attend(kv, q, k, v), ref)
    assert 0 < err < TOL[kv]


@pytest.mark.parametrize("kv", ["q8_0", "q4_0"])
def test_k_and_v_types_are_independent(kv):
    q, k, v = _qkv(1)
    ref = _attend(None, q, k, v)
    only_v = _rel(_attend(KVSpec("f32", kv), q, k, v), ref)
    only_k = _rel(_attend(KVSpec(kv, "f32"), q, k, v), ref)
    both = _rel(_attend(KVSpec(kv, kv), q, k, v), ref)
    assert 0 < only_v < both and 0 < only_k < both


@pytest.mark.parametrize("kv", ["f16", "bf16", "q8_0", "q6_0"])
def test_reads_are_the_codec_decode_of_the_stored_rows(kv):
    """Every read decodes exactly what is stored (f16/bf16/q8_0 through the store's reused buffer,
    the other types through the codec), for each layer and length, and the buffer is not reallocated."""
    from vramfit.quant import get_codec

    g = torch.Generator().manual_seed(3)
    cache = KVCache(2, 3, 64, 40, kv)
    for layer in range(2):
        cache.store(layer, 0, torch.randn(40, 3, 64, generator=g), torch.randn(40, 3, 64, generator=g))
    buffers = set()
    for layer, end in ((0, 40), (1, 17), (0, 5)):
        got = cache.keys(layer, end)
        raw = cache.k[layer, :, :end]
        if raw.dtype == torch.uint8:
            want = get_codec(kv).decode(raw.reshape(3 * end, -1), 64).view(3, end, 64)
        else:
            want = raw.float()
        assert got.shape == (3, end, 64) and torch.equal(got, want)
        buffers.add(got.data_ptr())
    assert len(buffers) == (3 if kv == "q6_0" else 1)  # q6_0: a new tensor from the codec per read


def test_hadamard_is_orthogonal_and_symmetric():
    h = hadamard(64)
    assert torch.allclose(h @ h, torch.eye(64), atol=1e-6) and torch.equal(h, h.T)
    assert set(torch.unique((h * 8).round()).tolist()) == {-1.0, 1.0}


def test_rotations_leave_float32_attention_unchanged():
    q, k, v = _qkv(2)
    ref = _attend(None, q, k, v)
    out = _attend(KVSpec("f32", "f32", True, True), q, k, v)
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("kv", ["q4_0", "q8_0"])
def test_k_rotation_helps_with_an_outlier_channel(kv):
    q, k, v = _qkv(3, outlier=20.0)
    ref = _attend(None, q, k, v)
    plain = _rel(_attend(KVSpec(kv, "f32"), q, k, v), ref)
    rotated = _rel(_attend(KVSpec(kv, "f32", k_hadamard=True), q, k, v), ref)
    assert rotated < 0.7 * plain


def test_v_rotation_is_undone():
    q, k, v = _qkv(4)
    ref = _attend(None, q, k, v)
    assert _rel(_attend(KVSpec("f32", "q8_0", v_hadamard=True), q, k, v), ref) < TOL["q8_0"]


def test_allocated_once_at_the_planned_size():
    # the 27B attention layers (16 x 4 kv heads x 256): 34,816 bytes per token in q8_0 (docs 4.1)
    cache = KVCache(16, 4, 256, 64, "q8_0")
    assert cache.k_store.nbytes + cache.v_store.nbytes == 64 * 34816
    assert KVCache.bytes_per_token(16, 4, 256, KVSpec("q6_0", "q5_0")) == 24576
    assert KVCache.bytes_per_token(16, 4, 256, torch.float16) == 65536


def test_bad_kv_types():
    with pytest.raises(KVTypeError, match="unknown KV cache type"):
        KVSpec.parse("q7_0")
    with pytest.raises(KVTypeError, match="multiple of 32"):
        KVCache(1, 1, 80, 8, "q8_0")
    with pytest.raises(KVTypeError, match="power-of-two"):
        KVCache(1, 1, 96, 8, KVSpec("q8_0", "q8_0", True))


def test_smollm2_logits_with_q8_0_kv_close_to_f32(model_path):
    path = model_path("smollm2-135m")
    text = "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. " * 2
    with use_backend("reference"):  # exact float32 products: only the cache differs
        base = vramfit.load(path, n_ctx=64)
        ids = base.tokenize(text)[:48]
        ref = base.logits(ids)
        q8 = vramfit.load(path, n_ctx=64, kv_type="q8_0").logits(ids)
    kld = _kld(ref, q8)
    assert 0 < kld.mean() < 0.01 and kld.max() < 0.1  # nats; q4_0 K/V gives ~0.4 on this text
    assert (q8.argmax(-1) == ref.argmax(-1)).mean() >= 0.95


def _kld(ref: np.ndarray, other: np.ndarray) -> np.ndarray:
    def log_softmax(x):
        x = x.astype(np.float64) - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    p, q = log_softmax(ref), log_softmax(other)
    return (np.exp(p) * (p - q)).sum(-1)


@pytest.mark.parametrize("arch", ["llama", "qwen35"])
def test_random_models_run_with_quantized_kv(tmp_path, arch, capsys):
    path = tmp_path / "m.gguf"
    write_random_model(random_model_spec(arch, "tiny"), path)
    ids = list(range(40, 72))
    ref = vramfit.load(path).logits(ids)
    m = vramfit.load(path, kv_type=KVSpec("q8_0", "q6_0", True, True))
    kv = getattr(m.engine.cache, "kv", m.engine.cache)  # qwen35: the attention layers' cache
    assert kv.spec == KVSpec("q8_0", "q6_0", True, True) and kv.k.dtype == torch.uint8
    assert np.abs(m.logits(ids) - ref).max() < 0.05 * np.abs(ref).max()
    assert (
        main(
            [
                "run",
                str(path),
                "-p",
                "hello",
                "-n",
                "4",
                "--temp",
                "0",
                "--ctk",
                "q8_0",
                "--ctv",
                "q4_0",
                "-khad",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("hello")
    assert main(["run", str(path), "-p", "hello", "-n", "4", "--ctk", "q9_0"]) == 2
    assert "unknown KV cache type 'q9_0'" in capsys.readouterr().err
