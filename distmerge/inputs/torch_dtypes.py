"""safetensors dtype codes <-> torch dtypes (the codes themselves live in ``dtypes``, torch-free).

Example:
    >>> to_torch("BF16"), code_of(to_torch("F16"))
    (torch.bfloat16, 'F16')
"""

from __future__ import annotations

import torch

from distmerge.inputs.dtypes import ITEMSIZES, TORCH_NAMES

__all__ = ["DTYPES", "to_torch", "code_of"]

# Optional dtypes are looked up with getattr so an older torch simply lacks them (and a file using
# them gets a clear error, not a crash).
#: code -> (torch dtype, bytes per element), for the codes this torch has
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    code: (getattr(torch, name), ITEMSIZES[code]) for code, name in TORCH_NAMES.items() if hasattr(torch, name)
}
_BY_TORCH = {dt: code for code, (dt, _) in DTYPES.items()}


def to_torch(code: str) -> torch.dtype:
    """Return the torch dtype for a safetensors code (``KeyError`` if unknown)."""
    return DTYPES[code][0]


def code_of(dtype: torch.dtype) -> str:
    """The safetensors code of a torch dtype (``KeyError`` if safetensors has none)."""
    return _BY_TORCH[dtype]
