"""IQK codecs (ik_llama.cpp) against the reference vectors in shared/testdata/quant (see its README.md).

- decode(q) reproduces the reference decoder's float32 output bit for bit for every IQK type, input
  and plain/imat variant. IQ6_K's reference `y` uses the CPU polynomial; there a small independent
  numpy unpacker is first validated against `y` with that polynomial, then gives the integer-table
  expectation (docs/iqk-formats.md 0.8, 3.6).
- Encoders: importance-weighted squared error of decode(encode(x)) is within 0.1% of the reference
  bytes' error on every vector. Error weights: the imatrix for `imat` variants, x^2 for `plain`
  (the spec's plain weights, section 4.0). Block bytes match the reference for >= 97-99% of
  blocks for every type whose reference algorithm is reproduced (all but IQ4_KSS).
- Property tests: encode -> decode stays finite and close on degenerate and random rows.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vramfit.quant as quant
from tests.conftest import QUANT_VECTORS
from vramfit.gguf.types import type_by_name

N = 1024
IQK_TYPES = [
    "iq4_ks",
    "iq4_kss",
    "iq5_ks",
    "iq2_ks",
    "iq3_ks",
    "iq2_kl",
    "iq2_k",
    "iq3_k",
    "iq4_k",
    "iq5_k",
    "iq6_k",
]
# types with an encoder -> loose round-trip bound on gaussian rows (relative RMSE)
RMSE_BOUND = {
    "iq4_ks": 0.15,
    "iq4_k": 0.15,
    "iq5_ks": 0.08,
    "iq4_kss": 0.15,
    "iq5_k": 0.08,
    "iq6_k": 0.05,
    "iq3_k": 0.3,
    "iq2_k": 0.45,
    "iq3_ks": 0.3,
    "iq2_kl": 0.4,
    "iq2_ks": 0.5,
}
ENCODERS = list(RMSE_BOUND)
# 2-3 bit types whose grids have no zero value
NO_ZERO_GRID = {"iq2_k", "iq3_k", "iq2_ks", "iq3_ks", "iq2_kl"}
# type -> minimal fraction of blocks whose bytes equal the reference encoder's (reference algorithm
# reproduced; the spec only sketches IQ4_KSS's pruning, so for it only the error bound is checked).
# IQ2_KS follows the reference's default (AVX2) search, which produced the vectors.
BYTE_MATCH = {
    "iq4_ks": 0.99,
    "iq4_k": 0.99,
    "iq5_ks": 0.99,
    "iq5_k": 0.99,
    "iq6_k": 0.97,
    "iq3_ks": 0.99,
    "iq2_kl": 0.99,
    "iq2_ks": 0.99,
    "iq3_k": 0.99,
    "iq2_k": 0.99,
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The encoders run many small ops; extra intra-op threads only add contention here."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@functools.cache
def vectors(type_name: str) -> dict[str, np.ndarray]:
    return dict(np.load(QUANT_VECTORS / f"{type_name}.npz"))


def cases(type_name: str) -> list[tuple[str, str]]:
    names = [k[2:] for k in vectors(type_name) if k.startswith("x_")]
    return [(name, var) for name in names for var in ("plain", "imat")]


ALL_CASES = [(t, name, var) for t in IQK_TYPES for name, var in cases(t)]
ENCODE_CASES = [(t, name, var) for t in ENCODERS for name, var in cases(t)]


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.int32)


def test_type_ids_and_row_sizes_match_vectors():
    for t in IQK_TYPES:
        v = vectors(t)
        assert type_by_name(t).id == int(v["type_id"])
        assert type_by_name(t).row_nbytes(N) == int(v["row_size"])


@pytest.mark.parametrize("type_name,name,var", [c for c in ALL_CASES if c[0] != "iq6_k"])
def test_decode_bit_exact(type_name, name, var):
    v = vectors(type_name)
    y = quant.decode(type_name, v[f"q_{name}_{var}"], N)
    np.testing.assert_array_equal(_bits(y), _bits(v[f"y_{name}_{var}"]))


def test_iq4_ks_worked_example():
    """Spec 3.1 worked example: expected values are the spec's."""
    row = np.zeros(4 + 136, np.uint8)
    row[0:4] = [0x6F, 0x12, 0x03, 0x3A]
    row[4:12] = [0x9B, 0x80, 0x01, 0xFE, 0x80, 0x80, 0x80, 0x80]
    row[12 + 0], row[12 + 1], row[12 + 15] = 0x3A, 0xF0, 0x78
    y = quant.decode("iq4_ks", row[None], 256)[0]
    f = np.float32
    expected = {0: 0.0005 * 27 * 29, 16: -0.82350004, 1: -1.6605, 17: 1.5795, 15: 0.0675, 31: -0.081}
    for i, val in expected.items():
        assert y[i] == pytest.approx(val, rel=1e-6)
    assert np.all(y[32:64] == y[32]) and y[32] == pytest.approx(-0.0635, rel=1e-6)
    assert y[64] == pytest.approx(7.8105, rel=1e-6)
    assert y[96] == pytest.approx(-8.0645, rel=1e-6)
    assert f(y[16]) == f(-0.82350004)


