"""Probes: what the cluster's nodes can really use, before any work is sent to them.

Devices (``usable_device``, which ``RaySession.settings`` asks): with ``device="auto"`` or
``"cuda"`` and GPUs in the cluster (or in the placement groups given), one probe task per GPU node
(or per placement group), scheduled as a GPU unit would be, reports whether torch there can really
use CUDA (``probe_devices``); ``auto`` falls back to CPU tasks with a warning when one cannot,
``cuda`` fails naming the node.

Storage (``check_shared_storage``): every node of a joined cluster must see the inputs and the
output folder at the same paths, and the driver what each node writes there.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

import ray
import ray.exceptions

from distmerge.cluster.dispatch import DispatchSettings, Slot, cause, placement_slots, task_options
from distmerge.errors import ClusterError

if TYPE_CHECKING:
    from ray.util.placement_group import PlacementGroup

__all__ = [
    "DeviceProbe",
    "PROBE_TIMEOUT_S",
    "check_shared_storage",
    "cuda_report",
    "probe_devices",
    "usable_device",
]

logger = logging.getLogger("distmerge.cluster")  # the name users see in -v logs


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
    build without CUDA is read from ``torch/version.py``; any other build is asked (``cuda_report``),
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
        from distmerge.cluster.probe import cuda_report  # torch has CUDA (or is imported already): ask it

        return {**out, **cuda_report()}

    return device_report


def cuda_report() -> dict:
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
            err = cause(e)
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            r = {"error": f"the probe task failed there ({type(err).__name__}: {first})"}
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


# --- shared storage -------------------------------------------------------------------------------


def _probe(paths: list[str], out_dir: str) -> dict[str, object]:
    """Runs on one node: which of ``paths`` it cannot see, and a sentinel written into ``out_dir``.

    ``DISTMERGE_PROBE_UNSHARED`` (os.pathsep-separated prefixes) makes a node treat those paths as
    absent: it lets tests and dry runs simulate a node without the shared mount on one machine.
    """
    node = ray.get_runtime_context().get_node_id()
    hidden = [h for h in os.environ.get("DISTMERGE_PROBE_UNSHARED", "").split(os.pathsep) if h]
    missing = [
        p
        for p in [*paths, *([out_dir] if out_dir else [])]
        if any(p.startswith(h) for h in hidden) or not os.path.exists(p)
    ]
    sentinel = os.path.join(out_dir, f".distmerge-probe-{node}")
    if out_dir and out_dir not in missing:
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
            if out_dir and not os.path.exists(r["sentinel"]):
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
