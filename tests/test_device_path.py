"""The GPU path without a GPU: the whole model on another device, and the Triton products in a model.

- "meta" device: every weight, the RoPE table and the caches are placed there by the loader; a forward
  then fails on the first tensor some code makes on the CPU instead (a missing `device=`), which is
  what would break on a CUDA device. Shapes only, no values.
- The "triton" backend under Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported):
  the model's products and the qwen35 DeltaNet recurrence go through the same kernels a GPU runs, the
  other ops through torch (no C kernels); its logits are compared with the reference backend (float32
  decode + torch matmul + torch delta rule).
With a CUDA device the second test runs the model on it instead.
"""

from __future__ import annotations

import os

import torch

_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
if not _GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton

import pytest  # noqa: E402

import vramfit  # noqa: E402
from vramfit.kernels import dispatch  # noqa: E402
from vramfit.kernels.triton import deltanet  # noqa: E402
from vramfit.model.loader import ModelError, load_model, resolve_device  # noqa: E402
from vramfit.model.random_model import random_model_spec, write_random_model  # noqa: E402
from vramfit.runtime.engine import Engine  # noqa: E402
from vramfit.runtime.sampling import SamplingParams  # noqa: E402

DEVICE = "cuda" if _GPU else "cpu"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny random GGUFs: llama in a mix of Triton-supported types, and the qwen35 hybrid."""
    d = tmp_path_factory.mktemp("device")
    paths = {}
    for arch, mix in (("llama", "q4_k_m"), ("qwen35", "iq4_ks")):
        paths[arch] = d / f"{arch}.gguf"
        write_random_model(random_model_spec(arch, "tiny", mix), paths[arch])
    return paths


@pytest.mark.parametrize("arch", ["llama", "qwen35"])
@pytest.mark.parametrize("kv", [None, "f16", "q8_0"])  # (the other encoders loop on data: values needed)
def test_everything_lives_on_the_model_device(tiny, arch, kv):
    model, _ = load_model(tiny[arch], 64, kv_type=kv, device="meta")
    assert model.device.type == "meta" and model.rope.freqs.device.type == "meta"
    cache = model.new_cache()
    tokens = torch.tensor([1, 2, 3, 4, 5], device="meta")
    for start, n in ((0, 5), (5, 1)):  # a prefill chunk, then a decode step
        hidden = model.forward(tokens[:n], cache, start)
        logits = model.logits(hidden)
        assert logits.device.type == "meta" and logits.shape == (n, model.cfg.n_vocab)


def test_untied_embedding_stays_in_host_memory(model_path):
    """As the planner's CUDA device counts it: an untied token embedding (Qwen2.5: a separate output
    matrix) stays mapped on the host, a lookup runs there and its rows go to the model's device; a
    tied one (SmolLM2) is the output matrix, read every token, so it moves with the model."""
    qwen, _ = load_model(model_path("qwen2.5-coder-0.5b"), 64, device="meta")
    assert qwen.embed.packed.device.type == "cpu" and qwen.output.packed.device.type == "meta"
    rows = qwen.embed.rows(torch.tensor([1, 151643]))
    assert rows.shape == (2, qwen.cfg.n_embd) and rows.device.type == "cpu"
    smol, _ = load_model(model_path("smollm2-135m"), 64, device="meta")
    assert smol.embed is smol.output and smol.embed.packed.device.type == "meta"


# the hybrid under Triton's interpreter takes 100 s on 2 cores: the slow form; CI runs the llama one
# (the hybrid's Triton DeltaNet kernels have their own quick tests in test_triton_deltanet.py)
@pytest.mark.parametrize("arch", ["llama", pytest.param("qwen35", marks=pytest.mark.slow)])
def test_triton_products_match_the_reference(tiny, arch):
    ids = [3, 17, 99, 250, 7, 7, 400, 12]
    ref_model, _ = load_model(tiny[arch], 64)  # its own copy: the reference keeps decoded weights
    with dispatch.use_backend("reference"):
        ref = Engine(ref_model, prefill_chunk=4).logits_all(ids)
        ref_events = list(Engine(ref_model).generate(ids, 2, SamplingParams(temperature=0)))
    model, _ = load_model(tiny[arch], 64, device=DEVICE)
    n_triton = 0

    def count(w, x):
        nonlocal n_triton
        n_triton += dispatch._triton(w, x)

    n_deltanet = 0
    forward_tokens = deltanet.forward_tokens

    def deltanet_calls(*args):
        nonlocal n_deltanet
        n_deltanet += 1
        return forward_tokens(*args)

    dispatch.input_observers.append(count)
    deltanet.forward_tokens = deltanet_calls
    try:
        with dispatch.use_backend("triton"):
            got = Engine(model, prefill_chunk=4).logits_all(ids)  # two chunks of 4 rows
            # decode steps: one row per product (the matrix-vector kernel)
            events = list(Engine(model).generate(ids, 2, SamplingParams(temperature=0)))
    finally:
        dispatch.input_observers.remove(count)
        deltanet.forward_tokens = forward_tokens
    assert n_triton > 0  # the products really went through the Triton kernels
    assert (n_deltanet > 0) == (arch == "qwen35")  # and the recurrence through its kernel
    scale = ref.abs().max().item()
    # fp16 tiles for several rows, float32 for one: within half-precision rounding of the logit scale
    print(f"{arch}: max |triton - reference| {(got - ref).abs().max().item():.2e}, logit scale {scale:.2f}")
    assert (got - ref).abs().max().item() <= 5e-3 * scale
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    assert [e.token for e in events] == [e.token for e in ref_events]


def test_device_choice_and_errors(tiny):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ModelError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="no CUDA device"):
            vramfit.load(tiny["llama"], device="cuda")
