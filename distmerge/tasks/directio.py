"""Direct I/O on local disks: which files may bypass the page cache, and reads that do.

A cold checkpoint read through the page cache moves one readahead window at a time and copies
every byte twice (disk to cache, cache to the task's buffer); the same read with ``O_DIRECT`` is
one DMA into the task's buffer, split by the block layer into requests that are all in flight at
once. Direct reads need the file offset, the length and the buffer address aligned to the
device's block, so a task's read buffers are placed where a tensor's bytes sit at the same
position within a 4 KiB block as in the file (``tasks.pipeline.Slot``) and the read covers the
whole blocks around them. Bytes the page cache already holds (a warm base, a file just
downloaded) are copied from the cache instead: ``resident_fraction`` asks the kernel without
reading anything.

Example:
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "f")
    >>> with open(path, "wb") as f:
    ...     _ = f.write(b"x" * 8192)
    >>> fd = os.open(path, os.O_RDONLY)
    >>> resident_fraction(fd, 0, 8192)  # just written: in the page cache
    1.0
    >>> os.close(fd)
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import re

from distmerge.inputs.rawio import libc_function

__all__ = [
    "DIRECT_ALIGN",
    "DIRECT_FILESYSTEMS",
    "direct_span",
    "direct_wanted",
    "filesystem_type",
    "open_direct",
    "read_direct",
    "resident_fraction",
]

#: O_DIRECT needs the file offset, the length and the buffer address aligned to the device's
#: logical block; 4096 covers every common device (512 and 4096 byte sectors)
DIRECT_ALIGN = 4096
#: filesystems on local block devices, where an O_DIRECT write is a plain DMA from the buffer;
#: network and FUSE filesystems (NFS, Lustre, CephFS, gcsfuse, ...) keep the page cache, whose
#: write-behind they are tuned for (``DISTMERGE_DIRECT_IO=1`` tries direct I/O anywhere)
DIRECT_FILESYSTEMS = frozenset({"ext4", "xfs", "btrfs", "f2fs"})


def filesystem_type(path: str) -> str | None:
    """The type of the filesystem holding ``path`` (the longest matching mount point in
    ``/proc/self/mounts``), or ``None`` where that cannot be told.

    >>> filesystem_type("/proc/self")
    'proc'
    """
    try:
        with open("/proc/self/mounts") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    real = os.path.realpath(path)
    best, kind = "", None
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[1])  # \040 = space
        if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, kind = mnt, parts[2]
    return kind


def direct_span(offset: int, nbytes: int, address: int, align: int = DIRECT_ALIGN) -> tuple[int, int] | None:
    """The part ``[start, end)`` of the file range ``[offset, offset + nbytes)`` that can be written
    with O_DIRECT from a buffer at ``address``: the whole aligned blocks inside it, provided the
    buffer sits at the same position within a block as the file range (else ``None``, as when
    no whole block fits).

    >>> direct_span(5000, 20000, 904)   # 5000 ≡ 904 (mod 4096): blocks 8192..24576 go direct
    (8192, 24576)
    >>> direct_span(5000, 20000, 900) is None, direct_span(5000, 3000, 904) is None
    (True, True)
    """
    if (offset - address) % align:
        return None
    start = -(-offset // align) * align
    end = (offset + nbytes) // align * align
    return (start, end) if end > start else None


_MMAP = libc_function(
    "mmap", ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64
)
_MUNMAP = libc_function("munmap", ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t)
_MINCORE = libc_function("mincore", ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
_PAGE = mmap.PAGESIZE
_MAP_FAILED = ctypes.c_void_p(-1).value


def direct_wanted(path: str, direct: bool = True) -> bool:
    """Whether I/O on ``path`` should try ``O_DIRECT``: on local block filesystems
    (``DIRECT_FILESYSTEMS``) unless ``direct`` is False; ``DISTMERGE_DIRECT_IO=1`` tries any
    filesystem, ``0`` none."""
    mode = os.environ.get("DISTMERGE_DIRECT_IO", "").strip().lower()
    if mode in ("0", "false", "no", "off") or not hasattr(os, "O_DIRECT"):
        return False
    if mode in ("1", "true", "yes", "on"):
        return direct
    return direct and filesystem_type(path) in DIRECT_FILESYSTEMS


def open_direct(path: str, flags: int) -> int | None:
    """``path`` opened with ``flags | O_DIRECT`` where ``direct_wanted`` says so, else ``None``
    (also when the filesystem refuses direct I/O)."""
    if not direct_wanted(path):
        return None
    try:
        return os.open(path, flags | os.O_DIRECT)
    except OSError:  # EINVAL: the filesystem has no direct I/O
        return None


def resident_fraction(fd: int, offset: int, nbytes: int) -> float:
    """The fraction of the pages of ``[offset, offset + nbytes)`` of ``fd`` that the page cache
    holds (``mincore`` on a mapping that is never touched, so nothing is read); 1.0 where that
    cannot be told, so the caller keeps reading through the cache."""
    if nbytes <= 0 or _MMAP is None or _MINCORE is None:
        return 1.0
    start = offset // _PAGE * _PAGE
    length = offset + nbytes - start
    addr = _MMAP(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
    if addr is None or addr == _MAP_FAILED:
        return 1.0
    try:
        pages = -(-length // _PAGE)
        vec = ctypes.create_string_buffer(pages)
        if _MINCORE(addr, length, vec) != 0:
            return 1.0
        return sum(b & 1 for b in vec.raw) / pages
    finally:
        _MUNMAP(addr, length)


def read_direct(fd: int, buf: memoryview, start: int, offset: int, nbytes: int) -> None:
    """Fill ``buf[start : start + nbytes]`` with the bytes of the ``O_DIRECT`` descriptor ``fd`` at
    ``offset``, reading the whole aligned blocks around them into ``buf``: the buffer must be in
    step with the file (``buf[start - offset % DIRECT_ALIGN]`` at an aligned address) and reach
    the block boundary after ``start + nbytes`` (a ``pipeline.Slot`` placed for ``offset``).

    Raises:
        OSError: EINVAL where the device wants a stricter alignment (the caller reads through the
            cache instead), EIO when the file ends before ``offset + nbytes``, other read errors.
    """
    head = offset % DIRECT_ALIGN
    pos, end = offset - head, offset + nbytes
    i = start - head
    stop = i + (-(-end // DIRECT_ALIGN) * DIRECT_ALIGN - pos)
    while pos < end:
        n = os.preadv(fd, [buf[i:stop]], pos)
        pos, i = pos + n, i + n
        if n <= 0 or (n % DIRECT_ALIGN and pos < end):  # short and unaligned: the file ended
            raise OSError(errno.EIO, f"unexpected end of file at byte {pos}")
