"""Dispatch: calls of one importable function as Ray tasks, a bounded number in flight.

``run_calls`` keeps at most ``settings.workers`` tasks in flight (biggest first), collects their
results in completion order, and on the first failure or Ctrl-C ends everything still pending
(``_stop``, in a session distmerge does not own; an owned session is shut down instead).
``DispatchSettings`` says how each task is shaped (``task_options``): plain resources, or a seat
(``Slot``) in a caller's placement group (``placement_slots``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import ray
import ray.exceptions

from distmerge.errors import ClusterError, DistmergeError

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ray.util.placement_group import PlacementGroup

__all__ = ["Call", "DispatchSettings", "Slot", "cause", "placement_slots", "run_calls", "task_options"]

logger = logging.getLogger("distmerge.cluster")  # the name users see in -v logs


@dataclass(frozen=True)
class DispatchSettings:
    """How tasks are shaped: device, concurrency, per-task CPUs/GPUs, retries."""

    device: str  #: ``cpu`` or ``cuda``
    workers: int  #: tasks in flight at once
    cpus_per_task: float = 1.0
    gpus_per_task: float = 0.0
    max_retries: int = 3
    memory_cap: int | None = None  #: never request more ``memory`` than this per task
    slots: tuple[Slot, ...] = ()  #: placement-group seats; when set, one task per seat at a time
    #: end in-flight tasks on failure/Ctrl-C (``_stop``). Only for a session distmerge does not own
    #: (ROLL's): an owned session is shut down instead, which ends every task of the job without
    #: racing ``ray.cancel`` against replies that are already on their way.
    cancel_pending: bool = True


@dataclass(frozen=True)
class Slot:
    """A seat for one task inside a placement group bundle (e.g. ROLL's per-node group), with the
    node-local GPU it is pinned to (``None`` for CPU work)."""

    pg: PlacementGroup
    bundle: int = 0
    gpu: int | None = None


def placement_slots(placement_groups: object, device: str) -> tuple[Slot, ...]:
    """One slot per GPU (``device="cuda"``) or per whole CPU of bundle 0 of each placement group.

    Accepts a list of groups or ROLL's ``resource_manager.node2pg`` dict (node rank -> group).
    """
    groups = list(
        placement_groups.values()
        if isinstance(placement_groups, dict)
        else cast("Iterable[PlacementGroup]", placement_groups)
    )
    slots = []
    for pg in groups:
        spec = pg.bundle_specs[0]
        if device == "cuda":
            slots += [Slot(pg, 0, g) for g in range(int(spec.get("GPU", 0)))]
        else:
            slots += [Slot(pg, 0, None) for _ in range(max(1, int(spec.get("CPU", 1))))]
    if not slots:
        raise ClusterError(
            f"the placement groups given hold no {'GPUs' if device == 'cuda' else 'CPUs'} for distmerge tasks"
        )
    return tuple(slots)


def task_options(settings: DispatchSettings, slot: Slot | None) -> dict:
    """Ray ``.options()`` for one task: plain resources, or a seat in a placement group with the
    GPU pinned explicitly (ROLL holds its GPUs with fractional actors and pins devices itself, so a
    plain ``num_gpus=1`` request would wait forever)."""
    opts: dict = {"max_retries": settings.max_retries, "retry_exceptions": False}
    if slot is None:
        return {**opts, "num_cpus": settings.cpus_per_task, "num_gpus": settings.gpus_per_task}
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
        placement_group=slot.pg, placement_group_bundle_index=slot.bundle
    )
    opts["num_cpus"] = 0.01
    if slot.gpu is not None:
        opts["num_gpus"] = 0.01
        opts["runtime_env"] = {
            "env_vars": {"CUDA_VISIBLE_DEVICES": str(slot.gpu), "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}
        }
    return opts


@dataclass(frozen=True)
class Call:
    """One task to run: ``fn(*args)`` on a worker. ``label`` names it in errors.

    >>> Call((1, 2), "pair 1").memory  # no ``memory`` resource asked for unless the caller says how much
    0
    """

    args: tuple
    label: str
    memory: int = 0  #: bytes of Ray's ``memory`` resource the task asks for (0: none; ignored in a group)
    size: int = 0  #: for scheduling order (largest first)
    order: tuple = ()  #: sort key; calls run in (order, -size) order


def _call(fn: Callable, args: tuple, device: str, threads: int) -> tuple[str, object]:
    """Worker side of every distmerge task: run ``fn(*args)`` and say on which node it ran."""
    import torch

    torch.set_num_threads(max(1, threads))
    try:
        return ray.get_runtime_context().get_node_id(), fn(*args)
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()


_remote_call = ray.remote(_call)


def cause(e: BaseException) -> BaseException:
    """The exception a Ray task raised (``RayTaskError.cause``), else ``e`` itself.

    >>> cause(ValueError("x"))
    ValueError('x')
    """
    inner = getattr(e, "cause", None)
    return inner if isinstance(inner, BaseException) else e


def run_calls(
    fn: Callable,
    calls: Sequence[Call],
    *,
    settings: DispatchSettings,
    on_done: Callable[[int, str, object], None] | None = None,
    claim: Callable[[int], bool] | None = None,
) -> list[tuple[str, object]]:
    """Run ``fn(*call.args)`` for every call as Ray tasks, at most ``settings.workers`` at once.

    ``fn`` must be a module-level (importable) function; it never sees Ray. Results come back in
    call order as ``(node_id, result)``; ``on_done(i, node_id, result)`` runs on the driver as each
    finishes (completion order). With ``claim``, a call is submitted only if ``claim(i)`` says it is
    still free (another runner may have taken it); results are for the calls run here.

    Raises:
        DistmergeError: the first task's own error (file and key named); the rest are cancelled
            (or end with the session distmerge owns).
        ClusterError: a task lost to Ray (worker/node died beyond the retry budget).
        KeyboardInterrupt: likewise.
    """
    d = _Dispatch(fn, calls, settings)
    queue = sorted(range(len(calls)), key=lambda i: (calls[i].order, -calls[i].size, i))  # biggest first
    results: dict[int, tuple[str, object]] = {}
    try:
        while queue or d.pending:
            while queue and len(d.pending) < settings.workers:
                i = queue.pop(0)
                if claim is None or claim(i):
                    d.submit(i)
            if not d.pending:
                break
            ready, _ = ray.wait(list(d.pending), num_returns=1)
            for ref in ready:
                i, (node, res) = d.collect(ref)
                results[i] = (node, res)
                if on_done:
                    on_done(i, node, res)
    except BaseException as exc:
        if d.pending and settings.cancel_pending:
            _stop(list(d.pending), interrupted=isinstance(exc, KeyboardInterrupt))
        raise
    return [results[i] for i in range(len(calls)) if i in results]


class _Dispatch:
    """The tasks of one ``run_calls`` in flight: each one's call and placement-group seat."""

    def __init__(self, fn: Callable, calls: Sequence[Call], settings: DispatchSettings) -> None:
        self.fn, self.calls, self.settings = fn, calls, settings
        self.pending: dict[ray.ObjectRef, int] = {}
        self.seat_of: dict[ray.ObjectRef, int] = {}
        self.free_seats = list(range(len(settings.slots)))
        self.threads = max(1, int(settings.cpus_per_task))

    def submit(self, i: int) -> None:
        """Start call ``i`` as a task (in a free seat, when the settings have seats)."""
        c, settings = self.calls[i], self.settings
        seat = self.free_seats.pop(0) if settings.slots else None
        opts = task_options(settings, settings.slots[seat] if seat is not None else None)
        if seat is None and c.memory > 0:  # a bundle reserves no "memory": only ask for it outside groups
            opts["memory"] = c.memory if settings.memory_cap is None else min(c.memory, settings.memory_cap)
        ref = _remote_call.options(name=f"distmerge-{c.label}", **opts).remote(
            self.fn, c.args, settings.device, self.threads
        )
        self.pending[ref] = i
        if seat is not None:
            self.seat_of[ref] = seat

    def collect(self, ref: ray.ObjectRef) -> tuple[int, tuple[str, object]]:
        """A finished task's call index and ``(node_id, result)``; its error as a one-liner."""
        i = self.pending.pop(ref)
        if ref in self.seat_of:
            self.free_seats.append(self.seat_of.pop(ref))
        try:
            return i, ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            err = cause(e)
            if isinstance(err, DistmergeError):
                raise err from None
            first = str(err).splitlines()[0] if str(err) else ""
            raise ClusterError(f"{self.calls[i].label} failed: {type(err).__name__}: {first}") from None
        except ray.exceptions.RayError as e:
            raise ClusterError(
                f"{self.calls[i].label} was lost after {self.settings.max_retries} retries: {type(e).__name__}"
            ) from None


def _stop(refs: list, *, interrupted: bool, grace_s: float = 300.0) -> None:
    """End in-flight tasks in a session distmerge does not own. After an error they are let
    finish (a few seconds: at most one unit each; their results are dropped), because
    force-cancelling a task whose reply is already on its way can trip a fatal check in Ray's
    driver; Ctrl-C, or tasks still running after ``grace_s``, are force-cancelled."""
    if not interrupted:
        _, refs = ray.wait(refs, num_returns=len(refs), timeout=grace_s)
    for ref in refs:
        try:
            ray.cancel(ref, force=True)
        except Exception as e:  # already finished or the session is gone: nothing to cancel
            logger.debug("not cancelled: %s", e)
