"""Job files: several merges described in one YAML file and run as one Ray job (``distmerge run``).

A Wan2.2 A14B checkpoint has two experts (``high_noise_model`` and ``low_noise_model``), each
trained with its own LoRA(s); one job file merges both, in order, inside a single Ray session
(started locally, joined with ``ray.address`` / ``--address``, or the one already running in this
process), so a cluster is started or joined once for all merges. Example::

    # wan22-experts.yaml -- relative paths are relative to this file's folder
    ray:                         # optional; every key may be omitted
      address: auto              # null/omitted: embedded local Ray (or RAY_ADDRESS if set)
      num_workers: 16            # tasks in flight (default: all CPUs, or all GPUs)
      device: auto               # auto | cpu | cuda
    defaults:                    # optional; any merge option, overridden per merge
      dtype: bf16                # keep | bf16 | fp16 | fp32 | fp8_e4m3fn | fp8_e5m2
      max_shard_size: 5GB
    merges:
      - name: high_noise_model
        base: Wan2.2-T2V-A14B/high_noise_model
        loras:
          - path: loras/high_noise_style.safetensors
            weight: 0.8
          - loras/high_noise_motion.pth          # a plain path: weight 1.0
        output: merged/high_noise_model
      - name: low_noise_model
        base: Wan2.2-T2V-A14B/low_noise_model
        loras: [loras/low_noise_style.safetensors]
        output: merged/low_noise_model
        alpha: 0.5                               # overrides the defaults for this merge only
        report: merged/low_noise_model.report.json

Merge options (in ``defaults:`` or in a merge): ``alpha``, ``dtype``, ``max_shard_size``,
``skip_unmatched``, ``overwrite``, ``unit_size``, ``max_retries``, ``resume``, ``checksum``; a merge may also
name a JSON ``report`` file. Unknown keys, wrong types, a missing field, duplicate merge names,
two merges writing the same output, or an output that is (or lies inside) a base or a LoRA of
any merge are refused before anything runs, with the file and line::

    jobs/wan22.yaml:14: merges[1].loras[0].weight: Input should be a valid number, … (got 'high')

The schema and its parsing are ``jobschema``'s (its names are importable from here too); this
module checks and runs a parsed job. Python API::

    job = load_job("wan22-experts.yaml")          # validated, paths absolute
    reports = run_job(job)                        # one MergeReport per merge, in order
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from distmerge.app import jobschema
from distmerge.app.flags import add_run_parser
from distmerge.app.jobschema import Job, MergeSpec, load_job
from distmerge.app.jobschema import JobFile as JobFile  # the schema's names are this module's too
from distmerge.app.jobschema import LoraSpec as LoraSpec
from distmerge.app.jobschema import MergeOptions as MergeOptions
from distmerge.app.jobschema import RayOptions as RayOptions
from distmerge.app.jobschema import parse_job as parse_job
from distmerge.errors import DistmergeError, PlanError
from distmerge.inputs.hub import local_path
from distmerge.inputs.objstore import is_s3
from distmerge.output.ledger import ProgressFn

#: the job file's schema and parsing (``jobschema``), then its running
__all__ = [*jobschema.__all__, "run_job", "add_run_parser", "cmd_run"]


if TYPE_CHECKING:
    from distmerge.cluster import RaySession


# --- running ----------------------------------------------------------------------------------------


def check_job(job: Job) -> None:
    """Check every merge of ``job`` as ``merge`` does before Ray starts (paths, LoRA keys and
    shapes, numbers, output rules, free space), without Ray and without writing anything.

    Raises:
        DistmergeError: of the first failing merge's type, prefixed with ``merge 'NAME': ``.
    """
    from distmerge.app.api import check

    for m in job.merges:  # every missing file first: the cheapest mistake to report
        for what, p in [("base", m.base), *(("LoRA", lo.path) for lo in m.loras)]:
            if not is_s3(p) and not os.path.exists(local_path(p)):  # a cache reference: its snapshot
                raise PlanError(f"merge {m.name!r}: {what} {p} not found (checked before running any merge)")
    for m in job.merges:
        try:
            check(m.base, [(lo.path, lo.weight) for lo in m.loras], m.output, options=m.options(job.ray))
        except DistmergeError as e:
            raise type(e)(f"merge {m.name!r}: {_in_job_words(str(e))}") from e


def _in_job_words(message: str) -> str:
    """A merge's error as a job file's user fixes it: flags become the job file's keys.

    >>> _in_job_words("out: folder is not empty; pass --overwrite to write into it")
    "out: folder is not empty; set 'overwrite: true' (for this merge, or under defaults:) to write into it"
    """
    for flag, key in (
        ("--overwrite", "overwrite: true"),
        ("--resume", "resume: true"),
        ("--skip-unmatched", "skip_unmatched: true"),
    ):
        message = message.replace(f"pass {flag}", f"set '{key}' (for this merge, or under defaults:)")
    return message


def run_job(
    job: Job,
    *,
    progress: ProgressFn | None = None,
    on_start: Callable[[int, MergeSpec], None] | None = None,
    on_done: Callable[[int, MergeSpec, Any], None] | None = None,
    session: RaySession | None = None,
) -> list:
    """Run every merge of ``job`` in order inside one Ray session; stop at the first failure.

    The session is ``session`` (the caller's), else one this runner starts for the job: the one
    already initialized in this process (kept running), the cluster at ``job.ray.address`` (or
    ``RAY_ADDRESS``), or an embedded local Ray shut down at the end. Either way each merge is
    handed that session, so a failing merge ends the job at once and its session with it.
    Every base and LoRA path is checked to exist before the first merge starts. Merges finished
    before a failure stay published. ``progress`` gets each merge's
    ``(units_done, units_total, bytes_done, bytes_total)``; its ``close()`` (if any) is called
    after each merge. ``on_start(i, merge)`` / ``on_done(i, merge, report)`` run around each merge.

    Returns:
        One ``MergeReport`` per merge, in job order.

    Raises:
        DistmergeError: of the failing merge's type, its message prefixed with ``merge 'NAME': ``.
    """
    from distmerge.app.api import merge
    from distmerge.cluster import RaySession

    check_job(job)  # fail before the first merge, not after hours of merging
    own = session is None
    ses = session or RaySession(job.ray.address, num_cpus=job.ray.num_cpus)
    reports = []
    try:
        ses.start()
        for i, m in enumerate(job.merges):
            if on_start:
                on_start(i, m)
            try:
                rep = merge(
                    m.base,
                    [(lo.path, lo.weight) for lo in m.loras],
                    m.output,
                    options=m.options(job.ray),
                    session=ses,
                    progress=progress,
                )
            except DistmergeError as e:
                raise type(e)(f"merge {m.name!r}: {_in_job_words(str(e))}") from e
            finally:
                close = getattr(progress, "close", None)
                if callable(close):
                    close()
            reports.append(rep)
            if on_done:
                on_done(i, m, rep)
    finally:
        if own:
            ses.close()
    return reports


# --- command line -----------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace, progress: ProgressFn | None) -> int:
    """Run ``distmerge run`` for parsed arguments; one summary line per merge on stdout; 0 if all ran.

    Raises:
        DistmergeError: a bad job file, or the first failing merge (``merge 'NAME': …``).
    """
    job = load_job(args.job)
    if args.only:
        job = job.select(args.only)
    job = job.with_ray(address=args.address, num_cpus=args.num_cpus, num_workers=args.num_workers, device=args.device)
    quiet = getattr(args, "quiet", False)
    n = len(job.merges)
    if args.check:
        check_job(job)
        for m in job.merges:
            loras = ", ".join(f"{lo.path}×{lo.weight:g}" for lo in m.loras)
            print(f"{m.name}: {m.base} + [{loras}] -> {m.output} (dtype {m.dtype}, alpha {m.alpha:g})")
        print(
            f"distmerge: {job.source}: {n} merge{'s' if n != 1 else ''} OK (inputs, LoRA keys and outputs "
            "checked; nothing run)"
        )
        return 0

    def on_start(i: int, m: MergeSpec) -> None:
        if not quiet:
            print(f"distmerge: merge {i + 1}/{n} {m.name!r}: {m.base} -> {m.output}", file=sys.stderr, flush=True)

    def on_done(i: int, m: MergeSpec, rep: Any) -> None:
        if rep.unmatched:
            print(
                f"distmerge: merge {m.name!r}: skipped {len(rep.unmatched)} unmatched LoRA key(s)"
                f"{' (see ' + m.report + ')' if m.report else ''}",
                file=sys.stderr,
            )
        print(f"{m.name}: {rep.summary_line()}", flush=True)

    from distmerge.cluster import RaySession

    session = RaySession(job.ray.address, num_cpus=job.ray.num_cpus, fast_exit=getattr(args, "fast_exit", False))
    try:
        run_job(job, progress=progress, on_start=on_start, on_done=on_done, session=session)
    finally:
        session.close()
    return 0
