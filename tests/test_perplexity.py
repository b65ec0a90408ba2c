"""Perplexity (llama-perplexity protocol) and KL divergence, against direct numpy computations."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest

import vramfit
from tests.test_quantize import write_tiny_llama
from vramfit.eval.perplexity import (
    BaseLogits,
    PerplexityError,
    compress_logits,
    expand_logprobs,
    perplexity,
    windows,
)
from vramfit.quant.pipeline import QuantizeRequest, quantize

N_CTX = 32


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory, model_path):
    d = tmp_path_factory.mktemp("ppl")
    src = write_tiny_llama(d / "tiny.gguf", model_path("smollm2-135m"), seed=3)
    q = d / "tiny-q4_0.gguf"
    quantize(QuantizeRequest(src, q, "Q4_0"))
    return vramfit.load(src, n_ctx=N_CTX), vramfit.load(q, n_ctx=N_CTX)


def _tokens(n: int) -> list[int]:
    return np.random.default_rng(7).integers(0, 64, size=n).tolist()


def _direct_nll(m, toks: list[int], n_ctx: int) -> np.ndarray:
    """Second half of each window: -log softmax(logits[j])[tok[j+1]] for j = n_ctx/2 .. n_ctx-2."""
    out = []
    for c in range(len(toks) // n_ctx):
        w = toks[c * n_ctx : (c + 1) * n_ctx]
        logits = m.logits(w).astype(np.float64)
        for j in range(n_ctx // 2, n_ctx - 1):
            z = logits[j] - logits[j].max()
            out.append(-(z[w[j + 1]] - math.log(np.exp(z).sum())))
    return np.array(out)


def test_ppl_equals_a_direct_computation(tiny_pair):
    m, _ = tiny_pair
    toks = _tokens(3 * N_CTX + 5)  # the 5 left over make no window
    res = perplexity(m.logits, windows(toks, N_CTX, None, None))
    nll = _direct_nll(m, toks, N_CTX)
    assert res.count == nll.size == 3 * (N_CTX - 1 - N_CTX // 2)
    assert res.ppl == pytest.approx(math.exp(nll.mean()), rel=1e-6)
    err = math.sqrt(((nll**2).mean() - nll.mean() ** 2) / (nll.size - 1)) * math.exp(nll.mean())
    assert res.ppl_error == pytest.approx(err, rel=1e-5)
    assert perplexity(m.logits, windows(toks, N_CTX, 2, None)).count == nll.size * 2 // 3


def test_windows_put_bos_first_and_need_a_full_window():
    toks = list(range(100, 170))
    w = windows(toks, 32, None, 1)
    assert len(w) == 2 and w[0][0] == 1 and w[1][0] == 1 and w[1][1:] == toks[33:64]
    with pytest.raises(PerplexityError, match="tokens"):
        windows(toks[:20], 32, None, None)


def test_compressed_log_probs_are_within_a_step():
    logits = np.random.default_rng(0).standard_normal((5, 1001)).astype(np.float32) * 4
    rows = compress_logits(logits)
    assert rows.shape == (5, 2 * (1001 + 1) // 2 + 4) and rows.dtype == np.uint16
    z = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    back = expand_logprobs(rows, 1001)
    step = (logits.max(-1) - np.maximum(logits.min(-1), logits.max(-1) - 16)) / 65535
    kept = logits > logits.max(-1, keepdims=True) - 16  # lower ones are clipped to the floor
    assert kept.mean() < 1
    assert np.all((np.abs(back - logp) <= step[:, None] * 0.5 + 1e-5)[kept])
    assert np.all(back[~kept] <= logp.max(-1, keepdims=True).repeat(1001, 1)[~kept] - 16 + 1e-3)


def test_kld_against_a_saved_base(tiny_pair, tmp_path):
    base_m, q_m = tiny_pair
    toks = _tokens(2 * N_CTX)
    path = tmp_path / "base.kld"
    base_res = perplexity(base_m.logits, windows(toks, N_CTX, None, None), save_base=path)
    raw = path.read_bytes()
    assert raw[:8] == b"_logits_" and struct.unpack_from("<Iii", raw, 8) == (N_CTX, 64, 2)
    assert list(np.frombuffer(raw, "<i4", count=2 * N_CTX, offset=20)) == toks
    base = BaseLogits(path)
    same = perplexity(base_m.logits, base.windows(), base=base)
    assert same.kld.mean_kld < 1e-5 and same.kld.same_top_p == 1.0
    assert same.kld.ppl_base == pytest.approx(base_res.ppl, rel=1e-3)
    res = perplexity(q_m.logits, base.windows(), base=base)
    # direct: KL(base || q) per scored position, full precision
    kl, dp, top = [], [], []
    for w in base.windows():
        la, lb = base_m.logits(w).astype(np.float64), q_m.logits(w).astype(np.float64)
        for j in range(N_CTX // 2, N_CTX - 1):
            pa = np.exp(la[j] - la[j].max())
            pa /= pa.sum()
            pb = np.exp(lb[j] - lb[j].max())
            pb /= pb.sum()
            kl.append((pa * np.log(pa / pb)).sum())
            dp.append(pb[w[j + 1]] - pa[w[j + 1]])
            top.append(la[j].argmax() == lb[j].argmax())
    assert res.kld.mean_kld == pytest.approx(np.mean(kl), rel=0.02, abs=1e-5)
    assert res.kld.rms_dp == pytest.approx(math.sqrt(np.mean(np.square(dp))), rel=0.02, abs=1e-5)
    assert res.kld.same_top_p == pytest.approx(np.mean(top))
    assert res.kld.kld_999 <= max(kl) * 1.02 + 1e-5


def test_base_file_errors(tmp_path):
    (tmp_path / "bad.kld").write_bytes(b"not a logits file at all")
    with pytest.raises(PerplexityError, match="bad magic"):
        BaseLogits(tmp_path / "bad.kld")
    with pytest.raises(PerplexityError, match="no such"):
        BaseLogits(tmp_path / "none.kld")
