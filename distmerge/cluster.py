"""The only module that talks to Ray: session handling and dispatch of work units as tasks.

Session policy (see ``RaySession``):

* Ray already initialized in this process (e.g. a ROLL driver): reuse it, never shut it down;
* ``address`` given (``auto``, ``HOST:PORT``) or ``RAY_ADDRESS`` set: join that cluster, passing no
  resource overrides, and disconnect at the end;
* otherwise: start an embedded local Ray (``address="local"``, so a stale recorded cluster is never
  joined by accident) with the dashboard off and a small object store, and shut it down at the end.
  A watchdog process (``_Watchdog``) ends that session if the driver dies without shutting it down
  (``kill -9``, an OOM kill): Ray's own fate-sharing ends GCS and raylet at once, but its agents
  linger for a minute trying to report the raylet's death to the dead GCS.

Devices (``RaySession.settings``): with ``device="auto"`` or ``"cuda"`` and GPUs in the cluster (or
in the placement groups given), one probe task per GPU node (or per placement group), scheduled as a
GPU unit would be, reports whether torch there can really use CUDA (``probe_devices``); ``auto``
falls back to CPU tasks with a warning when one cannot, ``cuda`` fails naming the node.

Dispatch (``run_units``) keeps at most ``workers`` tasks in flight, collects results in completion
order, and on the first failure or Ctrl-C force-cancels everything still pending.

Example:
        with RaySession() as s:
            results = run_units(plan.units, dests, settings=s.settings(device="auto"))
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from types import ModuleType
from typing import IO, TYPE_CHECKING, cast

import ray
import ray.exceptions

from .errors import ClusterError, DistmergeError
from .plan.merge_plan import WorkUnit

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ray.util.placement_group import PlacementGroup
    from typing_extensions import Self

    from .tasks.unit import UnitResult

__all__ = [
    "Call",
    "DeviceProbe",
    "DispatchSettings",
    "RaySession",
    "Slot",
    "check_shared_storage",
    "placement_slots",
    "probe_devices",
    "run_calls",
    "run_units",
    "unit_order",
    "task_options",
    "usable_device",
]

logger = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class DispatchSettings:
    """How tasks are shaped: device, concurrency, per-task CPUs/GPUs, retries."""

    device: str  #: ``cpu`` or ``cuda``
    workers: int  #: tasks in flight at once
    cpus_per_task: float = 1.0
    gpus_per_task: float = 0.0
    max_retries: int = 3
    memory_cap: int | None = None  #: never request more ``memory`` than this per task
    slots: tuple[Slot, ...] = ()  #: placement-group seats; when set, one task per seat at a time
    #: end in-flight tasks on failure/Ctrl-C (``_stop``). Only for a session distmerge does not own
    #: (ROLL's): an owned session is shut down instead, which ends every task of the job without
    #: racing ``ray.cancel`` against replies that are already on their way.
    cancel_pending: bool = True


@dataclass(frozen=True)
class Slot:
    """A seat for one task inside a placement group bundle (e.g. ROLL's per-node group), with the
    node-local GPU it is pinned to (``None`` for CPU work)."""

    pg: PlacementGroup
    bundle: int = 0
    gpu: int | None = None


def placement_slots(placement_groups: object, device: str) -> tuple[Slot, ...]:
    """One slot per GPU (``device="cuda"``) or per whole CPU of bundle 0 of each placement group.

    Accepts a list of groups or ROLL's ``resource_manager.node2pg`` dict (node rank -> group).
    """
    groups = list(
        placement_groups.values()
        if isinstance(placement_groups, dict)
        else cast("Iterable[PlacementGroup]", placement_groups)
    )
    slots = []
    for pg in groups:
        spec = pg.bundle_specs[0]
        if device == "cuda":
            slots += [Slot(pg, 0, g) for g in range(int(spec.get("GPU", 0)))]
        else:
            slots += [Slot(pg, 0, None) for _ in range(max(1, int(spec.get("CPU", 1))))]
    if not slots:
        raise ClusterError(
            f"the placement groups given hold no {'GPUs' if device == 'cuda' else 'CPUs'} for distmerge tasks"
        )
    return tuple(slots)


def task_options(settings: DispatchSettings, slot: Slot | None) -> dict:
    """Ray ``.options()`` for one task: plain resources, or a seat in a placement group with the
    GPU pinned explicitly (ROLL holds its GPUs with fractional actors and pins devices itself, so a
    plain ``num_gpus=1`` request would wait forever)."""
    opts: dict = {"max_retries": settings.max_retries, "retry_exceptions": False}
    if slot is None:
        return {**opts, "num_cpus": settings.cpus_per_task, "num_gpus": settings.gpus_per_task}
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
        placement_group=slot.pg, placement_group_bundle_index=slot.bundle
    )
    opts["num_cpus"] = 0.01
    if slot.gpu is not None:
        opts["num_gpus"] = 0.01
        opts["runtime_env"] = {
            "env_vars": {"CUDA_VISIBLE_DEVICES": str(slot.gpu), "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}
        }
    return opts


#: The watchdog's whole program (stdlib only, started with ``python -I -S``: ~30 ms, ~10 MB). It reads
#: session folders from stdin until EOF, which comes when the driver shuts the session down or dies
#: (even by SIGKILL: the kernel closes the pipe). Then it SIGKILLs every process but the driver that
#: holds a file open for writing in one of those folders (every Ray process of a session writes its
#: logs there; a reader such as ``tail -f`` is spared), or, when no folder came (the driver died
#: inside ``ray.init``), in a folder Ray names after the driver's pid (``session_<time>_<pid>``).
#: A line ``exit`` makes it leave without killing anything.
_WATCHDOG = r"""# distmerge: ends the embedded Ray session when its driver dies
import os, re, signal, sys, time


def writes_under(pid, dirs, pattern):
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


def session_pids(dirs, pattern, spare):
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) not in spare:
            try:
                if writes_under(name, dirs, pattern):
                    out.append(int(name))
            except OSError:
                pass
    return out


