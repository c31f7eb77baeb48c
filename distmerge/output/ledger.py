"""The driver's account of finished work units, for every job: the resume manifest, the staging's
own work per unit (a merge starts the unit's bytes towards the disk, or hashes them) and the
progress callback, all fed from one place as each unit lands.

Example:
    >>> from types import SimpleNamespace as U
    >>> from distmerge.output.staging import NoStaging
    >>> seen = []
    >>> ledger = UnitLedger(NoStaging(), None, units=2, nbytes=30, progress=lambda *a: seen.append(a))
    >>> ledger.unit_done(U(index=0, nbytes=10), "result of unit 0")
    >>> seen
    [(0, 2, 0, 30), (1, 2, 10, 30)]
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distmerge.output.manifest import Manifest
    from distmerge.output.staging import Staging

__all__ = ["ProgressFn", "UnitLedger"]

#: ``f(units_done, units_total, bytes_done, bytes_total)``, called on the driver as units finish
ProgressFn = Callable[[int, int, int, int], None]


class UnitLedger:
    """Records finished units (see the module docstring). Thread-safe: units may land from the
    driver's own worker as well as from Ray. ``units``/``nbytes`` are the job's totals."""

    def __init__(
        self,
        staging: Staging,
        manifest: Manifest | None,
        *,
        units: int,
        nbytes: int,
        progress: ProgressFn | None = None,
    ) -> None:
        self.staging, self.manifest, self.progress = staging, manifest, progress
        self.total_units, self.total_bytes = units, nbytes
        self.units = self.bytes = 0
        self._lock = threading.Lock()
        self._tell()

    def reused(self, done: Iterable[tuple[Any, Any]]) -> None:
        """Units an interrupted run finished (``(unit, its result or record)``), taken at once."""
        self._take(done)

    def unit_done(self, unit: Any, result: Any) -> None:
        """``unit`` finished with ``result``: recorded (and the manifest saved), then told."""
        self._take([(unit, result)])

    def _take(self, done: Iterable[tuple[Any, Any]]) -> None:
        with self._lock:
            for unit, result in done:
                self._record(unit, result)
            if self.manifest is not None:
                self.manifest.save()
            self._tell()

    def _record(self, unit: Any, result: Any) -> None:
        payload = self.staging.unit_done(unit, result)
        if self.manifest is not None:
            self.manifest.record(unit.index, payload)
        self.units += 1
        self.bytes += unit.nbytes

    def _tell(self) -> None:
        if self.progress:
            self.progress(self.units, self.total_units, self.bytes, self.total_bytes)
