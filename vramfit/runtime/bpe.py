"""Byte-level BPE backends for `Tokenizer` (GPT-2 style vocabularies): compact C tables or HF's model.

Both split a text with the pre-tokenizer regexes (each regex's matches and the gaps between them become
pieces, one regex after the other) and merge each piece by rank; they give the same ids
(tests/test_bpe.py). The compact backend splits with the `regex` module and merges with `_bpe.BPE`
(bpe.c), which keeps the vocabulary as raw bytes plus 32-bit hash tables: about 2 MiB for a 49K
vocabulary where HF's `BPE` model holds 11 MiB, 8 MiB for a 151K one where it holds 32; it encodes
faster too (HF's pre-tokenizer builds a tuple per piece). HF `tokenizers` (`Split` pre-tokenizers and
its `BPE` model) is the fallback when the extension was not built.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import regex

from vramfit.gguf.reader import StringArray

if TYPE_CHECKING:  # HF tokenizers is imported only when a backend uses it (3 MiB resident once imported)
    from tokenizers import Tokenizer as HFTokenizer

try:  # the compiled extension is optional
    from vramfit.runtime import _bpe
except ImportError:  # pragma: no cover - depends on the build
    _bpe = None


def available() -> bool:
    """True when the compact C backend is built."""
    return _bpe is not None


class HFBackend:
    """A whole HF `tokenizers` pipeline (pre-tokenizer and model)."""

    def __init__(self, hf: HFTokenizer):
        self.hf = hf

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, no special tokens added."""
        return [e.ids for e in self.hf.encode_batch_fast(texts, add_special_tokens=False)] if texts else []


class CompactBPE:
    """Pieces from the `regex` module, merged by the C tables."""

    def __init__(
        self, tokens: Sequence[str], merges: Sequence[str], regexes: Sequence[str], ignore_merges: bool
    ):
        self.splitters = [_isolating(r) for r in regexes]
        self.bpe = _bpe.BPE(*_packed(tokens), *_packed(merges), ignore_merges)

    def pieces(self, text: str) -> list[str]:
        """The pre-tokenizer's pieces of `text`, in order (together they are the text)."""
        pieces = [text]
        for rx in self.splitters:
            pieces = [p for piece in pieces for p in rx.split(piece) if p]
        return pieces

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, no special tokens added."""
        return [self.bpe.encode(self.pieces(t)) for t in texts]


def _isolating(pattern: str) -> regex.Pattern:
    """`pattern` in one capture group, so that `split` returns the gaps and the matches in turn."""
    if regex.compile(pattern).groups:
        raise ValueError(f"pre-tokenizer regex {pattern!r} has capture groups")
    return regex.compile(f"({pattern})")


def vocab_dict(tokens: Sequence[str]) -> dict[str, int]:
    """token -> id for HF's models; later duplicates win, as in llama.cpp's token_to_id map."""
    return {tok: i for i, tok in enumerate(tokens)}


def _hf_splits(regexes: Sequence[str]) -> list:
    """HF `Split` pre-tokenizers: each regex's matches and the gaps between them, in turn."""
    from tokenizers import Regex, pre_tokenizers

    return [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]


def _packed(strings: Sequence[str]) -> tuple[bytes | memoryview, np.ndarray, int]:
    """(buffer, offsets, gap): string i is buffer[offsets[i] : offsets[i + 1] - gap] in UTF-8."""
    if isinstance(strings, StringArray):
        raw, starts = strings.buffers()
        return raw, starts, 8
    encoded = [s.encode("utf-8", "surrogatepass") for s in strings]
    starts = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(b) for b in encoded], out=starts[1:])
    return b"".join(encoded), starts, 0


def build_gpt2(
    tokens: Sequence[str],
    merges: Sequence[str],
    regexes: Sequence[str],
    ignore_merges: bool,
    compact: bool = True,
) -> CompactBPE | HFBackend:
    """The byte-level BPE backend: the C tables when built (and `compact`), else HF's model."""
    if compact and available():
        return CompactBPE(tokens, merges, regexes, ignore_merges)
    from tokenizers import Tokenizer, models, pre_tokenizers

    # a repeated merge keeps its first rank, as in llama.cpp's bpe_ranks (HF's map would keep the last)
    pairs = [tuple(m.split(" ", 1)) for m in dict.fromkeys(merges)]
    hf = Tokenizer(models.BPE(vocab_dict(tokens), pairs, ignore_merges=ignore_merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.pre_tokenizer = pre_tokenizers.Sequence([*_hf_splits(regexes), byte_level])
    return HFBackend(hf)
