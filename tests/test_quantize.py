"""`quantize`: files re-read through GGUFFile decode to exactly what the codecs give for the source
tensors (so type ids, row sizes, row metadata and alignment are right), and the outputs load and
predict like the source."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf.constants import GGUFValueType as VT

import vramfit
from vramfit.gguf import GGUFFile, GGUFWriter, type_by_name
from vramfit.quant import get_codec
from vramfit.quant.imatrix import Imatrix, ImatrixError, load_imatrix, write_dat
from vramfit.quant.pipeline import QuantizeError, QuantizeRequest, quantize
from vramfit.quant.recipes import RecipeError

TINY = dict(n_embd=256, n_ff=256, n_head=4, n_kv=2, n_vocab=64, n_layer=1)


def write_tiny_llama(path: Path, tokenizer_from: Path, seed: int = 0, **dims) -> Path:
    """A random float32 llama GGUF with the tokenizer metadata of a real model (rows of 256)."""
    d = {**TINY, **dims}
    e, ff, hd = d["n_embd"], d["n_ff"], d["n_embd"] // d["n_head"]
    rng = np.random.default_rng(seed)
    src = GGUFFile(tokenizer_from)
    w = GGUFWriter(path)
    w.add("general.architecture", "llama")
    for key, value in [
        ("block_count", d["n_layer"]), ("context_length", 512), ("embedding_length", e),
        ("feed_forward_length", ff), ("attention.head_count", d["n_head"]),
        ("attention.head_count_kv", d["n_kv"]), ("rope.dimension_count", hd),
    ]:  # fmt: skip
        w.add(f"llama.{key}", value, VT.UINT32)
    w.add("llama.rope.freq_base", 10000.0, VT.FLOAT32)
    w.add("llama.attention.layer_norm_rms_epsilon", 1e-5, VT.FLOAT32)
    w.add("general.file_type", 0, VT.UINT32)
    for key, value in src.metadata.items():
        if key.startswith("tokenizer."):
            w.add(key, value, *src.metadata_types[key])
    f32 = type_by_name("f32")

    def mat(name, rows, cols, scale):
        w.add_tensor(name, (rows, cols), f32, (rng.standard_normal((rows, cols)) * scale).astype(np.float32))

    mat("token_embd.weight", d["n_vocab"], e, 1.0)
    mat("output.weight", d["n_vocab"], e, 0.1)
    for i in range(d["n_layer"]):
        kv = d["n_kv"] * hd
        shapes = [("attn_q", e, e), ("attn_k", kv, e), ("attn_v", kv, e), ("attn_output", e, e),
                  ("ffn_gate", ff, e), ("ffn_up", ff, e), ("ffn_down", e, ff)]  # fmt: skip
        for name, rows, cols in shapes:
            mat(f"blk.{i}.{name}.weight", rows, cols, cols**-0.5)
        for name in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{name}.weight", (e,), f32, np.ones(e, np.float32))
    w.add_tensor("output_norm.weight", (e,), f32, np.ones(e, np.float32))
    w.write()
    return path


def source_rows(g: GGUFFile, name: str, rows: np.ndarray) -> torch.Tensor:
    t = g.tensors[name]
    raw = torch.from_numpy(np.array(g.tensor_bytes(name)[rows]))
    return get_codec(t.type).decode(raw, t.shape[-1]).float()


def check_rows_match_codec(src: Path, dst: Path, imat: Imatrix | None, n_rows: int = 6) -> dict[str, str]:
    """Every tensor of dst: same shape; quantized rows (a sample; rows are encoded independently) are
    byte-equal to the codec's encoding of the source rows and decode equal to its decode."""
    a, b = GGUFFile(src), GGUFFile(dst)
    assert list(a.tensors) == list(b.tensors)
    assert b.data_offset % b.alignment == 0
    types = {}
    rng = np.random.default_rng(0)
    for name, tb in b.tensors.items():
        ta = a.tensors[name]
        assert tb.shape == ta.shape and tb.offset % b.alignment == 0
        assert tb.nbytes == tb.n_rows * tb.type.row_nbytes(tb.shape[-1])
        types[name] = tb.type.name.lower()
        if tb.type == ta.type:
            assert np.array_equal(a.tensor_bytes(name), b.tensor_bytes(name)), name
            continue
        rows = np.sort(rng.choice(ta.n_rows, size=min(n_rows, ta.n_rows), replace=False))
        x = source_rows(a, name, rows)
        w = None if imat is None or imat.get(name) is None else torch.from_numpy(imat.get(name))
        codec = get_codec(tb.type)
        want = codec.encode(x, w)
        got = torch.from_numpy(np.array(b.tensor_bytes(name)[rows]))
        assert torch.equal(got, want), name
        assert torch.equal(codec.decode(got, tb.shape[-1]), codec.decode(want, tb.shape[-1])), name
    return types


def top1_agreement(src: Path, dst: Path, ids: list[int]) -> float:
    la = vramfit.load(src, n_ctx=64).logits(ids)
    lb = vramfit.load(dst, n_ctx=64).logits(ids)
    return float((la.argmax(-1) == lb.argmax(-1)).mean())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, model_path):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-f32.gguf", model_path("smollm2-135m"))


@pytest.fixture(scope="module")
def tiny_imatrix(tiny, tmp_path_factory):
    from vramfit.quant.imatrix import collect_imatrix

    m = vramfit.load(tiny, n_ctx=64)
    ids = np.random.default_rng(1).integers(0, TINY["n_vocab"], size=48).tolist()
    path = tmp_path_factory.mktemp("im") / "tiny.dat"
    write_dat(collect_imatrix(m.engine, [ids]), path)
    return path


