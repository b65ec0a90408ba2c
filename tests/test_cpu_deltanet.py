"""The Gated DeltaNet's C kernels (kernels/cpu/qops_avx512.c, qops_avx2.c: each test on every
instruction set the machine has) against the torch reference ops of
model/qwen35.py: the causal conv + SiLU (outputs and the carried state, over kernel sizes, channel counts
that are not multiples of 16, 1..300 new rows, strided rows, thread counts) and the one-token delta-rule
step (outputs and the updated state, over head counts and dims, chained over many tokens)."""

from __future__ import annotations

import pytest
import torch

from vramfit.kernels import cpu, dispatch
from vramfit.model.qwen35 import causal_conv, delta_rule_step

pytestmark = pytest.mark.skipif(not cpu.conv_supported(), reason="the fast CPU kernels are not built here")
ISAS = [
    i
    for i in ("avx2", "avx512vnni")
    if cpu.available() and cpu.ISA_NAMES.index(i) <= cpu.ISA_NAMES.index(cpu.isa())
]
if cpu.available() and cpu.isa() != "avx512vnni":  # stated, so that the skip is visible
    ISAS.append(pytest.param("avx512vnni", marks=pytest.mark.skip(reason="this CPU has no AVX-512 VNNI")))


@pytest.fixture(params=ISAS, autouse=True)
def isa(request):
    """Every test with at most this instruction set in use."""
    cpu.set_isa(request.param)
    yield request.param
    cpu.set_isa(None)


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
        assert not dispatch.fast_deltanet(x)
    assert dispatch.fast_deltanet(x) and not dispatch.fast_deltanet(x.double())


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="conv_silu expects"):
        cpu.conv_silu(torch.randn(4, 32), torch.randn(2, 32), torch.randn(4, 32), 1)  # state needs K-1 rows
    with pytest.raises(ValueError, match="conv_silu expects"):
        cpu.conv_silu(torch.randn(32, 4).t(), torch.randn(3, 4), torch.randn(4, 4), 1)  # column stride 32


def _step_inputs(h, d_k, d_v, seed, n_k=None):
    g = torch.Generator().manual_seed(seed)
    n_k = n_k or h
    q = torch.nn.functional.normalize(torch.randn(n_k, d_k, generator=g), dim=-1) * d_k**-0.5
    k = torch.nn.functional.normalize(torch.randn(n_k, d_k, generator=g), dim=-1)
    v = torch.randn(h, d_v, generator=g)
    log_decay = -torch.rand(h, generator=g) * 3
    beta = torch.rand(h, generator=g)
    return q, k, v, log_decay, beta


@pytest.mark.parametrize(
    ("h", "d_k", "d_v"), [(1, 16, 16), (3, 32, 40), (16, 128, 128), (48, 128, 128), (2, 7, 100)]
)
@pytest.mark.parametrize("threads", [1, 2])
def test_delta_step_matches_reference(h, d_k, d_v, threads):
    state = torch.randn(h, d_k, d_v, generator=torch.Generator().manual_seed(h + d_v))
    ref_state, fast_state = state.clone(), state.clone()
    for t in range(6):  # chained: each step reads the state the previous one wrote
        q, k, v, log_decay, beta = _step_inputs(h, d_k, d_v, seed=100 * t + h)
        ref = delta_rule_step(q, k, v, log_decay, beta, ref_state)
        fast = cpu.delta_step(q, k, v, log_decay, beta, fast_state, threads)
        torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast_state, ref_state, atol=1e-5, rtol=1e-5)


def test_delta_step_refuses_bad_inputs():
    q, k, v, log_decay, beta = _step_inputs(2, 16, 16, seed=0)
    with pytest.raises(ValueError, match="delta_step expects"):
        cpu.delta_step(q, k, v, log_decay, beta, torch.zeros(2, 16, 8), 1)  # state's d_v differs from v's
    with pytest.raises(ValueError, match="delta_step expects"):
        cpu.delta_step(q.t().contiguous().t(), k, v, log_decay, beta, torch.zeros(2, 16, 16), 1)
    with pytest.raises(ValueError, match="delta_step expects"):  # 3 value heads cannot tile 2 key heads
        cpu.delta_step(q, k, torch.randn(3, 16), torch.zeros(3), torch.ones(3), torch.zeros(3, 16, 16), 1)
