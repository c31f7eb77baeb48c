"""The Ray session: started, joined or reused, in the background (``RaySession``).

Session policy:

* Ray already initialized in this process (e.g. a ROLL driver): reuse it, never shut it down;
* ``address`` given (``auto``, ``HOST:PORT``) or ``RAY_ADDRESS`` set: join that cluster, passing no
  resource overrides, and disconnect at the end;
* otherwise: start an embedded local Ray (``address="local"``, so a stale recorded cluster is never
  joined by accident) with the dashboard off and a small object store, and shut it down at the end.
  A ``Watchdog`` process ends that session if the driver dies without shutting it down.

Once Ray is up, ``RaySession.settings`` chooses the device (probing GPUs: ``probe.usable_device``)
and how many tasks run at once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING

import ray

from distmerge.cluster.dispatch import DispatchSettings, placement_slots
from distmerge.cluster.probe import usable_device
from distmerge.cluster.watchdog import Watchdog
from distmerge.errors import ClusterError

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["REACH_TIMEOUT_S", "RaySession"]

_LOCAL_OBJECT_STORE = 256 << 20


class _DropNotices(logging.Filter):
    """Ray >= 2.5x announces that it enabled token auth for a new local cluster (the safe default
    for an embedded session), and a session started off the main thread that it set no SIGTERM
    handler (the driver's own handling stays in charge): only noise on distmerge's output."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not (msg.startswith("Token authentication is enabled") or msg.startswith("SIGTERM handler is not set"))


def _usable_cpus() -> int:
    """The CPUs an embedded Ray will advertise (its own count: container CPU quotas included)."""
    try:
        from ray._private.utils import get_num_cpus

        return max(1, int(get_num_cpus()))
    except Exception:  # a Ray without it: the machine's count
        return os.cpu_count() or 1


def _register_fork_hooks_now() -> None:
    """Import, before Ray's thread starts forking its processes, the modules that register
    ``os.register_at_fork`` hooks: registered by the main thread's imports *during* one of those
    forks, a hook pair runs its ``after_in_parent`` half without its ``before`` half, and
    ``concurrent.futures.thread`` then prints ``Exception ignored … RuntimeError: release unlocked
    lock`` (about 1 run in 20 before this)."""
    import concurrent.futures.thread  # noqa: F401  (its _global_shutdown_lock hooks)
    import random  # noqa: F401


#: how long ``HOST:PORT`` may stay unreachable before joining it is given up (Ray itself retries for minutes)
REACH_TIMEOUT_S = 30.0


def _reachable(address: str, timeout_s: float | None = None) -> None:
    """Refuse a ``HOST:PORT`` (or ``ray://HOST:PORT``) whose port takes no TCP connection within
    ``timeout_s``: a typo answers in one line instead of Ray's minutes of retries. ``auto`` and
    other forms are left to Ray.

    >>> try:
    ...     _reachable("127.0.0.1:1", timeout_s=1)
    ... except ClusterError as e:
    ...     print(str(e)[:70])
    --address 127.0.0.1:1: no Ray cluster answers there (Connection refuse
    """
    import socket

    limit = REACH_TIMEOUT_S if timeout_s is None else timeout_s
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    host = host.strip("[]")
    deadline, why = time.monotonic() + limit, "timed out"
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((host, int(port)), timeout=max(0.5, min(5.0, left))):
                return
        except OSError as e:
            why = e.strerror or str(e) or type(e).__name__
            if isinstance(e, socket.gaierror):  # a host name that does not resolve: no use retrying
                break
        if time.monotonic() + 1.0 >= deadline or "refused" in why:
            break
        time.sleep(1.0)
    raise ClusterError(
        f"--address {address}: no Ray cluster answers there ({why}); check the host and the GCS port (default 6379)"
    )


def _nvidia_gpus() -> bool:
    """Whether this machine shows NVIDIA GPUs (``/proc/driver/nvidia/gpus``), without torch."""
    try:
        return bool(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return False


def _session_dir() -> str | None:
    """This process's Ray session folder (``/tmp/ray/session_…``), if Ray says."""
    node = getattr(ray._private.worker, "_global_node", None)
    try:
        return str(node.get_session_dir_path()) if node is not None else None
    except AttributeError:  # a Ray without it: the watchdog falls back to the driver-pid folder name
        return None


class RaySession:
    """Starts, joins or reuses a Ray session (see the module docstring), in the background.

    ``start()`` returns at once: Ray comes up on a thread of its own while the driver reads its
    inputs and plans, and ``wait()`` blocks until it is up (as a context manager it does both).
    The thread lives as long as the session, because Ray ties its daemons' lives to the thread
    that spawned them. ``close()`` ends what this object started: ``ray.shutdown()``, or with
    ``fast_exit=True`` (a command line about to leave its process) a kill of the embedded
    session's processes by its watchdog, which takes milliseconds instead of ~1.5 s.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        num_cpus: int | None = None,
        num_gpus: int | None = None,
        fast_exit: bool = False,
        lazy: bool = False,
    ) -> None:
        self.address = address
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.fast_exit = fast_exit
        #: an embedded session started only when something waits for it (``wait``, ``settings``,
        #: which clear this): a job the driver finishes by itself never starts Ray
        self.lazy = lazy
        self.owned = False
        self.mode = ""
        self._watchdog: Watchdog | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> Self:
        """Begin starting or joining Ray (no-op if already begun, if Ray runs in this process, or
        while the session is ``lazy``)."""
        if self.mode or self.lazy:
            return self
        if ray.is_initialized():
            self.mode = "existing"
            self._ready.set()
            return self
        address = self.address or os.environ.get("RAY_ADDRESS") or None
        self.mode = f"joined {address}" if address else "local"
        _register_fork_hooks_now()
        self._thread = threading.Thread(target=self._serve, args=(address,), name="distmerge-ray", daemon=True)
        self._thread.start()
        return self

    @property
    def local(self) -> bool:
        """An embedded session of this object's own (once started, or ``lazy``)."""
        return self.mode == "local" or self.lazy

    @property
    def ready(self) -> bool:
        """Ray is up (``wait`` would return at once)."""
        return self._ready.is_set() and self._error is None

    def wait_or(self, other: threading.Event, poll_s: float = 0.01) -> bool:
        """Block until Ray is up (or failed to come up: ``wait`` raises it) or ``other`` is set;
        True if Ray is up. A ``lazy`` session is not started: this waits for ``other`` alone."""
        if self.lazy:
            while not other.wait(0.05):  # in slices, so Ctrl-C is taken at once
                pass
            return False
        self.start()
        while not self._ready.is_set() and not other.is_set():
            self._ready.wait(poll_s)
        return self.ready

    def wait(self) -> Self:
        """Block until Ray is up.

        Raises:
            ClusterError: Ray could not be started or joined.
        """
        self.lazy = False  # needed after all
        self.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def _serve(self, address: str | None) -> None:
        """The session thread: start or join Ray, then hold it until ``close``."""
        try:
            self._init(address)
        except BaseException as e:  # handed to the thread that waits
            self._error = e
            self._ready.set()
            return
        self.owned = True
        self._ready.set()
        self._stop.wait()
        try:
            if ray.is_initialized():
                ray.shutdown()
        finally:
            self._close_watchdog()

    def _init(self, address: str | None) -> None:
        if address:
            _reachable(address)
        try:
            if address:
                ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
            else:
                self._start_local()
        except (ConnectionError, ValueError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            where = f"join the Ray cluster at {address!r}" if address else "start a local Ray"
            raise ClusterError(f"cannot {where}: {first}") from None

    def _start_local(self) -> None:
        """``ray.init`` of the embedded session, watched by a ``Watchdog`` from before it starts."""
        # an embedded session reports nothing home (and starts ~1 s faster without it)
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        for lg in (logging.getLogger("ray"), *(logging.getLogger("ray").handlers)):
            lg.addFilter(_DropNotices())
        self._watchdog = Watchdog.start()
        try:
            ray.init(
                address="local",
                num_cpus=self.num_cpus,
                num_gpus=self.num_gpus,
                include_dashboard=False,
                object_store_memory=_LOCAL_OBJECT_STORE,
                logging_level=logging.WARNING,
                log_to_driver=False,
            )
        except Exception:
            # Ray failed and cleans up after itself; the folder of the session it tried to start is
            # unknown, and the driver-pid name would also match a session this process still runs
            # (``ray.cluster_utils.Cluster``), so the watchdog only goes
            self._close_watchdog(kill=False)
            raise
        session_dir = _session_dir()
        if self._watchdog and session_dir:
            self._watchdog.watch(session_dir)

    def _close_watchdog(self, *, kill: bool = True) -> None:
        if self._watchdog is not None:
            self._watchdog.close(kill=kill)
            self._watchdog = None

    def close(self) -> None:
        """End what this object started (nothing for a session that was already running)."""
        if self._thread is None:
            return
        if self.fast_exit and self.local and self._watchdog is not None:
            self._watchdog.kill_now()  # the process is about to exit: no graceful shutdown
            return
        self._stop.set()
        self._thread.join()
        self._thread = None

    def __enter__(self) -> Self:
        try:
            return self.wait()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    def expected_workers(self, num_workers: int | None, device: str) -> int | None:
        """Tasks in flight ``settings`` will choose, when known before Ray is up: an embedded
        session on a machine without NVIDIA GPUs (or ``device="cpu"``); None otherwise."""
        if not self.local or (device != "cpu" and _nvidia_gpus()):
            return None
        return max(1, num_workers or self.num_cpus or _usable_cpus())

    def settings(
        self,
        *,
        device: str = "auto",
        num_workers: int | None = None,
        max_retries: int = 3,
        placement_groups: object = None,
    ) -> DispatchSettings:
        """Choose device and concurrency from what the cluster (or the placement groups) offer.

        With GPUs and ``device`` ``auto`` or ``cuda``, the GPUs are probed first (``usable_device``).
        """
        if device not in ("auto", "cpu", "cuda"):
            raise ClusterError(f"unknown device {device!r}; expected auto, cpu or cuda")
        self.wait()
        res = ray.cluster_resources()
        gpus, cpus = int(res.get("GPU", 0)), max(1, int(res.get("CPU", 1)))
        if device == "cuda" and gpus == 0:
            raise ClusterError(
                "--device cuda was asked for, but the Ray cluster has no GPUs "
                f"(resources: {int(res.get('CPU', 0))} CPUs, 0 GPUs)"
            )
        if device != "cpu":
            device = usable_device(device, placement_groups) if gpus > 0 else "cpu"
        default = gpus if device == "cuda" else cpus
        workers = max(1, num_workers or default)
        mems = [n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")]
        cap = int(max(mems) * 0.9) if mems and max(mems) > 0 else None
        slots = placement_slots(placement_groups, device) if placement_groups else ()
        if slots:
            workers = min(workers, len(slots)) if num_workers else len(slots)
        return DispatchSettings(
            device=device,
            workers=workers,
            cpus_per_task=1.0,
            gpus_per_task=1.0 if device == "cuda" else 0.0,
            max_retries=max_retries,
            memory_cap=cap,
            slots=slots,
            cancel_pending=not self.owned,
        )