driver = int(sys.argv[1])
lines = [line.strip() for line in sys.stdin]
if "exit" in lines:
    sys.exit(0)
dirs = tuple(line.rstrip("/") + "/" for line in lines if line.startswith("/"))
pattern = re.compile(r"/session_[0-9_-]+_%d/" % driver)
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
"""


class _Watchdog:
    """A tiny process that ends an embedded Ray session once its driver is gone (see ``_WATCHDOG``).

    Started before ``ray.init`` (so a driver killed during start-up leaves nothing either), told the
    session folder once Ray is up, and closed after ``ray.shutdown``. Linux only (it reads
    ``/proc``); elsewhere, or if it cannot start, the session runs without it.
    """

    def __init__(self, proc: subprocess.Popen[str], pipe: IO[str]) -> None:
        self.proc = proc
        self.pipe = pipe  #: the write end of the watchdog's stdin: its EOF ends the session

    @classmethod
    def start(cls) -> _Watchdog | None:
        """A watchdog for this process, or ``None`` where none can run."""
        if not sys.platform.startswith("linux") or not sys.executable or not os.path.isdir("/proc/self/fd"):
            return None
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _WATCHDOG, str(os.getpid())],
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
    ) -> None:
        self.address = address
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.fast_exit = fast_exit
        self.owned = False
        self.mode = ""
        self._watchdog: _Watchdog | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> Self:
        """Begin starting or joining Ray (no-op if already begun, or if Ray runs in this process)."""
        if self.mode:
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
        """An embedded session of this object's own (once started)."""
        return self.mode == "local"

    @property
    def ready(self) -> bool:
        """Ray is up (``wait`` would return at once)."""
        return self._ready.is_set() and self._error is None

    def wait_or(self, other: threading.Event, poll_s: float = 0.01) -> bool:
        """Block until Ray is up (or failed to come up: ``wait`` raises it) or ``other`` is set;
        True if Ray is up."""
        self.start()
        while not self._ready.is_set() and not other.is_set():
            self._ready.wait(poll_s)
        return self.ready

    def wait(self) -> Self:
        """Block until Ray is up.

        Raises:
            ClusterError: Ray could not be started or joined.
        """
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
        """``ray.init`` of the embedded session, watched by a ``_Watchdog`` from before it starts."""
        # an embedded session reports nothing home (and starts ~1 s faster without it)
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        for lg in (logging.getLogger("ray"), *(logging.getLogger("ray").handlers)):
            lg.addFilter(_DropNotices())
        self._watchdog = _Watchdog.start()
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


