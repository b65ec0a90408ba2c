"""Triton Gated DeltaNet kernels (vramfit.kernels.triton.deltanet) against qwen35's torch reference.

The oracle is vramfit.model.qwen35's own delta rule (delta_rule_step, delta_rule_chunked, l2_norm,
the key-head tiling of GatedDeltaNet._recurrent), run in float64 on CPU; the kernels compute in
float32. Errors are max |x - ref| / max |ref| over a whole output (or final state) and must stay
below 1e-4. With a CUDA device the kernels run compiled on the GPU (also on 27B-sized heads);
without one they run in Triton's CPU interpreter (TRITON_INTERPRET=1, set below before triton is
imported) on small shapes: several heads, fewer key heads than value heads, T in {1, 5, 64, 100}
(one partial chunk, a full one, a full one and a tail), a non-zero start state.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch

_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
if not _GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton

import pytest  # noqa: E402

from vramfit.kernels.triton import deltanet as dn  # noqa: E402
from vramfit.model import qwen35  # noqa: E402

DEVICE = torch.device("cuda" if _GPU else "cpu")
TOL = 1e-4
LENGTHS = [1, 5, 64, 100] + ([1000] if _GPU else [])
# (n_k_heads, n_v_heads, d_k, d_v): small in the interpreter; on the GPU also the 27B's heads
SHAPES = [(2, 6, 32, 16)] + ([(16, 48, 128, 128)] if _GPU else [])


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    assert x.shape == ref.shape and torch.isfinite(x).all()
    return float((x.detach().cpu().double() - ref).abs().max() / ref.abs().max())


def _inputs(t: int, nk: int, nv: int, d_k: int, d_v: int, seed: int):
    """Raw (un-normalised) q, k (T, nk, d_k); v (T, nv, d_v); g, beta (T, nv); start state (nv, d_k, d_v).
    g spans slow to near-total decay (down to -8), beta covers (0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(t, nk, d_k, generator=gen)
    k = torch.randn(t, nk, d_k, generator=gen)
    v = torch.randn(t, nv, d_v, generator=gen)
    g = -torch.nn.functional.softplus(2 * torch.randn(t, nv, generator=gen) - 1)
    g[:: max(1, t // 3)] = -8.0 * torch.rand(g[:: max(1, t // 3)].shape, generator=gen)
    beta = torch.sigmoid(2 * torch.randn(t, nv, generator=gen))
    state = 0.5 * torch.randn(nv, d_k, d_v, generator=gen)
    return q, k, v, g, beta, state


def _expand(q, k, nv: int):
    """qwen35's preparation (GatedDeltaNet._recurrent), in float64: L2 norms, tiled key heads, q scaled."""
    nk, d_k = q.shape[1], q.shape[2]
    qe = qwen35.l2_norm(q.double()).repeat(1, nv // nk, 1) * d_k**-0.5
    ke = qwen35.l2_norm(k.double()).repeat(1, nv // nk, 1)
    return qe, ke


def _reference(q, k, v, g, beta, state):
    """float64 qwen35.delta_rule_chunked on the prepared inputs -> (o (T, nv, d_v), final state)."""
    qe, ke = _expand(q, k, v.shape[1])
    s = state.double().clone()
    heads_first = [x.transpose(0, 1) for x in (qe, ke, v.double(), g.double(), beta.double())]
    o = qwen35.delta_rule_chunked(*heads_first, s).transpose(0, 1)
    return o, s


def _dev(*xs):
    return [x.to(DEVICE) for x in xs]


def test_interpreter_or_gpu_selected():
    assert dn.interpreted() != _GPU
    assert dn.available() == _GPU


def test_reference_chunked_equals_steps():
    """The oracle itself: qwen35's chunked form equals its step-by-step form (float64)."""
    q, k, v, g, beta, state = _inputs(100, 2, 6, 32, 16, seed=9)
    o_ref, s_ref = _reference(q, k, v, g, beta, state)
    qe, ke = _expand(q, k, 6)
    s = state.double().clone()
    o = torch.stack([qwen35.delta_rule_step(qe[i], ke[i], v[i].double(), g[i].double(), beta[i].double(), s)
                     for i in range(100)])  # fmt: skip
    assert _rel(o, o_ref) < 1e-10 and _rel(s, s_ref) < 1e-10


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "recurrent"])
@pytest.mark.parametrize("t", LENGTHS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_prefill_matches_reference(shape, t, chunked):
    """q/k prepared by qwen35 (normalised, repeated to the value heads) -> kernels take them as given."""
    nk, nv, d_k, d_v = shape
    q, k, v, g, beta, state = _inputs(t, nk, nv, d_k, d_v, seed=t)
    o_ref, s_ref = _reference(q, k, v, g, beta, state)
    qe, ke = _expand(q, k, nv)
    s = state.to(DEVICE)
    heads_first = _dev(*(x.transpose(0, 1).float() for x in (qe, ke, v, g, beta)))
    o, s_out = dn.prefill(*heads_first, s, chunked=chunked)
    assert s_out is s  # updated in place, as qwen35's torch functions do
    assert o.shape == (nv, t, d_v) and o.dtype == torch.float32
    err_o, err_s = _rel(o.transpose(0, 1), o_ref), _rel(s, s_ref)
    assert err_o < TOL and err_s < TOL, f"T={t}: output {err_o:.2e}, state {err_s:.2e}"


@pytest.mark.parametrize("t", LENGTHS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_prefill_tiled_key_heads_and_fused_norm(shape, t):
    """Raw q/k with n_k < n_v heads: the kernel normalises, scales and maps value head h to key
    head h % n_k itself; the reference is qwen35's l2_norm + repeat."""
    nk, nv, d_k, d_v = shape
    q, k, v, g, beta, state = _inputs(t, nk, nv, d_k, d_v, seed=50 + t)
    o_ref, s_ref = _reference(q, k, v, g, beta, state)
    s = state.to(DEVICE)
    o, _ = dn.prefill(*_dev(*(x.transpose(0, 1) for x in (q, k, v, g, beta))), s, l2norm=True)
    err_o, err_s = _rel(o.transpose(0, 1), o_ref), _rel(s, s_ref)
    assert err_o < TOL and err_s < TOL, f"T={t}: output {err_o:.2e}, state {err_s:.2e}"


@pytest.mark.parametrize("tiled", [True, False], ids=["raw-tiled", "prepared"])
def test_recurrent_step_decode_loop(tiled):
    """A decode loop of recurrent_step calls against qwen35.delta_rule_step, token by token."""
    nk, nv, d_k, d_v = SHAPES[-1]
    q, k, v, g, beta, state = _inputs(7, nk, nv, d_k, d_v, seed=3)
    qe, ke = _expand(q, k, nv)
    s_ref, s = state.double().clone(), state.to(DEVICE)
    for i in range(7):
        o_ref = qwen35.delta_rule_step(qe[i], ke[i], v[i].double(), g[i].double(), beta[i].double(), s_ref)
        if tiled:
            o, s_out = dn.recurrent_step(*_dev(q[i], k[i], v[i], g[i], beta[i]), s, l2norm=True)
        else:
            o, s_out = dn.recurrent_step(*_dev(qe[i].float(), ke[i].float(), v[i], g[i], beta[i]), s)
        assert s_out is s and o.shape == (nv, d_v)
        err_o, err_s = _rel(o, o_ref), _rel(s, s_ref)
        assert err_o < TOL and err_s < TOL, f"step {i}: output {err_o:.2e}, state {err_s:.2e}"


def test_batched_sequences():
    """A leading batch dim runs several sequences (own states) in one launch; each equals itself alone."""
    nk, nv, d_k, d_v = SHAPES[0]
    cases = [_inputs(37, nk, nv, d_k, d_v, seed=200 + b) for b in range(3)]
    stacked = [torch.stack([c[j] for c in cases]) for j in range(6)]
    heads_first = [x.transpose(1, 2) for x in stacked[:5]]
    states = stacked[5].clone().to(DEVICE)
    o, _ = dn.prefill(*_dev(*heads_first), states, l2norm=True)
    first = _dev(*(x[:, 0] for x in stacked[:5]))  # each sequence's first token, from its start state
    o_step, _ = dn.recurrent_step(*first, stacked[5].clone().to(DEVICE), l2norm=True)
    for b, case in enumerate(cases):
        o_ref, s_ref = _reference(*case)
        assert _rel(o[b].transpose(0, 1), o_ref) < TOL and _rel(states[b], s_ref) < TOL
        o1_ref, _ = _reference(*(x[:1] for x in case[:5]), case[5])
        assert _rel(o_step[b], o1_ref[0]) < TOL


@pytest.mark.parametrize("t", [1, 70])
def test_forward_tokens_equals_qwen35_layer(t):
    """forward_tokens on the conv output equals GatedDeltaNet._recurrent (conv + qwen35's delta rule),
    with the layer's own key-head tiling, state in place, and a non-contiguous state (a strided slot)."""
    nk, nv, d_k, d_v = SHAPES[0]
    cfg = qwen35.DeltaNetConfig(n_k_heads=nk, n_v_heads=nv, d_k=d_k, d_v=d_v, conv_kernel=4)
    gen = torch.Generator().manual_seed(t)
    w = 0.5 * torch.randn(cfg.conv_channels, 4, generator=gen)
    qkv = torch.randn(t, cfg.conv_channels, generator=gen)
    conv = torch.randn(3, cfg.conv_channels, generator=gen)
    _, _, _, g, beta, state = _inputs(t, nk, nv, d_k, d_v, seed=t + 1)
    layer = SimpleNamespace(cfg=SimpleNamespace(deltanet=cfg), conv=w.double(), conv_taps=None)
    s_ref = state.double().clone()
    o_ref = qwen35.GatedDeltaNet._recurrent(
        layer, qkv.double(), g.double(), beta.double(), conv.double().clone(), s_ref
    )

    x = qwen35.causal_conv(qkv, conv.clone(), w)
    q, k, v = x.split([nk * d_k, nk * d_k, nv * d_v], dim=-1)
    slots = torch.zeros(nv, d_k, 2 * d_v, device=DEVICE)
    s = slots[:, :, d_v:]  # not contiguous: the kernel works on a copy that is written back
    s.copy_(state)
    o = dn.forward_tokens(
        *_dev(q.reshape(t, nk, d_k), k.reshape(t, nk, d_k), v.reshape(t, nv, d_v), g, beta), s
    )
    assert o.shape == (t, nv, d_v)
    err_o, err_s = _rel(o, o_ref), _rel(s, s_ref)
    assert err_o < TOL and err_s < TOL, f"T={t}: output {err_o:.2e}, state {err_s:.2e}"
    assert float(slots[:, :, :d_v].abs().max()) == 0.0


def test_errors():
    q = torch.zeros(4, 3, 16, device=DEVICE)
    v = torch.zeros(6, 3, 16, device=DEVICE)
    g = torch.zeros(6, 3, device=DEVICE)
    state = torch.zeros(6, 16, 16, device=DEVICE)
    with pytest.raises(ValueError, match="not a multiple"):
        dn.prefill(q, q, v, g, g, state)
    with pytest.raises(ValueError, match="float32"):
        dn.prefill(q[:3], q[:3], v, g, g, state.double())
    o, s = dn.prefill(q[:3, :0], q[:3, :0], v[:, :0], g[:, :0], g[:, :0], state)
    assert o.shape == (6, 0, 16) and s is state
