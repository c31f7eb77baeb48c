"""distmerge: ends the embedded Ray session when its driver dies.

The watchdog's whole program, run by ``Watchdog.start`` as ``python -I -S _watchdog_main.py DRIVER_PID``
(stdlib only: ~30 ms, ~10 MB). It reads session folders from stdin until EOF, which comes when the
driver shuts the session down or dies (even by SIGKILL: the kernel closes the pipe). Then it
SIGKILLs every process but the driver that holds a file open for writing in one of those folders
(every Ray process of a session writes its logs there; a reader such as ``tail -f`` is spared), or,
when no folder came (the driver died inside ``ray.init``), in a folder Ray names after the driver's
pid (``session_<time>_<pid>``). A line ``exit`` makes it leave without killing anything.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time


def writes_under(pid: str, dirs: tuple[str, ...], pattern: re.Pattern[str]) -> bool:
    """Whether process ``pid`` holds a file open for writing under ``dirs`` (or matching ``pattern``
    when there are none)."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            path = os.readlink(f"/proc/{pid}/fd/{fd}")
            if not (path.startswith(dirs) if dirs else pattern.search(path)):
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                flags = next(int(x.split()[1], 8) for x in f if x.startswith("flags:"))
        except (OSError, StopIteration, ValueError):
            continue
        if flags & 3:  # O_WRONLY or O_RDWR
            return True
    return False


def session_pids(dirs: tuple[str, ...], pattern: re.Pattern[str], spare: set[int]) -> list[int]:
    """Every process (but those in ``spare``) that writes into the session."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) not in spare:
            try:
                if writes_under(name, dirs, pattern):
                    out.append(int(name))
            except OSError:
                pass
    return out


def main(argv: list[str]) -> int:
    """Wait for EOF on stdin, then kill the session's writers (up to 20 rounds, for late forks)."""
    driver = int(argv[1])
    lines = [line.strip() for line in sys.stdin]
    if "exit" in lines:
        return 0
    dirs = tuple(line.rstrip("/") + "/" for line in lines if line.startswith("/"))
    pattern = re.compile(rf"/session_[0-9_-]+_{driver}/")
    for _ in range(20):
        pids = session_pids(dirs, pattern, {driver, os.getpid()})
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.05)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
