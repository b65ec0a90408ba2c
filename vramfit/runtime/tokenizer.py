"""Text <-> token ids from a GGUF's `tokenizer.ggml.*` metadata, matching llama.cpp.

Two vocabulary kinds are supported:

- `gpt2`: byte-level BPE. The text is split by the pre-tokenizer regexes llama.cpp uses for
  `tokenizer.ggml.pre` (applied one after the other, each match and each gap between matches becoming
  its own piece), every piece's UTF-8 bytes are mapped to GPT-2's printable alphabet, then merged by
  rank (vramfit.runtime.bpe: the `regex` module and compact C tables, or HF `tokenizers` when the
  extension is not built).
- `llama`: SentencePiece BPE. Spaces become "▁", a space is prepended to every text fragment that
  starts the input or follows a special token (when `add_space_prefix`), adjacent symbols are merged
  best-score first, and characters missing from the vocabulary fall back to `<0xNN>` byte tokens. HF's
  BPE model emulates the score order with merges ranked by the merged token's score.

Special tokens are split out of the text before any of that, as llama.cpp's `tokenizer_st_partition`
does: longest token first, control (type 3) and unknown (type 2) tokens only when `special=True`,
user-defined tokens (type 4) always (llama.cpp and HF both match them in plain text too).

Decoding works on bytes (`token_bytes`), so `IncrementalDecoder` can hold back a multi-byte character
until all of its bytes have arrived.
"""

from __future__ import annotations

import codecs
import logging
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from enum import IntEnum
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from vramfit.gguf.reader import GGUFFile, StringArray
from vramfit.runtime.bpe import CompactBPE, HFBackend, build_gpt2, vocab_dict

log = logging.getLogger(__name__)


class TokenizerError(ValueError):
    """GGUF tokenizer metadata that is missing or cannot be used."""


