"""One driver for every job: ``merge``, ``extract`` and ``verify`` are ``Job``s run by ``run_job``.

The steps, written once:

1. validate the options (``Job.check``: one line, before anything is read);
2. read the inputs' headers (``Job.open``) and take the output's lock (``Job.lock``);
3. resolve the target under the lock (``Job.target``: output rules, the interrupted run to resume);
4. plan (``Job.plan``; a plan cut before Ray came up is kept while the worker count holds);
5. compare the resume manifest's fingerprint (``Job.fingerprint``);
6. prepare the staging (``Job.staging``: where the output lands until it is published);
7. take the units an interrupted run finished (``Staging.reusable``);
8. dispatch the rest: on the driver while Ray and its workers start (``Job.inline``), then as Ray tasks
   (``cluster.run_calls``), every finished unit recorded by one ``UnitLedger``;
9. publish, or abort on any error or Ctrl-C (nothing is left that looks finished);
10. build the report (``Job.report``) and write its JSON where ``--report`` says.

Ray comes up on a thread of its own while the inputs are read (``Job.start_ray_first``) or once they
are checked; a session the caller passes is used and left running.

Example (prose: a job needs real checkpoints)::

    report = run_job(ExtractJob(base, tuned, "lora.safetensors", ExtractOptions(rank=16), RunOptions()))
"""

from __future__ import annotations

import abc
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from distmerge.app.validate import check_counts, check_device
from distmerge.errors import PlanError
from distmerge.output.ledger import ProgressFn, UnitLedger
from distmerge.output.manifest import Manifest, changes
from distmerge.plan.units import TASK_OVERHEAD_BYTES, JobPlan, Unit

if TYPE_CHECKING:
    from distmerge.cluster import Call, DispatchSettings, RaySession
    from distmerge.output.staging import Staging

__all__ = ["Job", "JobOutcome", "Phases", "RunOptions", "UnitClaims", "driver_units_on", "run_job", "with_keywords"]

logger = logging.getLogger("distmerge.driver")  # the name users see in -v logs


def driver_units_on() -> bool:
    """Whether the driver may merge units itself (``DISTMERGE_INLINE_UNITS=0``: every unit a Ray task)."""
    return os.environ.get("DISTMERGE_INLINE_UNITS", "1") != "0"


R = TypeVar("R")


@dataclass(frozen=True)
class RunOptions:
    """How any job runs: its Ray session and tasks, its output rules, its report."""

    address: str | None = None  #: join a Ray cluster (``auto``, ``HOST:PORT``); default embedded
    num_workers: int | None = None  #: tasks in flight (default: every CPU, or every GPU)
    device: str = "auto"  #: ``auto``, ``cpu`` or ``cuda``
    num_cpus: int | None = None  #: CPUs of an embedded Ray
    max_retries: int = 3  #: Ray retries per task after a worker or node failure
    unit_size: int | str | None = None  #: target bytes per work unit
    overwrite: bool = False  #: replace an existing output
    resume: bool = False  #: continue an interrupted run, reusing its finished units
    report: str | os.PathLike[str] | None = None  #: write the JSON report here
    placement_groups: object = None  #: run every task inside these placement groups

    def check(self) -> None:
        """The counts and the device (``UsageError``: one line, before anything is read).

        >>> RunOptions(num_workers=0).check()
        Traceback (most recent call last):
        distmerge.errors.UsageError: --num-workers must be an integer >= 1 (got --num-workers 0)
        """
        check_counts(self)
        check_device(self.device)


def with_keywords(func: str, kwargs: Mapping[str, Any], *options: Any) -> list[Any]:
    """Each options dataclass with the ``kwargs`` that name its fields applied (``merge(...,
    dtype="bf16")``); a keyword no options object has is a ``TypeError``, as for any Python call.

    >>> with_keywords("extract", {"resume": True}, RunOptions())[0].resume
    True
    """
    from dataclasses import fields, replace

    out, left = [], dict(kwargs)
    for o in options:
        mine = {f.name for f in fields(o)} & set(left)
        out.append(replace(o, **{k: left.pop(k) for k in mine}))
    if left:
        raise TypeError(f"{func}() got an unexpected keyword argument {sorted(left)[0]!r}")
    return out


