"""Give back a process's pages of a file it keeps mapped (the page cache keeps them).

A worker keeps a pickled LoRA's tensors mapped from one unit to the next (unpickling the index
again would cost ~0.3 s of CPU per unit); the pages each unit touched would otherwise stay in the
worker's resident set until it exits. ``drop_mapped_pages`` asks the kernel to unmap them from this
process (``madvise(MADV_DONTNEED)`` on the file's private mappings that were never written
through): the next access maps them again from the page cache, with the file's bytes, as before.

Example:
    >>> drop_mapped_pages("/nonexistent/file") >= 0
    True
"""

from __future__ import annotations

import ctypes
import mmap
import os

from distmerge.inputs.rawio import libc_function

__all__ = ["drop_mapped_pages"]

_MADVISE = libc_function("madvise", ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)


def drop_mapped_pages(path: str) -> int:
    """Unmap this process's pages of ``path`` in its private mappings that hold no page of their
    own (``Anonymous: 0 kB``: nothing was ever written through them, so every page is the
    file's); returns the bytes advised (0 where there is no such mapping, or no ``/proc``)."""
    if _MADVISE is None:
        return 0
    real = os.path.realpath(path)
    try:
        with open("/proc/self/smaps", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return 0
    done = 0
    for lo, hi, own in _mappings(text, real):
        if own == 0 and _MADVISE(lo, hi - lo, _DONTNEED) == 0:
            done += hi - lo
    return done


def _mappings(smaps: str, path: str) -> list[tuple[int, int, int]]:
    """``(start, end, kB of its own pages)`` of each private mapping of ``path`` in ``smaps``
    (pages copied on write are anonymous; -1 where the mapping has no ``Anonymous`` line)."""
    found: list[tuple[int, int, int]] = []
    ours = False  # the lines being read belong to a mapping of ``path``
    for line in smaps.splitlines():
        parts = line.split(maxsplit=5)
        if parts and "-" in parts[0] and len(parts) >= 5:  # a mapping's header line
            ours = len(parts) == 6 and parts[5] == path and parts[1].endswith("p")
            if ours:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                found.append((lo, hi, -1))
        elif ours and parts[:1] == ["Anonymous:"]:
            found[-1] = (*found[-1][:2], int(parts[1]))
    return found
