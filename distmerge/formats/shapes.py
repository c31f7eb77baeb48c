"""The shape rules of every delta kind: the shape its factors produce, and whether it fits a base tensor."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Protocol

from distmerge.formats.kinds import FULL_KINDS, DeltaKind

__all__ = ["implied_shape", "delta_shape_error", "TensorLike"]


class TensorLike(Protocol):
    """What the formats need to know of a tensor: a safetensors dtype code and a shape."""

    @property
    def dtype(self) -> str: ...
    @property
    def shape(self) -> tuple[int, ...]: ...


def implied_shape(kind: str, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]:
    """The shape a delta produces from its factor shapes: ``(out, in_flat)`` for factorized kinds,
    the tensor's own shape for ``diff``/``set``. Raises ``ValueError`` on inconsistent factors.

    >>> implied_shape("lora", {"down": (4, 16, 3, 3), "up": (8, 4, 1, 1)})
    (8, 144)
    """
    if kind in FULL_KINDS:
        (s,) = [v for v in shapes.values()]
        return tuple(s)
    if kind == DeltaKind.LORA:
        a, b = shapes["down"], shapes["up"]
        if len(a) < 2 or len(b) < 2:
            raise ValueError(f"factors must be at least 2-D, found A {a} and B {b}")
        if math.prod(b[1:]) != a[0]:
            raise ValueError(
                f"A has rank {a[0]} but B has rank {math.prod(b[1:])}"
                if len(b) == 2
                else f"B {b} does not match A's rank {a[0]} (expected (out, {a[0]}, 1, …))"
            )
        if "mid" in shapes:
            m = shapes["mid"]
            if m[:2] != (a[0], a[0]):
                raise ValueError(f"lora_mid {m} does not match rank {a[0]}")
            return (b[0], a[1] * math.prod(m[2:]))
        return (b[0], math.prod(a[1:]))
    if kind == DeltaKind.LOHA:
        w1a, w1b, w2a, w2b = (shapes[r] for r in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        if w1a[1] != w1b[0] or w2a[1] != w2b[0]:
            raise ValueError(f"LoHa factor ranks disagree: w1 {w1a}@{w1b}, w2 {w2a}@{w2b}")
        if "hada_t1" in shapes:
            t = shapes["hada_t1"]
            return (w1a[0], w1b[1] * math.prod(t[2:]))
        if (w1a[0], math.prod(w1b[1:])) != (w2a[0], math.prod(w2b[1:])):
            raise ValueError(
                f"LoHa halves differ: ({w1a[0]}, {math.prod(w1b[1:])}) vs ({w2a[0]}, {math.prod(w2b[1:])})"
            )
        return (w1a[0], math.prod(w1b[1:]))
    if kind == DeltaKind.LOKR:
        w1 = shapes.get("lokr_w1") or (shapes["lokr_w1_a"][0], shapes["lokr_w1_b"][1])
        if "lokr_w2" in shapes:
            w2 = shapes["lokr_w2"]
            w2_out, w2_in = w2[0], math.prod(w2[1:])
        elif "lokr_t2" in shapes:
            t = shapes["lokr_t2"]
            w2_out, w2_in = shapes["lokr_w2_a"][1], shapes["lokr_w2_b"][1] * math.prod(t[2:])
        else:
            w2_out, w2_in = shapes["lokr_w2_a"][0], math.prod(shapes["lokr_w2_b"][1:])
        return (w1[0] * w2_out, w1[1] * w2_in)
    raise ValueError(f"unknown delta kind {kind!r}")


def delta_shape_error(
    kind: str, shapes: dict[str, tuple[int, ...]], w_shape: tuple[int, ...], *, transpose: bool = False
) -> str | None:
    """Why a delta with factor ``shapes`` (by role) cannot be added to ``w_shape`` (None if it can).

    >>> delta_shape_error("lora", {"down": (4, 16), "up": (8, 4)}, (8, 16)) is None
    True
    >>> delta_shape_error("lora", {"down": (4, 16), "up": (8, 2)}, (8, 16))
    'A has rank 4 but B has rank 2'
    """
    if kind == DeltaKind.EXPERTS:
        return _experts_shape_error(shapes, w_shape, transpose=transpose)
    try:
        got = implied_shape(kind, shapes)
    except ValueError as e:
        return str(e)
    if kind in FULL_KINDS:
        return None if got == tuple(w_shape) else f"delta has shape {got}, base needs {tuple(w_shape)}"
    out, inner = got
    if transpose:
        out, inner = inner, out
    if not w_shape or out != w_shape[0] or inner != math.prod(w_shape[1:]):
        return (
            f"the delta is ({out}, {inner}) but base needs ({w_shape[0] if w_shape else '?'}, "
            f"{math.prod(w_shape[1:])}) for shape {tuple(w_shape)}"
        )
    return None


def _experts_shape_error(
    shapes: Mapping[str, tuple[int, ...]], w_shape: tuple[int, ...], *, transpose: bool
) -> str | None:
    """A fused expert tensor ``(E, out, in)`` (``(E, in, out)`` with ``transpose``) takes A
    ``(E·r, in)`` and B ``(out, E·r)``.

    >>> _experts_shape_error({"down": (8, 6), "up": (5, 8)}, (4, 5, 6), transpose=False) is None
    True
    >>> _experts_shape_error({"down": (8, 6), "up": (5, 8)}, (3, 5, 6), transpose=False)
    "A has 8 rows, not a multiple of the base's 3 experts"
    """
    a, b = shapes["down"], shapes["up"]
    if len(w_shape) != 3 or len(a) != 2 or len(b) != 2:
        return f"expects a 3-D expert tensor and 2-D factors, found base {tuple(w_shape)}, A {a}, B {b}"
    e, out, inner = w_shape
    if transpose:
        out, inner = inner, out
    if a[0] % e:
        return f"A has {a[0]} rows, not a multiple of the base's {e} experts"
    if b[1] != a[0]:
        return f"A has {a[0]} rows (experts x rank) but B has {b[1]} columns"
    if (b[0], a[1]) != (out, inner):
        return f"each expert's delta is ({b[0]}, {a[1]}) but the base's experts are ({out}, {inner})"
    return None
