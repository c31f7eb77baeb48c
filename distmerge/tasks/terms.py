"""Load a tensor's deltas as ``mergemath.Term`` values: the LoRA factors read and checked finite.

Shared by the merge tasks (``unit``), the verify tasks (``checks``) and the in-memory merge
(``app.compat``); ``read(path, key)`` decides where the factors come from.

Example:
    >>> import torch
    >>> from distmerge.formats.normalize import Delta, FactorRef
    >>> refs = (FactorRef("l.pth", "a", "F32", (1, 2), "down"), FactorRef("l.pth", "b", "F32", (2, 1), "up"))
    >>> [t.kind for t in load_terms([Delta("w", "lora", refs, 1.0, 0.5, "l.pth")], lambda p, k: torch.ones(1))]
    ['lora']
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from distmerge.errors import DistmergeError, ShardWriteError
from distmerge.formats.kinds import DeltaKind
from distmerge.formats.normalize import Delta
from distmerge.tasks.mergemath import Term

__all__ = ["load_terms"]


def load_terms(deltas: Sequence[Delta], read: Callable[[str, str], torch.Tensor]) -> list[Term]:
    """Load each delta's factors with ``read(path, key)``; replacements (``set``) come first.

    Raises:
        ShardWriteError: a factor cannot be read, or holds NaN/Inf (the message names the file).
    """
    terms = []
    for d in sorted(deltas, key=lambda d: d.kind != DeltaKind.SET):
        try:
            factors = tuple(read(f.path, f.key) for f in d.factors)
        except DistmergeError:
            raise
        except Exception as e:  # a factor that existed at plan time but cannot be read now
            raise ShardWriteError(
                f"{d.source}: cannot read factor for '{d.target}' ({type(e).__name__}: {e})"
            ) from None
        for f, t in zip(d.factors, factors):  # even at weight 0: a NaN factor is a broken file
            if t.is_floating_point() and not bool(torch.isfinite(t.float() if t.dtype.itemsize == 1 else t).all()):
                raise ShardWriteError(
                    f"merged tensor '{d.target}' would hold NaN/Inf values: '{f.key}' in "
                    f"{d.source} holds NaN/Inf (a damaged file, or saved after a diverged step)"
                )
        terms.append(Term(d.kind, d.coef, factors, tuple(f.role for f in d.factors), d.transpose, d.dora, d.strength))
    return terms
