"""Real models against the shipped reference logits (float32 transformers on the dequantized GGUF)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import REFERENCE_MODELS, load_reference
from vramfit.kernels import cpu as cpu_kernels
from vramfit.kernels.dispatch import use_backend
from vramfit.model.loader import load_model
from vramfit.runtime.engine import Engine


@pytest.fixture(scope="module", params=sorted(REFERENCE_MODELS))
def loaded(request, model_path):
    model, _ = load_model(model_path(request.param), n_ctx=256)
    return request.param, model


def test_logits_match_reference(loaded):
    """The reference backend (float32 throughout) reproduces transformers' float32 logits."""
    name, model = loaded
    meta, ref = load_reference(name)
    engine = Engine(model)
    for text in meta["logits"]:
        ids = ref[f"{text}_ids"].tolist()
        assert len(ids) == meta["logits"][text]["n_tokens"]
        with use_backend("reference"):
            logits = engine.logits_all(ids)
        top_ids = torch.from_numpy(ref[f"{text}_top_ids"]).long()
        got_top = torch.gather(logits, 1, top_ids).numpy()
        assert np.array_equal(logits.argmax(1).numpy(), ref[f"{text}_top_ids"][:, 0]), text
        np.testing.assert_allclose(got_top, ref[f"{text}_top_logits"], atol=1e-2, rtol=0)
        lse = torch.logsumexp(logits, 1).numpy()
        np.testing.assert_allclose(lse, ref[f"{text}_logsumexp"], atol=1e-2, rtol=0)


@use_backend("reference")  # exact float32: 8-bit activations make any batching change ripple (see below)
def test_prefill_then_decode_equals_full_forward(loaded):
    _, model = loaded
    ids = [int(i) for i in torch.randint(0, 5000, (20,), generator=torch.Generator().manual_seed(0))]
    full = Engine(model).logits_all(ids)
    engine = Engine(model, prefill_chunk=7)  # uneven chunks exercise the causal mask with an offset
    steps = [engine.eval(ids[:8])]
    for i in range(8, len(ids)):
        steps.append(engine._step(ids[i]))
    # eval(ids[:8]) gives position 7's logits; each step gives the next position's
    got = torch.stack(steps[:-1])
    torch.testing.assert_close(got, full[7:-1], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(steps[-1], full[-1], atol=2e-4, rtol=1e-4)


@use_backend("reference")
def test_prompt_prefix_is_reused(loaded):
    _, model = loaded
    engine = Engine(model)
    a = [10, 20, 30, 40, 50, 60]
    first = engine.eval(a)
    engine.eval(a[:3] + [99, 98])
    assert engine.tokens == a[:3] + [99, 98]
    again = engine.eval(a)  # recomputes from position 3 only, must give the same logits
    torch.testing.assert_close(again, first, atol=2e-4, rtol=1e-4)


def test_fast_cpu_path_stays_close_to_reference(loaded):
    """The fused kernels quantize activations to 8 bits (as llama.cpp does): logits move a little,
    the ranking barely. Bounds: top-1 agrees on >= 90% of positions, the reference top-1 token stays
    within the fast path's top 5, and logits differ by less than 1.0 (logit scale ~10-30)."""
    assert cpu_kernels.available()  # this machine kind has AVX2; the fast path must be there
    name, model = loaded
    meta, ref = load_reference(name)
    engine = Engine(model)
    agree, total = 0, 0
    for text in meta["logits"]:
        ids = ref[f"{text}_ids"].tolist()
        with use_backend("cpu"):
            fast = engine.logits_all(ids)
        top_ids = torch.from_numpy(ref[f"{text}_top_ids"]).long()
        agree += int((fast.argmax(1) == top_ids[:, 0]).sum())
        total += len(ids)
        top5 = fast.topk(5, dim=1).indices
        assert bool((top5 == top_ids[:, :1]).any(1).all()), text
        got_top = torch.gather(fast, 1, top_ids).numpy()
        assert np.abs(got_top - ref[f"{text}_top_logits"]).max() < 1.0, text
    assert agree / total >= 0.9