class Phases:
    """When each driver step ended (seconds after the job started), logged at debug level."""

    def __init__(self) -> None:
        self.t0 = time.time()
        self.start = time.perf_counter()
        self.ends: dict[str, float] = {}

    def mark(self, name: str) -> None:
        self.ends[name] = round(time.time() - self.t0, 3)
        logger.debug("%.2f s: %s", self.ends[name], name)

    @property
    def seconds(self) -> float:
        return round(time.perf_counter() - self.start, 3)


@dataclass
class JobOutcome:
    """What the driver hands to ``Job.report``."""

    plan: Any
    results: dict[int, Any]  #: unit index -> the task's result, for the units run by this run
    reused: dict[int, Any]  #: unit index -> what ``Staging.reusable`` kept of an interrupted run
    published: Any  #: what ``Staging.publish`` returned
    ray: dict[str, Any] = field(default_factory=dict)  #: session mode, device, workers
    phases: Phases = field(default_factory=Phases)


class Job(abc.ABC, Generic[R]):
    """What a job supplies to ``run_job``: its checks, plan, task, staging and report."""

    run: RunOptions
    #: start Ray before ``open`` (its start-up overlaps the header reads)
    start_ray_first: bool = False
    #: what a changed fingerprint part is called in the resume refusal
    fingerprint_labels: Mapping[str, str] = {}
    #: the interrupted run this one resumes (set by ``target``)
    previous: Manifest | None = None
    #: the output as messages name it
    output: str = ""

    @property
    def workers(self) -> int:
        """Tasks in flight the plan cut before Ray came up was made for (see ``planned``)."""
        return 1

    def check(self) -> None:
        """Refuse bad options before anything is read."""

    def open(self) -> None:
        """Read the inputs' headers and refuse an output that is one of them (nothing written)."""

    def lock(self) -> AbstractContextManager[object]:
        """The output's lock, held from ``target`` to the report."""
        return nullcontext()

    def target(self, workers: int | None) -> None:
        """Under the lock: the output rules, ``previous``; ``workers`` when known before Ray is up."""

    def planned(self) -> JobPlan | None:
        """A plan already cut for the worker count Ray will have (merging may start before Ray is up)."""
        return None

    @abc.abstractmethod
    def plan(self, workers: int) -> JobPlan:
        """The plan for ``workers`` tasks in flight."""

    def fingerprint(self, plan: Any) -> dict[str, Any] | None:
        """What decides the output (``manifest.fingerprint``); None: the job keeps no manifest."""
        return None

    @abc.abstractmethod
    def staging(self, plan: Any, fingerprint: dict[str, Any] | None) -> Staging:
        """Where the output lands until it is published."""

    def shared_paths(self) -> tuple[list[str], str] | None:
        """(inputs, output folder) every node of a cluster must see; None: no check."""
        return None

    @abc.abstractmethod
    def task(self) -> Callable[..., Any]:
        """The module-level function each task runs (looked up at dispatch time)."""

    @abc.abstractmethod
    def call(self, unit: Any, dest: str, settings: DispatchSettings) -> Call:
        """The task call of ``unit`` writing to ``dest``."""

    def order(self, units: Sequence[Any]) -> list[Any]:
        """The order units are sent in."""
        return list(units)

    def inline(
        self, todo: Sequence[Any], staging: Staging, claim: Callable[[int], bool], ledger: UnitLedger, threads: int = 1
    ) -> Any:
        """A runner of units on the driver while Ray starts (``tasks.inline``; ``threads``: its
        math threads), or None."""
        return None

    def check_results(self, results: Mapping[int, Any]) -> None:
        """Refuse to publish what the units found (e.g. nothing to extract)."""

    @abc.abstractmethod
    def report(self, outcome: JobOutcome) -> R:
        """The job's report."""