class TokenType(IntEnum):
    """`tokenizer.ggml.token_type` values (llama.cpp's llama_token_type)."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


# ---------------------------------------------------------------------------------------------------
# Pre-tokenizer regexes, as in llama.cpp's llm_tokenizer_bpe (src/llama-vocab.cpp)
# ---------------------------------------------------------------------------------------------------

_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# Qwen 3.5: like qwen2, but combining marks (\p{M}) stay with their letters, out of punctuation runs.
_QWEN35 = (
    _CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# canonical name -> regexes applied in sequence
PRE_TOKENIZER_REGEXES: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "gpt2": (_GPT2,),
    "llama-bpe": (_LLAMA3,),
    "smollm": (r"\p{N}", _GPT2),  # llama.cpp's STARCODER family
    "qwen2": (_QWEN2,),
    "qwen35": (_QWEN35,),
}

# other `tokenizer.ggml.pre` spellings llama.cpp maps onto the same regexes
_PRE_ALIASES: dict[str, str] = {
    **dict.fromkeys(("llama3", "llama-v3", "dbrx", "smaug-bpe", "falcon3", "pixtral"), "llama-bpe"),
    **dict.fromkeys(("starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"), "smollm"),
    **dict.fromkeys(("deepseek-r1-qwen", "stablelm2", "hunyuan"), "qwen2"),
    **dict.fromkeys(("gpt-2", "mpt", "olmo", "jais", "phi-2", "trillion"), "gpt2"),
}

# llama.cpp takes a whole pre-token as one token when the vocabulary has it (llama3's `ignore_merges`)
_IGNORE_MERGES = {"llama-bpe"}

_SURROGATE = re.compile("[\ud800-\udfff]")


def _without_surrogates(text: str) -> str:
    """UTF-16 surrogates in a str have no UTF-8: a high + low pair becomes the character it encodes; a
    lone one (JSON's "\ud800", half of an emoji cut by an agent's tool) becomes U+FFFD, as a UTF-8
    decoder does for bytes that are no character."""
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


# control tokens whose text marks the end of a turn (llama.cpp's end-of-generation heuristics)
_EOG_TEXTS = frozenset(
    (
        "<|eot_id|>",
        "<|eom_id|>",
        "<|im_end|>",
        "<|endoftext|>",
        "<|end|>",
        "<end_of_turn>",
        "<|end_of_text|>",
        "<EOT>",
    )
)


def resolve_pre(pre: str | None) -> str:
    """Canonical pre-tokenizer name for a `tokenizer.ggml.pre` value (unknown -> "gpt2", warned)."""
    if pre is None:
        log.warning("GGUF has no tokenizer.ggml.pre; using llama.cpp's 'default' pre-tokenizer")
        return "default"
    name = _PRE_ALIASES.get(pre, pre)
    if name not in PRE_TOKENIZER_REGEXES:
        log.warning("unknown pre-tokenizer %r: falling back to gpt2's regex (tokens may differ)", pre)
        return "gpt2"
    return name


# ---------------------------------------------------------------------------------------------------
# GPT-2 byte <-> unicode alphabet
# ---------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from each byte to a printable character."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table


@lru_cache(maxsize=1)
def _byte_level_translation() -> dict[int, int]:
    """str.translate table taking byte-level characters back to chr(byte), for a latin-1 encode."""
    return {ord(c): b for b, c in bytes_to_unicode().items()}


def byte_level_decode(text: str) -> bytes:
    """The bytes a byte-level BPE token string stands for (foreign characters kept as UTF-8)."""
    try:
        return text.translate(_byte_level_translation()).encode("latin-1")
    except UnicodeEncodeError:
        inverse = {c: b for b, c in bytes_to_unicode().items()}
        return b"".join(bytes([inverse[c]]) if c in inverse else c.encode() for c in text)


# ---------------------------------------------------------------------------------------------------
# HF tokenizers construction
# ---------------------------------------------------------------------------------------------------


def spm_merges(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int]) -> list[tuple[str, str]]:
    """BPE merges reproducing SentencePiece's best-score-first merging.

    Each normal/user-defined token that splits into two vocabulary tokens yields a merge; merges are
    ranked by the merged token's score (higher first), ties by id.
    """
    vocab = set(tokens)
    mergeable = (TokenType.NORMAL, TokenType.USER_DEFINED)
    order = sorted(
        (i for i, t in enumerate(tokens) if len(t) > 1 and types[i] in mergeable),
        key=lambda i: (-scores[i], i),
    )
    merges = []
    for i in order:
        tok = tokens[i]
        merges.extend((tok[:k], tok[k:]) for k in range(1, len(tok)) if tok[:k] in vocab and tok[k:] in vocab)
    return merges


def _build_spm(
    tokens: Sequence[str], scores: Sequence[float], types: Sequence[int], unk_id: int | None
) -> HFBackend:
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    bpe = models.BPE(
        vocab_dict(tokens),
        spm_merges(tokens, scores, types),
        unk_token=unk,
        fuse_unk=True,
        byte_fallback=True,
    )
    return HFBackend(HFTokenizer(bpe))  # no pre-tokenizer: SentencePiece merges across the whole fragment


# ---------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------


def _opt_id(metadata: Mapping[str, Any], key: str, n_vocab: int) -> int | None:
    v = metadata.get(f"tokenizer.ggml.{key}_token_id")
    return int(v) if v is not None and 0 <= int(v) < n_vocab else None


class Tokenizer:
    """A GGUF model's tokenizer: `encode`, `decode`, special ids and streaming decode."""

    def __init__(self, metadata: Mapping[str, Any]):
        """Build from GGUF metadata (a `GGUFFile.metadata` dict or any mapping with the same keys)."""
        self.model = str(metadata.get("tokenizer.ggml.model", ""))
        if self.model not in ("gpt2", "llama"):
            raise TokenizerError(f"unsupported tokenizer.ggml.model {self.model!r} (gpt2 and llama are)")
        tokens = metadata.get("tokenizer.ggml.tokens")
        if not tokens:
            raise TokenizerError("GGUF has no tokenizer.ggml.tokens")
        # a GGUF StringArray stays as it is (~10 MiB less than Python strings for a large vocabulary)
        self.tokens: Sequence[str] = tokens if isinstance(tokens, StringArray) else list(tokens)
        types = metadata.get("tokenizer.ggml.token_type")
        n_types = len(types) if types is not None else 0
        # one byte per token (types are 1..6; anything else reads as unknown to TokenType)
        self.token_types = (
            np.asarray(types, dtype=np.int64).clip(0, 255).astype(np.uint8).tobytes()
            if n_types
            else bytes([TokenType.NORMAL]) * len(self.tokens)
        )
        self.pre = "" if self.model == "llama" else resolve_pre(metadata.get("tokenizer.ggml.pre"))
        self._read_special_ids(metadata)
        self._read_flags(metadata)
        self._backend = self._build_backend(metadata)
        self._special = self._special_tokens()
        self._eot_ids = self._end_of_turn_ids()
        self._bytes_cache: dict[int, bytes] = {}

    def _read_special_ids(self, metadata: Mapping[str, Any]) -> None:
        n = len(self.tokens)
        self._bos = _opt_id(metadata, "bos", n)
        self._eos = _opt_id(metadata, "eos", n)
        self._eot = _opt_id(metadata, "eot", n)
        self._eom = _opt_id(metadata, "eom", n)
        self.unk_id = _opt_id(metadata, "unknown", n)
        self.pad_id = _opt_id(metadata, "padding", n)

    def _read_flags(self, metadata: Mapping[str, Any]) -> None:
        """add_bos / add_eos / add_space_prefix, with llama.cpp's defaults where the GGUF has none."""
        is_spm = self.model == "llama"
        default_bos = is_spm or self.pre == "llama-bpe"
        self.add_bos: bool = bool(metadata.get("tokenizer.ggml.add_bos_token", default_bos))
        self.add_eos: bool = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
        self.add_space_prefix: bool = is_spm and bool(metadata.get("tokenizer.ggml.add_space_prefix", True))

    def _build_backend(self, metadata: Mapping[str, Any]) -> HFBackend | CompactBPE:
        if self.model == "llama":
            scores = metadata.get("tokenizer.ggml.scores") or [0.0] * len(self.tokens)
            return _build_spm(self.tokens, scores, self.token_types, self.unk_id)
        merges = metadata.get("tokenizer.ggml.merges")
        if merges is None:
            raise TokenizerError("gpt2 tokenizer without tokenizer.ggml.merges")
        regexes = PRE_TOKENIZER_REGEXES[self.pre]
        return build_gpt2(self.tokens, merges, regexes, ignore_merges=self.pre in _IGNORE_MERGES)

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """Read the tokenizer of the GGUF file at `path`."""
        with GGUFFile(path) as gguf:
            return cls(gguf.metadata)

    # -- ids ------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    @property
    def bos_id(self) -> int | None:
        return self._bos

    @property
    def eos_id(self) -> int | None:
        return self._eos

    @property
    def eot_ids(self) -> frozenset[int]:
        """Ids that end generation: eos, eot, eom and end-of-turn control tokens present in the vocab."""
        return self._eot_ids

    def _end_of_turn_ids(self) -> frozenset[int]:
        ids = {i for i in (self._eos, self._eot, self._eom) if i is not None}
        ids |= {i for i, t in enumerate(self.tokens) if t in _EOG_TEXTS and self.is_control(i)}
        return frozenset(ids)

    def token_type(self, token_id: int) -> TokenType:
        return TokenType(self.token_types[token_id])

    def is_control(self, token_id: int) -> bool:
        """Control or unknown token: rendered as text only when special tokens are shown."""
        return self.token_types[token_id] in (TokenType.CONTROL, TokenType.UNKNOWN)

    # -- encode ---------------------------------------------------------------------------------------

    def _special_tokens(self) -> list[tuple[str, int, bool]]:
        """(text, id, needs_special) for tokens matched in the text, longest text first."""
        out = []
        for i, (tok, tt) in enumerate(zip(self.tokens, self.token_types, strict=False)):
            if tok and tt in (TokenType.CONTROL, TokenType.UNKNOWN, TokenType.USER_DEFINED):
                out.append((tok, i, tt != TokenType.USER_DEFINED))
        out.sort(key=lambda x: -len(x[0]))
        return out

    def split_special(self, text: str, special: bool) -> list[str | int]:
        """Split `text` into raw-text fragments (str) and special token ids (int), as llama.cpp does."""
        fragments: list[str | int] = [text]
        for tok, tid, needs_special in self._special:
            if (needs_special and not special) or tok not in text:
                continue
            fragments = [piece for frag in fragments for piece in _split_on(frag, tok, tid)]
        return [f for f in fragments if f != ""]

    def encode(
        self, text: str, special: bool = False, add_bos: bool | None = None, add_eos: bool | None = None
    ) -> list[int]:
        """Token ids of `text`.

        special: parse control tokens written in the text (e.g. "<|im_start|>") as single tokens.
        add_bos / add_eos: None takes the GGUF's add_bos_token / add_eos_token.
        """
        add_bos = self.add_bos if add_bos is None else add_bos
        add_eos = self.add_eos if add_eos is None else add_eos
        if _SURROGATE.search(text):
            text = _without_surrogates(text)
        ids: list[int] = []
        if add_bos and self._bos is not None:
            ids.append(self._bos)
        ids.extend(self._encode_fragments(self.split_special(text, special)))
        if add_eos and self._eos is not None:
            ids.append(self._eos)
        return ids

    def _encode_fragments(self, fragments: list[str | int]) -> list[int]:
        texts: list[str] = []
        prev_special = True
        for frag in fragments:
            if isinstance(frag, int):
                prev_special = True
                continue
            if self.model == "llama":
                frag = (" " + frag if self.add_space_prefix and prev_special else frag).replace(" ", "▁")
            texts.append(frag)
            prev_special = False
        encoded = iter(self._backend.encode_texts(texts))
        ids: list[int] = []
        for frag in fragments:
            ids.extend([frag] if isinstance(frag, int) else next(encoded))
        return ids

    # -- decode ---------------------------------------------------------------------------------------

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes token `token_id` stands for (control tokens as their text, unused as b"")."""
        cached = self._bytes_cache.get(token_id)
        if cached is None:
            cached = self._bytes_cache[token_id] = self._piece_bytes(token_id)
        return cached

    def _piece_bytes(self, token_id: int) -> bytes:
        tok, tt = self.tokens[token_id], self.token_types[token_id]
        if tt in (TokenType.CONTROL, TokenType.UNKNOWN, TokenType.USER_DEFINED):
            return tok.encode()
        if tt == TokenType.UNUSED:
            return b""
        if self.model == "gpt2":
            return byte_level_decode(tok)
        if tt == TokenType.BYTE and len(tok) == 6 and tok.startswith("<0x"):
            return bytes([int(tok[3:5], 16)])
        return tok.replace("▁", " ").encode()

    def token_piece(self, token_id: int) -> str:
        """Text of one token (a partial UTF-8 character shows as U+FFFD)."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int], skip_special: bool = False) -> bytes:
        """Concatenated bytes of `ids`; see `decode`."""
        return b"".join(_PieceStream(self, skip_special).pieces(ids))

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of `ids`. skip_special drops control tokens; SentencePiece's prefix space is removed."""
        return self.decode_bytes(ids, skip_special).decode("utf-8", errors="replace")

    def incremental_decoder(self, skip_special: bool = False) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special)

    def stream_decode(self, ids: Iterable[int], skip_special: bool = False) -> Iterator[str]:
        """Yield text as `ids` arrive, never splitting a UTF-8 character (empty strings skipped)."""
        dec = IncrementalDecoder(self, skip_special)
        for i in ids:
            if text := dec.feed(i):
                yield text
        if text := dec.flush():
            yield text

    def __repr__(self) -> str:
        return f"Tokenizer(model={self.model!r}, pre={self.pre!r}, vocab_size={self.vocab_size})"


