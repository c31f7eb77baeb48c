"""A task's I/O pipeline: buffers placed for direct I/O and reused, reads and writes kept in flight.

A merge task on a local disk is I/O-bound (its arithmetic runs at several GB/s), so what decides
its speed is whether the disk always has work queued in both directions:

* ``READ_DEPTH`` reads are in flight on their own threads while the main thread computes, and up
  to ``WRITE_BACKLOG`` writes on another thread (``run_pipeline``): reading never waits for a
  write, nor a write for a read.
* Every buffer is a ``Slot`` of a ``Ring`` allocated once per unit size class and reused, piece
  after piece and unit after unit in the same worker (``BufferPool``): page-faulting fresh
  buffers costs more than the arithmetic done on them, and page-locked (pinned) ones, which a GPU
  task copies from by DMA, are slow to allocate.
* A slot sits at the same position within a 4 KiB block as the file bytes it holds, inside the
  whole blocks around them, so a read (``reading.read_placed``) or write (``writer.OutputFile``) can
  move the whole blocks around it with ``O_DIRECT``.

Example:
    >>> ring = Ring(100, 2)
    >>> s = ring.slot(10, file_offset=4097)
    >>> (s.data().data_ptr() - 4097) % 4096, s.data().numel()
    (0, 10)
    >>> done = []
    >>> waits = run_pipeline(iter([1, 2, 3]), read=lambda j: (lambda: j * 10),
    ...                      compute=lambda j, r: r + j, write=lambda j, out: done.append(out))
    >>> done
    [11, 22, 33]
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch

from distmerge.plan.merge_plan import READ_DEPTH, WRITE_BACKLOG
from distmerge.tasks.directio import DIRECT_ALIGN

__all__ = [
    "BufferPool",
    "Ring",
    "Slot",
    "Waits",
    "release_buffers",
    "run_pipeline",
]

#: free buffers a worker process keeps between units, in bytes (the rest are released)
POOL_BYTES = 1 << 30

J = TypeVar("J")
R = TypeVar("R")
O = TypeVar("O")


@dataclass(frozen=True)
class Slot:
    """``nbytes`` bytes at ``start`` of the ring buffer ``buf`` (uint8). ``direct``: the bytes sit
    at the same position within a ``DIRECT_ALIGN`` block as the file offset the slot was placed
    for, and ``buf`` holds the whole blocks around them."""

    buf: torch.Tensor
    start: int
    nbytes: int
    direct: bool

    def data(self) -> torch.Tensor:
        """The slot's bytes (a uint8 view)."""
        return self.buf[self.start : self.start + self.nbytes]

    def view(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """The slot's bytes as a ``dtype`` tensor of ``shape``."""
        return self.data().view(dtype).reshape(shape)


@dataclass
class Waits:
    """Where a unit's main thread spent its time: waiting for reads, computing, waiting for writes
    (an I/O-bound unit waits; a compute-bound one computes)."""

    read_s: float = 0.0
    compute_s: float = 0.0
    write_s: float = 0.0


class BufferPool:
    """Byte buffers kept by a worker process between units (at most ``limit`` bytes of free ones),
    so a Ray worker that runs many units allocates (and pins) its buffers once."""

    def __init__(self, limit: int = POOL_BYTES) -> None:
        self.limit = limit
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, nbytes: int, *, pinned: bool = False) -> torch.Tensor:
        """A uint8 buffer of at least ``nbytes`` (pinned: page-locked, for GPU copies)."""
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.numel() >= nbytes and b.is_pinned() == pinned]
            if fits:
                return self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)

    def give(self, bufs: list[torch.Tensor]) -> None:
        """Return buffers; the largest are kept up to ``limit`` bytes in all."""
        with self._lock:
            keep = sorted(self._free + bufs, key=lambda b: -b.numel())
            self._free, total = [], 0
            for b in keep:
                if total + b.numel() <= self.limit:
                    self._free.append(b)
                    total += b.numel()

    def clear(self) -> None:
        """Drop every free buffer."""
        with self._lock:
            self._free = []