def run_job(job: Job[R], *, session: RaySession | None = None, progress: ProgressFn | None = None) -> R:
    """Run ``job`` through the driver's steps (see the module docstring); the report is written
    to ``job.run.report`` when given. ``session``: a ``cluster.RaySession`` the caller owns;
    ``progress``: ``f(units_done, units_total, bytes_done, bytes_total)``, called on the driver.

    Raises:
        DistmergeError: any input, planning, output or task problem; nothing is published then.
    """
    phases = Phases()
    job.check()
    own = session is None
    if session is None:
        from distmerge.cluster import RaySession

        session = RaySession(job.run.address, num_cpus=job.run.num_cpus)
    if job.start_ray_first:
        session.start()
    try:
        job.open()
        with job.lock():
            workers = None
            if job.start_ray_first and not job.run.placement_groups:
                workers = session.expected_workers(job.run.num_workers, job.run.device)
            job.target(workers)
            phases.mark("inputs read")
            session.start()
            report = _Run(job, session, phases, progress).run()
    finally:
        if own:
            session.close()
    if job.run.report and hasattr(report, "write_json"):
        report.write_json(job.run.report)
    return report


class _Run(Generic[R]):
    """One job once its inputs are read and its output locked."""

    def __init__(self, job: Job[R], session: RaySession, phases: Phases, progress: ProgressFn | None) -> None:
        self.job, self.session, self.phases, self.progress = job, session, phases, progress
        self._settings: DispatchSettings | None = None

    def settings(self) -> DispatchSettings:
        """Device and concurrency, from the cluster once Ray is up (waits for it, the first time)."""
        if self._settings is None:
            r = self.job.run
            self._settings = self.session.settings(
                device=r.device,
                num_workers=r.num_workers,
                max_retries=r.max_retries,
                placement_groups=r.placement_groups,
            )
            self.phases.mark("ray ready")
            logger.info(
                "plan on %s (%s, %d in flight)", self.session.mode, self._settings.device, self._settings.workers
            )
        return self._settings

    def run(self) -> R:
        job = self.job
        plan = job.planned() or job.plan(self.settings().workers)
        fp = job.fingerprint(plan)
        self._check_unchanged(fp)
        staging = job.staging(plan, fp)
        self.phases.mark("planned")
        try:
            staging.prepare(plan, resume=job.previous is not None)
            ledger, reused = self._ledger(plan, fp, staging)
            results = self._dispatch(plan, staging, ledger, reused)
            job.check_results({**reused, **results})
            published = staging.publish(plan, {**reused, **results})
            self.phases.mark("published")
        except BaseException:
            staging.abort()
            raise
        return job.report(JobOutcome(plan, results, reused, published, self._ray_info(), self.phases))

    def _check_unchanged(self, fp: dict[str, Any] | None) -> None:
        """A resumed run must do the same job as the interrupted one."""
        previous = self.job.previous
        changed = changes(previous.fingerprint, fp, self.job.fingerprint_labels) if previous and fp else []
        if changed:
            raise PlanError(
                f"{self.job.output}: cannot resume: {'; '.join(changed)} changed since the "
                "interrupted run; rerun with --overwrite to start over"
            )

    def _ledger(self, plan: JobPlan, fp: dict[str, Any] | None, staging: Staging) -> tuple[UnitLedger, dict[int, Any]]:
        """The manifest (with the units a resumed run keeps) and the ledger that records units.
        Every node must see the inputs and the output (an embedded session is one node: this one)."""
        shared = self.job.shared_paths()
        if shared is not None and not self.session.local:
            from distmerge.cluster import check_shared_storage

            check_shared_storage(*shared)
        manifest = Manifest(fp, plan.unit_size, path=staging.manifest_path) if fp is not None else None
        previous = self.job.previous
        reused = staging.reusable(plan, previous, self._run_checks) if previous is not None else {}
        if previous is not None:
            logger.info("resume: %d of %d units already done", len(reused), len(plan.units))
        ledger = UnitLedger(staging, manifest, units=len(plan.units), nbytes=plan.total_bytes, progress=self.progress)
        by_index = {u.index: u for u in plan.units}
        ledger.reused([(by_index[i], r) for i, r in reused.items()])
        self.phases.mark("output prepared")
        return ledger, reused

    def _run_checks(self, fn: Callable[..., Any], items: Sequence[tuple[tuple, str, int]]) -> list[Any]:
        """Small checks as Ray tasks (a resumed run's units), results in order."""
        from distmerge.cluster import Call, run_calls

        calls = [Call(args, label, TASK_OVERHEAD_BYTES, size) for args, label, size in items]
        return [res for _, res in run_calls(fn, calls, settings=self.settings())]

    def _dispatch(self, plan: JobPlan, staging: Staging, ledger: UnitLedger, reused: dict[int, Any]) -> dict[int, Any]:
        """Every unit not yet done: on the driver while Ray starts, then as Ray tasks."""
        from distmerge.cluster import run_calls

        todo: list[Unit] = self.job.order([u for u in plan.units if u.index not in reused])
        claims = UnitClaims()
        inline = self._inline(todo, staging, claims, ledger)
        results: dict[int, Any] = {}

        def done(i: int, node: str, res: object) -> None:
            if inline is not None:
                inline.stop()  # Ray's workers are running units: they take the ones not yet taken
            results[todo[i].index] = res = _on_node(res, node)
            ledger.unit_done(todo[i], res)

        try:
            if inline is not None and not self.session.wait_or(inline.finished):
                return self._finish(inline, results)  # every unit ran on the driver before Ray was up
            settings = self.settings()
            if inline is not None and inline.failed:
                inline.join()
            calls = [self.job.call(u, staging.dest(u), settings) for u in todo]
            run_calls(
                self.job.task(), calls, settings=settings, on_done=done, claim=lambda i: claims.claim(todo[i].index)
            )
        except BaseException:
            if inline is not None:
                inline.stop()  # an error or Ctrl-C: the driver takes no further unit either
            raise
        return self._finish(inline, results)

    def _finish(self, inline: Any, results: dict[int, Any]) -> dict[int, Any]:
        for r in inline.join() if inline is not None else ():  # raises the error that stopped it
            results[r.index] = r
        self.phases.mark("units done")
        return results

    def _inline(self, todo: list[Unit], staging: Staging, claims: UnitClaims, ledger: UnitLedger) -> Any:
        """Units merged on the driver until Ray's first task is done (Ray's start, then its workers'
        imports), when Ray runs CPU tasks on this machine (an embedded session, the plan already
        cut, nothing resumed; never ``--device cuda``)."""
        s, job = self.session, self.job
        if not s.local or job.previous is not None or job.planned() is None or job.run.device == "cuda":
            return None
        if not driver_units_on():
            return None
        # a lazy session is not started: no Ray to share the cores with, all of them for the math
        threads = (s.expected_workers(None, "cpu") or 1) if s.lazy else 1
        return job.inline(todo, staging, claims.claim, ledger, threads)

    def _ray_info(self) -> dict[str, Any]:
        if self._settings is None:  # every unit ran on the driver (before Ray came up, or without it)
            return {"mode": self.session.mode or "none", "device": "cpu", "workers": self.job.workers}
        return {"mode": self.session.mode, "device": self._settings.device, "workers": self._settings.workers}


class UnitClaims:
    """Which units some runner (the driver's own, or Ray) has taken; thread-safe, first claim wins.

    >>> claims = UnitClaims()
    >>> claims.claim(3), claims.claim(3), claims.claim(4)
    (True, False, True)
    """

    def __init__(self) -> None:
        self._taken: set[int] = set()
        self._lock = threading.Lock()

    def claim(self, index: int) -> bool:
        """Take unit ``index``; False if another runner has it."""
        with self._lock:
            if index in self._taken:
                return False
            self._taken.add(index)
            return True


def _on_node(result: object, node: str) -> object:
    """A task's result with the node it ran on (results that say so: ``node_id``)."""
    from dataclasses import is_dataclass, replace

    if is_dataclass(result) and not isinstance(result, type) and hasattr(result, "node_id"):
        return replace(result, node_id=node)
    return result
