"""GGUF container: reader and writer against gguf-py (the independent oracle for mainline files),
round trips, synthetic files for every metadata value type, IQK row-metadata tensors, bad input,
and the ggml type table.

Expected numbers for IQK types are typed in from shared/docs/iqk-formats.md table 1.1 and 1.4,
never taken from vramfit.gguf.types.
"""

from __future__ import annotations

import filecmp
import struct
import types

import gguf
import numpy as np
import pytest
from gguf import gguf_reader
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.constants import GGUFValueType as VT

from vramfit.gguf import GGUFError, GGUFFile, GGUFWriter, StringArray, UnknownTypeError, copy_gguf
from vramfit.gguf.types import type_by_id, type_by_name

MODELS = ["smollm2-135m", "qwen2.5-coder-0.5b"]


def _bytes_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return np.array_equal(np.asarray(a).reshape(-1).view(np.uint8), np.asarray(b).reshape(-1).view(np.uint8))


# ------------------------------------------------------------------------------------------------
# 1. Real files against gguf-py
# ------------------------------------------------------------------------------------------------


def _gguf_py_reader(path) -> gguf.GGUFReader:
    """gguf-py's reader, unchanged except that it slices a plain ndarray view of its np.memmap: the
    same read-only mapping, but 5x faster on the 150k-string vocabularies (memmap slices are slow)."""
    fast_np = types.ModuleType("numpy_plain_memmap")
    fast_np.__dict__.update(np.__dict__)
    fast_np.memmap = lambda path, mode="r": np.memmap(path, mode=mode).view(np.ndarray)
    saved, gguf_reader.np = gguf_reader.np, fast_np
    try:
        return gguf.GGUFReader(path)
    finally:
        gguf_reader.np = saved


