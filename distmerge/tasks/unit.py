"""Execute one work unit: read its base byte ranges and LoRA factors, merge, write bytes.

This is the body of every Ray task, but it knows nothing about Ray: tests call it directly.

* Tensors no delta touches are copied file-to-file in the kernel (``copy_file_range``), never decoded.
* Big tensors are streamed in row chunks of about ``CHUNK_BYTES`` of float32: a LoRA delta's rows
  only need the matching rows of B, so a task never holds more than a few chunks, whatever the
  model size. Chunk boundaries depend only on the tensor's shape, so the bytes written never depend
  on how the work was split.
* Reads, math and writes overlap: one I/O thread prefetches the next chunk and writes finished ones
  while the main thread computes (``preadv``/``pwrite`` and torch kernels release the GIL).
* Merged bytes go to the disk with O_DIRECT where the filesystem allows it (``writer.OutputFile``):
  each output buffer is placed at the same offset within a 4 KiB block as its bytes' place in the
  file, so every whole block of it can be written without a copy through the page cache.
* Merged values are checked to be finite before they are written.
* A scaled-fp8 weight (``PlannedTensor.quant``) is merged whole: dequantized with its base scale,
  merged in float32 and rounded once to fp8 with a fresh scale, which the same task writes into
  the scale tensor laid out right after it (``fp8.quantize``).

Example:
    >>> import os, tempfile
    >>> from distmerge.inputs.checkpoint import open_base
    >>> from distmerge.plan.merge_plan import make_plan
    >>> from distmerge.tasks.writer import create_file, write_safetensors
    >>> base = os.path.join(tempfile.mkdtemp(), "base.safetensors")
    >>> _ = write_safetensors(base, {"w": torch.ones(4, 4, dtype=torch.bfloat16)})
    >>> plan = make_plan(open_base(base), [], out_dtype="F32", single_file="out.safetensors")
    >>> part = base + ".part"  # what ``output.prepare`` creates for the driver
    >>> create_file(part, plan.shards[0].header, plan.shards[0].size)
    >>> result = run_unit(plan.units[0], part)
    >>> result.nbytes, result.merged
    (64, 0)
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import torch

from distmerge.errors import ShardWriteError
from distmerge.formats.kinds import DeltaKind, Role
from distmerge.inputs.dtypes import itemsize
from distmerge.inputs.lorafile import LoraReader
from distmerge.inputs.torch_dtypes import to_torch
from distmerge.plan.merge_plan import CHUNK_BYTES, Action, PlannedTensor, WorkUnit
from distmerge.tasks.checksum import crc32, crc_range
from distmerge.tasks.fp8 import quantize
from distmerge.tasks.mergemath import NonFiniteError, OutOfRangeError, Term, merge_tensor
from distmerge.tasks.reading import OpenFiles, read_into, read_scalar
from distmerge.tasks.runtime import io_errors, task_device
from distmerge.tasks.terms import load_terms
from distmerge.tasks.writer import DIRECT_ALIGN, OutputFile, copy_range, tensor_bytes

__all__ = ["CHUNK_BYTES", "UnitResult", "row_chunks", "run_unit", "run_unit_task", "unit_crc32"]

_WRITE_BACKLOG = 2
#: at least this many rows per chunk, so the GEMM never degenerates to a matrix-vector kernel
_MIN_ROWS = 16


@dataclass(frozen=True)
class UnitResult:
    """What a task sends back: small metadata only, never tensors."""

    index: int
    shard: str
    nbytes: int
    seconds: float
    device: str
    merged: int  #: tensors that received deltas
    crc32: int = 0  #: CRC-32 of every byte of the unit's output range, in file order
    node_id: str = ""
    started: float = 0.0  #: ``time.time()`` when the task began (for the report's timeline)
    direct_bytes: int = 0  #: of ``nbytes``, written with O_DIRECT (the rest via the page cache)


def row_chunks(shape: tuple[int, ...], chunk_bytes: int | None = None) -> list[tuple[int, int]]:
    """Row ranges ``[r0, r1)`` covering ``shape[0]`` with about ``chunk_bytes`` of float32 each.

    >>> row_chunks((40, 4), chunk_bytes=256)
    [(0, 16), (16, 32), (32, 40)]
    """
    if len(shape) < 2 or shape[0] == 0:
        return [(0, shape[0] if shape else 1)]
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    per = max(_MIN_ROWS, chunk_bytes // (4 * math.prod(shape[1:])))
    return [(r, min(r + per, shape[0])) for r in range(0, shape[0], per)]


def _chunkable(t: PlannedTensor) -> bool:
    """True when rows of every ΔW depend only on the same rows of one factor (so row chunks are
    exact): plain LoRA pairs, full diffs and replacements on a tensor of 2 or more dimensions."""
    return len(t.shape) >= 2 and not t.whole


def _slice_rows(t: Term, r0: int, r1: int) -> Term:
    if t.kind == DeltaKind.LORA:
        up, down = t.factor(Role.UP).flatten(1)[r0:r1], t.factor(Role.DOWN)
        return Term(DeltaKind.LORA, t.coef, (down, up), (Role.DOWN, Role.UP), strength=t.strength)
    (d,) = t.factors
    return Term(t.kind, t.coef, (d[r0:r1],), t.roles, strength=t.strength)


@dataclass(frozen=True)
class _Job:
    """One piece of output: rows ``[r0, r1)`` of tensor ``t`` (or the whole tensor), with the
    tensor's delta terms sliced to those rows."""

    t: PlannedTensor
    r0: int
    r1: int
    terms: tuple[Term, ...] = ()

    def byte_range(self, *, out: bool) -> tuple[int, int]:
        """(offset, length) of the piece's bytes in the output file, or with ``out=False`` in its source."""
        t = self.t
        if len(t.shape) < 2:
            return (t.out_offset, t.out_nbytes) if out else (t.src_offset, t.src_nbytes)
        row = math.prod(t.shape[1:]) * itemsize(t.out_dtype if out else t.src_dtype)
        start = t.out_offset if out else t.src_offset
        return start + self.r0 * row, (self.r1 - self.r0) * row


