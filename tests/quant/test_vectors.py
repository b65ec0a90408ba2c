"""Codecs against the reference ggml test vectors in shared/testdata/quant (see its README.md).

decode(q) must reproduce the reference decoder's float32 output bit for bit, for every type that has a
decoder, every input and both the plain and imatrix-quantized variants.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vramfit.quant as quant
from tests.conftest import QUANT_VECTORS
from vramfit.quant.registry import Codec

N_PER_ROW = 1024


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The encoders run many small ops; extra intra-op threads only add contention here."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# IQ6_K's reference `y` comes from the CPU polynomial, not the integer table the format defines
# (docs/iqk-formats.md section 0 item 8), so it is not compared bit for bit here.
NOT_BIT_EXACT = {"iq6_k"}

REQUIRED_DECODERS = {
    "f16",
    "bf16",
    "q4_0",
    "q4_1",
    "q5_0",
    "q5_1",
    "q8_0",
    "q6_0",
    "iq4_nl",
    "q2_k",
    "q3_k",
    "q4_k",
    "q5_k",
    "q6_k",
    "iq4_xs",
}


def _has_decoder(name: str) -> bool:
    try:
        codec = quant.get_codec(name)
    except ValueError:
        return False
    return type(codec).decode is not Codec.decode


def _decodable_types() -> set[str]:
    return {name for name in quant.codec_names() if _has_decoder(name)}


@functools.cache
def _vectors(stem: str) -> dict[str, np.ndarray]:
    with np.load(QUANT_VECTORS / f"{stem}.npz") as z:
        return {k: z[k] for k in z.files}


def _vector_cases() -> list[tuple[str, str]]:
    """(npz stem, '<input>_<plain|imat>') for every vector file whose type has a decoder."""
    cases = []
    for path in sorted(QUANT_VECTORS.glob("*.npz")):
        stem = path.stem
        if stem.lower() in NOT_BIT_EXACT or not _has_decoder(stem):
            continue
        with np.load(path) as z:
            cases += [(stem, k[2:]) for k in sorted(z.files) if k.startswith("q_")]
    return cases


def _x_of(case: str) -> str:
    """'gauss_plain' -> 'x_gauss'."""
    return "x_" + case.rsplit("_", 1)[0]


def test_vectors_present():
    assert len(list(QUANT_VECTORS.glob("*.npz"))) >= len(REQUIRED_DECODERS)
    assert len(_vector_cases()) >= 14 * len(REQUIRED_DECODERS)


@pytest.mark.parametrize(("stem", "case"), _vector_cases())
def test_decode_bit_exact(stem, case):
    z = _vectors(stem)
    q, y = z[f"q_{case}"], z[f"y_{case}"]
    assert q.dtype == np.uint8 and q.shape == (8, int(z["row_size"]))
    out = quant.decode(stem, q, N_PER_ROW)
    assert out.dtype == np.float32 and out.shape == y.shape
    mismatch = out.view(np.uint32) != y.view(np.uint32)
    assert not mismatch.any(), (
        f"{stem} {case}: {mismatch.sum()} of {mismatch.size} values differ "
        f"(max |diff| {np.nanmax(np.abs(out.astype(np.float64) - y)):.3g})"
    )


def test_decoder_coverage():
    have = _decodable_types()
    missing = REQUIRED_DECODERS - have
    assert not missing, f"types without a decoder: {sorted(missing)}"


def test_vector_type_ids_match_table():
    for stem in {s for s, _ in _vector_cases()}:
        z = _vectors(stem)
        gtype = quant.get_codec(stem).gtype
        assert gtype.id == int(z["type_id"]), stem
        assert gtype.row_nbytes(N_PER_ROW) == int(z["row_size"]), stem


def test_decode_accepts_torch_and_multirow_shapes():
    z = _vectors("q4_K")
    q, y = z["q_gauss_plain"], z["y_gauss_plain"]
    # a flat buffer of several rows is split by row size; a torch tensor works like a numpy array
    out = quant.decode("Q4_K", torch.from_numpy(q.reshape(-1)), N_PER_ROW)
    assert np.array_equal(out.view(np.uint32), y.view(np.uint32))
    # the same rows decoded as 4 rows of 2048 weights equal the 8 rows of 1024
    out2 = quant.decode("q4_k", q, 2 * N_PER_ROW)
    assert out2.shape == (4, 2 * N_PER_ROW)
    assert np.array_equal(out2.reshape(8, N_PER_ROW).view(np.uint32), y.view(np.uint32))


def test_f32_round_trip():
    x = np.array(
        [
            [0.0, -0.0, 1.5, -2.25, 3.4028235e38, 1e-45, np.inf, -np.inf],
            [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0],
        ],
        dtype=np.float32,
    )
    q = quant.encode("f32", x)
    assert q.dtype == np.uint8 and q.shape == (2, 32)
    assert np.array_equal(q, x.view(np.uint8).reshape(2, 32))
    y = quant.decode("f32", q, 8)
    assert np.array_equal(y.view(np.uint32), x.view(np.uint32))


@pytest.mark.parametrize(("stem", "np_dtype"), [("f16", np.float16), ("bf16", None)])
def test_float_encode_reproduces_vectors(stem, np_dtype):
    z = _vectors(stem)
    cases = [k[2:] for k in z if k.startswith("q_")]
    assert cases
    for case in cases:
        x = z[_x_of(case)]
        q = quant.encode(stem, x)
        assert np.array_equal(q, z[f"q_{case}"]), f"{stem} {case}"
        if np_dtype is not None:  # f16 is numpy's IEEE half conversion (round to nearest even)
            assert np.array_equal(q, x.astype(np_dtype).view(np.uint8).reshape(x.shape[0], -1))


@pytest.mark.parametrize(("name", "block"), [("q8_0", 32), ("q4_0", 32), ("q4_K", 256), ("iq4_xs", 256)])
def test_encode_rejects_partial_block(name, block):
    x = np.zeros((2, block + block // 2), dtype=np.float32)
    with pytest.raises(
        ValueError, match=rf"row length {block + block // 2} is not a multiple of the block size {block}"
    ):
        quant.encode(name, x)


def test_encode_rejects_non_matrix():
    with pytest.raises(ValueError, match="2-D"):
        quant.encode("f16", np.zeros(64, dtype=np.float32))


# ---------------------------------------------------------------------------------------------
# encoders: reproduce the reference bytes for nearly every block, never a worse weighted error

# type -> (minimum fraction of blocks identical to the reference, allowed weighted-error ratio)
ENCODERS = {
    "q8_0": (0.99, 1.001),
    "q4_0": (0.99, 1.001),
    "iq4_nl": (0.99, 1.001),
    "q5_0": (0.98, 1.001),  # imatrix path: remaining differences are equal-error alternatives
    # imatrix path: ggml's make_qkx3_quants and a fixed-offset variant, the better block kept
    "q4_1": (0.95, 1.001),
    "q5_1": (0.95, 1.001),
    "q6_0": (0.98, 1.001),
    "iq4_xs": (0.99, 1.001),
    # K-quants: ggml's search, then a least-squares refit of the fp16 super-block scales where that
    # lowers the error, so their bytes differ by design (see test_kquant_reference_search below)
    "q2_K": (0.0, 1.001),
    "q3_K": (0.0, 1.001),
    "q4_K": (0.0, 1.001),
    "q5_K": (0.0, 1.001),
    "q6_K": (0.0, 1.001),
}


def _weighted_err(stem: str, q: np.ndarray, x: np.ndarray, w: np.ndarray) -> float:
    y = quant.decode(stem, q, x.shape[1]).astype(np.float64)
    return float((w * (y - x) ** 2).sum())


@pytest.mark.parametrize("stem", sorted(ENCODERS))
def test_encode_reproduces_reference(stem):
    min_match, max_ratio = ENCODERS[stem]
    z = _vectors(stem)
    block_bytes = quant.get_codec(stem).gtype.type_size
    same = total = 0
    for case in sorted(k[2:] for k in z if k.startswith("q_")):
        x = z[_x_of(case)]
        imat = z["imatrix"] if case.endswith("_imat") else None
        q = quant.encode(stem, x, imat)
        ref = z[f"q_{case}"]
        assert q.shape == ref.shape and q.dtype == np.uint8
        blocks_eq = (q.reshape(-1, block_bytes) == ref.reshape(-1, block_bytes)).all(axis=1)
        same += int(blocks_eq.sum())
        total += blocks_eq.size
        if imat is None and stem in ("q8_0", "q4_0", "q5_0", "q4_1", "q5_1"):
            # without an imatrix these are ggml's closed-form *_ref quantizers: every byte must match
            assert blocks_eq.all(), f"{stem} {case}: {(~blocks_eq).sum()} blocks differ"
        # error weights: the imatrix, or x^2 without one (the plain error weights of spec 4.0)
        w = imat if imat is not None else x.astype(np.float64) ** 2
        ours, theirs = _weighted_err(stem, q, x, w), _weighted_err(stem, ref, x, w)
        assert ours <= theirs * max_ratio + 1e-30, f"{stem} {case}: error {ours:.6g} vs ref {theirs:.6g}"
    assert same / total >= min_match, f"{stem}: only {same}/{total} blocks identical"


# Without the refit, the K-quant encoders emit ggml's own search result. Fraction of blocks equal to
# the reference, imatrix and plain variants: the plain Q5_K/Q2_K searches (make_qkx2_quants) differ
# from the reference build on many blocks (the reference's plain Q5_K error is up to 1.9x ours).
KQUANT_REFERENCE_MATCH = {"q6_K": (0.99, 0.99), "q3_K": (0.95, 0.99), "q4_K": (0.99, 0.95)}
KQUANT_REFERENCE_MATCH |= {"q5_K": (0.99, 0.35), "q2_K": (0.85, 0.6)}


@pytest.mark.parametrize("stem", sorted(KQUANT_REFERENCE_MATCH))
def test_kquant_reference_search(stem, monkeypatch):
    import vramfit.quant.kquants as kq

    monkeypatch.setattr(kq, "REFIT", False)
    z = _vectors(stem)
    block_bytes = quant.get_codec(stem).gtype.type_size
    for i, var in enumerate(("imat", "plain")):
        same = total = 0
        for case in sorted(k[2:] for k in z if k.startswith("q_") and k.endswith(var)):
            x = z[_x_of(case)]
            q = quant.encode(stem, x, z["imatrix"] if var == "imat" else None)
            eq = (q.reshape(-1, block_bytes) == z[f"q_{case}"].reshape(-1, block_bytes)).all(axis=1)
            same, total = same + int(eq.sum()), total + eq.size
        assert same / total >= KQUANT_REFERENCE_MATCH[stem][i], f"{stem} {var}: {same}/{total}"


def test_encode_decode_round_trip_is_close():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 256)).astype(np.float32)
    for stem in ENCODERS:
        y = quant.decode(stem, quant.encode(stem, x), 256)
        rel = np.linalg.norm(y - x) / np.linalg.norm(x)
        assert rel < {"q8_0": 0.01, "q2_K": 0.35}.get(stem, 0.2), (stem, rel)


# ---------------------------------------------------------------------------------------------
# property tests: degenerate and random rows encode to finite values within the format's bound

PROPERTY_TYPES = ["q4_1", "q5_1", "q6_0", "iq4_xs", "q2_K", "q3_K", "q4_K", "q5_K", "q6_K"]
# relative RMSE bound on gaussian rows (plain and imatrix)
GAUSS_BOUND = {"q4_1": 0.2, "q5_1": 0.1, "q6_0": 0.05, "iq4_xs": 0.15, "q2_K": 0.5, "q3_K": 0.3}
GAUSS_BOUND |= {"q4_K": 0.15, "q5_K": 0.08, "q6_K": 0.05}
PROP_ROW = 512


def _prop_row(kind: str, seed: int, scale: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "zeros":
        return np.zeros(PROP_ROW, np.float32)
    if kind == "constant":
        return np.full(PROP_ROW, scale, np.float32)
    if kind == "huge":
        x = (rng.standard_normal(PROP_ROW) * scale * 1e-3).astype(np.float32)
        x[rng.integers(PROP_ROW)] = scale * 1e3
        return x
    if kind == "denormal":
        return (rng.standard_normal(PROP_ROW) * 1e-40).astype(np.float32)
    return (rng.standard_normal(PROP_ROW) * scale).astype(np.float32)


@settings(max_examples=12)
@given(
    type_name=st.sampled_from(PROPERTY_TYPES),
    kind=st.sampled_from(["zeros", "constant", "huge", "denormal", "gauss"]),
    seed=st.integers(0, 2**16),
    scale=st.floats(0.5, 1e3),
    use_imat=st.booleans(),
)
def test_encode_properties(type_name, kind, seed, scale, use_imat):
    x = np.stack([_prop_row(kind, seed + r, scale * (1 + r)) for r in range(2)])
    rng = np.random.default_rng(seed)
    imat = rng.uniform(0.1, 10.0, PROP_ROW).astype(np.float32) if use_imat else None
    q = quant.encode(type_name, x, imat)
    assert q.shape == (2, quant.get_codec(type_name).gtype.row_nbytes(PROP_ROW))
    y = quant.decode(type_name, q, PROP_ROW).astype(np.float64)
    assert np.isfinite(y).all()
    err = np.sqrt(np.mean((y - x) ** 2, axis=-1))
    rms = np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=-1))
    if kind == "zeros":
        assert np.all(y == 0)
    elif kind == "gauss":
        assert np.all(err <= GAUSS_BOUND[type_name] * rms), err / rms
    elif kind == "constant":
        assert np.all(err <= 0.25 * rms), err / rms
    elif kind == "huge":
        k = np.abs(x).argmax(-1)[:, None]
        peak_x, peak_y = np.take_along_axis(x, k, -1), np.take_along_axis(y, k, -1)
        assert np.all(np.abs(peak_y - peak_x) <= 0.05 * np.abs(peak_x)), (peak_x, peak_y)
        assert np.all(err <= 0.5 * rms), err / rms
    else:  # denormals: finite and no larger than the input's scale
        assert np.all(err <= 2 * rms + 1e-38)
