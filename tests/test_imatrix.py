"""imatrix files (legacy .dat, mainline GGUF) and collection checked against a hook-free forward."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from gguf.constants import GGUFValueType as VT

from vramfit.gguf import GGUFWriter, type_by_name
from vramfit.quant import decode
from vramfit.quant.imatrix import (
    Collector,
    Imatrix,
    ImatrixError,
    collect_imatrix,
    load_imatrix,
    read_dat,
    write_dat,
)


def test_dat_layout_and_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    a, b = rng.random(64, dtype=np.float32), rng.random(32, dtype=np.float32)
    im = Imatrix({"blk.0.attn_q.weight": a, "blk.0.ffn_down.weight": b}, {"blk.0.attn_q.weight": 3,
                 "blk.0.ffn_down.weight": 5}, "train.txt", 7)  # fmt: skip
    path = tmp_path / "x.dat"
    write_dat(im, path)
    raw = path.read_bytes()
    # spec 5.1: int32 n_entries; per entry: int32 len, name, int32 ncall, int32 nval, f32 mean*ncall
    assert struct.unpack_from("<i", raw, 0)[0] == 2
    n = struct.unpack_from("<i", raw, 4)[0]
    assert raw[8 : 8 + n] == b"blk.0.attn_q.weight"
    ncall, nval = struct.unpack_from("<ii", raw, 8 + n)
    assert (ncall, nval) == (3, 64)
    stored = np.frombuffer(raw, "<f4", count=64, offset=16 + n)
    np.testing.assert_allclose(stored, a * 3, rtol=1e-6)
    # trailer: int32 last chunk, int32 dataset length, dataset
    assert raw[-9:] == b"train.txt" and struct.unpack_from("<ii", raw, len(raw) - 17) == (7, 9)
    back = read_dat(path)
    np.testing.assert_allclose(back.values["blk.0.attn_q.weight"], a, rtol=1e-6)
    np.testing.assert_allclose(back.values["blk.0.ffn_down.weight"], b, rtol=1e-6)
    assert back.ncall == {"blk.0.attn_q.weight": 3, "blk.0.ffn_down.weight": 5}
    assert (back.dataset, back.chunks) == ("train.txt", 7)


def test_reads_mainline_gguf_imatrix(tmp_path):
    rng = np.random.default_rng(1)
    sum2 = rng.random((4, 32), dtype=np.float32) * 100  # 4 experts x 32 columns
    counts = np.array([[10], [20], [40], [5]], dtype=np.float32)
    w = GGUFWriter(tmp_path / "im.gguf")
    w.add("general.type", "imatrix")
    w.add("imatrix.datasets", ["wiki.txt"], VT.ARRAY, VT.STRING)
    w.add("imatrix.chunk_count", 12, VT.UINT32)
    w.add("imatrix.chunk_size", 512, VT.UINT32)
    f32 = type_by_name("f32")
    w.add_tensor("blk.0.ffn_down_exps.weight.in_sum2", (4, 32), f32, sum2)
    w.add_tensor("blk.0.ffn_down_exps.weight.counts", (4, 1), f32, counts)
    w.write()
    im = load_imatrix(tmp_path / "im.gguf")
    expect = (sum2 / counts).reshape(-1)  # experts concatenated, each over its own count
    np.testing.assert_allclose(im.values["blk.0.ffn_down_exps.weight"], expect, rtol=1e-6)
    assert (im.dataset, im.chunks) == ("wiki.txt", 12)


def test_bad_files(tmp_path):
    (tmp_path / "junk.dat").write_bytes(b"\xff\xff\xff\xff hello")
    with pytest.raises(ImatrixError):
        load_imatrix(tmp_path / "junk.dat")
    with pytest.raises(ImatrixError):
        load_imatrix(tmp_path / "missing.dat")


def test_gate_falls_back_to_up():
    im = Imatrix({"blk.0.ffn_up.weight": np.ones(4, np.float32)})
    assert im.get("blk.0.ffn_gate.weight") is not None
    assert im.get("blk.0.attn_q.weight") is None


# ------------------------------------------------------------------ collection vs an independent forward


def _w(m, name: str) -> np.ndarray:
    t = m.gguf.tensors[name]
    return decode(t.type.name, m.gguf.tensor_bytes(name), t.shape[-1]).astype(np.float64)


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope_adjacent(x, pos, base):
    """x (n, heads, d): rotate adjacent pairs (llama.cpp 'norm' RoPE)."""
    d = x.shape[-1]
    theta = pos[:, None] * base ** (-np.arange(0, d, 2) / d)  # (n, d/2)
    c, s = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = x0 * c - x1 * s, x0 * s + x1 * c
    return out


def _layer0_inputs(m, ids):
    """Inputs of the seven matrices of block 0, computed in float64 numpy from the GGUF tensors."""
    md = m.metadata
    eps, base = md["llama.attention.layer_norm_rms_epsilon"], md["llama.rope.freq_base"]
    n_head, n_kv = md["llama.attention.head_count"], md["llama.attention.head_count_kv"]
    x = _w(m, "token_embd.weight")[ids]  # (n, n_embd)
    n, d = len(ids), x.shape[1] // n_head
    h = _rms(x, _w(m, "blk.0.attn_norm.weight")[0], eps)
    q = (h @ _w(m, "blk.0.attn_q.weight").T).reshape(n, n_head, d)
    k = (h @ _w(m, "blk.0.attn_k.weight").T).reshape(n, n_kv, d)
    v = (h @ _w(m, "blk.0.attn_v.weight").T).reshape(n, n_kv, d)
    pos = np.arange(n, dtype=np.float64)
    q, k = _rope_adjacent(q, pos, base), _rope_adjacent(k, pos, base)
    rep = n_head // n_kv
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    att = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d)
    att = np.where(np.tril(np.ones((n, n), bool)), att, -np.inf)
    att = np.exp(att - att.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    o = np.einsum("hqk,khd->qhd", att, v).reshape(n, n_head * d)
    x1 = x + o @ _w(m, "blk.0.attn_output.weight").T
    h2 = _rms(x1, _w(m, "blk.0.ffn_norm.weight")[0], eps)
    g, u = h2 @ _w(m, "blk.0.ffn_gate.weight").T, h2 @ _w(m, "blk.0.ffn_up.weight").T
    act = g / (1 + np.exp(-g)) * u
    return {
        "attn_q": h,
        "attn_k": h,
        "attn_v": h,
        "attn_output": o,
        "ffn_gate": h2,
        "ffn_up": h2,
        "ffn_down": act,
    }


def test_collected_means_equal_a_direct_computation(model_path):
    import vramfit

    m = vramfit.load(model_path("smollm2-135m"), n_ctx=64)
    text = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int\n    y: int\n"
    ids = m.tokenize(text * 2)[:40]
    assert len(ids) >= 32
    from vramfit.kernels.dispatch import use_backend

    with use_backend("reference"):  # float32 products, comparable with the float64 forward below
        im = collect_imatrix(m.engine, [ids, ids[:10]])  # the 10-token batch is ignored (< 16 tokens)
    expect = _layer0_inputs(m, np.array(ids))
    for name, x in expect.items():
        got = im.values[f"blk.0.{name}.weight"]
        np.testing.assert_allclose(got, (x * x).mean(0), rtol=2e-3, atol=1e-6, err_msg=name)
        assert im.ncall[f"blk.0.{name}.weight"] == 1
    assert len(im.values) == 7 * m.config.n_layer  # every block matrix, not the output
    assert "output.weight" not in im.values


def test_fused_weights_are_split_by_name():
    import torch

    class W:
        name = "blk.3.attn_q.weight+blk.3.attn_k.weight+blk.3.attn_v.weight"

    col = Collector()
    x = torch.arange(32 * 4, dtype=torch.float32).reshape(32, 4)
    col(W(), x)
    im = col.result()
    for n in ("attn_q", "attn_k", "attn_v"):
        np.testing.assert_allclose(
            im.values[f"blk.3.{n}.weight"], (x.double() ** 2).mean(0).numpy(), rtol=1e-6
        )