def _pieces(t: PlannedTensor) -> list[tuple[int, int]]:
    """The row ranges tensor ``t`` is processed in (one range when it cannot be chunked)."""
    if t.out_nbytes == 0 or t.action.passthrough or not _chunkable(t):
        return [(0, t.shape[0] if t.shape else 1)]
    return row_chunks(t.shape)


def _jobs(unit: WorkUnit, reader: LoraReader) -> Iterator[_Job]:
    for t in unit.tensors:
        terms: tuple[Term, ...] = ()
        if t.deltas and t.action != Action.COPY:  # factors upcast once per tensor, not once per chunk
            cdt = torch.float64 if t.src_dtype == "F64" else torch.float32
            terms = tuple(
                replace(x, factors=tuple(f.to(cdt) for f in x.factors))
                for x in load_terms(t.deltas, reader.read, reader.read_rows)
            )
        pieces = _pieces(t)
        for r0, r1 in pieces:
            sliced = tuple(_slice_rows(x, r0, r1) for x in terms) if len(pieces) > 1 else terms
            yield _Job(t, r0, r1, sliced)


class _Ring:
    """A fixed ring of reusable byte buffers: fresh 30 MB allocations cost more in page faults
    than the arithmetic done on them, so each task allocates its working buffers once."""

    def __init__(self, nbytes: int, count: int) -> None:
        self._bufs = [torch.empty(max(nbytes, 1) + DIRECT_ALIGN, dtype=torch.uint8) for _ in range(count)]
        self._i = 0

    def take(self, dtype: torch.dtype, shape: tuple[int, ...], file_offset: int | None = None) -> torch.Tensor:
        """The next buffer as a ``dtype`` tensor of ``shape``; with ``file_offset``, placed at the
        same position within a ``DIRECT_ALIGN`` block as that offset (for O_DIRECT writes)."""
        buf = self._bufs[self._i % len(self._bufs)]
        self._i += 1
        n = math.prod(shape) * dtype.itemsize
        shift = 0
        if file_offset is not None:
            shift = (file_offset - buf.data_ptr()) % DIRECT_ALIGN
            if shift % dtype.itemsize:  # an oddly placed tensor: no direct write, just a valid view
                shift = 0
        return buf[shift : shift + n].view(dtype).reshape(shape)


