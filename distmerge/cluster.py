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

__all__ = ["RaySession", "DispatchSettings", "run_units"]

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
                 max_retries: int = 3) -> DispatchSettings:
        """Choose device and concurrency from what the cluster offers."""
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
        return DispatchSettings(device=device, workers=workers, cpus_per_task=1.0,
                                gpus_per_task=1.0 if device == "cuda" else 0.0,
                                max_retries=max_retries, memory_cap=cap)


def _task(unit: WorkUnit, dest: str, device: str, threads: int) -> UnitResult:
    result = run_unit(unit, dest, device=device, threads=threads)
    if device == "cuda":
        import torch
        torch.cuda.empty_cache()
    return replace(result, node_id=ray.get_runtime_context().get_node_id())


_remote_task = ray.remote(_task)


def _cause(e: BaseException) -> BaseException:
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


def run_units(units: Sequence[WorkUnit], dests: dict[str, str], *, settings: DispatchSettings,
              on_done: Callable[[UnitResult], None] | None = None) -> list[UnitResult]:
    """Run every unit as a Ray task; return results ordered by unit index.

    Args:
        units: the plan's work units.
        dests: shard name -> part file path.
        settings: from ``RaySession.settings``.
        on_done: called on the driver as each unit finishes (progress).

    Raises:
        DistmergeError: the first unit's own error (file and key named), after cancelling the rest.
        ClusterError: a task lost to Ray (worker/node died beyond the retry budget).
        KeyboardInterrupt: after force-cancelling all pending tasks.
    """
    queue = sorted(units, key=lambda u: (-u.nbytes, u.index))  # biggest first: better balance
    pending: dict[ray.ObjectRef, WorkUnit] = {}
    results: list[UnitResult] = []
    threads = max(1, int(settings.cpus_per_task))
    try:
        while queue or pending:
            while queue and len(pending) < settings.workers:
                u = queue.pop(0)
                mem = u.memory if settings.memory_cap is None else min(u.memory, settings.memory_cap)
                ref = _remote_task.options(
                    num_cpus=settings.cpus_per_task, num_gpus=settings.gpus_per_task, memory=mem,
                    max_retries=settings.max_retries, retry_exceptions=False,
                    name=f"distmerge-unit-{u.index}",
                ).remote(u, dests[u.shard], settings.device, threads)
                pending[ref] = u
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                u = pending.pop(ref)
                try:
                    res = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    cause = _cause(e)
                    if isinstance(cause, DistmergeError):
                        raise cause from None
                    raise ClusterError(f"work unit {u.index} ({u.shard}) failed: "
                                       f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}") from None
                except ray.exceptions.RayError as e:
                    raise ClusterError(f"work unit {u.index} ({u.shard}) was lost after "
                                       f"{settings.max_retries} retries: {type(e).__name__}") from None
                results.append(res)
                if on_done:
                    on_done(res)
    except BaseException:
        for ref in pending:
            try:
                ray.cancel(ref, force=True)
            except Exception:  # already finished or the session is gone: nothing to cancel
                pass
        raise
    return sorted(results, key=lambda r: r.index)
