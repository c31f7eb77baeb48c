"""What every job's plan shares: the work unit's shape, the unit size, and the fixed memory of a task.

A job's plan (``MergePlan``, ``ExtractPlan``, verify's groups) is plain data whose ``units`` the
driver dispatches; each unit says its ``index``, the bytes it moves (``nbytes``: for byte-balanced
cuts, scheduling order and progress) and the working memory its task asks Ray for (``memory``).

Example:
    >>> target_unit_bytes(1000, workers=2)  # four units per worker in flight
    125
    >>> target_unit_bytes(1000, workers=2, unit_size="64KiB")
    65536
    >>> target_unit_bytes(30 << 30, workers=2) == MAX_UNIT_BYTES  # a big job: many units of 512 MiB
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

from distmerge.errors import PlanError
from distmerge.plan.sizes import parse_size

__all__ = ["MAX_UNIT_BYTES", "TASK_OVERHEAD_BYTES", "JobPlan", "Unit", "partition_units", "target_unit_bytes"]

#: a task's fixed working memory beyond its tensors (interpreter, torch, buffers), asked of Ray per task
TASK_OVERHEAD_BYTES = 64 << 20
#: the most bytes a unit moves when its size is chosen for the workers: about a second of a
#: worker's disk and math, so no worker idles long at the end (a task's buffers and a LoRA's
#: index are reused from one unit to the next, so small units cost little)
MAX_UNIT_BYTES = 512 << 20


class Unit(Protocol):
    """One task's share of a job."""

    @property
    def index(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def memory(self) -> int: ...


class JobPlan(Protocol):
    """What the driver reads of any job's plan."""

    @property
    def units(self) -> Sequence[Unit]: ...
    @property
    def unit_size(self) -> int: ...
    @property
    def total_bytes(self) -> int: ...


def target_unit_bytes(total: int, *, workers: int, unit_size: int | str | None = None, per_worker: int = 4) -> int:
    """The bytes a unit should move: ``unit_size`` when given (``64MB``, ``1GiB`` or a count), else
    about ``total / (per_worker × workers)``, so work stays balanced while every worker is busy,
    and at most ``MAX_UNIT_BYTES``.

    Raises:
        PlanError: a ``unit_size`` that is not a positive size.
    """
    if unit_size:
        n = parse_size(unit_size)
        if n <= 0:
            raise PlanError(f"unit size must be positive, got {unit_size!r}")
        return n
    return max(1, min(MAX_UNIT_BYTES, math.ceil(total / max(1, workers * per_worker))))


def partition_units(
    sizes: Sequence[int], target: int, joined: Sequence[bool] = (), tail: tuple[int, int] | None = None
) -> list[tuple[int, int]]:
    """Split a run of items into consecutive ``[start, end)`` groups of about ``target`` bytes;
    an item with ``joined[i]`` stays in the group of item ``i - 1``. With ``tail=(at, small)``,
    items from byte ``at`` of the run on are grouped by ``small`` bytes instead: the last units
    sent are short, so the workers finish together.

    >>> partition_units([5, 5, 5, 5, 30, 5], 10)
    [(0, 2), (2, 4), (4, 5), (5, 6)]
    >>> partition_units([5, 5, 5, 5, 30, 5], 10, joined=[False, False, True, False, False, True])
    [(0, 3), (3, 4), (4, 6)]
    >>> partition_units([4] * 8, 16, tail=(16, 4))
    [(0, 4), (4, 5), (5, 6), (6, 7), (7, 8)]
    """
    groups, start, used, pos = [], 0, 0, 0
    for i, n in enumerate(sizes):
        limit = tail[1] if tail is not None and pos >= tail[0] else target
        pos += n
        if i > start and used + n > limit and not (i < len(joined) and joined[i]):
            groups.append((start, i))
            start, used = i, 0
        used += n
    if start < len(sizes):
        groups.append((start, len(sizes)))
    return groups
