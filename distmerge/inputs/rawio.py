"""Exact positioned reads and writes on file descriptors (no torch, no file objects).

``preadv`` and ``pwrite`` may move fewer bytes than asked (signals, network filesystems, large
requests); these loops retry until every byte is moved, and report a file that ends too early as
``EndOfFile``, an ``OSError`` (EIO) that also says at which byte the data ran out.

Example:
    >>> import os, tempfile
    >>> fd, path = tempfile.mkstemp()
    >>> pwrite_all(fd, b"safetensors", 0)
    >>> bytes(read_bytes(fd, 4, 7))
    b'tensors'
    >>> try:
    ...     read_bytes(fd, 8, 10)
    ... except EndOfFile as e:
    ...     e.offset, e.strerror
    (11, 'unexpected end of file at byte 11')
    >>> os.close(fd); os.remove(path)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from typing import Any

__all__ = ["EndOfFile", "libc_function", "pread_exact", "pwrite_all", "read_bytes"]


class EndOfFile(OSError):
    """A read found the end of the file before the buffer was full; ``offset`` is where."""

    offset: int = 0


def pread_exact(fd: int, view: memoryview, offset: int, *, what: str = "file") -> None:
    """Fill all of ``view`` from ``offset`` of ``fd`` with ``preadv`` (which may return less than asked).

    Raises:
        EndOfFile: ``unexpected end of <what> at byte N`` (N: where the file ends).
        OSError: a read error.
    """
    while view:
        n = os.preadv(fd, [view], offset)
        if n == 0:
            err = EndOfFile(errno.EIO, f"unexpected end of {what} at byte {offset}")
            err.offset = offset
            raise err
        view, offset = view[n:], offset + n


def read_bytes(fd: int, offset: int, nbytes: int) -> bytearray:
    """Read exactly ``nbytes`` at ``offset`` into a fresh buffer."""
    buf = bytearray(nbytes)
    pread_exact(fd, memoryview(buf), offset)
    return buf


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (pwrite may write less than asked)."""
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        if n == 0:
            raise OSError(errno.EIO, "pwrite wrote 0 bytes")
        view, offset = view[n:], offset + n


def libc_function(name: str, restype: Any, *argtypes: Any) -> Any:
    """The C library's ``name`` (setting errno), or ``None`` where there is none (non-Linux)."""
    try:
        fn = getattr(ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = list(argtypes)
    fn.restype = restype
    return fn
