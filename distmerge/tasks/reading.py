"""Reading base and output bytes inside a task: one descriptor per file (and one for direct I/O),
exact positioned reads straight into tensors, and one-element scales.

Example:
    >>> import os, tempfile, torch
    >>> path = os.path.join(tempfile.mkdtemp(), "s.bin")
    >>> with open(path, "wb") as f:
    ...     _ = f.write(torch.tensor([0.5, 0.25]).numpy().tobytes())
    >>> files = OpenFiles()
    >>> read_scalar(files.fd(path), 4, "F32").item(), files.fd(path) == files.fd(path)
    (0.25, True)
    >>> files.close()
"""

from __future__ import annotations

import errno
import os
import threading

import torch

from distmerge.inputs import objstore, rawio
from distmerge.inputs.dtypes import itemsize
from distmerge.inputs.objstore import is_s3
from distmerge.inputs.rawio import pread_exact
from distmerge.inputs.torch_dtypes import to_torch
from distmerge.tasks.directio import open_direct, read_direct, resident_fraction

__all__ = ["OpenFiles", "Source", "read_bytes", "read_into", "read_placed", "read_scalar", "scalar_at"]

#: where a task reads bytes from: an open file's descriptor, or an ``s3://`` object's URL
Source = int | str

#: a range whose pages are at least this much in the page cache is copied from there
_CACHED = 0.5


class OpenFiles:
    """Input files opened read-only on first use and kept open until ``close`` (one task's inputs)."""

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}
        self.direct_fds: dict[str, int | None] = {}
        self.retired: list[int] = []  #: direct descriptors refused mid-run, closed with the rest
        self.direct_bytes = 0  #: bytes read with O_DIRECT so far
        self._lock = threading.Lock()  # reads run on several threads

    def fd(self, path: str) -> int:
        with self._lock:
            if path not in self.fds:
                self.fds[path] = os.open(path, os.O_RDONLY)
            return self.fds[path]

    def source(self, path: str) -> Source:
        """``fd(path)``, or for an ``s3://`` object its URL (read with ranged GETs by ``read_bytes``)."""
        return path if is_s3(path) else self.fd(path)

    def direct_fd(self, path: str) -> int | None:
        """An ``O_DIRECT`` descriptor of ``path``, or None where direct I/O is off
        (``directio.direct_wanted``) or refused."""
        with self._lock:
            if path not in self.direct_fds:
                self.direct_fds[path] = open_direct(path, os.O_RDONLY)
            return self.direct_fds[path]

    def count_direct(self, nbytes: int) -> None:
        with self._lock:
            self.direct_bytes += nbytes

    def no_direct(self, path: str) -> None:
        """Read ``path`` through the page cache from now on (the descriptor is closed with the
        rest: another read thread may still be using it)."""
        with self._lock:
            fd = self.direct_fds.get(path)
            self.direct_fds[path] = None
            if fd is not None:
                self.retired.append(fd)

    def close(self) -> None:
        for fd in [*self.fds.values(), *self.direct_fds.values(), *self.retired]:
            if fd is not None:
                os.close(fd)
        self.fds, self.direct_fds, self.retired = {}, {}, []


def read_into(fd: int, offset: int, buf: torch.Tensor) -> None:
    """Fill the uint8 tensor ``buf`` from ``offset`` (no intermediate copy)."""
    pread_exact(fd, buf.numpy().data.cast("B"), offset)


def read_placed(
    files: OpenFiles, path: str, offset: int, buf: torch.Tensor, start: int, nbytes: int, *, direct: bool = True
) -> None:
    """Fill ``buf[start : start + nbytes]`` with ``path``'s bytes at ``offset``: straight from the
    disk with ``O_DIRECT`` when the buffer is in step with the file (``pipeline.Slot.direct``) and
    most of the range is not in the page cache, else (or without ``direct``) through the cache.
    An ``s3://`` object is read with one ranged GET straight into the buffer (``objstore``)."""
    if is_s3(path):
        objstore.read_into(path, offset, buf[start : start + nbytes].numpy().data.cast("B"))
        return
    dfd = files.direct_fd(path) if direct else None
    fd = files.fd(path)
    if dfd is not None and resident_fraction(fd, offset, nbytes) < _CACHED:
        try:
            read_direct(dfd, buf.numpy().data.cast("B"), start, offset, nbytes)
            files.count_direct(nbytes)
            return
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            files.no_direct(path)  # a device with a stricter alignment
    read_into(fd, offset, buf[start : start + nbytes])


def scalar_at(files: OpenFiles, path: str, offset: int, code: str) -> torch.Tensor:
    """``read_scalar`` of ``path`` (a file, or an ``s3://`` object)."""
    return read_scalar(files.source(path), offset, code)


def read_bytes(src: Source, offset: int, nbytes: int) -> bytearray:
    """Exactly ``nbytes`` at ``offset`` of a file (its descriptor) or an object (its URL: one ranged GET)."""
    if isinstance(src, str):
        return bytearray(objstore.read_range(src, offset, nbytes))
    return rawio.read_bytes(src, offset, nbytes)


def read_scalar(fd: Source, offset: int, code: str, nbytes: int | None = None) -> torch.Tensor:
    """The one-element tensor of dtype ``code`` at ``offset`` (``nbytes`` long, by default one
    element) as a float32 0-d tensor."""
    raw = read_bytes(fd, offset, itemsize(code) if nbytes is None else nbytes)
    return torch.frombuffer(raw, dtype=to_torch(code)).to(torch.float32).reshape(())
