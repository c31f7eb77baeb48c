"""How ``verify`` compares: the rows it samples, the float64 reference it recomputes them to, and the
tally of ulp distances and errors over a tensor (``Compare``), folded over tasks (``ValueStats``).

Example:
    >>> rows = sample_rows("blocks.0.q.weight", n=10, rows=3, seed=0, full=False)
    >>> len(rows), rows == sorted(rows), rows == sample_rows("blocks.0.q.weight", 10, 3, 0, False)
    (3, True, True)
    >>> geometry((4, 3, 2)), geometry(())
    ((4, 6), (1, 1))
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from distmerge.formats.kinds import DeltaKind
from distmerge.inputs.dtypes import itemsize
from distmerge.inputs.header import TensorInfo
from distmerge.inputs.torch_dtypes import to_torch
from distmerge.tasks.mergemath import Term
from distmerge.tasks.reading import Source, read_bytes
from distmerge.tasks.ulp import error_text, finite, show_value, ulp_distance, ulp_tolerance

__all__ = [
    "CHECKSUM",
    "NEAR",
    "NONFINITE",
    "STRUCTURE",
    "UNTOUCHED",
    "VALUE",
    "Compare",
    "ValueStats",
    "Worst",
    "geometry",
    "read_rows",
    "reference_rows",
    "sample_rows",
    "where",
]

#: errors of values beyond the ulp tolerance kept while the tensor's ``max|ref|`` is not known yet
#: (only their count depends on it; pass/fail is exact whatever is dropped)
_PENDING = 1 << 20
#: near-cancellation allowance: |out - ref| <= NEAR * max|ref| of the tensor
NEAR = 1e-6
#: failure ranks, most serious first (the verdict lists failures in this order)
STRUCTURE, NONFINITE, VALUE, UNTOUCHED, CHECKSUM = range(5)


@dataclass(frozen=True)
class ValueStats:
    """How close the recomputed values of one tensor (or of many, ``merge``d) came to the reference.

    >>> a = ValueStats(values=10, worst_ulp=3, worst_key="a", near=0, worst_rel=1e-7, worst_rel_key="a")
    >>> b = ValueStats(values=5, worst_ulp=900, worst_key="b", near=2, worst_rel=4e-8, worst_rel_key="b")
    >>> m = a.merge(b)
    >>> m.values, m.worst_ulp, m.worst_key, m.near, m.worst_rel_key
    (15, 900, 'b', 2, 'a')
    """

    values: int = 0  #: values compared with the reference
    worst_ulp: int = 0  #: the largest ulp distance of any finite compared value, allowance or not
    worst_key: str = ""
    near: int = 0  #: values beyond the ulp tolerance that passed by the near-cancellation allowance
    worst_rel: float = 0.0  #: the largest ``|out - ref| / max|ref|`` (the tensor's largest value)
    worst_rel_key: str = ""

    def merge(self, other: ValueStats) -> ValueStats:
        """Both together: counts add up, the worst of each kind (and its key) is kept."""
        u = max(self, other, key=lambda x: (x.worst_ulp, bool(x.worst_key)))
        r = max(self, other, key=lambda x: (x.worst_rel, bool(x.worst_rel_key)))
        return ValueStats(
            self.values + other.values, u.worst_ulp, u.worst_key, self.near + other.near, r.worst_rel, r.worst_rel_key
        )


def geometry(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, elements per row): rows are the first axis; a 0-d tensor is one row of one."""
    if not shape:
        return 1, 1
    return shape[0], math.prod(shape[1:])


def where(shape: tuple[int, ...], row: int) -> str:
    return "value" if not shape else f"element {row}" if len(shape) == 1 else f"row {row}"


def sample_rows(key: str, n: int, rows: int, seed: int, full: bool) -> list[int]:
    """Sorted row indices to recompute: all with ``full``, else ``rows`` drawn with a generator
    seeded from ``seed`` and the key (so the sample does not depend on how tensors are grouped)."""
    if full or rows >= n:
        return list(range(n))
    if rows <= 0:
        return []
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (1 << 63))
    return sorted(torch.randperm(n, generator=g)[:rows].tolist())


def read_rows(fd: Source, info: TensorInfo, per: int, rows: Sequence[int]) -> torch.Tensor:
    """Rows ``rows`` (sorted) of ``info`` as a ``[len(rows), per]`` tensor of its dtype; runs of
    consecutive rows are read at once."""
    row_bytes = per * itemsize(info.dtype)
    parts: list[bytearray] = []
    i = 0
    while i < len(rows):
        j = i
        while j + 1 < len(rows) and rows[j + 1] == rows[j] + 1:
            j += 1
        parts.append(read_bytes(fd, info.offset + rows[i] * row_bytes, (j - i + 1) * row_bytes))
        i = j + 1
    if not parts or row_bytes == 0:
        return torch.empty((len(rows), per), dtype=to_torch(info.dtype))
    raw = parts[0] if len(parts) == 1 else bytearray(b"".join(parts))
    return torch.frombuffer(raw, dtype=to_torch(info.dtype)).reshape(len(rows), per)


