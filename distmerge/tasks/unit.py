"""Execute one work unit: read its base byte ranges and LoRA factors, merge, write bytes.

This is the body of every Ray task, but it knows nothing about Ray: tests call it directly.

* Big tensors are streamed in row chunks of about ``CHUNK_BYTES`` of float32 (``tasks.pieces``),
  so a task holds a few chunks whatever the model size.
* Tensors no delta touches are copied as they are, in byte pieces through the same buffers (or
  file-to-file in the kernel, ``copy_file_range``, where the output is not written with direct
  I/O), never decoded.
* Reads, math and writes overlap (``pipeline.run_pipeline``): several reads in flight on their own
  threads, writes on another, the math on the task's thread (``preadv``/``pwrite`` and torch
  kernels release the GIL). Every byte is read once: a piece's CRC is taken from its buffer.
* Base bytes come from the disk with O_DIRECT where the filesystem allows it and the page cache
  does not already hold them (``reading.read_placed``), and merged bytes go to the disk the same
  way (``writer.OutputFile``): each buffer is placed at the same offset within a 4 KiB block as
  its bytes' place in the file, so the whole blocks around them move without a page-cache copy.
* Merged values are checked to be finite before they are written.
* A GGUF tensor in a block type (``PlannedTensor.packed``) goes in row pieces too (rows are whole
  blocks): decoded to float32 by gguf-py, merged, encoded once to its output type (``ggml``).
* An ``s3://`` base is read with ranged GETs straight into the same buffers (``objstore``), and
  its copied tensors stream through them too.
* A scaled-fp8 weight (``PlannedTensor.quant``) is merged whole: dequantized with its base scale,
  merged in float32 and rounded once to fp8 with a fresh scale, which the same task writes into
  the scale tensor laid out right after it (``fp8.quantize``), followed by its new input scale
  (1.0, ``fp8.input_scale``) where ``--dtype fp8_*`` adds one.

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

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from distmerge.errors import ShardWriteError
from distmerge.inputs.dtypes import itemsize
from distmerge.inputs.ggml import is_quant
from distmerge.inputs.lorafile import LoraReader
from distmerge.inputs.objstore import is_s3
from distmerge.inputs.torch_dtypes import to_torch
from distmerge.plan.merge_plan import CHUNK_BYTES, READ_DEPTH, WRITE_BACKLOG, Action, PlannedTensor, WorkUnit
from distmerge.tasks.checksum import crc32, crc_range
from distmerge.tasks.fp8 import input_scale, quantize
from distmerge.tasks.ggml import decode, encode
from distmerge.tasks.mergemath import NonFiniteError, OutOfRangeError, merge_tensor
from distmerge.tasks.pieces import Piece, piece_bytes, row_chunks, unit_pieces
from distmerge.tasks.pipeline import Ring, Slot, run_pipeline
from distmerge.tasks.reading import OpenFiles, read_placed, scalar_at
from distmerge.tasks.runtime import io_errors, task_device
from distmerge.tasks.writer import OutputFile, copy_range, tensor_bytes

__all__ = ["CHUNK_BYTES", "UnitResult", "row_chunks", "run_unit", "run_unit_task", "unit_crc32"]


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
    direct_read_bytes: int = 0  #: base bytes read with O_DIRECT (the rest from the page cache)
    #: seconds the task's main thread waited for reads, computed, and waited for writes
    waits: tuple[float, float, float] = (0.0, 0.0, 0.0)
    etag: str = ""  #: an ``s3://`` output's part: the ETag its upload answered (``tasks.upload``)


def _compute(job: Piece, raw: Slot, device: torch.device, acc_ring: Ring, out_ring: Ring) -> torch.Tensor:
    """The output bytes of one piece, in a buffer of ``out_ring`` (never aliasing ``raw``)."""
    t = job.t
    rows = job.r1 - job.r0
    shape = (rows,) + t.shape[1:] if len(t.shape) >= 2 else t.shape
    if t.action == Action.COPY:
        return out_ring.slot(raw.nbytes, job.byte_range(out=True)[0]).data().copy_(raw.data())
    if t.packed:
        return _compute_packed(job, raw, device, shape, out_ring)
    w = raw.view(to_torch(t.src_dtype), shape)
    out = out_ring.take(to_torch(t.out_dtype), shape, file_offset=job.byte_range(out=True)[0])
    if not job.terms:
        return out.copy_(w)
    if device.type == "cuda":  # from the pinned ring buffer by DMA; the copy back below waits for it
        w = w.to(device, non_blocking=True)
        acc = None
    else:
        acc = acc_ring.take(torch.float64 if t.src_dtype == "F64" else torch.float32, shape)
    try:
        if acc is None:  # GPU: accumulate and round on the device, then copy into the host buffer
            return out.copy_(merge_tensor(w, job.terms, out_dtype=out.dtype, check_finite=True))
        return merge_tensor(w, job.terms, out_dtype=out.dtype, check_finite=True, acc=acc, out=out)
    except NonFiniteError as e:
        raise _nonfinite(t, e) from None


def _compute_packed(
    job: Piece, raw: Slot, device: torch.device, shape: tuple[int, ...], out_ring: Ring
) -> torch.Tensor:
    """A piece read or written in a GGML block type: its float32 values (``ggml.decode``, or the
    plain dtype's), the deltas added in float32 (on the task's device), one rounding to the
    output's type (``ggml.encode``, or the plain dtype's)."""
    t = job.t
    if is_quant(t.src_dtype):
        w = decode(raw.data(), t.src_dtype, shape)
    else:
        w = raw.view(to_torch(t.src_dtype), shape).to(torch.float32)
    try:
        if job.terms:
            w = merge_tensor(w.to(device), job.terms, out_dtype=torch.float32, inplace=True, check_finite=True)
        elif not bool(torch.isfinite(w).all()):
            raise NonFiniteError("a value is NaN or infinite")
    except NonFiniteError as e:
        raise _nonfinite(t, e) from None
    off, n = job.byte_range(out=True)
    if is_quant(t.out_dtype):
        return encode(w, t.out_dtype, out_ring.slot(n, off).data())
    return out_ring.take(to_torch(t.out_dtype), shape, file_offset=off).copy_(w)


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
    job: Piece,
    raw: Slot,
    device: torch.device,
    acc_ring: Ring,
    out_ring: Ring,
    scale0: torch.Tensor | None,
    scale_out: PlannedTensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp8 bytes of a whole ``scaled`` tensor and its fresh scale (``scale_out``'s dtype and
    shape): ``W = w.float() * scale0`` (``w.float()`` without a base scale), ``+ Σ coef·ΔW`` in
    float32, one rounding to fp8."""
    t = job.t
    w = raw.view(to_torch(t.src_dtype), t.shape)
    out = out_ring.take(to_torch(t.out_dtype), t.shape, file_offset=t.out_offset)
    if device.type == "cuda":
        acc = w.to(device, non_blocking=True).to(torch.float32)
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
    """A unit's working buffers (``pipeline.Ring``): the pieces being read and the one being
    computed, one float accumulator, and the output buffers of the queued writes plus the one
    being filled; page-locked on a GPU task."""

    read: Ring
    acc: Ring
    out: Ring

    @classmethod
    def for_unit(cls, unit: WorkUnit, device: torch.device) -> _Rings:
        src_bytes, out_bytes, acc_bytes = piece_bytes(unit)
        pinned = device.type == "cuda"
        return cls(
            Ring(src_bytes, READ_DEPTH + 1, pinned=pinned),
            Ring(acc_bytes, 1),
            Ring(out_bytes, WRITE_BACKLOG + 2, pinned=pinned),
        )

    def release(self) -> None:
        for ring in (self.read, self.acc, self.out):
            ring.release()


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

    @staticmethod
    def reading(t: PlannedTensor, e: OSError) -> ShardWriteError:
        """A read of ``t``'s base bytes failed (on a read thread, while others run)."""
        return _Where(t.src_path, t.key).error(e)


