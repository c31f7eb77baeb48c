"""Path rules shared by the output checks and the job-file checks (no I/O).

Example:
    >>> inside("/data/out/a", "/data/out"), inside("/data/outer", "/data/out"), inside("/data", "/data")
    (True, False, True)
"""

from __future__ import annotations

import os

__all__ = ["inside"]


def inside(child: str, parent: str) -> bool:
    """``child`` is ``parent`` or lies below it (plain string paths, compared as given)."""
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)