@pytest.fixture(scope="module")
def opened(model_path):
    """name -> (path, our GGUFFile, gguf-py's GGUFReader), each file parsed once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            path = model_path(name)
            cache[name] = (path, GGUFFile(path), _gguf_py_reader(path))
        return cache[name]

    yield get
    for _, ours, _ in cache.values():
        ours.close()


@pytest.fixture(params=MODELS)
def real(request, opened):
    return opened(request.param)


def test_real_metadata_matches_gguf_py(real):
    _, ours, theirs = real
    fields = {k: f for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.metadata) == list(fields)  # same keys, same order
    assert ours.version == theirs.fields["GGUF.version"].contents() == 3
    for key, field in fields.items():
        assert ours.metadata[key] == field.contents(), key
        vtype, sub = ours.metadata_types[key]
        assert [vtype] + ([sub] if sub is not None else []) == field.types, key
    # the arrays really are arrays (the tokenizer vocabulary) and were compared element by element
    assert isinstance(ours.metadata["tokenizer.ggml.tokens"], StringArray)
    assert len(ours.metadata["tokenizer.ggml.tokens"]) > 40000
    assert ours.metadata_types["tokenizer.ggml.tokens"] == (VT.ARRAY, VT.STRING)


def test_real_tensors_match_gguf_py(real):
    _, ours, theirs = real
    assert list(ours.tensors) == [t.name for t in theirs.tensors]
    assert ours.data_offset == theirs.data_offset
    for rt in theirs.tensors:
        t = ours.tensors[rt.name]
        assert t.shape == tuple(reversed(rt.shape.tolist())), rt.name
        assert t.type.id == int(rt.tensor_type), rt.name
        assert ours.data_offset + t.offset == rt.data_offset, rt.name
        assert t.nbytes == rt.n_bytes, rt.name  # mainline types only here: gguf-py's sizes are right
        view = ours.tensor_bytes(rt.name)
        assert view.dtype == np.uint8 and view.shape[0] == t.n_rows
        assert _bytes_equal(view, rt.data), rt.name


# ------------------------------------------------------------------------------------------------
# 2. Round trip of the real files
# ------------------------------------------------------------------------------------------------


def test_real_round_trip(real, tmp_path):
    path, ours, _ = real
    out = tmp_path / "copy.gguf"
    copy_gguf(ours, out)
    with GGUFFile(out) as back:
        assert back.metadata == ours.metadata
        assert back.metadata_types == ours.metadata_types
        assert list(back.metadata) == list(ours.metadata)
        assert back.alignment == ours.alignment
        assert [(t.name, t.shape, t.type, t.offset, t.nbytes) for t in back.tensors.values()] == [
            (t.name, t.shape, t.type, t.offset, t.nbytes) for t in ours.tensors.values()
        ]
        for name in ours.tensors:
            assert _bytes_equal(back.tensor_bytes(name), ours.tensor_bytes(name)), name
    # Both shipped files use the standard layout (header, infos, pad to alignment, each tensor padded
    # to alignment, zero padding, nothing trailing), which is what our writer produces, so the copy is
    # byte-identical to the original.
    assert filecmp.cmp(path, out, shallow=False)


# ------------------------------------------------------------------------------------------------
# 3. Synthetic files: every metadata value type, version 2, alignment
# ------------------------------------------------------------------------------------------------

# key -> (value type, array element type, value written, value expected back)
SCALARS = {
    "t.u8": (VT.UINT8, None, 255, 255),
    "t.i8": (VT.INT8, None, -128, -128),
    "t.u16": (VT.UINT16, None, 65535, 65535),
    "t.i16": (VT.INT16, None, -32768, -32768),
    "t.u32": (VT.UINT32, None, 2**32 - 1, 2**32 - 1),
    "t.i32": (VT.INT32, None, -(2**31), -(2**31)),
    "t.u64": (VT.UINT64, None, 2**64 - 1, 2**64 - 1),
    "t.i64": (VT.INT64, None, -(2**63), -(2**63)),
    "t.f32": (VT.FLOAT32, None, 0.1, 0.10000000149011612),  # float32(0.1) exactly
    "t.f32b": (VT.FLOAT32, None, -2.5, -2.5),
    "t.f64": (VT.FLOAT64, None, 0.1, 0.1),
    "t.true": (VT.BOOL, None, True, True),
    "t.false": (VT.BOOL, None, False, False),
    "t.str": (VT.STRING, None, "héllo ✓ \u00ff", "héllo ✓ \u00ff"),
    "t.empty_str": (VT.STRING, None, "", ""),
}
ARRAYS = {
    "a.u8": (VT.ARRAY, VT.UINT8, [0, 1, 255], [0, 1, 255]),
    "a.i8": (VT.ARRAY, VT.INT8, [-128, 0, 127], [-128, 0, 127]),
    "a.u16": (VT.ARRAY, VT.UINT16, [0, 65535], [0, 65535]),
    "a.i16": (VT.ARRAY, VT.INT16, [-32768, 32767], [-32768, 32767]),
    "a.u32": (VT.ARRAY, VT.UINT32, [0, 2**32 - 1, 7], [0, 2**32 - 1, 7]),
    "a.i32": (VT.ARRAY, VT.INT32, [-(2**31), 2**31 - 1], [-(2**31), 2**31 - 1]),
    "a.u64": (VT.ARRAY, VT.UINT64, [2**64 - 1, 3], [2**64 - 1, 3]),
    "a.i64": (VT.ARRAY, VT.INT64, [-(2**63), 2**63 - 1], [-(2**63), 2**63 - 1]),
    "a.f32": (VT.ARRAY, VT.FLOAT32, [0.1, -1.5], [0.10000000149011612, -1.5]),
    "a.f64": (VT.ARRAY, VT.FLOAT64, [0.1, -1.5, 1e300], [0.1, -1.5, 1e300]),
    "a.bool": (VT.ARRAY, VT.BOOL, [True, False, True], [True, False, True]),
    "a.str": (VT.ARRAY, VT.STRING, ["a", "", "ünï ✓"], ["a", "", "ünï ✓"]),
    "a.empty": (VT.ARRAY, VT.UINT32, [], []),
    # numpy arrays: the element type comes from the dtype
    "a.np_u16": (None, None, np.array([1, 65535], dtype=np.uint16), [1, 65535]),
    "a.np_f64": (None, None, np.array([0.25, 1e-300]), [0.25, 1e-300]),
}
# nested arrays: our reader keeps the nesting; gguf-py's reader flattens them (its FIXME).
# metadata_types records only (ARRAY, ARRAY), and the writer guesses inner element types (int ->
# INT32, str -> STRING), so only such nested arrays copy byte for byte; llama.cpp rejects nested
# arrays altogether, so no real file has them.
NESTED = {
    "n.int": ([[1, 2, 3], [4], [5, 6]], [1, 2, 3, 4, 5, 6], VT.INT32),
    "n.str": ([["x", "yy"], ["z"]], ["x", "yy", "z"], VT.STRING),
}
GUESSED_TYPES = {"a.np_u16": (VT.ARRAY, VT.UINT16), "a.np_f64": (VT.ARRAY, VT.FLOAT64)}


def _write_all_types(path, alignment=32):
    w = GGUFWriter(path, alignment=alignment)
    for key, (vt, sub, value, _) in (SCALARS | ARRAYS).items():
        w.add(key, value, vt, sub)
    for key, (value, _, _) in NESTED.items():
        w.add(key, value, VT.ARRAY, VT.ARRAY)
    w.add_tensor("f32", (2, 3), type_by_name("F32"), np.arange(6, dtype=np.float32))
    w.write()


def test_every_metadata_type_both_readers(tmp_path):
    p = tmp_path / "types.gguf"
    _write_all_types(p)
    with GGUFFile(p) as f:
        for key, (vt, sub, _, expected) in (SCALARS | ARRAYS).items():
            assert f.metadata[key] == expected, key
            assert f.metadata_types[key] == GUESSED_TYPES.get(key, (vt, sub)), key
        for key, (value, _, _) in NESTED.items():
            assert f.metadata[key] == value
            assert f.metadata_types[key] == (VT.ARRAY, VT.ARRAY)
        assert f.tensor_bytes("f32").view(np.float32).tolist() == [[0, 1, 2], [3, 4, 5]]
    r = gguf.GGUFReader(p)
    for key, (vt, sub, _, expected) in (SCALARS | ARRAYS).items():
        field = r.fields[key]
        assert field.contents() == expected, key
        vt, sub = GUESSED_TYPES.get(key, (vt, sub))
        assert field.types[0] == vt, key
        if key != "a.empty":  # gguf-py records an element type only from the first element
            assert field.types[1:] == ([sub] if sub is not None else []), key
    for key, (_, flat, inner) in NESTED.items():
        assert r.fields[key].contents() == flat
        assert r.fields[key].types == [VT.ARRAY, VT.ARRAY, inner]


def test_synthetic_round_trip_keeps_types(tmp_path):
    src, dst = tmp_path / "a.gguf", tmp_path / "b.gguf"
    _write_all_types(src)
    with GGUFFile(src) as f:
        copy_gguf(f, dst)
    assert src.read_bytes() == dst.read_bytes()


def test_gguf_py_written_file_reads_and_copies_identically(tmp_path):
    """A file laid out by gguf-py's writer (default alignment) is read, and copied byte for byte."""
    src, dst = tmp_path / "gp.gguf", tmp_path / "copy.gguf"
    w = gguf.GGUFWriter(src, arch="llama")
    w.add_uint32("llama.block_count", 2)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_array("tokenizer.ggml.tokens", ["<s>", "a", "bc"])
    w.add_array("tokenizer.ggml.scores", [0.0, -1.0, -2.5])
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = (np.arange(96, dtype=np.float16) / 7).reshape(1, 96)
    w.add_tensor("a", a)
    w.add_tensor("b", b)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with GGUFFile(src) as f:
        assert f.metadata["general.architecture"] == "llama"
        assert f.metadata["llama.block_count"] == 2
        assert f.metadata_types["llama.block_count"] == (VT.UINT32, None)
        assert f.metadata["tokenizer.ggml.tokens"] == ["<s>", "a", "bc"]
        assert f.metadata["tokenizer.ggml.scores"] == [0.0, -1.0, -2.5]
        assert f.tensors["a"].shape == (3, 4) and f.tensors["b"].shape == (1, 96)
        assert f.tensor_bytes("a").tobytes() == a.tobytes()
        assert f.tensor_bytes("b").tobytes() == b.tobytes()
        copy_gguf(f, dst)
    assert src.read_bytes() == dst.read_bytes()