# --- IQ6_K: independent unpacker, validated against the reference polynomial decoder ------------


def _iq6k_unpack(q: np.ndarray):
    """Plain numpy transcription of spec 3.6 -> dl (rows, nb, 16), idx (rows, nb, 16, 16), shift."""
    b = q.reshape(q.shape[0], -1, 212)
    d = b[..., 0:2].copy().view(np.float16).astype(np.float32)[..., 0]
    extra = b[..., 2].astype(np.int32) | (b[..., 3].astype(np.int32) << 8)
    scales = b[..., 4:20].copy().view(np.int8).astype(np.float32)
    qs, qh = b[..., 20:148].astype(np.int32), b[..., 148:212].astype(np.int32)
    idx = np.zeros(b.shape[:2] + (256,), np.int32)
    for c in range(4):
        sh, base = 4 * (c % 2), 32 * (c // 2)
        for j in range(16):
            lo0, lo1 = qs[..., 32 * c + j], qs[..., 32 * c + 16 + j]
            h0, h1 = qh[..., base + j], qh[..., base + 16 + j]
            idx[..., 64 * c + j] = (lo0 & 15) | (((h0 >> sh) & 3) << 4)
            idx[..., 64 * c + 16 + j] = (lo1 & 15) | (((h1 >> sh) & 3) << 4)
            idx[..., 64 * c + 32 + j] = (lo0 >> 4) | (((h0 >> (sh + 2)) & 3) << 4)
            idx[..., 64 * c + 48 + j] = (lo1 >> 4) | (((h1 >> (sh + 2)) & 3) << 4)
    shift = (extra[..., None] >> np.arange(16)) & 1
    return d[..., None] * scales, idx.reshape(*b.shape[:2], 16, 16), shift


def _fma32(a, b, c):
    return (np.float64(a) * b + c).astype(np.float32)


IQ6NL_BASE = np.array(
    [
        -127,
        -121,
        -115,
        -109,
        -104,
        -98,
        -93,
        -88,
        -84,
        -79,
        -74,
        -70,
        -66,
        -62,
        -58,
        -54,
        -51,
        -47,
        -44,
        -40,
        -37,
        -34,
        -31,
        -28,
        -25,
        -22,
        -19,
        -16,
        -13,
        -11,
        -8,
        -5,
        -2,
        0,
        3,
        6,
        9,
        12,
        14,
        17,
        20,
        23,
        27,
        30,
        33,
        36,
        40,
        44,
        47,
        51,
        55,
        59,
        63,
        68,
        72,
        77,
        82,
        87,
        92,
        98,
        103,
        109,
        115,
        121,
    ],
    np.float32,
)  # fmt: skip  (spec Appendix A)


@pytest.mark.parametrize("name,var", cases("iq6_k"))
def test_iq6_k_decode_table_exact(name, var):
    v = vectors("iq6_k")
    dl, idx, shift = _iq6k_unpack(v[f"q_{name}_{var}"])
    shiftf = shift[..., None].astype(np.float32)
    # 1) the unpacker reproduces the reference CPU decoder (cubic in Horner form with FMAs) bit for bit
    qf = idx.astype(np.float32)
    poly = _fma32(
        qf, _fma32(qf, _fma32(qf, np.float32(0.0011972), np.float32(-0.11218)), np.float32(6.2568)), -127
    )
    y_poly = (dl[..., None] * (poly + shiftf)).reshape(8, -1)
    np.testing.assert_array_equal(_bits(y_poly), _bits(v[f"y_{name}_{var}"]))
    # 2) our decoder equals the same unpacking with the integer table
    y_table = (dl[..., None] * (IQ6NL_BASE[idx] + shiftf)).reshape(8, -1)
    np.testing.assert_array_equal(_bits(quant.decode("iq6_k", v[f"q_{name}_{var}"], N)), _bits(y_table))


# --- encoders ----------------------------------------------------------------------------------


def _weighted_error(type_name: str, q: np.ndarray, x: np.ndarray, w: np.ndarray) -> float:
    y = quant.decode(type_name, q, N).astype(np.float64)
    return float(((y - x) ** 2 * w).sum())


@functools.cache
def _encoded(type_name: str, name: str, var: str) -> np.ndarray:
    v = vectors(type_name)
    imat = v["imatrix"] if var == "imat" else None
    return quant.encode(type_name, v[f"x_{name}"], imat)


@pytest.mark.parametrize("type_name,name,var", ENCODE_CASES)
def test_encode_error_no_worse_than_reference(type_name, name, var):
    v = vectors(type_name)
    x = v[f"x_{name}"].astype(np.float64)
    w = np.broadcast_to(v["imatrix"], x.shape) if var == "imat" else x * x
    ours = _weighted_error(type_name, _encoded(type_name, name, var), x, w)
    ref = _weighted_error(type_name, v[f"q_{name}_{var}"], x, w)
    assert ours <= ref * 1.001, (ours, ref)


@pytest.mark.parametrize("type_name", list(BYTE_MATCH))
def test_encode_block_bytes_match_reference(type_name):
    gt = type_by_name(type_name)
    same = total = 0
    for name, var in cases(type_name):
        ours = _encoded(type_name, name, var)[:, gt.row_meta :].reshape(-1, gt.type_size)
        ref = vectors(type_name)[f"q_{name}_{var}"][:, gt.row_meta :].reshape(-1, gt.type_size)
        assert ours.shape == ref.shape
        same += int((ours == ref).all(-1).sum())
        total += ref.shape[0]
    assert same / total >= BYTE_MATCH[type_name], same / total


# --- property tests ----------------------------------------------------------------------------

ROW = 256


def _row(kind: str, seed: int, scale: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "zeros":
        return np.zeros(ROW, np.float32)
    if kind == "constant":
        return np.full(ROW, scale, np.float32)
    if kind == "huge":
        x = (rng.standard_normal(ROW) * scale * 1e-3).astype(np.float32)
        x[rng.integers(ROW)] = scale * 1e3
        return x
    if kind == "denormal":
        return (rng.standard_normal(ROW) * 1e-40).astype(np.float32)
    return (rng.standard_normal(ROW) * scale).astype(np.float32)


def _check_roundtrip(type_name: str, x: np.ndarray, imat: np.ndarray | None, kind: str):
    q = quant.encode(type_name, x, imat)
    assert q.shape == (x.shape[0], type_by_name(type_name).row_nbytes(ROW))
    y = quant.decode(type_name, q, ROW)
    assert np.isfinite(y).all()
    err = np.sqrt(np.mean((y.astype(np.float64) - x) ** 2, axis=-1))
    rms = np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=-1))
    if kind == "zeros":
        assert np.all(y == 0)
    elif kind == "gauss":
        assert np.all(err <= RMSE_BOUND[type_name] * rms)
    elif kind == "constant":
        # IQ2_KL's pair codebook has few equal-value pairs and the reference scale search never
        # aims a block at them: constant blocks land on unequal neighbouring pairs
        assert np.all(err <= (0.3 if type_name == "iq2_kl" else 0.25) * rms)
    elif kind == "huge":
        # the outlier itself survives (IQ4_KSS's 1.01 scale fudge included); its block-mates may
        # carry up to ~0.1 of it where a parity fix must move one of them (IQ4_KSS)
        k = np.abs(x).argmax(-1)[:, None]
        peak_x, peak_y = np.take_along_axis(x, k, -1), np.take_along_axis(y, k, -1)
        # with an imatrix, sigma2 = 2 mean(x^2) gives each block-mate ~9% of the peak's weight; on
        # the zero-less 2-3 bit grids the best fit then gives up up to ~10% of the peak
        peak_tol = 0.12 if type_name in NO_ZERO_GRID else 0.03
        assert np.all(np.abs(peak_y - peak_x) <= peak_tol * np.abs(peak_x))
        # 2-3 bit grids have no zero: the huge value's zero-weight block-mates land anywhere on it
        assert np.all(err <= (1.5 if type_name in NO_ZERO_GRID else 0.5) * rms)
    else:  # denormals: finite and no larger than the input's scale
        assert np.all(err <= 2 * rms + 1e-38)


# Types whose scales are stored as fp16 (no float32 row scale) only represent rows whose block
# scales lie in fp16's normal range; their property rows are drawn at magnitudes 0.5 .. 1e3.
FP16_SCALED = {t for t in ENCODERS if type_by_name(t).row_meta != 4}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    type_name=st.sampled_from(ENCODERS),
    kind=st.sampled_from(["zeros", "constant", "huge", "denormal", "gauss"]),
    seed=st.integers(0, 2**31 - 1),
    unit=st.floats(0.0, 1.0),
    with_imat=st.booleans(),
)
def test_encode_roundtrip_properties(type_name, kind, seed, unit, with_imat):
    lo, hi = (0.5, 1e3) if type_name in FP16_SCALED else (1e-6, 1e3)
    scale = float(lo * (hi / lo) ** unit)  # log-uniform
    x = np.stack([_row(kind, seed + i, scale) for i in range(2)])
    imat = np.random.default_rng(seed).uniform(0.1, 10, ROW).astype(np.float32) if with_imat else None
    _check_roundtrip(type_name, x, imat, kind)
