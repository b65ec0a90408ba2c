"""Fast CPU kernels (vramfit.kernels.cpu) against the reference decode: x @ decode(W).T.

The kernels quantize activations to 8-bit blocks of 32 (as llama.cpp). Two checks per product:
- exact path: against `q8(x) @ decode(W).T`, where q8 emulates that activation quantization, the
  result must agree to float32 rounding (1e-4 of the output scale);
- accuracy: against the float reference `x @ decode(W).T` within 3e-2 of the output scale
  |x| * |w_row| / sqrt(K) (typical errors are a few 1e-3).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vramfit import quant
from vramfit.kernels import cpu

QUANT_VECTORS = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "quant"

TYPES = sorted(cpu.TYPE_IDS)
K_SIZES = (256, 512, 896, 1536, 4864)
AVX2_K_SIZES = (256, 896, 4864)
N_SIZES = (1, 7, 37)
BATCHES = (1, 2, 5, 8, 33)

# byte offsets of the float fields to overwrite in random blocks: (block bytes, row meta, fp16 offsets)
SCALE_FIELDS = {
    "q4_0": (18, 0, (0,)),
    "q4_1": (20, 0, (0, 2)),
    "q5_0": (22, 0, (0,)),
    "q5_1": (24, 0, (0, 2)),
    "q8_0": (34, 0, (0,)),
    "q6_0": (26, 0, (0,)),
    "iq4_nl": (18, 0, (0,)),
    "q2_k": (84, 0, (80, 82)),
    "q3_k": (110, 0, (108,)),
    "q4_k": (144, 0, (0, 2)),
    "q5_k": (176, 0, (0, 2)),
    "q6_k": (210, 0, (208,)),
    "iq4_xs": (136, 0, (0,)),
    "iq2_k": (76, 0, (0,)),
    "iq3_k": (110, 0, (0,)),
    "iq4_k": (144, 0, (0,)),
    "iq5_k": (176, 0, (0,)),
    "iq6_k": (212, 0, (0,)),
    "iq4_ks": (136, 4, ()),
    "iq4_kss": (128, 4, ()),
    "iq5_ks": (168, 4, ()),
    "iq2_ks": (70, 2, ()),
    "iq3_ks": (102, 2, ()),
    "iq2_kl": (86, 2, ()),
}

needs_ext = pytest.mark.skipif(not cpu.available(), reason="fast CPU kernels not built for this machine")


def random_rows(type_name: str, n_rows: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Random packed rows with every float scale field replaced by a sane value."""
    block, meta, offsets = SCALE_FIELDS[type_name]
    nbytes = quant.get_codec(type_name).gtype.row_nbytes(k)
    rows = torch.randint(0, 256, (n_rows, nbytes), dtype=torch.uint8, generator=gen)
    n_blocks = (nbytes - meta) // block
    blocks = rows[:, meta:].view(n_rows, n_blocks, block)
    for off in offsets:
        d = (torch.rand(n_rows, n_blocks, generator=gen) * 0.02 + 0.005).to(torch.float16)
        blocks[..., off : off + 2] = d.view(torch.uint8).view(n_rows, n_blocks, 2)
    if meta == 4:  # float32 row scale
        d_row = torch.rand(n_rows, generator=gen) * 1e-3 + 1e-4
        rows[:, :4] = d_row.view(torch.uint8).view(n_rows, 4)
    elif meta == 2:  # fp16 row scale
        d_row = (torch.rand(n_rows, generator=gen) * 0.02 + 0.005).to(torch.float16)
        rows[:, :2] = d_row.view(torch.uint8).view(n_rows, 2)
    return rows


def q8_activations(x: torch.Tensor) -> torch.Tensor:
    """The kernels' activation quantization: blocks of 32, d = max|x| / 127, round to nearest even."""
    xb = x.view(x.shape[0], -1, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    # a true float32 division, as in C (torch's `127.0 / t` multiplies by a rounded reciprocal)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    return (torch.round(xb * inv) * (amax / 127.0)).view_as(x)


def check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    scale = x.norm(dim=1, keepdim=True) * w.norm(dim=1) / x.shape[1] ** 0.5 + 1e-30
    exact = q8_activations(x) @ w.T
    assert ((y - exact).abs() / scale).max().item() < 1e-4
    assert ((y - x @ w.T).abs() / scale).max().item() < 3e-2


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The reference products are many small matmuls: one torch thread is faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["avx512vnni", "avx2"])
def isa(request):
    """Run each test on every instruction set this CPU has (AVX-512 machines also test AVX2)."""
    have = cpu.isa()
    if cpu.ISA_NAMES.index(request.param) > cpu.ISA_NAMES.index(have):
        pytest.skip(f"CPU lacks {request.param}")
    cpu.set_isa(request.param)
    yield request.param
    cpu.set_isa(None)


