"""The Gated DeltaNet's causal conv + SiLU on the C kernel (kernels/cpu/qops_avx512.c) against the torch
reference (model/qwen35.causal_conv with no taps): outputs and the carried state, over kernel sizes,
channel counts that are not multiples of 16, 1..300 new rows, strided rows and thread counts."""

from __future__ import annotations

import pytest
import torch

from vramfit.kernels import cpu, dispatch
from vramfit.model.qwen35 import causal_conv

pytestmark = pytest.mark.skipif(not cpu.conv_supported(), reason="the conv kernel needs AVX-512")


@pytest.mark.parametrize("k", [1, 2, 4, 7])
@pytest.mark.parametrize("c", [16, 40, 6144])
@pytest.mark.parametrize("t", [1, 2, 3, 65, 300])
def test_conv_silu_matches_reference(k, c, t):
    g = torch.Generator().manual_seed(k * 1000 + c + t)
    w = torch.randn(c, k, generator=g)
    state = torch.randn(k - 1, c, generator=g)
    wide = torch.randn(t, c + 24, generator=g)  # x as columns of a wider product: strided rows
    x = wide[:, 8 : 8 + c]
    ref_state, fast_state = state.clone(), state.clone()
    ref = causal_conv(x, ref_state, w)
    fast = causal_conv(x, fast_state, w, w.t().contiguous())
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(fast_state, ref_state)  # the last K-1 raw inputs, copied


def test_conv_silu_in_steps_equals_one_call():
    # a prompt in pieces (and decode steps) carries the state exactly as one long call
    c, k = 48, 4
    w, x = torch.randn(c, k), torch.randn(20, c)
    taps = w.t().contiguous()
    whole = causal_conv(x, torch.zeros(k - 1, c), w, taps)
    state = torch.zeros(k - 1, c)
    parts = [causal_conv(x[s:e], state, w, taps) for s, e in ((0, 2), (2, 3), (3, 11), (11, 20))]
    torch.testing.assert_close(torch.cat(parts), whole, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_conv_silu_threads(threads):
    c, k, t = 1000, 4, 257
    w, state, x = torch.randn(c, k), torch.randn(k - 1, c), torch.randn(t, c)
    out = cpu.conv_silu(x, state, w.t().contiguous(), threads)
    torch.testing.assert_close(out, causal_conv(x, state.clone(), w), atol=1e-5, rtol=1e-5)


def test_reference_backend_keeps_torch():
    x = torch.randn(5, 32)
    with dispatch.use_backend("reference"):
        assert not dispatch.fast_conv(x, 4)
    assert dispatch.fast_conv(x, 4) and not dispatch.fast_conv(x, 17)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="conv_silu expects"):
        cpu.conv_silu(torch.randn(4, 32), torch.randn(2, 32), torch.randn(4, 32), 1)  # state needs K-1 rows
    with pytest.raises(ValueError, match="conv_silu expects"):
        cpu.conv_silu(torch.randn(32, 4).t(), torch.randn(3, 4), torch.randn(4, 4), 1)  # column stride 32
