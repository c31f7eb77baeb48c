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
from distmerge.formats.normalize import Delta, FactorRef
from distmerge.inputs.torch_dtypes import to_torch
from distmerge.tasks.mergemath import Term

__all__ = ["load_terms", "read_factor", "RowReader"]


def _sel(t: torch.Tensor, span: tuple[int, int, int] | None, dim: int) -> torch.Tensor:
    if span is None:
        return t
    start, stop, step = span
    return t[start:stop:step] if dim == 0 else t[:, start:stop:step]


#: ``read_rows(path, key, start, stop)``: rows of a stored tensor, reading only their bytes
RowReader = Callable[[str, str, int, int], torch.Tensor]


def read_factor(
    f: FactorRef, read: Callable[[str, str], torch.Tensor], read_rows: RowReader | None = None
) -> torch.Tensor:
    """The tensor of ``f``: the stored tensor itself, or the blocks of ``f.pieces`` placed in a
    ``f.shape`` tensor of ``f.dtype`` (every element covered once: the plan guarantees it). A block
    of whole rows is read with ``read_rows`` when given (only its bytes); others slice ``read``'s.

    >>> from distmerge.formats.normalize import Piece
    >>> src = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, 1)}
    >>> f = FactorRef("x", "a", "F32", (2, 3), "down", (Piece("x", "a", cols=(0, 2, 1)), Piece("x", "b", at=(0, 2))))
    >>> read_factor(f, lambda p, k: src[k]).tolist()
    [[0.0, 1.0, 1.0], [3.0, 4.0, 1.0]]
    """
    if not f.pieces:
        return read(f.path, f.key)
    out = torch.empty(f.shape, dtype=to_torch(f.dtype))
    for p in f.pieces:
        if read_rows is not None and p.cols is None and p.rows is not None and p.rows[2] == 1:
            block = read_rows(p.path, p.key, p.rows[0], p.rows[1])
        else:
            block = _sel(_sel(read(p.path, p.key), p.rows, 0), p.cols, 1)
        r, c = p.at
        if block.dim() != 2 or r + block.shape[0] > f.shape[0] or c + block.shape[1] > f.shape[1]:
            raise ValueError(f"'{p.key}' in {p.path}: block {tuple(block.shape)} does not fit {f.shape} at {p.at}")
        out[r : r + block.shape[0], c : c + block.shape[1]] = block
    return out


def load_terms(
    deltas: Sequence[Delta], read: Callable[[str, str], torch.Tensor], read_rows: RowReader | None = None
) -> list[Term]:
    """Load each delta's factors with ``read(path, key)`` (and ``read_rows`` for row blocks);
    replacements (``set``) come first.

    Raises:
        ShardWriteError: a factor cannot be read, or holds NaN/Inf (the message names the file).
    """
    terms = []
    for d in sorted(deltas, key=lambda d: d.kind != DeltaKind.SET):
        try:
            factors = tuple(read_factor(f, read, read_rows) for f in d.factors)
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
        roles = tuple(f.role for f in d.factors)
        terms.append(Term(d.kind, d.coef, factors, roles, d.transpose, d.dora, d.strength))
    return terms
