"""The only module that talks to Ray: session handling and dispatch of work units as tasks.

Session policy (see ``RaySession``):

* Ray already initialized in this process (e.g. a ROLL driver): reuse it, never shut it down;
* ``address`` given (``auto``, ``HOST:PORT``) or ``RAY_ADDRESS`` set: join that cluster, passing no
  resource overrides, and disconnect at the end;
* otherwise: start an embedded local Ray (``address="local"``, so a stale recorded cluster is never
  joined by accident) with the dashboard off and a small object store, and shut it down at the end.

Dispatch (``run_units``) keeps at most ``workers`` tasks in flight, collects results in completion
order, and on the first failure or Ctrl-C force-cancels everything still pending.

Example:
    >>> # with RaySession() as s:
    >>> #     results = run_units(plan.units, dests, settings=s.settings(device="auto"))
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import ray
import ray.exceptions

from .errors import ClusterError, DistmergeError
from .plan import WorkUnit
from .unit import UnitResult, run_unit

__all__ = ["RaySession", "DispatchSettings", "Slot", "placement_slots", "task_options", "Call", "run_calls", "run_units", "check_shared_storage"]

logger = logging.getLogger(__name__)

_LOCAL_OBJECT_STORE = 256 << 20


class _DropTokenNotice(logging.Filter):
    """Ray >= 2.5x announces that it enabled token auth for a new local cluster; that is the safe
    default for an embedded session, so the notice is only noise on distmerge's output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Token authentication is enabled")


@dataclass(frozen=True)
class DispatchSettings:
    """How tasks are shaped: device, concurrency, per-task CPUs/GPUs, retries."""

    device: str  #: ``cpu`` or ``cuda``
    workers: int  #: tasks in flight at once
    cpus_per_task: float = 1.0
    gpus_per_task: float = 0.0
    max_retries: int = 3
    memory_cap: int | None = None  #: never request more ``memory`` than this per task
    slots: tuple["Slot", ...] = ()  #: placement-group seats; when set, one task per seat at a time
    #: end in-flight tasks on failure/Ctrl-C (``_stop``). Only for a session distmerge does not own
    #: (ROLL's): an owned session is shut down instead, which ends every task of the job without
    #: racing ``ray.cancel`` against replies that are already on their way.
    cancel_pending: bool = True


@dataclass(frozen=True)
class Slot:
    """A seat for one task inside a placement group bundle (e.g. ROLL's per-node group), with the
    node-local GPU it is pinned to (``None`` for CPU work)."""

    pg: object
    bundle: int = 0
    gpu: int | None = None