def _isas_for(k: int) -> list[str]:
    """Every instruction set this CPU has; the AVX2 fallback of an AVX-512 CPU only on the shorter
    row lengths (the best instruction set the CPU has runs every row length)."""
    have = cpu.ISA_NAMES.index(cpu.isa())
    isas = [name for name in ("avx512vnni", "avx2") if cpu.ISA_NAMES.index(name) <= have]
    best = cpu.ISA_NAMES[have]
    return [name for name in isas if name == best or k in AVX2_K_SIZES]


@needs_ext
@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.parametrize("k", K_SIZES)
def test_random_rows(type_name, k):
    block_size = quant.get_codec(type_name).gtype.block_size
    if k % block_size:
        assert cpu.row_nbytes(type_name, k) == 0
        return
    gen = torch.Generator().manual_seed(k)
    packed = random_rows(type_name, max(N_SIZES), k, gen)
    dense = torch.from_numpy(quant.decode(type_name, packed, k))
    assert cpu.row_nbytes(type_name, k) == packed.shape[1]
    isas = _isas_for(k)
    assert isas
    try:
        for isa in isas:
            cpu.set_isa(isa)
            for n_rows in N_SIZES:
                for n in BATCHES:
                    x = torch.randn(n, k, generator=gen)
                    y = cpu.qmatmul(x, packed[:n_rows].contiguous(), type_name, threads=2)
                    check(y, x, dense[:n_rows])
    finally:
        cpu.set_isa(None)