# --- device probe ---------------------------------------------------------------------------------


def _env_seconds(name: str, default: float) -> float:
    """A positive number of seconds from the environment, else ``default``."""
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        return default
    return value if value > 0 else default


#: seconds a device probe may take, from submission to its answer (a worker to start, torch to
#: import, CUDA to initialize); a probe that gets no GPU seat in that time counts as no CUDA there.
#: ``DISTMERGE_DEVICE_PROBE_TIMEOUT`` sets it.
PROBE_TIMEOUT_S = _env_seconds("DISTMERGE_DEVICE_PROBE_TIMEOUT", 30.0)


@dataclass(frozen=True)
class DeviceProbe:
    """What one GPU node (or placement group seat) can really use, as its probe task saw it."""

    node_id: str
    ip: str
    gpus: int  #: GPUs it advertises to Ray (or holds, for a placement group)
    group: str = ""  #: the placement group's id, when probed in one
    torch: str = ""  #: ``torch.__version__`` on the worker
    cuda: str | None = None  #: ``torch.version.cuda`` there (``None``: a build without CUDA)
    devices: tuple[str, ...] = ()  #: names of the devices torch there sees and ran a kernel on
    error: str = ""  #: why CUDA is not usable there (empty when it is)
    timed_out: float | None = None  #: seconds waited in vain for the probe's answer (no GPU seat)

    @property
    def ok(self) -> bool:
        """Torch there ran a kernel on CUDA."""
        return self.timed_out is None and bool(self.devices) and not self.error

    def where(self) -> str:
        """``node 10.0.0.3 (0123456789ab) advertises 1 GPU``, or the placement group that holds it."""
        n = f"{self.gpus} GPU{'s' if self.gpus != 1 else ''}"
        node = f"node {self.ip} ({self.node_id[:12]})"
        return f"placement group {self.group[:12]} on {node} holds {n}" if self.group else f"{node} advertises {n}"

    def problem(self) -> str:
        """One clause: what stands between this node and CUDA."""
        if self.timed_out is not None:
            return (
                f"a probe task asking for its GPU got no answer within {self.timed_out:g} s "
                "(GPUs held by other tasks, actors or placement groups?)"
            )
        return self.error or "torch there sees no CUDA device"

    def fix(self) -> str:
        """How to make ``--device cuda`` work there."""
        if self.timed_out is not None:
            how = "free a GPU there (inside a job that holds them, pass its placement groups)"
        elif self.cuda is None and self.torch:
            how = "install a CUDA build of torch on the workers"
        else:
            how = "check the NVIDIA driver and CUDA_VISIBLE_DEVICES on that node"
        return f"{how}, or pass --device cpu"


def _make_device_report() -> Callable[[], dict]:
    """The probe's worker side. Built as a local function, so Ray ships it by value and a worker runs
    it without importing distmerge and torch (~2 s on a fresh worker) when it need not: a torch
    build without CUDA is read from ``torch/version.py``; any other build is asked (``_cuda_report``),
    and the worker stays warm, torch imported, for the units."""

    def torch_version_py() -> str:
        """The text of the worker's ``torch/version.py`` (``""`` if torch is imported or not found)."""
        import os
        import sys
        from importlib.util import find_spec

        spec = None if "torch" in sys.modules else find_spec("torch")
        if spec is None or not spec.submodule_search_locations:
            return ""
        try:
            with open(os.path.join(next(iter(spec.submodule_search_locations)), "version.py")) as f:
                return f.read()  # e.g. "__version__ = '2.13.0+cpu'", "cuda: Optional[str] = None"
        except OSError:
            return ""

    def device_report() -> dict:
        import re

        import ray

        out = {"node": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address()}
        text = torch_version_py()
        version = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
        if version and all(re.search(rf"^{k}\s*(:[^=]*)?=\s*None\s*$", text, re.MULTILINE) for k in ("cuda", "hip")):
            return {
                **out,
                "torch": version[1],
                "cuda": None,
                "devices": [],
                "error": f"torch there has no CUDA (torch {version[1]})",
            }
        from distmerge.cluster import _cuda_report  # torch has CUDA (or is imported already): ask it

        return {**out, **_cuda_report()}

    return device_report


