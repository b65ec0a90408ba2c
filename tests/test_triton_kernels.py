"""Triton kernels (vramfit.kernels.triton) against the reference decoders + a float64 matmul.

With a CUDA device the kernels run compiled on the GPU, on larger shapes (27B-shaped matrices, prefill
batch 512); without one they run in Triton's CPU interpreter (TRITON_INTERPRET=1, set below before
triton is imported) on small shapes. Either way every type sees batch sizes 1..8 and a prefill batch,
odd row counts and row lengths from 256 to 4096.

The oracle is vramfit.quant's vectorised decode (bit-exact with ggml / ik_llama.cpp, tested against
their test vectors elsewhere), plus the worked IQ4_KS example of shared/docs/iqk-formats.md 3.1.
Errors are measured against |x| @ |W|.T, the scale that float rounding errors of a dot product can
reach: the float32 matrix-vector kernel (batch 1) must stay within 1e-5 of it, fp16 tiles (batch
2..8 and prefill) within 2e-3, bf16 tiles within 1e-2.
"""

from __future__ import annotations

import os
import struct

import torch

_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
if not _GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from vramfit.kernels import triton as vt  # noqa: E402
from vramfit.model.random_model import random_rows  # noqa: E402
from vramfit.quant import get_codec  # noqa: E402

DEVICE = torch.device("cuda" if _GPU else "cpu")
TYPES = list(vt.type_names())
PRIORITY = ["iq4_ks", "q4_k", "q6_k", "q8_0", "q5_0", "q4_1", "iq3_k", "iq5_ks"]
LEGACY = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "iq4_nl", "q6_0"]

if _GPU:
    # (N, K) per batch size 1..8: odd row counts, K from 256 to 4096
    DECODE_SHAPES = [(4095, 4096), (1, 256), (3001, 2560), (127, 512), (5121, 1024), (33, 3072), (769, 768),
                     (2049, 4096)]  # fmt: skip
    PREFILL = [(512, 1537, 4096), (512, 4095, 1024), (100, 33, 256)]  # (M, N, K)
else:
    DECODE_SHAPES = [(7, 256), (13, 512), (3, 1024), (5, 256), (9, 768), (1, 4096), (11, 256), (6, 1280)]
    PREFILL = [(19, 21, 512), (9, 3, 256)]


