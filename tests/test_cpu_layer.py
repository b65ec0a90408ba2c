"""The C decode step (kernels/cpu/qlayer.c: every layer of one token in one call) against the Python
layer loop with the same fast kernels, for llama (SmolLM2), qwen2 with qkv biases (Qwen2.5-Coder-0.5B)
and a tiny random qwen3 (q/k norms); and the cases that must keep the Python path.

Two kinds of comparison, because both paths quantize every product's input to 8 bits: attention and
silu are not bit-identical to torch's, and a last-bit difference now and then flips one rounding of
that quantization, which over 24-30 layers grows to the noise level of the 8-bit activations (a 1-ulp
nudge to the Python path's input does as much). So each layer is compared with the Python layer from
the same input, tightly; a whole generation by its greedy tokens and its logits, within that noise.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import pytest
import torch

from vramfit.kernels import cpu as cpu_kernels
from vramfit.kernels import dispatch
from vramfit.kernels.cpu.fused_decode import FusedDecoder
from vramfit.model.kvcache import KVSpec
from vramfit.model.layers import KVCache
from vramfit.model.loader import load_model
from vramfit.model.random_model import (
    PRESETS,
    RandomModelSpec,
    TensorSpec,
    random_model_spec,
    write_random_model,
)
from vramfit.runtime.engine import Engine

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="fast CPU kernels not built")

# prompts with a clear continuation ("The capital of France is", "def fibonacci(n):"), so that greedy
# decoding meets no near tie for the activations' noise to flip
PROMPTS = {
    "smollm2-135m": [504, 3575, 282, 4649, 314],
    "qwen2.5-coder-0.5b": [750, 75698, 1445, 1648],
    "tiny-qwen3": [72, 101, 108, 108, 111],
    "tiny-qwen3-hd80": [72, 101, 108, 108, 111],
}
# tiny random qwen3 shapes: head size 64 (q4_K/q6_K), and 80 with rope on 32 dims only (q4_K/q5_0)
TINY = {"tiny-qwen3": {}, "tiny-qwen3-hd80": {"head_dim": 80, "rope_dim": 32}}
N_STEPS = 16


def write_tiny_qwen3(path, **shape) -> None:
    """The tiny random llama preset (with `shape` changes) as qwen3: NeoX rope, q/k norms per head."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(PRESETS, ("llama", "test"), dataclasses.replace(PRESETS[("llama", "tiny")], **shape))
        spec = random_model_spec("llama", "test", "q4_k_m")
    md = {k.replace("llama.", "qwen3.", 1): v for k, v in spec.metadata.items()}
    md["general.architecture"] = "qwen3"
    head_dim, n_layer = md["qwen3.attention.key_length"], md["qwen3.block_count"]
    names = [f"blk.{i}.attn_{qk}_norm.weight" for i in range(n_layer) for qk in "qk"]
    norms = [TensorSpec(name, (head_dim,), "f32") for name in names]
    write_random_model(RandomModelSpec("qwen3", "tiny", md, spec.tensors + norms), path)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    """Returns a function: tiny model name -> its GGUF (written once)."""
    folder = tmp_path_factory.mktemp("tiny")

    def get(name: str):
        path = folder / f"{name}.gguf"
        if not path.exists():
            write_tiny_qwen3(path, **TINY[name])
        return path

    return get


@pytest.fixture(scope="module", params=sorted(PROMPTS))
def named_model(request, model_path, tiny_path):
    name = request.param
    model, _ = load_model(tiny_path(name) if name in TINY else model_path(name), n_ctx=64)
    assert (model.blocks[0].q_norm is not None) == (name in TINY)
    return name, model


@contextmanager
def python_path(model):
    """Run `model` through its Python layer loop (the same kernels, no C step)."""
    saved, model._fused = model._fused, False
    try:
        yield
    finally:
        model._fused = saved


