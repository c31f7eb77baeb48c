"""Progress for long merges: a tqdm bar on a terminal, sparse log lines otherwise, nothing if quiet.

Example:
    >>> p = Progress(mode="lines", stream=__import__("sys").stdout)
    >>> p(0, 4, 0, 4_000_000_000)
    distmerge: 0/4 units, 0.00/4.00 GB (0%), 0.00 GB/s, ETA ?
    >>> p(4, 4, 4_000_000_000, 4_000_000_000)  # doctest: +ELLIPSIS
    distmerge: 4/4 units, 4.00/4.00 GB (100%), ... GB/s, ETA 0s
    >>> p.close()
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, TextIO

__all__ = ["Progress"]


class Progress:
    """Callable as ``progress(units_done, units_total, bytes_done, bytes_total)``."""

    def __init__(self, mode: str = "auto", stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "lines"
        self.mode = mode
        self.start = time.monotonic()
        self.bar: Any = None  # a tqdm bar once drawn
        self._last_pct = -1
        self._lock = threading.Lock()  # calls come from the driver's threads and Ray's callbacks

    def __call__(self, done: int, total: int, done_bytes: int, total_bytes: int) -> None:
        if self.mode == "quiet":
            return
        with self._lock:
            self._draw(done, total, done_bytes, total_bytes)

    def _draw(self, done: int, total: int, done_bytes: int, total_bytes: int) -> None:
        if done == 0:
            self.start = time.monotonic()
        if self.mode == "bar":
            if self.bar is None:
                from tqdm import tqdm

                tqdm.monitor_interval = 0  # no monitor thread: nothing left running at exit
                self.bar = tqdm(
                    total=total_bytes,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1000,
                    desc="merging",
                    file=self.stream,
                    dynamic_ncols=True,
                )
            self.bar.update(done_bytes - self.bar.n)
            self.bar.set_postfix_str(f"units {done}/{total}", refresh=True)
            return
        pct = int(100 * done_bytes / total_bytes) if total_bytes else 100
        if done and pct // 10 == self._last_pct // 10 and done != total:
            return  # about one line per 10 %
        self._last_pct = pct
        el = time.monotonic() - self.start
        rate = done_bytes / el / 1e9 if el > 0 else 0.0
        eta = (total_bytes - done_bytes) / (rate * 1e9) if rate > 0 else float("nan")
        eta_s = f"{eta:.0f}s" if eta == eta else "?"
        print(
            f"distmerge: {done}/{total} units, {done_bytes / 1e9:.2f}/{total_bytes / 1e9:.2f} GB "
            f"({pct}%), {rate:.2f} GB/s, ETA {eta_s}",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        """End the bar (its last state stays on screen); the next call, for the next merge of a
        job, starts a new one. The CLI closes it before printing its summary, the last line."""
        with self._lock:
            if self.bar is not None:
                self.bar.close()
                self.bar = None