def _rel_err(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> float:
    """max |y - x @ w.T| / (|x| @ |w|.T), in float64."""
    xd, wd = x.double(), w.double()
    ref = xd @ wd.T
    scale = xd.abs() @ wd.abs().T
    assert torch.isfinite(y).all()
    return float(((y.double() - ref).abs() / scale.clamp_min(1e-30)).max())


def _tol(m: int) -> float:
    return 1e-5 if m == 1 else 2e-3


def _case(type_name: str, n: int, k: int, seed: int):
    packed = torch.from_numpy(random_rows(type_name, n, k, seed)).to(DEVICE)
    w = get_codec(type_name).decode(packed, k)  # reference decode, float32 (n, k)
    return packed, w


def test_interpreter_or_gpu_selected():
    assert vt.interpreted() != _GPU
    assert vt.available() == _GPU


@pytest.mark.parametrize("type_name", TYPES)
def test_decode_batches_1_to_8(type_name):
    g = torch.Generator().manual_seed(1)
    for m in range(1, vt.DECODE_MAX_BATCH + 1):
        n, k = DECODE_SHAPES[(m - 1) % len(DECODE_SHAPES)]
        packed, w = _case(type_name, n, k, seed=m)
        x = torch.randn(m, k, generator=g).to(DEVICE)
        y = vt.qmatmul(x, packed, type_name)
        assert y.shape == (m, n) and y.dtype == torch.float32
        err = _rel_err(y, x, w)
        assert err < _tol(m), f"{type_name} m={m} N={n} K={k}: relative error {err:.2e}"
        if m == 1:  # the matrix-vector kernel without its two-chunk unrolling
            err = _rel_err(vt.qmatmul(x, packed, type_name, {"unroll": 1}), x, w)
            assert err < _tol(m), f"{type_name} m=1 unroll=1 N={n} K={k}: relative error {err:.2e}"


@pytest.mark.parametrize("type_name", TYPES)
def test_prefill(type_name):
    g = torch.Generator().manual_seed(2)
    for i, (m, n, k) in enumerate(PREFILL):
        packed, w = _case(type_name, n, k, seed=100 + i)
        x = torch.randn(m, k, generator=g).to(DEVICE)
        y = vt.qmatmul(x, packed, type_name)
        assert y.shape == (m, n)
        err = _rel_err(y, x, w)
        assert err < 2e-3, f"{type_name} prefill m={m} N={n} K={k}: relative error {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("type_name", PRIORITY)
def test_half_activations(type_name, dtype):
    n, k = (257, 2048) if _GPU else (5, 512)
    packed, w = _case(type_name, n, k, seed=7)
    g = torch.Generator().manual_seed(3)
    for m in (1, 4, 24):
        x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
        y = vt.qmatmul(x, packed, type_name)
        assert y.dtype == dtype and y.shape == (m, n)
        # the output is rounded to x's dtype (2**-8 for bf16, 2**-11 for fp16) on top of the product
        tol = (1e-2 if dtype == torch.bfloat16 else 2e-3) if m > 1 else 1e-5
        tol += 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
        err = _rel_err(y.float(), x.float(), w)
        assert err < tol, f"{type_name} {dtype} m={m}: relative error {err:.2e}"


@pytest.mark.parametrize("type_name", LEGACY)
def test_legacy_rows_not_a_multiple_of_256(type_name):
    # 32-weight block types only need K % 32 == 0; the last 256-chunk is partly masked
    g = torch.Generator().manual_seed(4)
    for m, n, k in [(1, 5, 288), (3, 7, 800), (12, 9, 544)]:
        packed, w = _case(type_name, n, k, seed=k)
        x = torch.randn(m, k, generator=g).to(DEVICE)
        err = _rel_err(vt.qmatmul(x, packed, type_name), x, w)
        assert err < _tol(m), f"{type_name} m={m} K={k}: {err:.2e}"


def test_iq4_ks_worked_example():
    """shared/docs/iqk-formats.md 3.1: a hand-decoded IQ4_KS row; one-hot activations pick weights."""
    row = bytearray(4 + 136)
    row[0:4] = bytes([0x6F, 0x12, 0x03, 0x3A])  # float32 0.0005
    assert abs(struct.unpack("<f", bytes(row[0:4]))[0] - 0.0005) < 1e-9
    row[4:12] = bytes([0x9B, 0x80, 0x01, 0xFE, 0x80, 0x80, 0x80, 0x80])
    row[12 + 0], row[12 + 1], row[12 + 15] = 0x3A, 0xF0, 0x78
    packed = torch.tensor(list(row), dtype=torch.uint8).reshape(1, -1).to(DEVICE)
    expected = {0: 0.3915, 16: -0.8235, 1: -1.6605, 17: 1.5795, 15: 0.0675, 31: -0.081, 64: 7.8105,
                96: -8.0645, 32: -0.0635, 63: -0.0635}  # fmt: skip
    idx = list(expected)
    x = torch.zeros(len(idx), 256)
    x[torch.arange(len(idx)), torch.tensor(idx)] = 1.0
    # one row at a time: the float32 matrix-vector kernel reproduces the decoded weights exactly
    got = np.array(
        [float(vt.qmatmul(x[i : i + 1].to(DEVICE), packed, "iq4_ks")[0, 0]) for i in range(len(idx))]
    )
    # and a batch of 8 through the fp16 tile path, to fp16 accuracy
    y8 = vt.qmatmul(x[:8].to(DEVICE), packed, "iq4_ks")[:, 0].cpu().numpy()
    np.testing.assert_allclose(y8, [expected[i] for i in idx[:8]], rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(got, [expected[i] for i in idx], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("type_name", PRIORITY)
def test_27b_row_lengths(type_name):
    """The 27B matrices' row lengths (5120, 17408); full-size on the GPU, a few rows in the interpreter."""
    g = torch.Generator().manual_seed(5)
    shapes = [(17408, 5120), (5120, 17408)] if _GPU else [(3, 5120), (2, 17408)]
    batches = (1, 8, 512) if _GPU else (1,)
    for n, k in shapes:
        packed, w = _case(type_name, n, k, seed=n)
        for m in batches:
            x = torch.randn(m, k, generator=g).to(DEVICE)
            err = _rel_err(vt.qmatmul(x, packed, type_name), x, w)
            assert err < _tol(m), f"{type_name} m={m} N={n} K={k}: {err:.2e}"


def test_errors_and_support():
    assert vt.supports("IQ4_KS") and vt.supports("q4_K") and not vt.supports("iq2_xxs")
    packed = torch.zeros((3, 140), dtype=torch.uint8, device=DEVICE)
    x = torch.zeros((1, 256), device=DEVICE)
    with pytest.raises(ValueError, match="no Triton kernel"):
        vt.qmatmul(x, packed, "iq2_xxs")
    with pytest.raises(ValueError, match="expected 276"):
        vt.qmatmul(torch.zeros((1, 512), device=DEVICE), packed, "iq4_ks")
    y = vt.qmatmul(x, packed, "iq4_ks")  # all-zero rows (d_row = 0) decode to zeros
    assert y.shape == (1, 3) and float(y.abs().max()) == 0.0
