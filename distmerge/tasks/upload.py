"""A unit of an ``s3://`` output: rendered into a node-local scratch file, uploaded as one part.

Each unit of a merge into a bucket is one part of its shard's multipart upload (the plan keeps every
part but a shard's last at least 5 MiB). The task merges the unit exactly as for a local output
(``unit.run_unit``), into a scratch file that holds only the part's bytes (its tensors' offsets
shifted by the part's start; the first part carries the shard's header), uploads that file as part
``number`` and removes it. The driver completes the upload with the ETags the tasks return.

The scratch file lives in ``DISTMERGE_SCRATCH_DIR`` (default: the system's temporary folder); a node
needs room for one unit per task in flight (``--unit-size``, at most 512 MiB by default).

Example:
    >>> from distmerge.plan.merge_plan import PlannedTensor, WorkUnit
    >>> t = PlannedTensor("w", (2,), "/b.safetensors", 80, "F32", 8, "F32", 4096, 8)
    >>> shifted(WorkUnit(3, "s", (t,)), 4000).tensors[0].out_offset
    96
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import replace

from distmerge.errors import ShardWriteError
from distmerge.inputs import objwrite
from distmerge.inputs.objwrite import PartTarget
from distmerge.plan.merge_plan import WorkUnit
from distmerge.tasks.unit import UnitResult, run_unit

__all__ = ["scratch_dir", "shifted", "upload_unit", "upload_unit_task"]


def scratch_dir() -> str:
    """Where a task renders its part: ``DISTMERGE_SCRATCH_DIR``, else the system's temporary folder."""
    return os.environ.get("DISTMERGE_SCRATCH_DIR") or tempfile.gettempdir()


def shifted(unit: WorkUnit, start: int) -> WorkUnit:
    """``unit`` with every output offset moved back by ``start`` (its bytes in a file of their own)."""
    return replace(unit, tensors=tuple(replace(t, out_offset=t.out_offset - start) for t in unit.tensors))


def upload_unit(unit: WorkUnit, part: PartTarget, *, device: str = "cpu", threads: int | None = None) -> UnitResult:
    """Merge ``unit`` into a scratch file and upload it as ``part``; the unit's result with the
    part's ETag.

    Raises:
        ShardWriteError: as ``run_unit``, or the scratch file cannot be made.
        FormatError: the store refused the part (one line naming the object and what was refused).
    """
    end = unit.tensors[-1].out_offset + unit.tensors[-1].out_nbytes + unit.tensors[-1].out_pad
    folder = scratch_dir()
    try:
        fd, path = tempfile.mkstemp(prefix=f".distmerge-part-{part.number}-", dir=folder)
    except OSError as e:
        raise ShardWriteError(f"{folder}: cannot make a scratch file for {part.url} ({e.strerror or e})") from None
    try:
        try:
            os.pwrite(fd, part.header, 0)
            os.ftruncate(fd, end - part.start)  # sparse: the unit fills it
        finally:
            os.close(fd)
        result = run_unit(shifted(unit, part.start), path, device=device, threads=threads, direct_io=False)
        etag = objwrite.upload_part(part.url, part.upload_id, part.number, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    return replace(result, etag=etag)


def upload_unit_task(unit: WorkUnit, part: PartTarget, device: str) -> UnitResult:
    """``upload_unit`` as a Ray task calls it (positional arguments)."""
    return upload_unit(unit, part, device=device)