@dataclass
class _Tally:
    """What a unit has produced so far: the CRC of its bytes in file order, the merged keys."""

    crc: int = 0
    merged: set[str] = field(default_factory=set)


class _UnitRun:
    """The steps of one unit: read a piece (on a read thread), compute it, account for its bytes,
    write it (on the write thread). A weight's fresh fp8 scale (and new input scale) is computed
    with the weight and kept in ``derived`` until its own turn."""

    def __init__(self, unit: WorkUnit, dev: torch.device, files: OpenFiles, sink: OutputFile, where: _Where) -> None:
        self.unit, self.dev, self.files, self.sink, self.where = unit, dev, files, sink, where
        self.tally = _Tally()
        self.waits = (0.0, 0.0, 0.0)
        # else copy_file_range, through the page cache (a file: an object in a bucket is read into buffers)
        self.stream_copies = sink.direct_fd is not None or any(is_s3(t.src_path) for t in unit.tensors)
        self.rings = _Rings.for_unit(unit, dev)
        self.by_key = {t.key: t for t in unit.tensors}
        self.scales0 = {  # the base scale of each scaled-fp8 weight
            t.key: scalar_at(files, *t.scale_src) for t in unit.tensors if t.quant and t.scale_src
        }
        self.derived: dict[str, torch.Tensor] = {}  # scale key -> its bytes, computed with its weight

    def read(self, job: Piece) -> Callable[[], Slot | None]:
        """Take the buffer for ``job``'s source bytes now and return the read that fills it (a
        no-op where nothing is read: derived scales, kernel copies)."""
        t = job.t
        if t.out_nbytes == 0 or t.action == Action.DERIVED or (t.action == Action.COPY and not self.stream_copies):
            return lambda: None
        off, n = job.byte_range(out=False)
        elem = 1 if (t.action == Action.COPY or is_quant(t.src_dtype)) else itemsize(t.src_dtype)
        slot = self.rings.read.slot(n, off, elem)

        def fill() -> Slot:
            try:
                read_placed(self.files, t.src_path, off, slot.buf, slot.start, n, direct=slot.direct)
            except OSError as e:
                raise _Where.reading(t, e) from None
            return slot

        return fill

    def compute(self, job: Piece, raw: Slot | None) -> torch.Tensor | None:
        """The output bytes of ``job`` (None: copied file to file by ``write``)."""
        t = job.t
        self.where.at(t)
        if t.derived_from:
            return self.derived.pop(t.key)
        if raw is not None and t.quant:
            scale_out = self.by_key[t.scale_key]
            out, self.derived[t.scale_key] = _compute_scaled(
                job, raw, self.dev, self.rings.acc, self.rings.out, self.scales0.get(t.key), scale_out
            )
            if t.input_key:  # a new input scale: a constant, written after the scale
                inp = self.by_key[t.input_key]
                self.derived[t.input_key] = input_scale(inp.out_dtype, inp.shape)
            return out
        return None if raw is None else _compute(job, raw, self.dev, self.rings.acc, self.rings.out)

    def account(self, job: Piece, out: torch.Tensor | None) -> None:
        """Chain ``job``'s output bytes onto the CRC and note a merged tensor."""
        t, tally = job.t, self.tally
        if out is not None:
            tally.crc = crc32(tensor_bytes(out), tally.crc)
        elif t.out_nbytes:  # copied in the kernel: CRC the (cached) source bytes
            off, n = job.byte_range(out=False)
            tally.crc = crc_range(self.files.fd(t.src_path), off, n, tally.crc)
        if job.tail:  # the zeros after a GGUF tensor, part of the unit's range
            tally.crc = crc32(bytes(job.tail), tally.crc)
        if job.terms:
            tally.merged.add(t.key)

    def write(self, job: Piece, out: torch.Tensor | None) -> None:
        t = job.t
        if t.out_nbytes == 0:
            return
        if out is None:
            src, n = job.byte_range(out=False)
            copy_range(self.files.fd(t.src_path), src, self.sink.fd, job.byte_range(out=True)[0], n)
            return
        off, _ = job.byte_range(out=True)
        self.sink.write(tensor_bytes(out), off, out.data_ptr())

    def run(self, reader: LoraReader) -> None:
        """Every piece in order, through the task's I/O pipeline."""

        def compute(job: Piece, raw: Slot | None) -> torch.Tensor | None:
            out = self.compute(job, raw)
            self.account(job, out)
            return out

        try:
            w = run_pipeline(unit_pieces(self.unit, reader), read=self.read, compute=compute, write=self.write)
            self.waits = (round(w.read_s, 4), round(w.compute_s, 4), round(w.write_s, 4))
        finally:
            self.rings.release()


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
    where = _Where(dest)
    sink: OutputFile | None = None
    direct = 0
    run: _UnitRun | None = None
    try:
        with io_errors(where.error):
            sink = OutputFile(dest, direct=direct_io)
            run = _UnitRun(unit, dev, files, sink, where)
            reader = LoraReader()
            try:
                run.run(reader)
            finally:
                reader.close()
    finally:
        files.close()
        if sink is not None:
            direct = sink.direct_bytes
            sink.close()
    seconds = time.perf_counter() - start
    tally = run.tally
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
        direct_read_bytes=files.direct_bytes,
        waits=run.waits,
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