def _cuda_report() -> dict:
    """torch's build on this worker, the devices it sees, and that a kernel runs on them."""
    import torch

    out: dict = {"torch": torch.__version__, "cuda": torch.version.cuda, "devices": [], "error": ""}
    try:
        if not torch.cuda.is_available():
            out["error"] = _why_no_cuda(torch)
            return out
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        torch.ones(1, device="cuda").add_(1).item()  # a context and a kernel: the driver really works
        out["devices"] = names
    except Exception as e:  # a broken driver, an unsupported GPU, a busy device: all "no"
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        out["error"] = f"CUDA fails there ({type(e).__name__}: {first}; torch {torch.__version__})"
    return out


def _why_no_cuda(torch: ModuleType) -> str:
    """Why ``torch.cuda.is_available()`` said no, in one clause."""
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return f"torch there has no CUDA (torch {torch.__version__})"
    try:
        torch.cuda.init()
    except Exception as e:  # its message is the answer
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"torch there cannot use CUDA ({first}; torch {torch.__version__})"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"torch there sees no CUDA device (torch {torch.__version__}, CUDA_VISIBLE_DEVICES={visible!r})"


_remote_device_report = ray.remote(_make_device_report())


@dataclass(frozen=True)
class _Target:
    """Where one probe runs and how it is scheduled."""

    node_id: str
    ip: str
    gpus: int
    options: dict
    group: str = ""


def _probe_targets(placement_groups: object) -> list[_Target]:
    """One target per alive node with a whole GPU (``num_gpus=1`` pinned to the node), or one per
    placement group holding GPUs (its first GPU seat, exactly as a unit would sit in it)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = {n["NodeID"]: n for n in ray.nodes() if n.get("Alive")}
    base = {"max_retries": 0, "retry_exceptions": False}
    if not placement_groups:
        return [
            _Target(
                i,
                n.get("NodeManagerAddress", "?"),
                int(n["Resources"].get("GPU", 0)),
                {
                    **base,
                    "num_cpus": 0,
                    "num_gpus": 1,
                    "scheduling_strategy": NodeAffinitySchedulingStrategy(i, soft=False),
                },
            )
            for i, n in nodes.items()
            if n["Resources"].get("GPU", 0) >= 1
        ]
    seats: dict[PlacementGroup, list[Slot]] = {}
    for slot in _gpu_seats(placement_groups):
        seats.setdefault(slot.pg, []).append(slot)
    targets = []
    for pg, group in seats.items():
        node = _group_node(pg)
        opts = task_options(DispatchSettings(device="cuda", workers=1, max_retries=0), group[0])
        targets.append(
            _Target(node, nodes.get(node, {}).get("NodeManagerAddress", "?"), len(group), opts, group=pg.id.hex())
        )
    return targets


def _gpu_seats(placement_groups: object) -> tuple[Slot, ...]:
    """The groups' GPU seats (none if they hold no GPUs)."""
    try:
        return placement_slots(placement_groups, "cuda")
    except ClusterError:  # the groups hold no GPUs
        return ()


def _group_node(pg: PlacementGroup) -> str:
    """The node of a placement group's first bundle (``?`` if Ray does not say)."""
    try:
        table = ray.util.placement_group_table(pg)
        return str(table["bundles_to_node_id"][0])
    except (KeyError, IndexError, TypeError, ray.exceptions.RayError):
        return "?"


