"""Work units run by the driver itself, on a thread of its own, while Ray and its workers start.

An embedded Ray takes seconds to come up and its workers seconds more to import torch; the plan
fixes every byte of the output, so who writes a unit changes nothing. A ``claim`` function (the
driver's ``UnitClaims``) hands each unit to exactly one runner (this thread or a Ray task);
``InlineRunner`` takes units in the order Ray would until it is told to stop (the first Ray task
is done), finishing the one in hand.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from distmerge.plan.merge_plan import WorkUnit
from distmerge.tasks.pipeline import release_buffers
from distmerge.tasks.unit import UnitResult, run_unit

__all__ = ["InlineRunner"]

logger = logging.getLogger("distmerge.inline")


class InlineRunner:
    """Runs units on one driver thread, in ``units`` order, until ``stop`` (see the module docstring).

    ``on_done(result)`` is called on that thread for each finished unit; the first error stops the
    thread and is raised again by ``join``.
    """

    def __init__(
        self,
        units: Sequence[WorkUnit],
        dests: dict[str, str],
        claim: Callable[[int], bool],
        *,
        on_done: Callable[[UnitResult], None],
        direct_io: bool,
        threads: int = 1,
    ) -> None:
        self.units, self.dests, self.claim, self.on_done = list(units), dests, claim, on_done
        self.direct_io, self.threads = direct_io, threads
        self.results: list[UnitResult] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self.finished = threading.Event()  #: set when the thread has ended (all taken, stopped or failed)
        self._thread = threading.Thread(target=self._run, name="distmerge-inline", daemon=True)

    def start(self) -> InlineRunner:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Take no further unit (the one in hand is finished)."""
        self._stop.set()

    def _run(self) -> None:
        try:
            for u in self.units:
                if self._stop.is_set():
                    return
                if not self.claim(u.index):
                    continue
                t = time.perf_counter()
                res = run_unit(u, self.dests[u.shard], device="cpu", threads=self.threads, direct_io=self.direct_io)
                res = replace(res, node_id="driver")
                logger.debug("unit %d done on the driver in %.2f s", u.index, time.perf_counter() - t)
                self.results.append(res)
                self.on_done(res)
        except BaseException as e:  # raised again on the driver's main thread by join()
            self.error = e
            self._stop.set()
        finally:
            release_buffers()  # the driver merges no more units: its buffers go back to the system
            self.finished.set()

    @property
    def failed(self) -> bool:
        return self.error is not None

    def join(self) -> list[UnitResult]:
        """Wait for the unit in hand; its results, or the error that stopped it."""
        self._stop.set()
        self._thread.join()
        if self.error is not None:
            raise self.error
        return self.results
