"""Replace a small text file atomically: readers see the old file or the whole new one, never a part.

Example:
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "index.json")
    >>> write_atomic(path, "{}\\n", durable=False)
    >>> open(path).read(), os.path.exists(path + ".tmp")
    ('{}\\n', False)
"""

from __future__ import annotations

import os

__all__ = ["write_atomic"]


def write_atomic(path: str, text: str, *, tmp: str | None = None, durable: bool = True) -> None:
    """Write ``text`` to ``tmp`` (default ``path + ".tmp"``), fsync it (unless not ``durable``),
    then rename it to ``path``: readers see the old file or the whole new one, never a part.

    An fsync on ext4 (``data=ordered``) commits the journal, which first writes out every dirty
    block allocated since the last commit, the part files' gigabytes included; so files rewritten
    while tasks run (the resume manifest) are not fsynced.
    """
    tmp = tmp or path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