def placement_slots(placement_groups: object, device: str) -> tuple[Slot, ...]:
    """One slot per GPU (``device="cuda"``) or per whole CPU of bundle 0 of each placement group.

    Accepts a list of groups or ROLL's ``resource_manager.node2pg`` dict (node rank -> group).
    """
    groups = list(placement_groups.values()) if isinstance(placement_groups, dict) else list(placement_groups)
    slots = []
    for pg in groups:
        spec = pg.bundle_specs[0]
        if device == "cuda":
            slots += [Slot(pg, 0, g) for g in range(int(spec.get("GPU", 0)))]
        else:
            slots += [Slot(pg, 0, None) for _ in range(max(1, int(spec.get("CPU", 1))))]
    if not slots:
        raise ClusterError(f"the placement groups given hold no {'GPUs' if device == 'cuda' else 'CPUs'} "
                           "for distmerge tasks")
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
        placement_group=slot.pg, placement_group_bundle_index=slot.bundle)
    opts["num_cpus"] = 0.01
    if slot.gpu is not None:
        opts["num_gpus"] = 0.01
        opts["runtime_env"] = {"env_vars": {"CUDA_VISIBLE_DEVICES": str(slot.gpu),
                                            "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}}
    return opts


class RaySession:
    """Context manager that starts, joins or reuses a Ray session (see the module docstring)."""

    def __init__(self, address: str | None = None, *, num_cpus: int | None = None,
                 num_gpus: int | None = None) -> None:
        self.address = address
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.owned = False
        self.mode = ""

    def __enter__(self) -> "RaySession":
        if ray.is_initialized():
            self.mode = "existing"
            return self
        address = self.address or os.environ.get("RAY_ADDRESS") or None
        try:
            if address:
                self.mode = f"joined {address}"
                ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
            else:
                self.mode = "local"
                # an embedded session reports nothing home (and starts ~1 s faster without it)
                os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
                logging.getLogger("ray").addFilter(_DropTokenNotice())
                for h in logging.getLogger("ray").handlers:
                    h.addFilter(_DropTokenNotice())
                ray.init(address="local", num_cpus=self.num_cpus, num_gpus=self.num_gpus,
                         include_dashboard=False, object_store_memory=_LOCAL_OBJECT_STORE,
                         logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            where = f"join the Ray cluster at {address!r}" if address else "start a local Ray"
            raise ClusterError(f"cannot {where}: {first}") from None
        self.owned = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self.owned and ray.is_initialized():
            ray.shutdown()

    def settings(self, *, device: str = "auto", num_workers: int | None = None,
                 max_retries: int = 3, placement_groups: object = None) -> DispatchSettings:
        """Choose device and concurrency from what the cluster (or the placement groups) offer."""
        res = ray.cluster_resources()
        gpus, cpus = int(res.get("GPU", 0)), max(1, int(res.get("CPU", 1)))
        if device == "auto":
            device = "cuda" if gpus > 0 else "cpu"
        if device == "cuda" and gpus == 0:
            raise ClusterError("--device cuda was asked for, but the Ray cluster has no GPUs "
                               f"(resources: {int(res.get('CPU', 0))} CPUs, 0 GPUs)")
        if device not in ("cpu", "cuda"):
            raise ClusterError(f"unknown device {device!r}; expected auto, cpu or cuda")
        default = gpus if device == "cuda" else cpus
        workers = max(1, num_workers or default)
        mems = [n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")]
        cap = int(max(mems) * 0.9) if mems and max(mems) > 0 else None
        slots = placement_slots(placement_groups, device) if placement_groups else ()
        if slots:
            workers = min(workers, len(slots)) if num_workers else len(slots)
        return DispatchSettings(device=device, workers=workers, cpus_per_task=1.0,
                                gpus_per_task=1.0 if device == "cuda" else 0.0,
                                max_retries=max_retries, memory_cap=cap, slots=slots,
                                cancel_pending=not self.owned)


@dataclass(frozen=True)
class Call:
    """One task to run: ``fn(*args)`` on a worker. ``label`` names it in errors."""

    args: tuple
    label: str
    memory: int = 64 << 20
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


def _cause(e: BaseException) -> BaseException:
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


def run_calls(fn: Callable, calls: Sequence[Call], *, settings: DispatchSettings,
              on_done: Callable[[int, str, object], None] | None = None) -> list[tuple[str, object]]:
    """Run ``fn(*call.args)`` for every call as Ray tasks, at most ``settings.workers`` at once.

    ``fn`` must be a module-level (importable) function; it never sees Ray. Results come back in
    call order as ``(node_id, result)``; ``on_done(i, node_id, result)`` runs on the driver as each
    finishes (completion order).

    Raises:
        DistmergeError: the first task's own error (file and key named); the rest are cancelled
            (or end with the session distmerge owns).
        ClusterError: a task lost to Ray (worker/node died beyond the retry budget).
        KeyboardInterrupt: likewise.
    """
    queue = sorted(range(len(calls)), key=lambda i: (calls[i].order, -calls[i].size, i))  # biggest first
    pending: dict[ray.ObjectRef, int] = {}
    seat_of: dict[ray.ObjectRef, int] = {}
    free_seats = list(range(len(settings.slots)))
    results: dict[int, tuple[str, object]] = {}
    threads = max(1, int(settings.cpus_per_task))
    try:
        while queue or pending:
            while queue and len(pending) < settings.workers:
                i = queue.pop(0)
                c = calls[i]
                mem = c.memory if settings.memory_cap is None else min(c.memory, settings.memory_cap)
                seat = free_seats.pop(0) if settings.slots else None
                opts = task_options(settings, settings.slots[seat] if seat is not None else None)
                if seat is None:  # a bundle reserves no "memory": only ask for it outside groups
                    opts["memory"] = mem
                ref = _remote_call.options(name=f"distmerge-{c.label}", **opts
                                           ).remote(fn, c.args, settings.device, threads)
                pending[ref] = i
                if seat is not None:
                    seat_of[ref] = seat
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                i = pending.pop(ref)
                if ref in seat_of:
                    free_seats.append(seat_of.pop(ref))
                try:
                    node, res = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    cause = _cause(e)
                    if isinstance(cause, DistmergeError):
                        raise cause from None
                    first = str(cause).splitlines()[0] if str(cause) else ""
                    raise ClusterError(f"{calls[i].label} failed: {type(cause).__name__}: {first}") from None
                except ray.exceptions.RayError as e:
                    raise ClusterError(f"{calls[i].label} was lost after {settings.max_retries} "
                                       f"retries: {type(e).__name__}") from None
                results[i] = (node, res)
                if on_done:
                    on_done(i, node, res)
    except BaseException as exc:
        if pending and settings.cancel_pending:
            _stop(list(pending), interrupted=isinstance(exc, KeyboardInterrupt))
        raise
    return [results[i] for i in range(len(calls))]


def _probe(paths: list[str], out_dir: str) -> dict[str, object]:
    """Runs on one node: which of ``paths`` it cannot see, and a sentinel written into ``out_dir``.

    ``DISTMERGE_PROBE_UNSHARED`` (os.pathsep-separated prefixes) makes a node treat those paths as
    absent: it lets tests and dry runs simulate a node without the shared mount on one machine.
    """
    node = ray.get_runtime_context().get_node_id()
    hidden = [h for h in os.environ.get("DISTMERGE_PROBE_UNSHARED", "").split(os.pathsep) if h]
    missing = [p for p in [*paths, out_dir] if any(p.startswith(h) for h in hidden) or not os.path.exists(p)]
    sentinel = os.path.join(out_dir, f".distmerge-probe-{node}")
    if out_dir not in missing:
        try:
            with open(sentinel, "w") as f:
                f.write(node)
        except OSError:
            missing.append(out_dir)
    return {"node": node, "ip": ray.util.get_node_ip_address(), "missing": missing, "sentinel": sentinel}


_remote_probe = ray.remote(_probe)


def check_shared_storage(paths: Sequence[str], out_dir: str) -> int:
    """One probe task per alive node that can run work: every node must see the inputs and the
    output folder at the same paths, and the driver must see what each node writes there.

    Returns the number of nodes probed.

    Raises:
        ClusterError: naming the node and the path it cannot see.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive") and
             (n["Resources"].get("CPU", 0) > 0 or n["Resources"].get("GPU", 0) > 0)]
    if len(nodes) <= 1:
        return len(nodes)
    refs = [_remote_probe.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
        n["NodeID"], soft=False), name="distmerge-probe").remote(list(paths), out_dir) for n in nodes]
    results = ray.get(refs)
    try:
        for r in results:
            if r["missing"]:
                raise ClusterError(f"node {r['node'][:12]} ({r['ip']}) cannot see {r['missing'][0]}: the "
                                   "base, the LoRA files and the output folder must be on storage shared "
                                   "by every node, mounted at the same path")
            if not os.path.exists(r["sentinel"]):
                raise ClusterError(f"node {r['node'][:12]} ({r['ip']}) wrote into {out_dir} but the driver "
                                   "cannot see it: the output folder must be on shared storage")
    finally:
        for r in results:
            try:
                os.remove(r["sentinel"])
            except OSError:
                pass
    return len(results)


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
        except Exception:  # already finished or the session is gone: nothing to cancel
            pass


def run_units(units: Sequence[WorkUnit], dests: dict[str, str], *, settings: DispatchSettings,
              on_done: Callable[[UnitResult], None] | None = None, direct_io: bool = True) -> list[UnitResult]:
    """Run every work unit as a Ray task (``unit.run_unit``), shard by shard and front to back
    (so each shard's bytes are finished in order and can be checksummed while later ones run).
    ``direct_io`` lets the tasks write with O_DIRECT (see ``writer.OutputFile``).

    Returns unit results ordered by unit index.
    """
    shard_order = {name: i for i, name in enumerate(dests)}
    calls = [Call((u, dests[u.shard], settings.device, direct_io), f"unit-{u.index} ({u.shard})", u.memory, u.nbytes,
                  order=(shard_order[u.shard], u.index)) for u in units]

    def done(i: int, node: str, res: object) -> None:
        if on_done:
            on_done(replace(res, node_id=node))  # type: ignore[type-var]

    out = run_calls(run_unit_task, calls, settings=settings, on_done=done)
    return sorted((replace(res, node_id=node) for node, res in out), key=lambda r: r.index)  # type: ignore


def run_unit_task(unit: WorkUnit, dest: str, device: str, direct_io: bool = True) -> UnitResult:
    return run_unit(unit, dest, device=device, direct_io=direct_io)
