"""GGUF reading that keeps memory low: string arrays kept as their stored bytes, and the pages of
copied tensors dropped from the mapping."""

import mmap
import struct

import numpy as np
import pytest
from gguf.constants import GGUFValueType as VT

from vramfit.gguf import GGUFFile, GGUFWriter, StringArray, copy_gguf
from vramfit.gguf.types import type_by_name


def test_string_arrays_read_lazily_and_copy_byte_for_byte(tmp_path):
    """String arrays stay as their stored bytes: items decode on access, invalid UTF-8 shows as
    U+FFFD but is written back unchanged, and the array outlives the closed file."""
    src, dst = tmp_path / "s.gguf", tmp_path / "copy.gguf"
    items = [b"a", b"", "\u00fcn\u00ef \u2713".encode(), b"bad \xff\xfe", b"z" * 300]
    body = struct.pack("<IQ", int(VT.STRING), len(items)) + b"".join(
        struct.pack("<Q", len(b)) + b for b in items
    )
    head = (
        b"GGUF"
        + struct.pack("<IQQ", 3, 0, 1)
        + struct.pack("<Q", 4)
        + b"toks"
        + struct.pack("<I", int(VT.ARRAY))
    )
    src.write_bytes(head + body + b"\0" * (-(len(head) + len(body)) % 32))
    with GGUFFile(src) as f:
        toks = f.metadata["toks"]
        copy_gguf(f, dst)
    assert src.read_bytes() == dst.read_bytes()
    assert isinstance(toks, StringArray) and len(toks) == 5
    expected = [b.decode("utf-8", errors="replace") for b in items]
    assert list(toks) == expected and toks == expected and expected == toks
    assert toks[3] == "bad \ufffd\ufffd" and toks[-1] == "z" * 300 and toks[1:3] == expected[1:3]
    assert toks.index(expected[2]) == 2 and "a" in toks and toks != expected[:4]
    with pytest.raises(IndexError):
        toks[5]
    with pytest.raises(IndexError):
        toks[-6]


def _resident_pages(view: np.ndarray) -> np.ndarray:
    """Whether each page under `view` is in this process's memory (/proc/self/pagemap bit 63)."""
    page = mmap.PAGESIZE
    first, last = view.ctypes.data // page, (view.ctypes.data + view.nbytes - 1) // page
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        entries = np.frombuffer(f.read((last - first + 1) * 8), dtype=np.uint64)
    return (entries >> np.uint64(63)).astype(bool)


def test_release_drops_pages_of_adjacent_tensors_together(tmp_path):
    """Released neighbours go as one span (the page they share too); a page shared with a kept
    tensor stays; released bytes read back unchanged from the file."""
    p = tmp_path / "r.gguf"
    w = GGUFWriter(p)
    sizes = {"a": 3 * 4096 + 100, "b": 2 * 4096 + 300, "c": 3 * 4096 + 68}
    rng = np.random.default_rng(0)
    data = {n: rng.integers(0, 256, k, dtype=np.uint8) for n, k in sizes.items()}
    for n, raw in data.items():
        w.add_tensor(n, (raw.size // 4,), type_by_name("F32"), raw)
    w.write()
    with GGUFFile(p) as f:
        whole = np.frombuffer(f._buf, dtype=np.uint8)
        assert int(whole.sum()) > 0 and _resident_pages(whole).all()  # every page touched

        def page(name: str, at: int) -> int:  # page index (in the file) of byte `at` of a tensor
            t = f.tensors[name]
            return (f.data_offset + t.offset + (at if at >= 0 else t.nbytes + at)) // mmap.PAGESIZE

        assert page("a", -1) == page("b", 0)  # a's tail and b's head share a page
        assert page("b", -1) == page("c", 0)  # so do b's tail and c's head
        f.release("a", "b")
        res = _resident_pages(whole)
        assert not res[page("a", 0) + 1 : page("b", -1)].any()  # the shared a/b page went too
        assert res[page("b", -1) :].all()  # c's pages, the one it shares with b included, stay
        for n, raw in data.items():
            assert f.tensor_bytes(n).tobytes() == raw.tobytes(), n


def test_rewriting_a_mapped_file_keeps_its_readers_valid(tmp_path):
    """A GGUF written over a file that is still open (its string arrays are views of the mapping)
    replaces it by rename: the old reader keeps reading the old bytes, the new file reads the new."""
    p = tmp_path / "m.gguf"
    w = GGUFWriter(p)
    w.add("toks", ["alpha", "beta", "gamma"], VT.ARRAY, VT.STRING)
    w.write()
    old = GGUFFile(p)
    toks = old.metadata["toks"]
    w = GGUFWriter(p)
    w.add("toks", ["x"], VT.ARRAY, VT.STRING)
    w.write()
    assert list(toks) == ["alpha", "beta", "gamma"]
    assert GGUFFile(p).metadata["toks"] == ["x"]
    assert sorted(q.name for q in tmp_path.iterdir()) == ["m.gguf"]  # no partial file left


def test_untied_embedding_rows_come_from_the_file_not_the_mapping(model_path):
    """Qwen2.5's untied embedding: a lookup reads its rows with pread (the same rows the mapping
    decodes), maps none of its pages, and a row outside the vocabulary is an IndexError."""
    import torch

    from vramfit.model.loader import load_model
    from vramfit.runtime.memory import PAGE

    model, _ = load_model(model_path("qwen2.5-coder-0.5b"), 64)
    embed = model.embed
    assert embed is not model.output and embed._file is not None
    ids = torch.tensor([3, 151643, 99999, 99999])
    got = embed.rows(ids)
    buf = np.frombuffer(embed.packed.numpy(), dtype=np.uint8)  # the mapped rows: a view of the file
    first, last = buf.ctypes.data // PAGE, (buf.ctypes.data + buf.nbytes - 1) // PAGE
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        present = np.frombuffer(f.read((last - first + 1) * 8), dtype=np.uint64) >> np.uint64(63)
    row_pages = [(buf.ctypes.data + r * embed.packed.shape[1]) // PAGE - first for r in ids.tolist()]
    assert not any(present[p] for p in row_pages)  # looked up, never mapped
    ref = embed.__class__(embed.packed, embed.gtype, embed.shape, embed.name).rows(ids)  # the mapping's
    assert got.shape == (4, embed.shape[1]) and torch.equal(got, ref)
    with pytest.raises(IndexError, match="row 151936"):
        embed.rows(torch.tensor([151936]))
