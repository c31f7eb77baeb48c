"""One table mapping safetensors dtype codes to torch dtypes and element sizes.

Example:
    >>> from distmerge.dtypes import to_torch, itemsize, code_of
    >>> to_torch("BF16"), itemsize("F32"), code_of(to_torch("F16"))
    (torch.bfloat16, 4, 'F16')
"""

from __future__ import annotations

import torch

__all__ = ["DTYPES", "FLOAT_CODES", "FP8_CODES", "CLI_DTYPES", "to_torch", "itemsize", "code_of", "is_float"]

# code -> (torch dtype name, bytes per element). Optional dtypes are looked up with getattr so an
# older torch simply lacks them (and a file using them gets a clear error, not a crash).
_TABLE: dict[str, tuple[str, int]] = {
    "BOOL": ("bool", 1),
    "U8": ("uint8", 1),
    "I8": ("int8", 1),
    "I16": ("int16", 2),
    "U16": ("uint16", 2),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I32": ("int32", 4),
    "U32": ("uint32", 4),
    "F32": ("float32", 4),
    "F64": ("float64", 8),
    "I64": ("int64", 8),
    "U64": ("uint64", 8),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}

DTYPES: dict[str, tuple[torch.dtype, int]] = {
    code: (getattr(torch, name), size)
    for code, (name, size) in _TABLE.items()
    if hasattr(torch, name)
}
_BY_TORCH = {dt: code for code, (dt, _) in DTYPES.items()}

#: codes whose tensors LoRA deltas may be added to (and ``--dtype`` converts)
FLOAT_CODES = frozenset({"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"})
#: the float8 codes (merged through float32; ``--dtype`` to them writes scaled fp8, see ``fp8``)
FP8_CODES = frozenset({"F8_E4M3", "F8_E5M2"})

#: ``--dtype`` spellings -> safetensors code (``keep`` -> None)
CLI_DTYPES: dict[str, str | None] = {
    "keep": None,
    "bf16": "BF16",
    "bfloat16": "BF16",
    "fp16": "F16",
    "float16": "F16",
    "fp32": "F32",
    "float32": "F32",
    "fp8_e4m3fn": "F8_E4M3",
    "float8_e4m3fn": "F8_E4M3",
    "fp8_e5m2": "F8_E5M2",
    "float8_e5m2": "F8_E5M2",
}


def to_torch(code: str) -> torch.dtype:
    """Return the torch dtype for a safetensors code (``KeyError`` if unknown)."""
    return DTYPES[code][0]


def itemsize(code: str) -> int:
    """Bytes per element of a safetensors code (``KeyError`` if unknown)."""
    return DTYPES[code][1]


def code_of(dtype: torch.dtype) -> str:
    """The safetensors code of a torch dtype (``KeyError`` if safetensors has none)."""
    return _BY_TORCH[dtype]


def is_float(code: str) -> bool:
    """True for floating-point codes, the only ones a delta can be added to."""
    return code in FLOAT_CODES
