"""The watchdog of an embedded Ray session: it ends the session if the driver dies without
shutting it down (``kill -9``, an OOM kill). Ray's own fate-sharing ends GCS and raylet at once,
but its agents linger for a minute trying to report the raylet's death to the dead GCS.

The watchdog is a separate, stdlib-only program (``_watchdog_main.py``) fed through a pipe: the
pipe's EOF, which the kernel delivers even after a SIGKILL of the driver, is its signal.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from typing import IO

__all__ = ["PROGRAM", "Watchdog"]

logger = logging.getLogger("distmerge.cluster")  # the name users see in -v logs

#: the watchdog's program, run as a script with ``python -I -S`` (see its docstring)
PROGRAM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_watchdog_main.py")


class Watchdog:
    """A tiny process that ends an embedded Ray session once its driver is gone (``PROGRAM``).

    Started before ``ray.init`` (so a driver killed during start-up leaves nothing either), told the
    session folder once Ray is up, and closed after ``ray.shutdown``. Linux only (it reads
    ``/proc``); elsewhere, or if it cannot start, the session runs without it.
    """

    def __init__(self, proc: subprocess.Popen[str], pipe: IO[str]) -> None:
        self.proc = proc
        self.pipe = pipe  #: the write end of the watchdog's stdin: its EOF ends the session

    @classmethod
    def start(cls) -> Watchdog | None:
        """A watchdog for this process, or ``None`` where none can run."""
        if not sys.platform.startswith("linux") or not sys.executable or not os.path.isdir("/proc/self/fd"):
            return None
        if not os.path.isfile(PROGRAM):  # an install that left it out
            logger.debug("no session watchdog: %s is missing", PROGRAM)
            return None
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", PROGRAM, str(os.getpid())],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                text=True,
                start_new_session=True,
            )
        except OSError as e:
            logger.debug("no session watchdog: %s", e)
            return None
        assert proc.stdin is not None  # stdin=PIPE
        return cls(proc, proc.stdin)

    def watch(self, session_dir: str) -> None:
        """Name the session folder whose processes end with the driver."""
        try:
            self.pipe.write(os.path.realpath(session_dir) + "\n")
            self.pipe.flush()
        except OSError as e:  # it died: nothing to do but say so
            logger.debug("session watchdog gone: %s", e)

    def kill_now(self) -> None:
        """EOF without waiting: the watchdog kills the session's processes while this one exits."""
        try:
            self.pipe.close()
        except OSError:
            pass

    def close(self, *, kill: bool = True, timeout_s: float = 10.0) -> None:
        """EOF: the watchdog ends what is left of the session (nothing, after a clean shutdown) and
        exits; wait for it, so a session started next in this process is never mistaken for it.
        ``kill=False`` makes it exit without killing anything."""
        try:
            if not kill:
                self.pipe.write("exit\n")
            self.pipe.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


_Watchdog = Watchdog  # its former name