def test_version_2_reads(tmp_path):
    p = tmp_path / "v2.gguf"
    _write_all_types(p)
    raw = bytearray(p.read_bytes())
    assert raw[4:8] == struct.pack("<I", 3)
    raw[4:8] = struct.pack("<I", 2)
    p.write_bytes(bytes(raw))
    with GGUFFile(p) as f:
        assert f.version == 2
        assert f.metadata["t.u64"] == 2**64 - 1
        assert f.metadata["a.str"] == ["a", "", "ünï ✓"]
        assert f.tensor_bytes("f32").view(np.float32).tolist() == [[0, 1, 2], [3, 4, 5]]
    r = gguf.GGUFReader(p)
    assert r.fields["GGUF.version"].contents() == 2
    assert r.fields["t.u64"].contents() == 2**64 - 1


def test_alignment_64_honoured_by_both_readers(tmp_path):
    p = tmp_path / "align.gguf"
    # first tensor 40 bytes: the second starts at 64 with alignment 64 (it would be 64 with 32 too,
    # so the third, after a 72-byte tensor, tells them apart: 64+72 -> 192, not 160)
    t0 = np.arange(10, dtype=np.float32)
    t1 = np.arange(18, dtype=np.float32) + 100
    t2 = np.arange(4, dtype=np.float32) - 50
    # pad the header with a key so that it ends between two multiples of 64 at a place where 32- and
    # 64-alignment differ (checked below with gguf-py's view of the header)
    for filler in range(64):
        w = GGUFWriter(p, alignment=64)
        w.add("pad", "x" * filler)
        w.add_tensor("t0", (10,), type_by_name("F32"), t0)
        w.add_tensor("t1", (18,), type_by_name("F32"), t1)
        w.add_tensor("t2", (4,), type_by_name("F32"), t2)
        w.write()
        r = gguf.GGUFReader(p)
        last = r.tensors[-1].field
        header_end = last.offset + sum(int(x.nbytes) for x in last.parts)
        if 0 < header_end % 64 <= 32:
            break
    assert 0 < header_end % 64 <= 32
    expected_data = header_end + (64 - header_end % 64)
    raw = p.read_bytes()
    assert r.alignment == 64 and r.data_offset == expected_data
    assert [t.data_offset - expected_data for t in r.tensors] == [0, 64, 192]
    with GGUFFile(p) as f:
        assert f.alignment == 64
        assert f.metadata["general.alignment"] == 64
        assert f.metadata_types["general.alignment"] == (VT.UINT32, None)
        assert f.data_offset == expected_data
        assert [t.offset for t in f.tensors.values()] == [0, 64, 192]
        for name, arr in (("t0", t0), ("t1", t1), ("t2", t2)):
            assert f.tensor_bytes(name).tobytes() == arr.tobytes()
    # and the bytes really sit there in the file
    assert raw[expected_data + 192 : expected_data + 208] == t2.tobytes()
    assert raw[expected_data + 40 : expected_data + 64] == bytes(24)  # zero padding