def probe_devices(placement_groups: object = None, *, timeout_s: float | None = None) -> list[DeviceProbe]:
    """Ask every GPU node (or every placement group holding GPUs) what torch there can use.

    The probes run in parallel, one small task each, scheduled as a GPU unit would be. A torch build
    without CUDA is recognised from its ``version.py`` (a few ms); any other imports torch and runs
    one kernel (that worker stays warm for the units). A probe that has not answered within
    ``timeout_s`` (default ``PROBE_TIMEOUT_S``) is cancelled and counts as getting no GPU.
    """
    timeout_s = PROBE_TIMEOUT_S if timeout_s is None else timeout_s
    targets = _probe_targets(placement_groups)
    refs = [_remote_device_report.options(name="distmerge-device-probe", **t.options).remote() for t in targets]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s) if refs else ([], [])
    done = set(ready)
    probes = []
    for t, ref in zip(targets, refs):
        if ref not in done:
            _cancel(ref)
            probes.append(DeviceProbe(t.node_id, t.ip, t.gpus, t.group, timed_out=timeout_s))
            continue
        try:
            r = ray.get(ref)
        except ray.exceptions.RayError as e:
            cause = _cause(e)
            first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
            r = {"error": f"the probe task failed there ({type(cause).__name__}: {first})"}
        probes.append(
            DeviceProbe(
                r.get("node", t.node_id),
                r.get("ip", t.ip),
                t.gpus,
                t.group,
                torch=r.get("torch", ""),
                cuda=r.get("cuda"),
                devices=tuple(r.get("devices", ())),
                error=r.get("error", ""),
            )
        )
    for p in probes:
        logger.info(
            "device probe: %s: %s",
            p.where(),
            f"CUDA on {', '.join(p.devices)} (torch {p.torch})" if p.ok else p.problem(),
        )
    return probes


def _cancel(ref: ray.ObjectRef) -> None:
    try:
        ray.cancel(ref)  # not force: the task is waiting for a seat, or at most importing torch
    except Exception as e:  # finished meanwhile, or the session is going away
        logger.debug("device probe not cancelled: %s", e)


def usable_device(device: str, placement_groups: object = None) -> str:
    """``cuda`` when every probed GPU works (``probe_devices``); otherwise ``cpu`` for
    ``device="auto"`` (one warning naming the nodes and why), or a ``ClusterError`` for ``cuda``.

    Raises:
        ClusterError: ``device="cuda"`` and a node (or seat) cannot use CUDA, naming it and the fix.
    """
    if placement_groups and not _gpu_seats(placement_groups):
        if device == "cuda":
            placement_slots(placement_groups, "cuda")  # raises: the groups hold no GPUs
        return "cpu"
    probes = probe_devices(placement_groups)
    if not probes:  # GPUs only in fractions: a unit takes a whole one
        if device == "cuda":
            raise ClusterError(
                "--device cuda: no node of the Ray cluster offers a whole GPU (a GPU unit takes one); pass --device cpu"
            )
        return "cpu"
    bad = [p for p in probes if not p.ok]
    if not bad:
        return "cuda"
    if device == "cuda":
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ClusterError(f"--device cuda: {bad[0].where()} but {bad[0].problem()}{more}; {bad[0].fix()}")
    logger.warning("%s; running CPU tasks", "; ".join(f"{p.where()} but {p.problem()}" for p in bad))
    return "cpu"


@dataclass(frozen=True)
class Call:
    """One task to run: ``fn(*args)`` on a worker. ``label`` names it in errors."""

    args: tuple
    label: str
    memory: int = 64 << 20
    size: int = 0  #: for scheduling order (largest first)
    order: tuple = ()  #: sort key; calls run in (order, -size) order


def _call(fn: Callable, args: tuple, device: str, threads: int) -> tuple[str, object]:
    """Worker side of every distmerge task: run ``fn(*args)`` and say on which node it ran."""
    import torch

    torch.set_num_threads(max(1, threads))
    try:
        return ray.get_runtime_context().get_node_id(), fn(*args)
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()


_remote_call = ray.remote(_call)


def _cause(e: BaseException) -> BaseException:
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


