"""GGUF container: type table (with IQK ids and row metadata), memory-mapped reader, writer."""

from vramfit.gguf.reader import GGUFError, GGUFFile, StringArray, TensorInfo
from vramfit.gguf.types import GGMLType, UnknownTypeError, type_by_id, type_by_name
from vramfit.gguf.writer import GGUFWriter, copy_gguf

__all__ = [
    "GGMLType", "GGUFError", "GGUFFile", "GGUFWriter", "StringArray", "TensorInfo", "UnknownTypeError",
    "copy_gguf", "type_by_id", "type_by_name",
]  # fmt: skip