def greedy(model, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """n greedy tokens after `prompt` and the n + 1 logits rows that chose them (and the next)."""
    engine = Engine(model)
    logits = [engine.eval(prompt)]
    tokens: list[int] = []
    for _ in range(n):
        tokens.append(int(logits[-1].argmax()))
        logits.append(engine._step(tokens[-1]))
    return tokens, torch.stack(logits)


@torch.inference_mode()
def layer_errors(model, prompt: list[int]) -> list[float]:
    """After `prompt`, one more token layer by layer through the C step and the Python layer from
    the same input and cache: the C output's error relative to the layer's update x_out - x_in.
    The k, v rows must be the same (same products, bias adds, norms and rope, rounded alike)."""
    engine = Engine(model)
    engine.eval(prompt)
    pos, cache = len(prompt), engine.cache
    fused = model._fused_decoder(cache)
    assert fused is not None
    x = model.embed.rows(torch.tensor([42]))
    rot = model.rope.at(pos, 1)
    errors = []
    for i in range(model.cfg.n_layer):
        got = fused.step(x.clone(), cache, pos, i, i + 1)
        got_k, got_v = cache.k[i, :, pos].clone(), cache.v[i, :, pos].clone()
        x_in, x = x, model.layer(i, x, cache, pos, rot)
        assert torch.equal(got_k, cache.k[i, :, pos]) and torch.equal(got_v, cache.v[i, :, pos])
        errors.append(((got - x).abs().max() / (x - x_in).abs().max()).item())
    return errors


def test_each_layer_matches_python(named_model):
    """Each C layer matches the Python layer to float rounding (<1e-6 of its update typically; up to
    a few 1e-3 where a last-bit difference flips one 8-bit rounding of a product's input)."""
    name, model = named_model
    errors = layer_errors(model, PROMPTS[name])
    assert max(errors) < 1e-2
    assert sorted(errors)[len(errors) // 2] < 1e-5


def test_long_context_layers_match_python(tiny_path):
    """300 cached positions: attention runs on the thread pool (and over many 8-key blocks)."""
    model, _ = load_model(tiny_path("tiny-qwen3"), n_ctx=512)
    prompt = torch.randint(0, 512, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    threads = dispatch.get_threads()
    dispatch.set_threads(2)
    try:
        assert max(layer_errors(model, prompt)) < 1e-5
    finally:
        dispatch.set_threads(threads)


def test_avx2_kernels(tiny_path):
    """With the AVX2 kernels (CPUs without AVX-512), the step calls those for its products too."""
    model, _ = load_model(tiny_path("tiny-qwen3-hd80"), n_ctx=64)
    cpu_kernels.set_isa("avx2")
    try:
        assert max(layer_errors(model, PROMPTS["tiny-qwen3-hd80"])) < 1e-5
    finally:
        cpu_kernels.set_isa(None)


def test_generation_matches_python(named_model):
    """Prefill, then greedy steps on the C path: the Python path's tokens, and logits within the
    noise of the 8-bit activations (measured: up to 2.8% of the largest logit on SmolLM2, 1.1% on
    Qwen2.5-0.5B). The two-layer tiny models agree to float rounding (<1e-6) on most steps."""
    name, model = named_model
    with python_path(model):
        want_tokens, want = greedy(model, PROMPTS[name], N_STEPS)
    got_tokens, got = greedy(model, PROMPTS[name], N_STEPS)
    assert isinstance(model._fused, FusedDecoder)  # the C step ran
    assert got_tokens == want_tokens
    errors = (got - want).abs().amax(dim=1) / want.abs().max()  # per step
    assert errors.max() <= 5e-2
    if name in TINY:
        assert errors.median() <= 1e-5


def test_fallbacks_keep_the_python_path(tiny_path, monkeypatch):
    """A quantized or rotated KV cache, the reference backend and input observers keep the Python
    loop; so does a weight once decoded to float (the Python path then multiplies that copy)."""
    model, _ = load_model(tiny_path("tiny-qwen3"), n_ctx=64)
    c = model.cfg
    plain = model.new_cache()
    assert model._fused_decoder(plain) is not None
    for spec in (KVSpec("q8_0", "q8_0"), KVSpec(k_hadamard=True)):
        assert model._fused_decoder(KVCache(c.n_layer, c.n_head_kv, c.head_dim, 64, spec)) is None
    with dispatch.use_backend("reference"):
        assert model._fused_decoder(plain) is None
    with monkeypatch.context() as m:
        m.setattr(dispatch, "input_observers", [lambda w, x: None])
        assert model._fused_decoder(plain) is None
    # and a forward then runs without the C step
    monkeypatch.setattr(FusedDecoder, "step", _no_step)
    engine = Engine(model)
    engine.cache = KVCache(c.n_layer, c.n_head_kv, c.head_dim, 64, "q8_0")
    engine.eval([1, 2, 3])
    engine._step(4)
    with dispatch.use_backend("reference"):  # decodes every weight to float32 once
        engine._step(5)
    engine.cache = model.new_cache()
    engine.reset()
    engine.eval([1, 2, 3])
    engine._step(4)
    assert model._fused_decoder(plain) is None


def _no_step(*args, **kwargs):
    raise AssertionError("the C decode step ran where the Python path must")
