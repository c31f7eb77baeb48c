"""The merge's work units as Ray tasks, through ``cluster.run_calls``: shard by shard, front to back.

Example:
        with RaySession() as s:
            results = run_units(plan.units, dests, settings=s.settings(device="auto"))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, cast

from distmerge.cluster import Call, run_calls

if TYPE_CHECKING:
    from distmerge.cluster import DispatchSettings
    from distmerge.plan.merge_plan import WorkUnit
    from distmerge.tasks.unit import UnitResult

__all__ = ["run_unit_task", "run_units", "unit_order"]


def run_units(
    units: Sequence[WorkUnit],
    dests: dict[str, str],
    *,
    settings: DispatchSettings,
    on_done: Callable[[UnitResult], None] | None = None,
    direct_io: bool = True,
    claim: Callable[[int], bool] | None = None,
) -> list[UnitResult]:
    """Run every work unit as a Ray task (``unit.run_unit``), shard by shard and front to back
    (so each shard's bytes are finished in order and can be checksummed while later ones run).
    ``direct_io`` lets the tasks write with O_DIRECT (see ``writer.OutputFile``); with ``claim``
    (``claim(unit_index)``), only the units no other runner has taken.

    Returns unit results ordered by unit index.
    """
    shard_order = {name: i for i, name in enumerate(dests)}
    calls = [
        Call(
            (u, dests[u.shard], settings.device, direct_io),
            f"unit-{u.index} ({u.shard})",
            u.memory,
            u.nbytes,
            order=(shard_order[u.shard], u.index),
        )
        for u in units
    ]

    def done(i: int, node: str, res: object) -> None:
        if on_done:
            on_done(replace(cast("UnitResult", res), node_id=node))

    take = (lambda i: claim(units[i].index)) if claim is not None else None
    out = run_calls(run_unit_task, calls, settings=settings, on_done=done, claim=take)
    return sorted((replace(cast("UnitResult", res), node_id=node) for node, res in out), key=lambda r: r.index)


def unit_order(units: Sequence[WorkUnit], dests: dict[str, str]) -> list[WorkUnit]:
    """The order ``run_units`` sends units in: shard by shard, front to back."""
    shard_order = {name: i for i, name in enumerate(dests)}
    return sorted(units, key=lambda u: (shard_order[u.shard], u.index))


def run_unit_task(unit: WorkUnit, dest: str, device: str, direct_io: bool = True) -> UnitResult:
    """A work unit on a worker (torch is imported there, not by the driver's import of this module)."""
    from distmerge.tasks.unit import run_unit

    return run_unit(unit, dest, device=device, direct_io=direct_io)