def _split_on(fragment: str | int, tok: str, tid: int) -> list[str | int]:
    if isinstance(fragment, int) or tok not in fragment:
        return [fragment]
    parts = fragment.split(tok)
    out: list[str | int] = [parts[0]]
    for part in parts[1:]:
        out += [tid, part]
    return out


class _PieceStream:
    """Token bytes in order, applying skip_special and SentencePiece's leading-space removal.

    A SentencePiece encode prepends a space to each fragment that starts the text or follows a special
    token; the first normal token in such a position loses one leading space here, so that
    decode(encode(text)) == text.
    """

    def __init__(self, tok: Tokenizer, skip_special: bool):
        self.tok, self.skip_special = tok, skip_special
        self.prev_special = True

    def piece(self, token_id: int) -> bytes:
        tok = self.tok
        if tok.is_control(token_id):
            self.prev_special = True
            return b"" if self.skip_special else tok.token_bytes(token_id)
        data = tok.token_bytes(token_id)
        if tok.token_types[token_id] == TokenType.USER_DEFINED:
            self.prev_special = True
            return data
        if tok.add_space_prefix and self.prev_special and data.startswith(b" "):
            data = data[1:]
        self.prev_special = False
        return data

    def pieces(self, ids: Iterable[int]) -> Iterator[bytes]:
        return (self.piece(int(i)) for i in ids)


class IncrementalDecoder:
    """Streaming detokenizer: `feed` one id at a time, get only complete UTF-8 characters back.

    Bytes of a character split across tokens are held until the character is complete; invalid
    sequences come out as U+FFFD. Call `flush` at the end for whatever is still held.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self._stream = _PieceStream(tokenizer, skip_special)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        """New complete text after `token_id` (possibly "")."""
        return self._utf8.decode(self._stream.piece(int(token_id)))

    def flush(self) -> str:
        """Text still held back (an incomplete character becomes U+FFFD); the decoder resets."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