# ------------------------------------------------------------------------------------------------
# 4. IQK tensors with per-row metadata
# ------------------------------------------------------------------------------------------------


def test_iqk_row_metadata_tensors(tmp_path):
    p = tmp_path / "iqk.gguf"
    rng = np.random.default_rng(0)
    # spec 1.1: IQ4_KS id 144, 256 weights/block, 136 bytes/block, 4-byte f32 row scale
    #           IQ2_KS id 145, 256 weights/block,  70 bytes/block, 2-byte f16 row scale
    iq4_row = 4 + (512 // 256) * 136  # 276
    iq2_row = 2 + (512 // 256) * 70  # 142
    iq4 = rng.integers(0, 256, size=(3, iq4_row), dtype=np.uint8)
    iq4[:, :4] = np.array([1.5, -2.0, 0.25], dtype="<f4").view(np.uint8).reshape(3, 4)
    iq2 = rng.integers(0, 256, size=(3, iq2_row), dtype=np.uint8)
    iq2[:, :2] = np.array([0.5, 3.0, -1.0], dtype="<f2").view(np.uint8).reshape(3, 2)
    tail = np.arange(8, dtype=np.float32)

    w = GGUFWriter(p)
    w.add("general.architecture", "llama")
    w.add_tensor("iq4", (3, 512), type_by_id(144), iq4)
    w.add_tensor("iq2", (3, 512), type_by_id(145), iq2)
    w.add_tensor("tail", (8,), type_by_name("F32"), tail)
    w.write()

    with GGUFFile(p) as f:
        a, b, c = f.tensors["iq4"], f.tensors["iq2"], f.tensors["tail"]
        assert (a.type.name, a.type.id, a.shape) == ("IQ4_KS", 144, (3, 512))
        assert (b.type.name, b.type.id, b.shape) == ("IQ2_KS", 145, (3, 512))
        assert a.nbytes == 3 * 276 == 828
        assert b.nbytes == 3 * 142 == 426
        # offsets: 828 -> padded to 832 (alignment 32); 832 + 426 = 1258 -> 1280
        assert (a.offset, b.offset, c.offset) == (0, 832, 1280)
        va = f.tensor_bytes("iq4")
        assert va.shape == (3, 276) and np.array_equal(va, iq4)
        assert va[:, :4].copy().view("<f4").ravel().tolist() == [1.5, -2.0, 0.25]
        vb = f.tensor_bytes("iq2")
        assert vb.shape == (3, 142) and np.array_equal(vb, iq2)
        assert vb[:, :2].copy().view("<f2").ravel().tolist() == [0.5, 3.0, -1.0]
        assert f.tensor_bytes("tail").view(np.float32).ravel().tolist() == list(range(8))

    # independent of our reader: find the data in the raw file and check where the rest lies
    raw = p.read_bytes()
    start = raw.find(iq4.tobytes())
    assert start > 0 and start % 32 == 0
    assert raw[start + 832 : start + 832 + 426] == iq2.tobytes()
    assert raw[start + 1280 : start + 1280 + 32] == tail.tobytes()
    assert len(raw) == start + 1280 + 32

    # the writer refuses the gguf-py-style size that ignores the row metadata
    with pytest.raises(ValueError, match="828"):
        GGUFWriter(tmp_path / "x.gguf").add_tensor("bad", (3, 512), type_by_id(144), iq4[:, 4:])


# ------------------------------------------------------------------------------------------------
# 5. Bad input
# ------------------------------------------------------------------------------------------------


def _raises(path, *words):
    with pytest.raises(GGUFError) as ei:
        GGUFFile(path)
    msg = str(ei.value)
    assert "\n" not in msg and msg.strip() == msg
    for word in words:
        assert word.lower() in msg.lower(), msg
    return msg


def _one_tensor_file(path, **kv):
    """No metadata unless given; one F32 tensor 't' of 4 floats."""
    w = GGUFWriter(path)
    for k, v in kv.items():
        w.add(k, v, VT.UINT32)
    w.add_tensor("t", (4,), type_by_name("F32"), np.ones(4, dtype=np.float32))
    w.write()
    return bytearray(path.read_bytes())


def test_missing_empty_and_not_gguf(tmp_path):
    _raises(tmp_path / "nope.gguf", "no such file")
    (tmp_path / "empty.gguf").write_bytes(b"")
    _raises(tmp_path / "empty.gguf", "empty")
    (tmp_path / "rand.gguf").write_bytes(np.random.default_rng(1).integers(0, 256, 4096, np.uint8).tobytes())
    _raises(tmp_path / "rand.gguf", "not a GGUF")
    (tmp_path / "text.gguf").write_text("hello, this is a text file\nwith two lines\n")
    _raises(tmp_path / "text.gguf", "not a GGUF")


def test_truncated_real_file(opened, tmp_path):
    path, _, r = opened("smollm2-135m")  # positions from the independent reader (gguf-py)
    info_start = r.tensors[0].field.offset
    info_end = r.tensors[-1].field.offset + sum(int(x.nbytes) for x in r.tensors[-1].field.parts)
    first, last = r.tensors[0], max(r.tensors, key=lambda t: t.data_offset)
    cuts = {
        "in version": 6,
        "in counts": 20,
        "in first key": 30,
        "in metadata": 5000,
        "in vocabulary": info_start // 2,
        "in tensor infos": (info_start + info_end) // 2,
        "at end of infos": info_end,
        "in first tensor data": first.data_offset + first.n_bytes // 2,
        "in last tensor data": last.data_offset + last.n_bytes - 1,
    }
    data = open(path, "rb").read(cuts["in last tensor data"])
    out = tmp_path / "cut.gguf"
    for where, n in cuts.items():
        out.write_bytes(data[:n])
        msg = _raises(out, "truncated")
        assert str(out) in msg, where


def test_unknown_and_repacked_tensor_type(tmp_path):
    p = tmp_path / "t.gguf"
    raw = _one_tensor_file(p)
    # header: magic 4, version 4, n_tensors 8, n_kv 8 = 24; info: name len 8, "t" 1, n_dims 4, ne0 8
    type_at = 24 + 8 + 1 + 4 + 8
    assert raw[type_at : type_at + 4] == struct.pack("<I", 0)  # F32
    raw[type_at : type_at + 4] = struct.pack("<I", 999)
    p.write_bytes(bytes(raw))
    _raises(p, "999", "unknown", "'t'")
    raw[type_at : type_at + 4] = struct.pack("<I", 344)  # IQ4_KS_R4
    p.write_bytes(bytes(raw))
    _raises(p, "344", "repack")


def test_bad_metadata_value_type(tmp_path):
    p = tmp_path / "kv.gguf"
    raw = _one_tensor_file(p, k=7)
    vtype_at = 24 + 8 + 1  # after the key "k"
    assert raw[vtype_at : vtype_at + 4] == struct.pack("<I", int(VT.UINT32))
    raw[vtype_at : vtype_at + 4] = struct.pack("<I", 13)
    p.write_bytes(bytes(raw))
    _raises(p, "metadata value type 13")
    # bad element type inside an array
    w = GGUFWriter(p)
    w.add("arr", [1, 2], VT.ARRAY, VT.UINT8)
    w.write()
    raw = bytearray(p.read_bytes())
    sub_at = 24 + 8 + 3 + 4
    assert raw[sub_at : sub_at + 4] == struct.pack("<I", int(VT.UINT8))
    raw[sub_at : sub_at + 4] = struct.pack("<I", 77)
    p.write_bytes(bytes(raw))
    _raises(p, "metadata value type 77")


@pytest.mark.parametrize("version", [0, 1, 4, 0x03000000])
def test_unsupported_version(tmp_path, version):
    p = tmp_path / "v.gguf"
    raw = _one_tensor_file(p)
    raw[4:8] = struct.pack("<I", version)
    p.write_bytes(bytes(raw))
    _raises(p, "version", str(version))


# ------------------------------------------------------------------------------------------------
# 6. The type table
# ------------------------------------------------------------------------------------------------

# spec table 1.1: name -> (id, weights per block, bytes per block, row metadata bytes)
SPEC_IQK = {
    "Q6_0": (133, 32, 26, 0),
    "IQ1_BN": (134, 64, 13, 2),
    "IQ2_BN": (135, 64, 16, 4),
    "IQ2_K": (137, 256, 76, 0),
    "IQ3_K": (138, 256, 110, 0),
    "IQ4_K": (139, 256, 144, 0),
    "IQ5_K": (140, 256, 176, 0),
    "IQ6_K": (141, 256, 212, 0),
    "IQ4_KS": (144, 256, 136, 4),
    "IQ2_KS": (145, 256, 70, 2),
    "IQ4_KSS": (146, 256, 128, 4),
    "Q8_KV": (151, 32, 32, 8),
    "IQ5_KS": (152, 256, 168, 4),
    "IQ2_KT": (153, 256, 68, 4),
    "IQ3_KT": (154, 256, 100, 4),
    "IQ4_KT": (155, 256, 128, 4),
    "IQ3_KS": (156, 256, 102, 2),
    "IQ2_KL": (157, 256, 86, 2),
    "IQ1_KT": (158, 256, 56, 4),
}
# bytes of one 1024-weight row, worked out by hand from the table above
SPEC_ROW_1024 = {
    "Q6_0": 32 * 26,  # 832
    "IQ1_BN": 2 + 16 * 13,  # 210
    "IQ2_BN": 4 + 16 * 16,  # 260
    "IQ2_K": 4 * 76,  # 304
    "IQ3_K": 4 * 110,  # 440
    "IQ4_K": 4 * 144,  # 576
    "IQ5_K": 4 * 176,  # 704
    "IQ6_K": 4 * 212,  # 848
    "IQ4_KS": 4 + 4 * 136,  # 548
    "IQ2_KS": 2 + 4 * 70,  # 282
    "IQ4_KSS": 4 + 4 * 128,  # 516
    "Q8_KV": 8 + 32 * 32,  # 1032
    "IQ5_KS": 4 + 4 * 168,  # 676
    "IQ2_KT": 4 + 4 * 68,  # 276
    "IQ3_KT": 4 + 4 * 100,  # 404
    "IQ4_KT": 4 + 4 * 128,  # 516
    "IQ3_KS": 2 + 4 * 102,  # 410
    "IQ2_KL": 2 + 4 * 86,  # 346
    "IQ1_KT": 4 + 4 * 56,  # 228
}


@pytest.mark.parametrize("name", sorted(SPEC_IQK))
def test_iqk_row_sizes_from_spec(name):
    tid, block, bytes_per_block, meta = SPEC_IQK[name]
    t = type_by_id(tid)
    assert t is type_by_name(name)
    assert (t.name, t.block_size, t.type_size, t.row_meta) == (name, block, bytes_per_block, meta)
    assert t.row_nbytes(1024) == SPEC_ROW_1024[name]
    assert t.nbytes((2, 3, 1024)) == 6 * SPEC_ROW_1024[name]
    with pytest.raises(ValueError):
        t.row_nbytes(1024 + block // 2 if block > 1 else 1)


def test_type_table_specials():
    assert type_by_name("iq4_ks") is type_by_name("IQ4_KS") is type_by_name("Iq4_Ks") is type_by_id(144)
    assert type_by_name("q8_0") is type_by_id(8)
    with pytest.raises(UnknownTypeError):
        type_by_name("IQ4_KZ")
    for bad in (142, 143, 999, 401):  # 142/143 are ik's deprecated IQ2_TN/IQ1_TN
        with pytest.raises(UnknownTypeError):
            type_by_id(bad)
    with pytest.raises(UnknownTypeError, match="repack"):
        type_by_id(344)
    # spec 1.1/1.3: ik's 41 (Q1_0_G128) has mainline Q1_0's layout; 36 is ik's I2_S
    assert (type_by_id(41).block_size, type_by_id(41).type_size) == (128, 18)
    assert type_by_id(36).name == "I2_S"
    # spec 1.1: Q8_1 is 32 weights in 36 bytes (fp16 d and s + 32 int8) in ggml, mainline and ik
    assert (type_by_id(9).block_size, type_by_id(9).type_size) == (32, 36)


def test_mainline_types_match_gguf_py():
    checked = 0
    for t in GGMLQuantizationType:
        if t.value in (36, 41):  # ik's own meaning wins at these ids (checked above)
            continue
        if t == GGMLQuantizationType.Q8_1:
            # gguf-py still lists (32, 40), a stale float d + float s layout; ggml's block_q8_1 is
            # static_asserted to 2*sizeof(ggml_half) + 32 = 36 bytes (see test_type_table_specials)
            continue
        ours = type_by_id(t.value)
        assert ours.name == t.name
        assert (ours.block_size, ours.type_size, ours.row_meta) == (*GGML_QUANT_SIZES[t], 0), t.name
        assert ours.row_nbytes(ours.block_size * 4) == 4 * GGML_QUANT_SIZES[t][1]
        checked += 1
    assert checked >= 30