IDS = list(range(3, 35))


def test_iq4_ks_mix_with_imatrix(tiny, tiny_imatrix, tmp_path):
    out = tmp_path / "tiny-iq4_ks.gguf"
    report = quantize(QuantizeRequest(tiny, out, "IQ4_KS", imatrix=tiny_imatrix))
    g = GGUFFile(out)
    assert g.metadata["general.file_type"] == 145 and g.metadata_types["general.file_type"][0] == VT.UINT32
    assert g.metadata["general.quantization_version"] == 2
    assert g.metadata["quantize.imatrix.entries_count"] == 7
    types = check_rows_match_codec(tiny, out, load_imatrix(tiny_imatrix))
    assert types["blk.0.attn_q.weight"] == "iq4_ks" and types["blk.0.ffn_down.weight"] == "iq4_ks"
    assert types["blk.0.attn_v.weight"] == "iq5_k"  # GQA
    assert types["token_embd.weight"] == "iq4_ks" and types["blk.0.attn_norm.weight"] == "f32"
    # IQ4_KS rows: a float32 row scale in front of 256-weight blocks of 136 bytes (spec 1.1, 1.4)
    t = g.tensors["blk.0.attn_q.weight"]
    assert (t.type.id, t.nbytes) == (144, 256 * (4 + 136))
    assert report.nbytes == sum(t.nbytes for t in g.tensors.values())
    assert out.stat().st_size >= g.data_offset + report.nbytes
    assert top1_agreement(tiny, out, IDS) >= 0.75


def test_iq4_ks_without_imatrix_and_overrides(tiny, tmp_path):
    out = tmp_path / "tiny-iq4_ks-noim.gguf"
    rules = "ffn_(gate|up)=q8_0,attn_(q|output)=q8_0"  # keeps the run short: IQK on attn_k/v and ffn_down
    quantize(QuantizeRequest(tiny, out, "iq4_ks", custom_q=rules, token_embedding_type="q8_0"))
    types = check_rows_match_codec(tiny, out, None)
    assert types["blk.0.ffn_gate.weight"] == "q8_0" and types["blk.0.ffn_up.weight"] == "q8_0"
    assert types["token_embd.weight"] == "q8_0" and types["blk.0.attn_k.weight"] == "iq4_ks"
    assert types["blk.0.ffn_down.weight"] == "iq4_ks"  # no imatrix, but n_layer / 8 = 0 layers get Q5_K
    assert "quantize.imatrix.file" not in GGUFFile(out).metadata
    assert top1_agreement(tiny, out, IDS) >= 0.75


def test_requantize_a_real_model_to_q8_0(model_path, tmp_path):
    """SmolLM2 (Q4_1) cut to its first 2 blocks, requantized to Q8_0 (decode, then encode)."""
    src = model_path("smollm2-135m")
    cut = tmp_path / "smol-2.gguf"
    _first_blocks(GGUFFile(src), cut, 2)
    out = tmp_path / "smol-2-q8_0.gguf"
    quantize(QuantizeRequest(cut, out, "Q8_0"))
    types = check_rows_match_codec(cut, out, None, n_rows=16)
    assert {types[n] for n in types if n.endswith("attn_q.weight")} == {"q8_0"}
    m = vramfit.load(out, n_ctx=64)
    ids = m.tokenize("import numpy as np\n\ndef mean(xs):\n    return sum(xs) / len(xs)\n")
    assert top1_agreement(cut, out, ids) >= 0.9


def _first_blocks(g: GGUFFile, dst: Path, n: int) -> None:
    w = GGUFWriter(dst, g.alignment)
    for key, value in g.metadata.items():
        w.add(key, n if key.endswith(".block_count") else value, *g.metadata_types[key])
    for t in g.tensors.values():
        if not t.name.startswith("blk.") or int(t.name.split(".")[1]) < n:
            w.add_tensor(t.name, t.shape, t.type, g.tensor_bytes(t.name))
    w.write()


# ------------------------------------------------------------------------ bad requests, before any work


def test_bad_requests_fail_before_writing(tiny, tmp_path, model_path):
    out = tmp_path / "x.gguf"
    with pytest.raises(QuantizeError, match="does not exist"):
        quantize(QuantizeRequest(tiny, tmp_path / "missing" / "x.gguf", "IQ4_KS"))
    with pytest.raises(RecipeError, match="unknown tensor type"):
        quantize(QuantizeRequest(tiny, out, "IQ4_KS", custom_q="attn_v=q9_k"))
    other = tmp_path / "other.dat"
    write_dat(Imatrix({"blk.0.attn_q.weight": np.ones(576, np.float32)}), other)
    with pytest.raises(ImatrixError, match="another model"):
        quantize(QuantizeRequest(tiny, out, "IQ4_KS", imatrix=other))
    unrelated = tmp_path / "unrelated.dat"
    write_dat(Imatrix({"model.layers.0.mlp.weight": np.ones(256, np.float32)}), unrelated)
    with pytest.raises(ImatrixError, match="no entry"):
        quantize(QuantizeRequest(tiny, out, "IQ4_KS", imatrix=unrelated))
    assert not out.exists() and list(tmp_path.glob(".*partial")) == []


def test_interrupted_run_leaves_no_file(tiny, tmp_path):
    out = tmp_path / "y.gguf"

    class Stop:
        def start(self, total):
            pass

        def tensor(self, choice, index, count):
            if index == 3:
                raise KeyboardInterrupt

        def advance(self, n):
            pass

    with pytest.raises(KeyboardInterrupt):
        quantize(QuantizeRequest(tiny, out, "Q8_0"), Stop())
    assert not out.exists() and list(tmp_path.iterdir()) == []
