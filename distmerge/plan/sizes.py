"""Sizes as users write them: ``5GB`` (10⁹), ``500MiB`` (2²⁰) or a plain byte count."""

from __future__ import annotations

import re

from distmerge.errors import PlanError

__all__ = ["parse_size"]

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
}


def parse_size(size: int | str) -> int:
    """Parse ``5GB`` (10⁹), ``500MiB`` (2²⁰) or a plain byte count.

    >>> parse_size("5GB"), parse_size("1.5MiB"), parse_size(1024)
    (5000000000, 1572864, 1024)
    """
    if isinstance(size, int):
        value = size
    else:
        m = _SIZE_RE.match(str(size))
        if not m or m.group(2).lower() not in _UNITS:
            raise PlanError(f"cannot parse size {size!r}; expected e.g. 5GB, 500MB, 2GiB or a byte count")
        value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise PlanError(f"size must be positive, got {size!r}")
    return value