def run_calls(
    fn: Callable,
    calls: Sequence[Call],
    *,
    settings: DispatchSettings,
    on_done: Callable[[int, str, object], None] | None = None,
    claim: Callable[[int], bool] | None = None,
) -> list[tuple[str, object]]:
    """Run ``fn(*call.args)`` for every call as Ray tasks, at most ``settings.workers`` at once.

    ``fn`` must be a module-level (importable) function; it never sees Ray. Results come back in
    call order as ``(node_id, result)``; ``on_done(i, node_id, result)`` runs on the driver as each
    finishes (completion order). With ``claim``, a call is submitted only if ``claim(i)`` says it is
    still free (another runner may have taken it); results are for the calls run here.

    Raises:
        DistmergeError: the first task's own error (file and key named); the rest are cancelled
            (or end with the session distmerge owns).
        ClusterError: a task lost to Ray (worker/node died beyond the retry budget).
        KeyboardInterrupt: likewise.
    """
    d = _Dispatch(fn, calls, settings)
    queue = sorted(range(len(calls)), key=lambda i: (calls[i].order, -calls[i].size, i))  # biggest first
    results: dict[int, tuple[str, object]] = {}
    try:
        while queue or d.pending:
            while queue and len(d.pending) < settings.workers:
                i = queue.pop(0)
                if claim is None or claim(i):
                    d.submit(i)
            if not d.pending:
                break
            ready, _ = ray.wait(list(d.pending), num_returns=1)
            for ref in ready:
                i, (node, res) = d.collect(ref)
                results[i] = (node, res)
                if on_done:
                    on_done(i, node, res)
    except BaseException as exc:
        if d.pending and settings.cancel_pending:
            _stop(list(d.pending), interrupted=isinstance(exc, KeyboardInterrupt))
        raise
    return [results[i] for i in range(len(calls)) if i in results]


class _Dispatch:
    """The tasks of one ``run_calls`` in flight: each one's call and placement-group seat."""

    def __init__(self, fn: Callable, calls: Sequence[Call], settings: DispatchSettings) -> None:
        self.fn, self.calls, self.settings = fn, calls, settings
        self.pending: dict[ray.ObjectRef, int] = {}
        self.seat_of: dict[ray.ObjectRef, int] = {}
        self.free_seats = list(range(len(settings.slots)))
        self.threads = max(1, int(settings.cpus_per_task))

    def submit(self, i: int) -> None:
        c, settings = self.calls[i], self.settings
        seat = self.free_seats.pop(0) if settings.slots else None
        opts = task_options(settings, settings.slots[seat] if seat is not None else None)
        if seat is None:  # a bundle reserves no "memory": only ask for it outside groups
            opts["memory"] = c.memory if settings.memory_cap is None else min(c.memory, settings.memory_cap)
        ref = _remote_call.options(name=f"distmerge-{c.label}", **opts).remote(
            self.fn, c.args, settings.device, self.threads
        )
        self.pending[ref] = i
        if seat is not None:
            self.seat_of[ref] = seat

    def collect(self, ref: ray.ObjectRef) -> tuple[int, tuple[str, object]]:
        """A finished task's call index and ``(node_id, result)``; its error as a one-liner."""
        i = self.pending.pop(ref)
        if ref in self.seat_of:
            self.free_seats.append(self.seat_of.pop(ref))
        try:
            return i, ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            cause = _cause(e)
            if isinstance(cause, DistmergeError):
                raise cause from None
            first = str(cause).splitlines()[0] if str(cause) else ""
            raise ClusterError(f"{self.calls[i].label} failed: {type(cause).__name__}: {first}") from None
        except ray.exceptions.RayError as e:
            raise ClusterError(
                f"{self.calls[i].label} was lost after {self.settings.max_retries} retries: {type(e).__name__}"
            ) from None


def _probe(paths: list[str], out_dir: str) -> dict[str, object]:
    """Runs on one node: which of ``paths`` it cannot see, and a sentinel written into ``out_dir``.

    ``DISTMERGE_PROBE_UNSHARED`` (os.pathsep-separated prefixes) makes a node treat those paths as
    absent: it lets tests and dry runs simulate a node without the shared mount on one machine.
    """
    node = ray.get_runtime_context().get_node_id()
    hidden = [h for h in os.environ.get("DISTMERGE_PROBE_UNSHARED", "").split(os.pathsep) if h]
    missing = [p for p in [*paths, out_dir] if any(p.startswith(h) for h in hidden) or not os.path.exists(p)]
    sentinel = os.path.join(out_dir, f".distmerge-probe-{node}")
    if out_dir not in missing:
        try:
            with open(sentinel, "w") as f:
                f.write(node)
        except OSError:
            missing.append(out_dir)
    return {"node": node, "ip": ray.util.get_node_ip_address(), "missing": missing, "sentinel": sentinel}


_remote_probe = ray.remote(_probe)


