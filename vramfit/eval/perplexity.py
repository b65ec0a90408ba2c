"""Perplexity and KL divergence, with llama-perplexity's protocol and report.

The text is tokenized once (BOS per the model), cut into windows of n_ctx tokens (the first token of
each becomes BOS when the model adds one), and only the second half of each window is scored:
logits at positions first..n_ctx-2, first = n_ctx/2, predict the next token. PPL = exp(mean NLL),
its error sqrt(var(NLL)/(N-1)) * PPL.

Base logits file (llama-perplexity's `--kl-divergence-base` layout): "_logits_", u32 n_ctx,
i32 n_vocab, i32 n_chunk, i32 tokens[n_chunk * n_ctx], then for every scored position nv =
2*((n_vocab+1)/2)+4 uint16: a float32 scale and a float32 min log-prob in the first four, then each
token's log-prob as min + scale * q, q in 0..65535, clipped 16 nats below the top logit.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

MAGIC = b"_logits_"


class PerplexityError(ValueError):
    """Too little text, or a base logits file that does not fit the model or the options."""


@dataclass
class KLDStats:
    kld: np.ndarray  # per scored position
    dp: np.ndarray  # p(token) - p_base(token)
    same_top: np.ndarray  # bool
    nll_base: np.ndarray

    @property
    def mean_kld(self) -> float:
        return float(self.kld.mean())

    @property
    def kld_999(self) -> float:
        return float(np.percentile(self.kld, 99.9))

    @property
    def rms_dp(self) -> float:
        return float(np.sqrt((self.dp**2).mean()))

    @property
    def same_top_p(self) -> float:
        return float(self.same_top.mean())

    @property
    def ppl_base(self) -> float:
        return math.exp(float(self.nll_base.mean()))


@dataclass
class PerplexityResult:
    nll: list[np.ndarray] = field(default_factory=list)  # per chunk: NLL of each scored token
    kld: KLDStats | None = None

    @property
    def count(self) -> int:
        return sum(a.size for a in self.nll)

    @property
    def ppl(self) -> float:
        return math.exp(float(np.concatenate(self.nll).astype(np.float64).mean()))

    @property
    def ppl_error(self) -> float:
        v = np.concatenate(self.nll).astype(np.float64)
        mean, mean2 = v.mean(), (v * v).mean()
        var = mean2 - mean * mean
        return math.sqrt(var / (v.size - 1)) * self.ppl if var > 0 and v.size > 1 else float("nan")


def windows(tokens: Sequence[int], n_ctx: int, n_chunks: int | None, bos: int | None) -> list[list[int]]:
    n_max = len(tokens) // n_ctx
    n = n_max if not n_chunks or n_chunks < 0 else min(n_chunks, n_max)
    if n == 0:
        raise PerplexityError(
            f"the text has {len(tokens)} tokens; at least {2 * n_ctx} are needed for a context of {n_ctx}"
        )
    out = []
    for i in range(n):
        w = list(tokens[i * n_ctx : (i + 1) * n_ctx])
        if bos is not None:
            w[0] = bos
        out.append(w)
    return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """(n, n_vocab) float32 -> float64 log-probabilities."""
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _first(n_ctx: int) -> int:
    return n_ctx // 2


def perplexity(
    logits_fn: Callable[[list[int]], np.ndarray],
    chunks: list[list[int]],
    save_base: Path | None = None,
    base: BaseLogits | None = None,
    on_chunk: Callable[[int, PerplexityResult], None] | None = None,
) -> PerplexityResult:
    """Score every window with `logits_fn(tokens) -> (n_ctx, n_vocab)`; optionally write the base
    logits file, or compare against one."""
    res = PerplexityResult()
    kld_parts: list[tuple] = []
    writer = _BaseWriter(save_base, chunks) if save_base else None
    try:
        for i, w in enumerate(chunks):
            first = _first(len(w))
            logits = np.asarray(logits_fn(w), dtype=np.float32)[first : len(w) - 1]  # (n_scored, n_vocab)
            target = np.asarray(w[first + 1 :])
            logp = log_softmax(logits)
            res.nll.append(-logp[np.arange(len(target)), target])
            if writer:
                writer.chunk(logits)
            if base is not None:
                kld_parts.append(_kld_chunk(logp, target, base.chunk(i)))
            if on_chunk:
                on_chunk(i + 1, res)
    finally:
        if writer:
            writer.close()
    if base is not None:
        res.kld = KLDStats(*(np.concatenate(p) for p in zip(*kld_parts, strict=True)))
    return res


# -------------------------------------------------------------------------------- base logits file


def _nv(n_vocab: int) -> int:
    return 2 * ((n_vocab + 1) // 2) + 4


def compress_logits(logits: np.ndarray) -> np.ndarray:
    """(n, n_vocab) float32 -> (n, nv) uint16 rows of the base file."""
    n, n_vocab = logits.shape
    mx = logits.max(-1, keepdims=True)
    mn = np.maximum(logits.min(-1, keepdims=True), mx - 16)
    log_sum_exp = np.log(np.exp((logits - mx).astype(np.float64)).sum(-1, keepdims=True)).astype(np.float32)
    min_log_prob = (mn - mx - log_sum_exp).astype(np.float32)
    scale = ((mx - mn) / 65535).astype(np.float32)
    inv = np.where(scale > 0, 1 / np.where(scale > 0, scale, 1), 0).astype(np.float32)
    q = np.clip(np.rint((logits - mn) * inv), 0, 65535).astype(np.uint16)
    out = np.zeros((n, _nv(n_vocab)), dtype=np.uint16)
    out[:, :4] = np.concatenate([scale, min_log_prob], axis=1).astype("<f4").view(np.uint16)
    out[:, 4 : 4 + n_vocab] = q
    return out


def expand_logprobs(rows: np.ndarray, n_vocab: int) -> np.ndarray:
    """(n, nv) uint16 -> (n, n_vocab) float64 base log-probabilities."""
    head = np.ascontiguousarray(rows[:, :4]).view("<f4").astype(np.float64)  # (n, 2): scale, min
    return head[:, :1] * rows[:, 4 : 4 + n_vocab].astype(np.float64) + head[:, 1:2]


class _BaseWriter:
    def __init__(self, path: Path, chunks: list[list[int]]):
        self.f: BinaryIO = open(path, "wb")
        n_ctx = len(chunks[0])
        self.header_written = False
        self.n_ctx, self.n_chunk = n_ctx, len(chunks)
        self.tokens = np.asarray(chunks, dtype="<i4").reshape(-1)

    def chunk(self, logits: np.ndarray) -> None:
        if not self.header_written:
            self.f.write(MAGIC + struct.pack("<Iii", self.n_ctx, logits.shape[1], self.n_chunk))
            self.f.write(self.tokens.tobytes())
            self.header_written = True
        self.f.write(compress_logits(logits).astype("<u2").tobytes())

    def close(self) -> None:
        self.f.close()


class BaseLogits:
    """A base logits file opened for comparison (memory-mapped)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise PerplexityError(f"{path}: no such base logits file")
        with open(self.path, "rb") as f:
            head = f.read(20)
        if len(head) < 20 or head[:8] != MAGIC:
            raise PerplexityError(f"{path}: not a base logits file (bad magic)")
        self.n_ctx, self.n_vocab, self.n_chunk = struct.unpack("<Iii", head[8:20])
        n_tok = self.n_ctx * self.n_chunk
        self.tokens = np.fromfile(self.path, dtype="<i4", count=n_tok, offset=20)
        n_scored = self.n_ctx - 1 - _first(self.n_ctx)
        self.rows = np.memmap(self.path, dtype="<u2", mode="r", offset=20 + 4 * n_tok)
        want = self.n_chunk * n_scored * _nv(self.n_vocab)
        if self.rows.size < want:
            raise PerplexityError(f"{path}: truncated base logits file")
        self.rows = self.rows[:want].reshape(self.n_chunk, n_scored, _nv(self.n_vocab))

    def windows(self, n_chunks: int | None = None) -> list[list[int]]:
        n = self.n_chunk if not n_chunks or n_chunks < 0 else min(n_chunks, self.n_chunk)
        return [self.tokens[i * self.n_ctx : (i + 1) * self.n_ctx].tolist() for i in range(n)]

    def chunk(self, i: int) -> np.ndarray:
        return expand_logprobs(np.asarray(self.rows[i]), self.n_vocab)


def _kld_chunk(logp: np.ndarray, target: np.ndarray, base_logp: np.ndarray) -> tuple:
    """Per position: KL(base || new), p - p_base of the actual token, same argmax, base NLL."""
    if base_logp.shape != logp.shape:
        raise PerplexityError(
            f"base logits have {base_logp.shape[1]} tokens per row, the model has {logp.shape[1]}"
        )
    keep = base_logp > -16.0  # llama-perplexity skips base probabilities below e^-16
    pb = np.where(keep, np.exp(base_logp), 0.0)
    kld = (pb * np.where(keep, base_logp - logp, 0.0)).sum(-1)
    idx = np.arange(len(target))
    dp = np.exp(logp[idx, target]) - np.exp(base_logp[idx, target])
    same = logp.argmax(-1) == base_logp.argmax(-1)
    return kld, dp, same, -base_logp[idx, target]
