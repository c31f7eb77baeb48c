"""Durable shard bytes: each shard's checksum (joined from its units' CRCs, or a SHA-256 read as its
units finish), the disk writeback started as units land, and the fsyncs before anything is published.

Example:
    >>> import os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> fsync_dir(d); fsync_dir(os.path.join(d, "absent"))  # a folder that is gone is no error
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from distmerge.errors import OutputError
from distmerge.inputs.rawio import EndOfFile, pread_exact
from distmerge.plan.merge_plan import MergePlan
from distmerge.tasks.checksum import crc32, crc32_combine, format_crc32

__all__ = ["ShardHasher", "Writeback", "fsync_dir", "fsync_files", "fsync_path", "shard_crc32s"]


def _hash_range(h: hashlib._Hash, fd: int, start: int, end: int, buf: bytearray, path: str) -> None:
    """Feed bytes ``[start, end)`` of ``fd`` to ``h``, read into the reused buffer ``buf`` (plain
    reads, not a mapping: an I/O error must stay an exception, never a SIGBUS in the driver)."""
    view = memoryview(buf)
    pos = start
    while pos < end:
        block = view[: min(len(buf), end - pos)]
        try:
            pread_exact(fd, block, pos)
        except EndOfFile as e:
            raise OutputError(f"{path}: file ends at byte {e.offset}, expected at least {end}") from None
        h.update(block)  # hashlib releases the GIL for blocks this size
        pos += len(block)


def shard_crc32s(plan: MergePlan, unit_crcs: dict[int, int]) -> dict[str, str]:
    """The CRC-32 of every whole output shard, joined from its header and its units' CRCs (each
    unit covers a contiguous byte range, in file order), without reading the shards.

    Raises:
        OutputError: a unit's CRC is missing, or units leave a gap (a bug, never published).
    """
    state = {s.name: (crc32(s.header), len(s.header)) for s in plan.shards}
    for u in sorted(plan.units, key=lambda u: (u.shard, min((t.out_offset for t in u.tensors), default=0))):
        crc, pos = state[u.shard]
        if u.index not in unit_crcs:
            raise OutputError(f"unit {u.index} of {u.shard} has no checksum")
        if u.tensors and u.tensors[0].out_offset != pos:
            raise OutputError(f"{u.shard}: units leave a gap at byte {pos}")
        state[u.shard] = (crc32_combine(crc, unit_crcs[u.index], u.nbytes), pos + u.nbytes)
    for s in plan.shards:
        if state[s.name][1] != s.size:
            raise OutputError(f"{s.name}: units cover {state[s.name][1]} bytes, expected {s.size}")
    return {name: format_crc32(crc) for name, (crc, _) in state.items()}


class Writeback:
    """Starts the disk writing each finished unit's byte range at once, on a background thread
    (``sync_file_range`` may block while the device queue is full; only this thread waits then),
    so the disk works while later units compute and the final fsync finds little left to write.

    Example:
        >>> import os, tempfile
        >>> part = os.path.join(tempfile.mkdtemp(), "part")
        >>> with open(part, "wb") as f:
        ...     _ = f.write(bytes(8192))
        >>> wb = Writeback()
        >>> wb.unit_done(part, 0, 4096); wb.unit_done(part, 4096, 4096)
        >>> wb.close(); fsync_files([part])
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="distmerge-writeback")

    def unit_done(self, path: str, start: int, nbytes: int) -> None:
        self._pool.submit(self._kick, path, start, nbytes)

    @staticmethod
    def _kick(path: str, start: int, nbytes: int) -> None:
        from distmerge.tasks.writer import start_writeback  # torch: only once there are bytes

        try:
            fd = os.open(path, os.O_WRONLY)
        except OSError:
            return  # a head start only: the final fsync reports real errors
        try:
            start_writeback(fd, start, nbytes)
        finally:
            os.close(fd)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def fsync_files(paths: list[str]) -> None:
    """Flush each file to disk, in parallel (each call waits on the device, not the CPU)."""
    with ThreadPoolExecutor(max(1, min(8, len(paths))), thread_name_prefix="distmerge-fsync") as pool:
        list(pool.map(fsync_path, paths))


class ShardHasher:
    """SHA-256 of every output shard, computed front to back in a background thread as the work
    units finish (units of a shard are contiguous byte ranges after its header), then fsynced.

    The driver calls ``unit_done`` as results arrive and ``digests`` before publishing; hashing
    overlaps the units still running instead of re-reading every shard at the end.
    """

    def __init__(self, plan: MergePlan, dests: dict[str, str]) -> None:
        self._dests = dests
        self._spans: dict[str, list[tuple[int, int, int]]] = {}  # shard -> (unit, start, end) in order
        for s in plan.shards:
            self._spans[s.name] = []
        for u in plan.units:
            start = min(t.out_offset for t in u.tensors)
            end = max(t.out_offset + t.out_nbytes for t in u.tensors)
            self._spans[u.shard].append((u.index, start, end))
        self._sizes = {s.name: (len(s.header), s.size) for s in plan.shards}
        self._shard_of = {u.index: u.shard for u in plan.units}
        self._state: dict[str, list[Any]] = {
            name: [hashlib.sha256(), 0, 0] for name in self._spans
        }  # hash, next span, pos
        self._done: set[int] = set()
        self._digests: dict[str, str] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="distmerge-sha256")
        self._buf = bytearray(16 << 20)  # one read buffer for the hashing thread
        self._futures: list[Future] = []
        for name, spans in self._spans.items():
            spans.sort(key=lambda x: x[1])
            if not spans:  # a shard with no tensors is just its header
                self._futures.append(self._pool.submit(self._advance, name))

    def unit_done(self, index: int) -> None:
        self._done.add(index)
        self._futures.append(self._pool.submit(self._advance, self._shard_of[index]))

    def _advance(self, name: str) -> None:
        h, k, pos = self._state[name]
        spans = self._spans[name]
        header, size = self._sizes[name]
        with open(self._dests[name], "rb", buffering=0) as f:
            if pos == 0:
                h.update(f.read(header))
                pos = header
            while k < len(spans) and spans[k][0] in self._done:
                _, start, end = spans[k]
                if start != pos:
                    raise OutputError(f"{self._dests[name]}: units leave a gap at byte {pos}")
                _hash_range(h, f.fileno(), pos, end, self._buf, self._dests[name])
                pos = end
                k += 1
            if k == len(spans) and name not in self._digests:
                if pos != size:
                    raise OutputError(f"{self._dests[name]}: hashed {pos} bytes, expected {size}")
                os.fsync(f.fileno())
                self._digests[name] = h.hexdigest()
        self._state[name] = [h, k, pos]

    def digests(self) -> dict[str, str]:
        """Wait for the hashing to finish; shard name -> hex SHA-256."""
        for fut in self._futures:
            fut.result()
        missing = [n for n in self._spans if n not in self._digests]
        if missing:
            raise OutputError(f"shard {missing[0]} was not complete when publishing")
        return dict(self._digests)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
