"""The C encoders (vramfit.quant.fast) against the torch encoders, which are the oracle.

For every type with a C encoder: on the shipped vectors (shared/testdata/quant/<type>.npz, every
input, with and without its imatrix) and on random rows including all-zero, constant, huge, tiny and
denormal ones, the C bytes equal the torch bytes exactly, with the AVX2 search and with the portable
one. Where the torch encoder reproduces ik_llama.cpp's reference bytes, the C bytes are also checked
against those reference bytes directly.

Oracle note: iqk_encode.importance takes torch.sqrt of float32 values; on builds where torch's
float32 sqrt is not correctly rounded (MKL/AVX-512) that differs from the reference's sqrtf in the
last bit. The C code uses sqrtf (and matches the reference bytes), so the oracle here is run with a
correctly rounded torch.sqrt (`_exact_sqrt`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vramfit.quant as quant
from tests.conftest import QUANT_VECTORS
from vramfit.quant import fast

# every type that must have a C encoder when the extension is built
C_TYPES = ["iq4_ks", "iq5_ks", "iq4_k", "iq5_k", "q8_0", "q4_0", "q5_0", "q6_0", "iq4_nl", "iq4_xs", "q6_K"]
# ... and those whose C bytes must equal ik_llama.cpp's reference vectors exactly
REFERENCE_EXACT = {"iq4_ks", "iq5_ks", "iq4_k", "iq5_k", "iq4_xs", "q8_0"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def _exact_sqrt(monkeypatch):
    real = torch.sqrt
    monkeypatch.setattr(torch, "sqrt", lambda t: real(t.double()).to(t.dtype))


def _stem(name: str) -> str:
    return name[:-1] + "K" if name.lower().endswith("_k") and name[0] == "q" else name


def _oracle(name, x, imat):
    return quant.encode(name, x, imat, backend="torch")


def _oracle_rows(name, x, imat):
    """Torch bytes per row, and the rows it can encode (some torch encoders raise on rows whose
    float32 sums overflow, e.g. huge rows for iq4_nl/iq4_xs without an imatrix)."""
    try:
        return _oracle(name, x, imat), list(range(x.shape[0]))
    except (IndexError, RuntimeError):
        ok, outs = [], []
        for r in range(x.shape[0]):
            try:
                outs.append(_oracle(name, x[r : r + 1], imat)[0])
                ok.append(r)
            except (IndexError, RuntimeError):
                pass
        return np.stack(outs), ok


def _both_c(name, x, imat):
    """C bytes with the AVX2 search and with the portable one (they must agree)."""
    outs = []
    for simd in (True, False):
        fast.set_simd(simd)
        try:
            outs.append(quant.encode(name, x, imat, backend="c"))
        finally:
            fast.set_simd(True)
    return outs


def _assert_same(name, want, got, what):
    assert got.shape == want.shape and got.dtype == np.uint8, (name, what)
    bad = [r for r in range(want.shape[0]) if not np.array_equal(want[r], got[r])]
    assert not bad, f"{name} {what}: rows {bad} differ"


def test_c_types_present():
    assert {t.lower() for t in C_TYPES} <= set(fast.types())
    for name in C_TYPES:
        assert fast.supports(name)


@pytest.mark.parametrize("name", C_TYPES)
def test_vectors_equal_torch(name, _exact_sqrt):
    v = np.load(QUANT_VECTORS / f"{_stem(name)}.npz")
    inputs = [k for k in v.files if k.startswith("x_")]
    assert inputs
    for key in inputs:
        for imat in (None, v["imatrix"]):
            want = _oracle(name, v[key], imat)
            for got in _both_c(name, v[key], imat):
                _assert_same(name, want, got, f"{key} imatrix={imat is not None}")


@pytest.mark.parametrize("name", sorted(REFERENCE_EXACT))
def test_vectors_equal_reference(name):
    v = np.load(QUANT_VECTORS / f"{_stem(name)}.npz")
    for key in [k for k in v.files if k.startswith("x_")]:
        stem = key[2:]
        for var, imat in (("plain", None), ("imat", v["imatrix"])):
            got = fast.encode(name, v[key], imat)
            _assert_same(name, v[f"q_{stem}_{var}"], got, f"{stem} {var} vs reference")


# types whose torch and C encoders also agree on rows of 1e15 (float32 sums that overflow to inf);
# for the others (whose fp16 scales overflow from ~1e6 on) the torch encoder's inf/NaN handling is
# not replicated and `auto` keeps inputs >= 1e6 on torch, so their huge row is 2e5 * N(0, 1)
HUGE_15 = {"iq4_ks", "iq5_ks", "iq4_k", "iq5_k", "q8_0"}


def _random_rows(n: int, seed: int, huge: float = 2e5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = [
        rng.standard_normal(n),
        rng.standard_t(3, n),
        np.zeros(n),
        np.full(n, 0.37),
        np.full(n, -2.5),
        rng.standard_normal(n) * huge,
        rng.standard_normal(n) * 1e-20,  # tiny (squares underflow to denormals / zero)
        rng.standard_normal(n) * 1e-40,  # denormal inputs
        np.where(rng.random(n) < 0.9, 0.0, rng.standard_normal(n)),  # sparse
        rng.integers(-3, 4, n).astype(np.float64),  # many exact ties
        rng.uniform(0, 1, n),  # one-signed
    ]
    x = np.stack(rows).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block inside a normal row
    x[1, 100] = 50.0  # an outlier
    return x


@pytest.mark.parametrize("name", C_TYPES)
def test_random_equal_torch(name, _exact_sqrt):
    n = 512
    for seed in range(2):
        x = _random_rows(n, seed, 1e15 if name in HUGE_15 else 2e5)
        rng = np.random.default_rng(seed + 100)
        imat = rng.uniform(0.0, 5.0, n).astype(np.float32)
        imat[:16] = 0.0  # a degenerate imatrix block (replaced by 1e-9 where the type does so)
        for im in (None, imat):
            want, rows = _oracle_rows(name, x, im)
            assert len(rows) >= x.shape[0] - 1  # at most the huge row is beyond the torch encoder
            for got in _both_c(name, x, im):
                _assert_same(name, want, got[rows], f"seed {seed} imatrix={im is not None}")


def test_backend_switch():
    x = _random_rows(256, 3)[:4]
    name = C_TYPES[0]
    auto = quant.encode(name, x)
    c = quant.encode(name, x, backend="c")
    assert np.array_equal(auto, c)
    with pytest.raises(ValueError):
        quant.encode(name, x, backend="cuda-magic")
    with pytest.raises(quant.UnsupportedTypeError):
        quant.encode("iq2_kl", x, backend="c")  # no C encoder for this type
    # threads do not change the bytes
    many = _random_rows(256, 4)
    assert np.array_equal(fast.encode(name, many, threads=1), fast.encode(name, many, threads=2))
