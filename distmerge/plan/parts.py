"""A merge plan whose units are the parts of multipart uploads (an ``s3://`` output).

Each output shard in a bucket is one multipart upload and each of its units one part, so S3's rules
become the plan's: every part but a shard's last at least ``MIN_PART`` (5 MiB), at most
``MAX_PARTS`` (10,000) parts of at most ``MAX_PART`` (5 GiB) each. ``as_parts`` joins each shard's
small units with their neighbours (the bytes written never change: units only group tensors).

Example:
    >>> join_small([(0, 1), (1, 2), (2, 3), (3, 4)], [3, 3, 3, 1], 5)
    [(0, 2), (2, 4)]
    >>> join_small([(0, 1), (1, 2)], [6, 1], 5)  # a small last group is allowed
    [(0, 1), (1, 2)]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from distmerge.errors import PlanError
from distmerge.inputs.objwrite import MAX_PART, MAX_PARTS, MIN_PART
from distmerge.plan.merge_plan import MergePlan, WorkUnit

__all__ = ["as_parts", "check_parts", "join_small"]


def join_small(groups: Sequence[tuple[int, int]], sizes: Sequence[int], least: int) -> list[tuple[int, int]]:
    """``groups`` of consecutive items (``[start, end)``) joined with the next ones until every
    group but the last holds at least ``least`` bytes (``sizes`` per item)."""
    out: list[tuple[int, int]] = []
    start, used = (groups[0][0] if groups else 0), 0
    for a, b in groups:
        used += sum(sizes[a:b])
        if used >= least:
            out.append((start, b))
            start, used = b, 0
    if used:
        out.append((start, groups[-1][1]))
    return out


def check_parts(shard: str, sizes: Sequence[int]) -> None:
    """A shard's units as the parts of one upload: at most ``MAX_PARTS``, each at most ``MAX_PART``.

    Raises:
        PlanError: too many parts (a larger --unit-size or a smaller --max-shard-size) or one too big.
    """
    if len(sizes) > MAX_PARTS:
        raise PlanError(
            f"{shard}: {len(sizes)} units, and an s3:// upload takes at most {MAX_PARTS} parts; "
            "pass a larger --unit-size or a smaller --max-shard-size"
        )
    if max(sizes, default=0) > MAX_PART:
        raise PlanError(
            f"{shard}: a unit of {max(sizes)} bytes, and an s3:// upload's part holds at most {MAX_PART}; "
            "pass a smaller --unit-size"
        )


def as_parts(plan: MergePlan, least: int = MIN_PART) -> MergePlan:
    """``plan`` with each shard's units joined until every unit but the shard's last moves at least
    ``least`` bytes, renumbered in order; the shards and every offset unchanged.

    Raises:
        PlanError: a shard would need more parts, or bigger ones, than S3 takes (``check_parts``).
    """
    units: list[WorkUnit] = []
    for shard in plan.shards:
        mine = [u for u in plan.units if u.shard == shard.name]
        sizes = [u.nbytes for u in mine]
        groups = join_small([(i, i + 1) for i in range(len(mine))], sizes, least)
        check_parts(shard.name, [sum(sizes[a:b]) for a, b in groups])
        for a, b in groups:
            units.append(WorkUnit(len(units), shard.name, tuple(t for u in mine[a:b] for t in u.tensors)))
    return replace(plan, units=tuple(units))