def _piece_bytes(unit: WorkUnit) -> tuple[int, int, int]:
    """Largest (source, output, float32) bytes of any piece of ``unit``."""
    src = out = acc = 0
    for t in unit.tensors:
        if t.action.passthrough or t.out_nbytes == 0:
            continue
        r0, r1 = max(_pieces(t), key=lambda p: p[1] - p[0])
        rows = (r1 - r0) if len(t.shape) >= 1 else 1
        per_row = math.prod(t.shape[1:]) if len(t.shape) >= 1 else 1
        src = max(src, rows * per_row * itemsize(t.src_dtype))
        out = max(out, rows * per_row * itemsize(t.out_dtype))
        acc = max(acc, rows * per_row * 8)
    return src, out, acc


def _compute(job: _Job, raw: torch.Tensor, device: torch.device, acc_ring: _Ring, out_ring: _Ring) -> torch.Tensor:
    """The output bytes of one piece, in a buffer of ``out_ring`` (never aliasing ``raw``)."""
    t = job.t
    rows = job.r1 - job.r0
    shape = (rows,) + t.shape[1:] if len(t.shape) >= 2 else t.shape
    w = raw.view(to_torch(t.src_dtype)).reshape(shape)
    out = out_ring.take(to_torch(t.out_dtype), shape, file_offset=job.byte_range(out=True)[0])
    if not job.terms:
        return out.copy_(w)
    if device.type == "cuda":
        w = w.pin_memory().to(device, non_blocking=True)
        acc = None
    else:
        acc = acc_ring.take(torch.float64 if t.src_dtype == "F64" else torch.float32, shape)
    try:
        if acc is None:  # GPU: accumulate and round on the device, then copy into the host buffer
            return out.copy_(merge_tensor(w, job.terms, out_dtype=out.dtype, check_finite=True))
        return merge_tensor(w, job.terms, out_dtype=out.dtype, check_finite=True, acc=acc, out=out)
    except NonFiniteError as e:
        raise _nonfinite(t, e) from None


def _nonfinite(t: PlannedTensor, e: NonFiniteError) -> ShardWriteError:
    if not t.deltas:
        return ShardWriteError(f"{t.src_path}: '{t.key}' has NaN/Inf values ({e}); cannot quantize it to {t.out_dtype}")
    sources = ", ".join(sorted({d.source for d in t.deltas}))
    what = f"overflows {t.out_dtype}" if isinstance(e, OutOfRangeError) else "has NaN/Inf values"
    return ShardWriteError(
        f"merged tensor '{t.key}' {what} after adding deltas from "
        f"{sources} ({e}; check the LoRA factors and --weight/--alpha)"
    )


