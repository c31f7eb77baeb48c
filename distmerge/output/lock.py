"""One advisory lock per output, so two merges never write the same output at once.

This module owns the lock file beside each output, ``<parent>/.<name>.distmerge-lock`` (beside,
because the output folder may not exist yet), and the one-line refusal a second run gets.
``merge()`` holds ``OutputLock(output)`` from before the output checks until the result is
published or abandoned. The lock never waits: a run that finds the output locked is refused at once,
naming the holder's pid, host and start time.

How it works:

- ``fcntl.flock(LOCK_EX | LOCK_NB)`` on the lock file. The kernel drops the lock with the process,
  so a crashed or ``kill -9``-ed run never leaves an output stuck; a lock file left behind by such a
  run (present, but nobody holds it) is taken over silently.
- The holder writes its pid, host and start time into the file (for the refusal) and removes the
  file when it lets go, while still holding the lock. A run that opened the old file just before
  it was removed sees, after locking, that the path names another file (or none) and starts over,
  so two runs can never each hold a different file for one output.
- Every spelling of one output shares one lock: the path is resolved (``os.path.realpath``, through
  a link named as the output too) before the lock file is named.
- The output's parent folder must exist (``OutputError`` otherwise), unless ``create_parent=True``.
- Where the filesystem does not support ``flock`` (``ENOLCK``/``EOPNOTSUPP``, e.g. NFS mounted
  without a lock manager) one warning is logged per process and the run goes on **without a lock**:
  merges are not blocked, but nothing stops two of them there. On NFS mounted with ``nolock`` the
  kernel keeps such locks local to each client, so they exclude runs on the same host only.
- Deleting the lock file of a running merge by hand defeats the lock (a new run creates a new file).

Example:
    >>> import os, tempfile
    >>> from distmerge.errors import OutputError
    >>> folder = tempfile.mkdtemp()
    >>> out = os.path.join(folder, "low_noise_model")
    >>> with OutputLock(out) as lock:
    ...     print(os.path.basename(lock.path), read_holder(out).pid == os.getpid())
    ...     try:
    ...         OutputLock(out).__enter__()
    ...     except OutputError as e:
    ...         print("refused:", "another distmerge run (pid" in str(e))
    .low_noise_model.distmerge-lock True
    refused: True
    >>> os.listdir(folder)  # released: the lock file is gone
    []
    >>> os.rmdir(folder)
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING

from distmerge.errors import OutputError

if TYPE_CHECKING:  # typing.Self is Python 3.11+
    from typing_extensions import Self

__all__ = ["refuse_if_locked", "LockHolder", "OutputLock", "lock_path", "read_holder"]

logger = logging.getLogger("distmerge.lock")  # the name users see in -v logs

LOCK_SUFFIX = ".distmerge-lock"

#: flock errors meaning "this filesystem does not do locks" (ENOTSUP is EOPNOTSUPP on Linux)
_UNSUPPORTED = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})
_HELD = frozenset({errno.EWOULDBLOCK, errno.EAGAIN})
_ATTEMPTS = 50  #: fresh opens after the lock file was replaced under us, before giving up
_INFO_WAIT_S = 1.0  #: how long a refused run waits for a new holder to finish writing its details
_warned_unsupported = False


@dataclass(frozen=True)
class LockHolder:
    """What a lock file records about the run holding it."""

    pid: int
    host: str
    started: float  #: Unix time the lock was taken

    def since(self) -> str:
        """Local start time, ``21:58:04`` (with the date when it is not today)."""
        t = datetime.fromtimestamp(self.started)
        return t.strftime("%H:%M:%S" if t.date() == datetime.now().date() else "%Y-%m-%d %H:%M:%S")


def _resolve(output: str | os.PathLike[str]) -> tuple[str, str, str]:
    """(parent as spelled, resolved parent, resolved name) of an output path."""
    given = os.path.abspath(os.fspath(output))
    parent, name = os.path.split(given)
    real_parent, real_name = os.path.split(os.path.realpath(given))
    if not name or not real_name:
        raise OutputError(f"{os.fspath(output)}: a filesystem root cannot be an output")
    return parent, real_parent, real_name


def lock_path(output: str | os.PathLike[str]) -> str:
    """The lock file of ``output``: ``.<name>.distmerge-lock`` in its (resolved) parent folder.

    >>> lock_path("/no-such-dir/merged/low_noise_model/")
    '/no-such-dir/merged/.low_noise_model.distmerge-lock'
    """
    _, real_parent, real_name = _resolve(output)
    return os.path.join(real_parent, f".{real_name}{LOCK_SUFFIX}")


def refuse_if_locked(output: str | os.PathLike[str]) -> None:
    """Answer at once when another run holds ``output``'s lock (before the caller loads torch or
    Ray), writing nothing; the lock itself is still taken by ``OutputLock`` later.

    >>> refuse_if_locked("/no-such-dir/merged")  # no lock file: nothing to say
    """
    path = lock_path(output)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return  # no lock file (or none we may read): OutputLock decides
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in _HELD and _names(path, fd):
                raise OutputError(OutputLock(output)._refusal(OutputLock._holder(fd))) from None
            return
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _parse(data: bytes) -> LockHolder | None:
    try:
        info = json.loads(data.decode("utf-8"))
        pid, host, started = int(info["pid"]), str(info["host"]), float(info["started"])
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError):
        return None
    host = "".join(c if c.isprintable() else "?" for c in host)[:200]  # it goes into a one-line message
    return LockHolder(pid, host, started)


def read_holder(output: str | os.PathLike[str]) -> LockHolder | None:
    """What the lock file of ``output`` records, or None (no file, or nothing readable in it).

    It does not check whether the lock is held: a crashed run's file still names it.
    """
    try:
        with open(lock_path(output), "rb") as f:
            return _parse(f.read(4096))
    except OSError:
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def _names(path: str, fd: int) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


class OutputLock:
    """Context manager holding the advisory lock of one output for a whole run.

    Args:
        output: the output as given (a folder, or a path ending in ``.safetensors``).
        create_parent: create the output's parent folders first (default: they must exist).

    ``__enter__`` takes the lock or raises ``OutputError`` (one line: the output, the holder's pid,
    host and start time). It never waits. Not reentrant; one ``OutputLock`` object is used once.
    """

    def __init__(self, output: str | os.PathLike[str], *, create_parent: bool = False) -> None:
        self.output = os.fspath(output)
        self.create_parent = create_parent
        self.path = lock_path(output)
        self._fd: int | None = None
        self._used = False

    @property
    def locked(self) -> bool:
        """Whether this object holds the lock (False before, after, and without lock support)."""
        return self._fd is not None

    def __enter__(self) -> Self:
        if self._used:
            raise RuntimeError(f"OutputLock({self.output!r}) was already entered; make a new one")
        self._used = True
        self._check_parent()
        for _ in range(_ATTEMPTS):
            fd, writable = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in _HELD:
                    holder = self._holder(fd)
                    replaced = not _names(self.path, fd)  # its holder let go and removed it: again
                    os.close(fd)
                    if replaced:
                        continue
                    raise OutputError(self._refusal(holder)) from None
                os.close(fd)
                if e.errno in _UNSUPPORTED:
                    self._without_lock(e)
                    return self
                raise OutputError(f"{self.output}: cannot lock {self.path}: {e.strerror}") from None
            if not _names(self.path, fd):  # locked a file a finished run had just removed
                os.close(fd)
                continue
            self._fd = fd
            if writable:
                self._write_details(fd)
            return self
        raise OutputError(f"{self.output}: cannot lock {self.path}: other runs keep replacing it")

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def release(self) -> None:
        """Remove the lock file and let go of the lock (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if _names(self.path, fd):  # unlinked while still locked: see the module docstring
                os.unlink(self.path)
        except OSError as e:
            logger.debug("%s: could not remove the lock file: %s", self.path, e)
        finally:
            os.close(fd)

    # -- internals -------------------------------------------------------------------------------

    def _check_parent(self) -> None:
        parent, real_parent, _ = _resolve(self.output)
        if self.create_parent and not os.path.exists(real_parent):
            try:
                os.makedirs(real_parent, exist_ok=True)
            except OSError as e:
                raise OutputError(f"{parent}: cannot create the folder for the output: {e.strerror}") from None
        if not os.path.isdir(real_parent):
            if os.path.exists(real_parent):
                raise OutputError(f"{parent}: is not a folder, so it cannot hold the output")
            raise OutputError(f"{parent}: folder for the output does not exist")

    def _open(self) -> tuple[int, bool]:
        """The lock file, created if needed; read-only when another user's file is not writable."""
        flags = os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        err: OSError
        try:
            return os.open(self.path, os.O_RDWR | flags, 0o644), True
        except PermissionError as e:
            err = e  # the real reason, unless another user's lock file is there to open read-only
            if os.path.lexists(self.path):
                try:  # flock works on a read-only descriptor too
                    return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW), False
                except OSError as e2:
                    err = e2
        except OSError as e:
            err = e
        if err.errno == errno.ELOOP:
            raise OutputError(f"{self.output}: lock file {self.path} is a symbolic link; remove it") from None
        folder = os.path.dirname(self.path) or "."
        why = (
            f"{folder} is read-only or not yours to write"
            if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
            else ""
        )
        raise OutputError(
            f"{self.output}: cannot create the lock file {self.path}: {err.strerror}" + (f" ({why})" if why else "")
        ) from None

    @staticmethod
    def _write_details(fd: int) -> None:
        data = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
        try:
            os.ftruncate(fd, 0)  # a crashed run's details may be there
            os.pwrite(fd, (data + "\n").encode("utf-8"), 0)
        except OSError as e:  # the lock holds without them; a refusal then names no pid
            logger.debug("could not record the lock holder: %s", e)

    @staticmethod
    def _holder(fd: int) -> LockHolder | None:
        """The holder's details, waiting briefly while a new holder is still writing them."""
        host = socket.gethostname()
        deadline = time.monotonic() + _INFO_WAIT_S
        while True:
            try:
                holder = _parse(os.pread(fd, 4096, 0))
            except OSError:
                return None
            # empty, half written, or a dead run's details not yet overwritten: look again shortly
            if holder is not None and (holder.host != host or _alive(holder.pid)):
                return holder
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)

    def _refusal(self, holder: LockHolder | None) -> str:
        who = (
            f"another distmerge run (pid {holder.pid} on host {holder.host}, since {holder.since()})"
            if holder is not None
            else f"another distmerge run (holding {self.path})"
        )
        return f"{self.output}: {who} is writing this output; wait for it to finish or choose another --output"

    def _without_lock(self, e: OSError) -> None:
        global _warned_unsupported
        try:  # do not leave an empty file behind for a lock that was never taken
            if os.lstat(self.path).st_size == 0:
                os.unlink(self.path)
        except OSError as err:
            logger.debug("%s: could not remove the unused lock file: %s", self.path, err)
        if not _warned_unsupported:
            _warned_unsupported = True
            logger.warning(
                "%s: the filesystem does not support file locks (%s); merging without a lock, "
                "so make sure no other run writes this output",
                self.output,
                e.strerror,
            )