def check_shared_storage(paths: Sequence[str], out_dir: str) -> int:
    """One probe task per alive node that can run work: every node must see the inputs and the
    output folder at the same paths, and the driver must see what each node writes there.

    Returns the number of nodes probed.

    Raises:
        ClusterError: naming the node and the path it cannot see.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [
        n
        for n in ray.nodes()
        if n.get("Alive") and (n["Resources"].get("CPU", 0) > 0 or n["Resources"].get("GPU", 0) > 0)
    ]
    if len(nodes) <= 1:
        return len(nodes)
    refs = [
        _remote_probe.options(
            num_cpus=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
            name="distmerge-probe",
        ).remote(list(paths), out_dir)
        for n in nodes
    ]
    results: list[dict] = ray.get(refs)
    try:
        for r in results:
            if r["missing"]:
                raise ClusterError(
                    f"node {r['node'][:12]} ({r['ip']}) cannot see {r['missing'][0]}: the "
                    "base, the LoRA files and the output folder must be on storage shared "
                    "by every node, mounted at the same path"
                )
            if not os.path.exists(r["sentinel"]):
                raise ClusterError(
                    f"node {r['node'][:12]} ({r['ip']}) wrote into {out_dir} but the driver "
                    "cannot see it: the output folder must be on shared storage"
                )
    finally:
        for r in results:
            try:
                os.remove(r["sentinel"])
            except OSError:
                pass
    return len(results)


def _stop(refs: list, *, interrupted: bool, grace_s: float = 300.0) -> None:
    """End in-flight tasks in a session distmerge does not own. After an error they are let
    finish (a few seconds: at most one unit each; their results are dropped), because
    force-cancelling a task whose reply is already on its way can trip a fatal check in Ray's
    driver; Ctrl-C, or tasks still running after ``grace_s``, are force-cancelled."""
    if not interrupted:
        _, refs = ray.wait(refs, num_returns=len(refs), timeout=grace_s)
    for ref in refs:
        try:
            ray.cancel(ref, force=True)
        except Exception as e:  # already finished or the session is gone: nothing to cancel
            logger.debug("not cancelled: %s", e)


def run_units(
    units: Sequence[WorkUnit],
    dests: dict[str, str],
    *,
    settings: DispatchSettings,
    on_done: Callable[[UnitResult], None] | None = None,
    direct_io: bool = True,
    claim: Callable[[int], bool] | None = None,
) -> list[UnitResult]:
    """Run every work unit as a Ray task (``unit.run_unit``), shard by shard and front to back
    (so each shard's bytes are finished in order and can be checksummed while later ones run).
    ``direct_io`` lets the tasks write with O_DIRECT (see ``writer.OutputFile``); with ``claim``
    (``claim(unit_index)``), only the units no other runner has taken.

    Returns unit results ordered by unit index.
    """
    shard_order = {name: i for i, name in enumerate(dests)}
    calls = [
        Call(
            (u, dests[u.shard], settings.device, direct_io),
            f"unit-{u.index} ({u.shard})",
            u.memory,
            u.nbytes,
            order=(shard_order[u.shard], u.index),
        )
        for u in units
    ]

    def done(i: int, node: str, res: object) -> None:
        if on_done:
            on_done(replace(cast("UnitResult", res), node_id=node))

    take = (lambda i: claim(units[i].index)) if claim is not None else None
    out = run_calls(run_unit_task, calls, settings=settings, on_done=done, claim=take)
    return sorted((replace(cast("UnitResult", res), node_id=node) for node, res in out), key=lambda r: r.index)


def unit_order(units: Sequence[WorkUnit], dests: dict[str, str]) -> list[WorkUnit]:
    """The order ``run_units`` sends units in: shard by shard, front to back."""
    shard_order = {name: i for i, name in enumerate(dests)}
    return sorted(units, key=lambda u: (shard_order[u.shard], u.index))


def run_unit_task(unit: WorkUnit, dest: str, device: str, direct_io: bool = True) -> UnitResult:
    """A work unit on a worker (torch is imported there, not by the driver's import of this module)."""
    from .tasks.unit import run_unit

    return run_unit(unit, dest, device=device, direct_io=direct_io)