def _compute_scaled(
    job: _Job,
    raw: torch.Tensor,
    device: torch.device,
    acc_ring: _Ring,
    out_ring: _Ring,
    scale0: torch.Tensor | None,
    scale_out: PlannedTensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp8 bytes of a whole ``scaled`` tensor and its fresh scale (``scale_out``'s dtype and
    shape): ``W = w.float() * scale0`` (``w.float()`` without a base scale), ``+ Σ coef·ΔW`` in
    float32, one rounding to fp8."""
    t = job.t
    w = raw.view(to_torch(t.src_dtype)).reshape(t.shape)
    out = out_ring.take(to_torch(t.out_dtype), t.shape, file_offset=t.out_offset)
    if device.type == "cuda":
        acc = w.pin_memory().to(device, non_blocking=True).to(torch.float32)
    else:
        acc = acc_ring.take(torch.float32, t.shape)
        acc.copy_(w)
    if scale0 is not None:
        acc.mul_(scale0.to(acc.device))
    try:
        if job.terms:
            merge_tensor(acc, job.terms, out_dtype=torch.float32, inplace=True, check_finite=True)
        q, scale = quantize(
            acc,
            t.out_dtype,
            scale_dtype=to_torch(scale_out.out_dtype),
            inplace=True,
            out=None if device.type == "cuda" else out,
        )
    except NonFiniteError as e:
        raise _nonfinite(t, e) from None
    if q is not out:
        out.copy_(q)
    return out, scale.reshape(scale_out.shape).contiguous()


@dataclass
class _Rings:
    """A unit's working buffers: the piece being computed and the one being read, one float
    accumulator, and the output buffers of the queued writes plus the one being filled."""

    read: _Ring
    acc: _Ring
    out: _Ring

    @classmethod
    def for_unit(cls, unit: WorkUnit) -> _Rings:
        src_bytes, out_bytes, acc_bytes = _piece_bytes(unit)
        return cls(_Ring(src_bytes, 2), _Ring(acc_bytes, 1), _Ring(out_bytes, _WRITE_BACKLOG + 2))


@dataclass
class _Where:
    """What an I/O error message names: the output file, then the input file and key of the
    tensor being worked on."""

    path: str
    key: str = ""

    def at(self, t: PlannedTensor) -> None:
        self.path, self.key = t.src_path, t.key

    def error(self, e: OSError) -> ShardWriteError:
        where = f"{self.path}: '{self.key}'" if self.key else self.path
        return ShardWriteError(f"{where}: {e.strerror or e}")


@dataclass
class _Tally:
    """What a unit has produced so far: the CRC of its bytes in file order, the merged keys."""

    crc: int = 0
    merged: set[str] = field(default_factory=set)


class _UnitRun:
    """The steps of one unit: read a piece (on the I/O thread), compute it, account for its bytes,
    write it (on the I/O thread). A weight's fresh fp8 scale is computed with the weight and kept
    in ``derived`` until its own turn."""

    def __init__(self, unit: WorkUnit, dev: torch.device, files: OpenFiles, sink: OutputFile) -> None:
        self.unit, self.dev, self.files, self.sink = unit, dev, files, sink
        self.rings = _Rings.for_unit(unit)
        self.by_key = {t.key: t for t in unit.tensors}
        self.scales0 = {  # the base scale of each scaled-fp8 weight
            t.key: read_scalar(files.fd(t.scale_src[0]), t.scale_src[1], t.scale_src[2])
            for t in unit.tensors
            if t.quant and t.scale_src
        }
        self.derived: dict[str, torch.Tensor] = {}  # scale key -> its bytes, computed with its weight

    def read(self, job: _Job) -> torch.Tensor | None:
        """The source bytes of ``job`` (None where nothing is computed: copies, derived scales)."""
        t = job.t
        if t.out_nbytes == 0 or t.action.passthrough:
            return None
        off, n = job.byte_range(out=False)
        buf = self.rings.read.take(torch.uint8, (n,))
        read_into(self.files.fd(t.src_path), off, buf)
        return buf

    def compute(self, job: _Job, raw: torch.Tensor | None) -> torch.Tensor | None:
        """The output bytes of ``job`` (None: copied file to file by ``write``)."""
        t = job.t
        if t.derived_from:
            return self.derived.pop(t.key)
        if raw is not None and t.quant:
            scale_out = self.by_key[t.scale_key]
            out, self.derived[t.scale_key] = _compute_scaled(
                job, raw, self.dev, self.rings.acc, self.rings.out, self.scales0.get(t.key), scale_out
            )
            return out
        return None if raw is None else _compute(job, raw, self.dev, self.rings.acc, self.rings.out)

    def account(self, job: _Job, out: torch.Tensor | None, tally: _Tally) -> None:
        """Chain ``job``'s output bytes onto the CRC and note a merged tensor."""
        t = job.t
        if out is not None:
            tally.crc = crc32(tensor_bytes(out), tally.crc)
        elif t.out_nbytes:  # copied in the kernel: CRC the (cached) source bytes
            tally.crc = crc_range(self.files.fd(t.src_path), t.src_offset, t.src_nbytes, tally.crc)
        if job.terms:
            tally.merged.add(t.key)

    def write(self, job: _Job, out: torch.Tensor | None) -> None:
        t = job.t
        if t.out_nbytes == 0:
            return
        if out is None:
            copy_range(self.files.fd(t.src_path), t.src_offset, self.sink.fd, t.out_offset, t.src_nbytes)
            return
        off, _ = job.byte_range(out=True)
        self.sink.write(tensor_bytes(out), off, out.data_ptr())

    def run(self, io: ThreadPoolExecutor, reader: LoraReader, where: _Where, tally: _Tally) -> None:
        """Every piece in order, the next read and up to ``_WRITE_BACKLOG`` writes in flight."""
        jobs = _jobs(self.unit, reader)
        job = next(jobs, None)
        nxt: Future | None = io.submit(self.read, job) if job else None
        writes: deque[Future] = deque()
        while job is not None:
            where.at(job.t)
            assert nxt is not None  # set whenever job is
            raw = nxt.result()
            following = next(jobs, None)
            nxt = io.submit(self.read, following) if following else None
            out = self.compute(job, raw)
            self.account(job, out, tally)
            writes.append(io.submit(self.write, job, out))
            while len(writes) > _WRITE_BACKLOG:
                writes.popleft().result()
            job = following
        for w in writes:
            w.result()


def run_unit(
    unit: WorkUnit, dest: str, *, device: str = "cpu", threads: int | None = None, direct_io: bool = True
) -> UnitResult:
    """Fill ``unit``'s tensors of the prepared output file ``dest``.

    The bytes are not fsynced here: each shard is fsynced once, after it is checksummed
    (``output.ShardHasher``), before anything is published; a resumed run re-checks every unit's
    CRC, so a unit lost in a crash before that fsync is simply redone.

    Args:
        unit: from the plan.
        dest: the part file the driver created with ``writer.create_file``.
        device: ``cpu`` or ``cuda`` (the task's visible GPU).
        threads: torch intra-op threads for CPU math (the task's CPUs).
        direct_io: write whole blocks with O_DIRECT where the filesystem allows it (the driver
            turns it off while something reads the part files during the run).

    Raises:
        ShardWriteError: an input could not be read, the output could not be written, or a merged
            tensor is not finite. The message names the file and key.
    """
    start, started = time.perf_counter(), time.time()
    dev = task_device(device, threads)
    files = OpenFiles()
    where, tally = _Where(dest), _Tally()
    sink: OutputFile | None = None
    direct = 0
    try:
        with io_errors(where.error):
            sink = OutputFile(dest, direct=direct_io)
            with ThreadPoolExecutor(1, thread_name_prefix="distmerge-io") as io:
                _UnitRun(unit, dev, files, sink).run(io, LoraReader(), where, tally)
    finally:
        files.close()
        if sink is not None:
            direct = sink.direct_bytes
            sink.close()
    seconds = time.perf_counter() - start
    return UnitResult(
        unit.index,
        unit.shard,
        unit.nbytes,
        seconds,
        dev.type,
        len(tally.merged),
        tally.crc,
        started=started,
        direct_bytes=direct,
    )


def run_unit_task(unit: WorkUnit, dest: str, device: str, direct_io: bool = True) -> UnitResult:
    """``run_unit`` as a Ray task calls it (positional arguments)."""
    return run_unit(unit, dest, device=device, direct_io=direct_io)


def unit_crc32(unit: WorkUnit, dest: str) -> int:
    """Re-read ``unit``'s output range of ``dest`` and CRC it (what ``run_unit`` reported when the
    bytes are intact; a resumed run keeps a unit only then)."""
    fd = os.open(dest, os.O_RDONLY)
    try:  # a unit's tensors are one contiguous range of the shard
        return crc_range(fd, unit.tensors[0].out_offset, unit.nbytes) if unit.tensors else 0
    finally:
        os.close(fd)
