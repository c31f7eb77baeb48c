"""GGML tensor types, as GGUF files store them (no torch; gguf-py is imported only when asked).

A GGUF tensor's type is named by gguf-py's ``GGMLQuantizationType``: ``F32``, ``F16``, ``BF16``,
``I8`` … ``F64`` have the same names, element sizes and little-endian bytes as the safetensors
codes of ``dtypes``, so they are those codes; the block-quantized types (``Q8_0``, ``Q4_K``,
``IQ4_XS`` …) pack ``block`` values of the innermost dimension into ``type_size`` bytes. Rows (the
first torch dimension, the last ggml one) are whole blocks, so a tensor's rows are contiguous
byte ranges of ``row_nbytes`` each, like any other dtype's.

Example:
    >>> is_quant("Q8_0"), is_quant("BF16"), is_quant("X")
    (True, False, False)
    >>> tensor_nbytes("Q8_0", (4, 64)), tensor_nbytes("BF16", (4, 64)), row_nbytes("Q4_K", (2, 512))
    (272, 512, 288)
"""

from __future__ import annotations

import functools
import math

from distmerge.inputs.dtypes import ITEMSIZES

__all__ = ["WRITABLE", "block_sizes", "is_quant", "row_nbytes", "tensor_nbytes"]

#: the block types gguf-py quantizes (``gguf.quants``: ``Q8_0`` bit-exact with ggml); the K-quants
#: and IQ types it only dequantizes
WRITABLE = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")


@functools.lru_cache(maxsize=1)
def _sizes() -> dict[str, tuple[int, int]]:
    from gguf.constants import GGML_QUANT_SIZES

    return {t.name: v for t, v in GGML_QUANT_SIZES.items()}


def block_sizes(code: str) -> tuple[int, int]:
    """``(values per block, bytes per block)`` of a GGML type (``KeyError`` if unknown)."""
    return _sizes()[code]


def is_quant(code: str) -> bool:
    """A block-quantized GGML type (not a plain element type that safetensors also has)."""
    return code not in ITEMSIZES and code in _sizes()


def tensor_nbytes(code: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of torch ``shape`` stored as ``code`` (a safetensors code or a GGML type)."""
    n = math.prod(shape)
    if code in ITEMSIZES:
        return n * ITEMSIZES[code]
    block, size = block_sizes(code)
    return n // block * size


def row_nbytes(code: str, shape: tuple[int, ...]) -> int:
    """Bytes of one index of the first dimension (a whole tensor's for fewer than 2 dimensions)."""
    return tensor_nbytes(code, shape[1:] if len(shape) >= 2 else shape)
