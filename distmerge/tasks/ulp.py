"""Distances between float values in units in the last place, and values printed so that
neighbours differ: the arithmetic of ``verify``'s comparisons.

ULP distances use the monotonic integer line of each float format; values are printed with enough
digits to tell neighbours apart, and with their bits.

Example:
    >>> ulp_distance(torch.tensor([1.0]), torch.nextafter(torch.tensor([1.0]), torch.tensor([2.0]))).tolist()
    [1]
    >>> show_value(0.1, "F32"), show_value(0.1, "BF16")
    ('0.100000001 (0x3dcccccd)', '0.1001 (0x3dcd)')
"""

from __future__ import annotations

import math

import torch

from distmerge.inputs.dtypes import itemsize
from distmerge.inputs.torch_dtypes import to_torch

__all__ = ["error_text", "finite", "show_value", "ulp_distance", "ulp_tolerance"]

_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise distance in units in the last place between two float tensors of one dtype.

    Bit patterns are mapped to a monotonic integer line (``i`` if ``i >= 0`` else ``INT_MIN - i``
    for the signed integer of the same width), so ``+0``/``-0`` are 0 apart and the smallest
    positive and negative subnormals 2 apart. Returns int64; float64 distances across zero that
    do not fit saturate at the int64 maximum instead of wrapping around.

    >>> x = torch.tensor([0.0, 1.0, -0.0], dtype=torch.bfloat16)
    >>> y = torch.tensor([-0.0, 1.0078125, 0.0], dtype=torch.bfloat16)
    >>> ulp_distance(x, y).tolist()
    [0, 1, 0]
    >>> big = torch.tensor([1e300], dtype=torch.float64)
    >>> ulp_distance(big, -big).item() == torch.iinfo(torch.int64).max
    True
    """
    if a.dtype != b.dtype:
        raise ValueError(f"ulp_distance needs one dtype, got {a.dtype} and {b.dtype}")
    oa, ob = _ordered(a), _ordered(b)
    if a.element_size() < 8:
        return (oa - ob).abs()  # at most 2^32 apart: exact in int64
    top = torch.iinfo(torch.int64).max  # |ordered| <= top, so only opposite signs can overflow
    same = (oa >= 0) == (ob >= 0)
    ua, ub = oa.abs(), ob.abs()
    across = torch.where(ub > top - ua, torch.full_like(ua, top), ua + ub)
    return torch.where(same, (oa - ob).abs(), across)


def _ordered(x: torch.Tensor) -> torch.Tensor:
    size = x.element_size()
    i = x.contiguous().view(_INT_VIEW[size]).to(torch.int64)
    lowest = -(1 << (8 * size - 1))
    return torch.where(i >= 0, i, lowest - i)


#: significant decimal digits that tell any two neighbouring values of a float format apart
_DIGITS = {8: 17, 4: 9, 2: 5, 1: 3}


def show_value(value: float, code: str) -> str:
    """``value`` (exactly representable in the safetensors float ``code``) as enough decimal digits
    to differ from its neighbours, followed by its raw bits in hex.

    >>> show_value(0.0430994, "F32"), show_value(-2.0, "F8_E4M3")
    ('0.0430993997 (0x3d3088ff)', '-2 (0xc0)')
    """
    t = torch.tensor([value], dtype=torch.float64).to(to_torch(code))
    size = t.element_size()
    digits = 4 if code == "BF16" else _DIGITS[size]
    bits = int(t.view(_INT_VIEW[size]).item()) & ((1 << (8 * size)) - 1)
    return f"{float(t.item()):.{digits}g} (0x{bits:0{2 * size}x})"


def error_text(ulp: int, got: float, want: float, unit: str = "ulp") -> str:
    """``N ulp, relative error R``: the relative error reads sensibly where a distance across zero
    (or a sign flip) is billions of ulp."""
    err = abs(got - want)
    rel = f"relative error {err / abs(want):.3g}" if want != 0 and math.isfinite(want) else f"error {err:.3g}"
    return f"{ulp} {unit}, {rel}"


def ulp_tolerance(code: str) -> int:
    return 16 if itemsize(code) >= 4 else 1


def finite(x: torch.Tensor) -> torch.Tensor:
    """``isfinite`` for any float dtype (torch has no fp8 kernel: fp8 is upcast, exactly)."""
    return torch.isfinite(x.to(torch.float32) if x.element_size() == 1 else x)