_POOL = BufferPool()


def release_buffers() -> None:
    """Free the buffers this process keeps between units (a driver done merging units itself)."""
    _POOL.clear()


class Ring:
    """A fixed ring of ``count`` reusable buffers of ``nbytes`` (plus room for placement), handed
    out in turn: a slot is overwritten ``count`` takes after it was handed out."""

    def __init__(self, nbytes: int, count: int, *, pinned: bool = False, pool: BufferPool = _POOL) -> None:
        self._pool = pool
        # room for the aligned start, the bytes' offset within their first block and the last block's rest
        self._bufs = [pool.take(max(nbytes, 1) + 3 * DIRECT_ALIGN, pinned=pinned) for _ in range(count)]
        self._i = 0

    def slot(self, nbytes: int, file_offset: int | None = None, itemsize: int = 1) -> Slot:
        """The next buffer's slot for ``nbytes`` destined for (or read from) ``file_offset``;
        placed in step with it unless the offset is not a multiple of ``itemsize`` (the bytes
        could not be viewed as that dtype there)."""
        buf = self._bufs[self._i % len(self._bufs)]
        self._i += 1
        first = (-buf.data_ptr()) % DIRECT_ALIGN  # the buffer's first aligned byte
        if file_offset is None or file_offset % itemsize:
            return Slot(buf, first, nbytes, False)
        return Slot(buf, first + file_offset % DIRECT_ALIGN, nbytes, True)

    def take(self, dtype: torch.dtype, shape: tuple[int, ...], file_offset: int | None = None) -> torch.Tensor:
        """The next buffer as a ``dtype`` tensor of ``shape`` (placed in step with ``file_offset``)."""
        n = math.prod(shape) * dtype.itemsize
        return self.slot(n, file_offset, dtype.itemsize).view(dtype, shape)

    def release(self) -> None:
        """Give the buffers back to the pool (the ring must not be used after)."""
        self._pool.give(self._bufs)
        self._bufs = []


def run_pipeline(
    jobs: Iterator[J],
    *,
    read: Callable[[J], Callable[[], R]],
    compute: Callable[[J, R], O],
    write: Callable[[J, O], None],
    depth: int = READ_DEPTH,
    backlog: int = WRITE_BACKLOG,
) -> Waits:
    """Every job in order: ``read(job)`` on this thread (taking its buffers) returns the read
    itself, run on one of ``depth`` read threads; ``compute(job, raw)`` here; ``write(job, out)``
    on the write thread. At most ``depth`` reads and ``backlog`` + 1 writes are in flight, so a
    read ring of ``depth + 1`` and an output ring of ``backlog + 2`` buffers are never overwritten
    while in use. The first error (read, compute or write) is raised once everything in flight
    has stopped. Returns the main thread's ``Waits``."""
    reads = ThreadPoolExecutor(depth, thread_name_prefix="distmerge-read")
    writes = ThreadPoolExecutor(1, thread_name_prefix="distmerge-write")
    with reads, writes:
        pending: deque[tuple[J, Future]] = deque()
        written: deque[Future] = deque()

        def fill() -> None:
            while len(pending) < depth:
                job = next(jobs, None)
                if job is None:
                    return
                pending.append((job, reads.submit(read(job))))

        waits, clock = Waits(), time.perf_counter
        fill()
        while pending:
            job, fut = pending.popleft()
            t0 = clock()
            raw = fut.result()
            t1 = clock()
            fill()
            out = compute(job, raw)
            t2 = clock()
            written.append(writes.submit(write, job, out))
            while len(written) > backlog:
                written.popleft().result()
            waits.read_s += t1 - t0
            waits.compute_s += t2 - t1
            waits.write_s += clock() - t2
        t0 = clock()
        for w in written:
            w.result()
        waits.write_s += clock() - t0
        return waits
