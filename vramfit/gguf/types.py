"""The ggml tensor type table: ids, block geometry and per-row metadata.

Mainline ids and block sizes come from gguf-py; ik_llama.cpp's IQK ids (133-158) and their per-row
metadata (a float32 or fp16 scale stored in front of every row) are added here, following
shared/docs/iqk-formats.md section 1. Row sizes always include the row metadata.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType


@dataclass(frozen=True)
class GGMLType:
    name: str  # upper-case ggml name, e.g. "IQ4_KS"
    id: int  # the value stored in a GGUF tensor-info record
    block_size: int  # weights per block
    type_size: int  # bytes per block
    row_meta: int = 0  # bytes stored once per row, in front of the blocks

    def row_nbytes(self, n_per_row: int) -> int:
        if n_per_row % self.block_size:
            raise ValueError(
                f"{self.name}: row length {n_per_row} is not a multiple of the block size {self.block_size}"
            )
        return self.row_meta + (n_per_row // self.block_size) * self.type_size

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Bytes of a tensor whose shape is given innermost-last (numpy order)."""
        n_rows = 1
        for d in shape[:-1]:
            n_rows *= d
        return n_rows * self.row_nbytes(shape[-1]) if shape else self.row_nbytes(1)

    @property
    def bpw(self) -> float:
        return 8.0 * self.type_size / self.block_size


# ik_llama.cpp-only types: (name, id, block_size, type_size, row_meta)
_IK_TYPES = [
    ("I2_S", 36, 1, 1, 0),
    ("Q1_0_G128", 41, 128, 18, 0),
    ("Q6_0", 133, 32, 26, 0),
    ("IQ1_BN", 134, 64, 13, 2),
    ("IQ2_BN", 135, 64, 16, 4),
    ("IQ2_K", 137, 256, 76, 0),
    ("IQ3_K", 138, 256, 110, 0),
    ("IQ4_K", 139, 256, 144, 0),
    ("IQ5_K", 140, 256, 176, 0),
    ("IQ6_K", 141, 256, 212, 0),
    ("IQ4_KS", 144, 256, 136, 4),
    ("IQ2_KS", 145, 256, 70, 2),
    ("IQ4_KSS", 146, 256, 128, 4),
    ("Q8_KV", 151, 32, 32, 8),
    ("IQ5_KS", 152, 256, 168, 4),
    ("IQ2_KT", 153, 256, 68, 4),
    ("IQ3_KT", 154, 256, 100, 4),
    ("IQ4_KT", 155, 256, 128, 4),
    ("IQ3_KS", 156, 256, 102, 2),
    ("IQ2_KL", 157, 256, 86, 2),
    ("IQ1_KT", 158, 256, 56, 4),
]

# Interleaved-row ids written by ik's --repack; recognised only to name them in errors.
_REPACKED_IDS = range(202, 400)


def _build() -> dict[int, GGMLType]:
    table = {t.value: GGMLType(t.name, t.value, *GGML_QUANT_SIZES[t]) for t in GGMLQuantizationType}
    # ik's meaning wins where ids overlap (36 is a slot mainline retired; 41 has the same layout)
    table.update({tid: GGMLType(n, tid, b, s, m) for n, tid, b, s, m in _IK_TYPES})
    # gguf-py's Q8_1 entry (32, 40) is stale (float d and s); ggml's block_q8_1 in mainline and ik is
    # fp16 d, fp16 s and 32 int8, static_asserted to 36 bytes
    table[GGMLQuantizationType.Q8_1.value] = GGMLType("Q8_1", GGMLQuantizationType.Q8_1.value, 32, 36)
    return table


TYPES_BY_ID: dict[int, GGMLType] = _build()
TYPES_BY_NAME: dict[str, GGMLType] = {t.name.lower(): t for t in TYPES_BY_ID.values()}


class UnknownTypeError(ValueError):
    pass


def type_by_id(type_id: int) -> GGMLType:
    t = TYPES_BY_ID.get(type_id)
    if t is None:
        if type_id in _REPACKED_IDS:
            raise UnknownTypeError(
                f"tensor type id {type_id} is an ik_llama.cpp row-interleaved (_R4/_R8) type; "
                "requantize the file without --repack"
            )
        raise UnknownTypeError(f"unknown ggml tensor type id {type_id}")
    return t


def type_by_name(name: str) -> GGMLType:
    t = TYPES_BY_NAME.get(name.lower())
    if t is None:
        raise UnknownTypeError(f"unknown ggml tensor type {name!r}")
    return t


# llama_ftype values (`general.file_type`) -> display names; ik-only values from iqk-formats.md 1.2
FILE_TYPES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K - Medium",
    11: "Q3_K - Small", 12: "Q3_K - Medium", 13: "Q3_K - Large", 14: "Q4_K - Small", 15: "Q4_K - Medium",
    16: "Q5_K - Small", 17: "Q5_K - Medium", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K - Small",
    22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S",
    29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 38: "MXFP4", 135: "Q6_0", 136: "IQ1_BN",
    137: "IQ2_BN", 138: "IQ2_K", 139: "IQ3_K", 140: "IQ4_K", 141: "IQ5_K", 142: "IQ6_K", 145: "IQ4_KS",
    146: "IQ3_KL", 147: "IQ2_KS", 148: "IQ4_KSS", 150: "IQ5_KS", 151: "IQ2_KT", 152: "IQ3_KT",
    153: "IQ4_KT", 154: "IQ3_KS", 155: "IQ2_KL", 156: "IQ1_KT",
}  # fmt: skip


def file_type_name(ftype: int | None) -> str:
    if ftype is None:
        return "?"
    return FILE_TYPES.get(int(ftype), f"ftype {ftype}")
