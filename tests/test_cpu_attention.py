"""The C attention kernels (vramfit.kernels.cpu.attention) against torch's SDPA in float32, and the
SwiGLU kernels against torch, on every instruction set the machine has (AVX2's per-row kernel, and
AVX-512's flash kernel where the CPU has it).

Shapes cover grouped-query heads, head dims from 16 to 256, batches that are not a multiple of the
kernel's 8-row query blocks, caches that already hold earlier positions (chunked prefill) and key
counts that end inside the kernel's 16/32/64-key blocks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vramfit.kernels import cpu, dispatch
from vramfit.model.layers import KVCache, attention

needs_kernel = pytest.mark.skipif(
    not cpu.attention_supported(64), reason="the fast CPU kernels are not built for this machine"
)
ISAS = [
    i
    for i in ("avx2", "avx512vnni")
    if cpu.available() and cpu.ISA_NAMES.index(i) <= cpu.ISA_NAMES.index(cpu.isa())
]
if cpu.available() and cpu.isa() != "avx512vnni":  # stated, so that the skip is visible
    ISAS.append(pytest.param("avx512vnni", marks=pytest.mark.skip(reason="this CPU has no AVX-512 VNNI")))


@pytest.fixture(params=ISAS)
def isa(request):
    """Run the test with at most this instruction set in use."""
    cpu.set_isa(request.param)
    yield request.param
    cpu.set_isa(None)


def sdpa(q, k, v, start, scale):
    n, n_heads, head_dim = q.shape
    end = start + n
    mask = torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None].double(), k[None, :, :end].double(), v[None, :, :end].double(),
        attn_mask=mask, scale=scale, enable_gqa=True,
    )[0]  # fmt: skip
    return out.transpose(0, 1).reshape(n, n_heads * head_dim)


@needs_kernel
@pytest.mark.parametrize(
    ("n", "start", "n_heads", "n_kv", "head_dim", "ctx"),
    [
        (512, 0, 9, 3, 64, 512),  # SmolLM2 pp512
        (37, 5, 4, 2, 32, 64),
        (1, 10, 4, 4, 16, 16),
        (100, 300, 14, 2, 64, 512),  # a second prefill chunk
        (9, 0, 2, 1, 128, 9),
        (70, 3, 8, 2, 256, 100),  # the 27B's head dim
        (3, 0, 6, 2, 80, 3),  # 80: not a multiple of 64
        (65, 0, 4, 1, 48, 65),
    ],
)
def test_matches_sdpa(n, start, n_heads, n_kv, head_dim, ctx, isa):
    gen = torch.Generator().manual_seed(n * 7 + start)
    q = torch.randn(n, n_heads, head_dim, generator=gen) * 2
    k = torch.randn(n_kv, ctx, head_dim, generator=gen)
    v = torch.randn(n_kv, ctx, head_dim, generator=gen)
    scale = head_dim**-0.5
    for threads in (1, 2):
        out = cpu.attention(q, k, v, start, scale, threads)
        assert out.shape == (n, n_heads * head_dim)
        assert (out.double() - sdpa(q, k, v, start, scale)).abs().max().item() < 2e-5


@needs_kernel
def test_peaked_scores(isa):
    """Large scores (a softmax close to one-hot, and the running max growing block after block)."""
    gen = torch.Generator().manual_seed(3)
    n, ctx, head_dim = 200, 200, 64
    q = torch.randn(n, 4, head_dim, generator=gen) * 8
    k = torch.randn(2, ctx, head_dim, generator=gen) * torch.linspace(0.1, 4, ctx)[None, :, None]
    v = torch.randn(2, ctx, head_dim, generator=gen)
    out = cpu.attention(q, k, v, 0, 1.0, 2)
    assert (out.double() - sdpa(q, k, v, 0, 1.0)).abs().max().item() < 1e-4


@needs_kernel
def test_layer_attention_uses_the_kernel_and_matches_the_reference(isa):
    """layers.attention on the fast backend equals the reference backend (torch SDPA) on a cache."""
    gen = torch.Generator().manual_seed(5)
    cache = KVCache(n_layer=2, n_kv_heads=2, head_dim=64, n_ctx=96)
    k = torch.randn(96, 2, 64, generator=gen)
    v = torch.randn(96, 2, 64, generator=gen)
    cache.store(1, 0, k, v)
    q = torch.randn(40, 6, 64, generator=gen)
    with dispatch.use_backend("reference"):
        ref = attention(q, cache, 1, 56, 0.125)
    with dispatch.use_backend("cpu"):
        assert dispatch.fast_attention(q, 64)
        out = attention(q, cache, 1, 56, 0.125)
    assert (out - ref).abs().max().item() < 2e-5


@needs_kernel
def test_bad_arguments(isa):
    q = torch.randn(4, 2, 64)
    k = torch.randn(1, 3, 64)
    with pytest.raises(ValueError, match="cache holds 3 positions"):
        cpu.attention(q, k, k, 0, 0.1, 1)
    with pytest.raises(TypeError):
        cpu.attention(q.double(), k, k, 0, 0.1, 1)
    with pytest.raises(ValueError, match="unsupported shape"):
        bad = torch.randn(4, 3, 64)  # 3 query heads over 2 kv heads
        cpu.attention(bad, torch.randn(2, 8, 64), torch.randn(2, 8, 64), 0, 0.1, 1)
    assert not cpu.attention_supported(36) and cpu.attention_supported(72)
    # one query, or a head size the flash kernel does not take: the per-row kernel on every ISA
    assert (
        cpu.attention_variant(64, 1)
        == cpu.attention_variant(72, 8)
        == cpu.attention_variant(512, 8)
        == "rows"
    )
    assert cpu.attention_variant(64, 8) == ("flash" if isa == "avx512vnni" else "rows")


@pytest.mark.skipif(not cpu.swiglu_supported(), reason="the fast CPU kernels are not built for this machine")
def test_swiglu_matches_torch(isa):
    """dispatch.swiglu on a stacked [gate | up] product equals silu(gate) * up; other inputs fall back."""
    gen = torch.Generator().manual_seed(6)
    for n, n_ff in ((1, 1536), (7, 100), (512, 4864)):
        gu = torch.randn(n, 2 * n_ff, generator=gen) * 6
        gate, up = gu.split(n_ff, dim=-1)
        ref = F.silu(gate.double()) * up.double()
        out = dispatch.swiglu(gate, up)
        assert out.shape == (n, n_ff)
        assert ((out.double() - ref).abs() / (ref.abs() + 1e-3)).max().item() < 1e-5
    a, b = torch.randn(3, 8), torch.randn(3, 8)  # separate tensors: torch's ops
    assert torch.equal(dispatch.swiglu(a, b), F.silu(a) * b)