def reference_rows(w: torch.Tensor, terms: Sequence[Term], n: int, per: int, rows: Sequence[int]) -> torch.Tensor:
    """``W + Σ coef·ΔW`` for ``rows`` in float64, computed independently of ``mergemath`` (plain
    LoRA, ``diff`` and ``set`` terms, whose rows depend only on the same rows of one factor)."""
    idx = torch.tensor(list(rows), dtype=torch.long)
    acc = w.to(torch.float64)
    for t in terms:  # load_terms puts replacements first
        if t.kind == DeltaKind.SET:
            acc = t.factors[0].reshape(n, per).index_select(0, idx).to(torch.float64)
        elif t.kind == DeltaKind.DIFF:
            acc = acc + t.coef * t.factors[0].reshape(n, per).index_select(0, idx).to(torch.float64)
        else:
            up, down = t.get("up"), t.get("down")
            assert up is not None and down is not None  # row-local LoRA terms have both factors
            b = up.flatten(1).index_select(0, idx).to(torch.float64)
            acc = acc + t.coef * (b @ down.flatten(1).to(torch.float64))
    return acc


@dataclass(frozen=True)
class Worst:
    """The compared value with the largest ``|out - ref|`` beyond the ulp tolerance."""

    diff: float
    ulp: int
    row: int
    out: float
    ref: float


class Compare:
    """Accumulates the comparison of one merged tensor, chunk by chunk.

    Every finite value counts toward the worst ulp and the worst error relative to ``max|ref|``. A
    value beyond the ulp tolerance still passes if ``|out - ref| <= NEAR · max|ref|`` (where W and
    ΔW cancel); ``max|ref|`` only grows as chunks arrive, so such a value is counted as soon as the
    running maximum admits it, and the errors not admitted yet wait in ``pending``.
    """

    def __init__(self, code: str, key: str) -> None:
        self.code, self.key = code, key
        self.tol = ulp_tolerance(code)
        self.ref_max = 0.0
        self.values = self.worst_ulp = self.near = self.dropped = 0
        self.max_diff = 0.0
        self.pending = torch.empty(0, dtype=torch.float64)
        self.worst: Worst | None = None

    def add(self, out: torch.Tensor, ref64: torch.Tensor, rows: Sequence[int]) -> None:
        """Compare ``out`` (``[len(rows), per]``, the output dtype) with the float64 ``ref64``."""
        if out.numel() == 0:
            return
        ref = ref64.to(out.dtype)
        rf = ref.to(torch.float64)
        fin_out, fin_ref = finite(out), torch.isfinite(rf)
        ulp = ulp_distance(out, ref)
        diff = (out.to(torch.float64) - rf).abs()
        self.values += out.numel()
        if bool(fin_ref.any()):
            self.ref_max = max(self.ref_max, float(rf[fin_ref].abs().max()))
        if bool(fin_out.any()):  # non-finite outputs are reported by the finite pass
            self.worst_ulp = max(self.worst_ulp, int(ulp[fin_out].max()))
        both = fin_out & fin_ref
        if bool(both.any()):
            self.max_diff = max(self.max_diff, float(diff[both].max()))
        bad = (ulp > self.tol) & fin_out
        if bool(bad.any()):
            err = torch.where(fin_ref, diff, math.inf)
            self.pending = torch.cat([self.pending, err[bad]])
            flat = int(torch.where(bad, err, -1.0).reshape(-1).argmax())
            r, col = divmod(flat, out.shape[1])
            if self.worst is None or float(err[r, col]) > self.worst.diff:
                self.worst = Worst(float(err[r, col]), int(ulp[r, col]), rows[r], float(out[r, col]), float(rf[r, col]))
        self._settle()

    def _settle(self) -> None:
        keep = self.pending > NEAR * self.ref_max
        self.near += int((~keep).sum())
        self.pending = self.pending[keep]
        if self.pending.numel() > _PENDING:  # a wrong LoRA: keep the smallest (only the count suffers)
            self.dropped += self.pending.numel() - _PENDING
            self.pending = torch.topk(self.pending, _PENDING, largest=False, sorted=False).values

    def result(self) -> tuple[ValueStats, Worst | None, int]:
        """(statistics, the worst failing value or None, how many values fail)."""
        failing = self.worst is not None and self.worst.diff > NEAR * self.ref_max
        near = self.near + (0 if failing else self.pending.numel() + self.dropped)
        rel = self.max_diff / self.ref_max if self.ref_max > 0 else 0.0 if self.max_diff == 0 else math.inf
        stats = ValueStats(
            self.values, self.worst_ulp, self.key if self.values else "", near, rel, self.key if self.values else ""
        )
        if not failing:
            return stats, None, 0
        return stats, self.worst, int(self.pending.numel()) + self.dropped

    def failure(self, shape: tuple[int, ...], name: str) -> list[tuple[int, int, str]]:
        """The failure of this tensor (of ``shape``, in file ``name``); empty when it passes."""
        _, w, n = self.result()
        if w is None:
            return []
        return [
            (
                VALUE,
                w.ulp,
                (
                    f"{self.key} {where(shape, w.row)}: {show_value(w.out, self.code)} vs expected "
                    f"{show_value(w.ref, self.code)} ({error_text(w.ulp, w.out, w.ref)}; "
                    f"{n} of {self.values} compared values beyond tolerance) ({name})"
                ),
            )
        ]
