"""Hand freed heap memory back to the system.

glibc keeps freed blocks for reuse; after a model load (the tokenizer's and parser's temporaries)
and after a long prefill (its activations) that can be tens of MiB the process holds for nothing,
more than the whole working set of a small model's decode. `release_free_heap` asks malloc to
return it. It is a no-op where the C library has no `malloc_trim` (musl, macOS).
"""

from __future__ import annotations

import ctypes


def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()


def release_free_heap() -> None:
    if _TRIM is not None:
        _TRIM(0)