@needs_ext
@pytest.mark.parametrize("type_name", ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q6_0", "iq4_nl"])
def test_odd_row_lengths(type_name, isa):
    """32-weight types on rows that are not a multiple of 64, 128 or 256 weights (tails everywhere)."""
    gen = torch.Generator().manual_seed(4)
    for k in (32, 96, 576, 1056, 3104):
        packed = random_rows(type_name, 9, k, gen)
        dense = torch.from_numpy(quant.decode(type_name, packed, k))
        for n in (1, 3, 11):
            x = torch.randn(n, k, generator=gen)
            check(cpu.qmatmul(x, packed, type_name, threads=2), x, dense)


def reference_rows(type_name: str) -> list[torch.Tensor]:
    """The reference library's encodings (8 rows x 1024 each) of Gaussian and real SmolLM2 weights."""
    # vector files use ggml's spelling: q4_K.npz (k-quants) but iq4_k.npz, iq4_ks.npz
    stem = type_name[:-2] + "_K" if type_name.startswith("q") and type_name.endswith("_k") else type_name
    z = np.load(QUANT_VECTORS / f"{stem}.npz")
    return [torch.from_numpy(z[key]) for key in z.files if key.startswith("q_")]


@needs_ext
@pytest.mark.parametrize("type_name", TYPES)
def test_reference_vectors(type_name, isa):
    """Products with the reference library's encodings, against x @ decode(W).T.

    The weights come from the package decoder, not the vectors' `y`: for iq6_k those come from the
    reference's polynomial CPU decoder, while the kernels (like ik_llama.cpp's GEMM) use the table."""
    gen = torch.Generator().manual_seed(1)
    for packed in reference_rows(type_name):
        dense = torch.from_numpy(quant.decode(type_name, packed, 1024))
        for n in (3, 12):  # the fused decode kernels, and the batched path
            x = torch.randn(n, 1024, generator=gen)
            check(cpu.qmatmul(x, packed, type_name), x, dense)


@needs_ext
@pytest.mark.parametrize("type_name", ["q4_0", "q6_k", "iq4_ks"])
def test_long_rows(type_name, isa):
    """Rows longer than the batched path's 16384-weight chunk (27B ffn_down: 17408), walked in parts;
    iq4_ks also carries its row scale in front of the blocks."""
    gen = torch.Generator().manual_seed(5)
    k = 17408
    packed = random_rows(type_name, 5, k, gen)
    dense = torch.from_numpy(quant.decode(type_name, packed, k))
    for n in (2, 9):
        x = torch.randn(n, k, generator=gen)
        check(cpu.qmatmul(x, packed, type_name, threads=2), x, dense)


@needs_ext
@pytest.mark.parametrize("type_name", TYPES)
def test_unpack_exact(type_name, isa):
    """Every decoded weight, read back through the generic (batch > 8) path with the identity as
    activations: one-hot rows quantize exactly, so each output is one weight, dwl * q + mw, and must
    equal the reference decoder's value up to float32 rounding. Reference encodings and random rows."""
    gen = torch.Generator().manual_seed(5)
    for packed in [*reference_rows(type_name), random_rows(type_name, 8, 1024, gen)]:
        dense = torch.from_numpy(quant.decode(type_name, packed, 1024))
        y = cpu.qmatmul(torch.eye(1024), packed, type_name).T
        row_scale = dense.abs().amax(1, keepdim=True) + 1e-30
        assert ((y - dense).abs() / row_scale).max().item() < 1e-6


@needs_ext
@pytest.mark.parametrize("type_name", ["q4_0", "q4_1", "q5_0", "q8_0", "iq4_nl", "iq4_ks", "iq4_k", "iq5_ks"])
def test_encoded_weights(type_name, isa):
    """Weights through the package's own encoders, one thread and several, with an `out` buffer."""
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(7, 512, generator=gen)
    packed = torch.from_numpy(quant.encode(type_name, w))
    dense = torch.from_numpy(quant.decode(type_name, packed, 512))
    x = torch.randn(8, 512, generator=gen)
    out = torch.empty(8, 7)
    for threads in (1, 2, 3):
        assert cpu.qmatmul(x, packed, type_name, out=out, threads=threads) is out
        check(out, x, dense)


@needs_ext
def test_zero_and_large_rows():
    """All-zero activation blocks, zero weight rows and a large prefill batch with several threads."""
    gen = torch.Generator().manual_seed(3)
    packed = random_rows("q4_k", 40, 512, gen)
    packed[3, :] = 0
    dense = torch.from_numpy(quant.decode("q4_K", packed, 512))
    x = torch.randn(70, 512, generator=gen)
    x[5] = 0
    x[6, :32] = 0
    y = cpu.qmatmul(x, packed, "q4_K", threads=2)
    check(y, x, dense)
    assert (y[5] == 0).all()


def test_fallback_decision(monkeypatch):
    """Without the extension nothing claims support, so dispatch keeps the reference path."""
    if cpu.available():
        assert cpu.supports("q4_K") and cpu.supports("Q8_0") and cpu.supports("iq4_ks")
        assert cpu.isa() in ("avx2", "avx512vnni")
        assert cpu.supports("q4_K", 512) and not cpu.supports("q4_K", 896) and cpu.supports("q4_0", 896)
    assert not cpu.supports("iq2_kt") and not cpu.supports("f16")
    monkeypatch.setattr(cpu, "_qgemm", None)
    assert not cpu.available()
    assert not cpu.supports("q4_0")
    assert cpu.isa() == "none"


@needs_ext
def test_bad_arguments():
    packed = torch.zeros(4, 18 * 16, dtype=torch.uint8)
    with pytest.raises(ValueError):
        cpu.qmatmul(torch.zeros(1, 256), packed, "q4_0")  # row is 512 weights, not 256
    with pytest.raises(TypeError):
        cpu.qmatmul(torch.zeros(1, 512, dtype=torch.float64), packed, "q4_0")
    with pytest.raises(ValueError):
        cpu.qmatmul(torch.zeros(1, 512), packed, "q4_0", out=torch.empty(2, 4))
    with pytest.raises(ValueError):
        cpu.qmatmul(torch.zeros(1, 512), torch.zeros(4, 2 * 18 * 16, dtype=torch.uint8)[:, ::2], "q4_0")
    x = torch.randn(512, 3).T  # a non-contiguous activation is copied
    assert torch.equal(cpu.qmatmul(x, packed, "q4_0"), cpu.qmatmul(x.contiguous(), packed, "q4_0"))


@needs_ext
@pytest.mark.parametrize("shape", [(1, 576), (7, 896), (3, 14, 64), (2, 5120)])
def test_rms_norm_matches_torch(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=gen) * 3
    w = torch.randn(shape[-1], generator=gen)
    want = torch.nn.functional.rms_norm(x.double(), (shape[-1],), w.double(), 1e-6).float()
    torch.testing.assert_close(cpu.rms_norm(x, w, 1e-6), want, atol=1e-5, rtol=1e-5)


PART_TYPES = [("q4_k", "q4_k", "q6_k"), ("q4_1", "q8_0"), ("iq4_ks", "q5_0", "q2_k", "iq4_ks")]


@needs_ext
@pytest.mark.parametrize("types", PART_TYPES)
@pytest.mark.parametrize("n", [1, 3, 9])
def test_parts_equal_separate_products(types, n):
    """qmatmul_parts (q/k/v, gate/up in one pass of the kernels) gives each part what its own qmatmul
    gives: the same kernels on the same quantized activations, bit for bit; parts the fused path does
    not take together (q2_k, batches above 8) run one after the other."""
    gen = torch.Generator().manual_seed(n)
    k = 512
    x = torch.randn(n, k, generator=gen)
    weights = [random_rows(t, 16 * (i + 1) + 5, k, gen) for i, t in enumerate(types)]
    outs = [torch.full((n, w.shape[0]), float("nan")) for w in weights]
    cpu.qmatmul_parts(x, [(w, t, o) for w, t, o in zip(weights, types, outs, strict=True)], threads=2)
    for w, t, o in zip(weights, types, outs, strict=True):
        assert torch.equal(o, cpu.qmatmul(x, w, t, threads=2))
    with pytest.raises(ValueError, match="1 to 4 parts"):
        cpu.qmatmul_parts(x, [(weights[0], types[0], outs[0])] * 5, threads=1)
