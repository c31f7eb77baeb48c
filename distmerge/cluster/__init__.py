"""The only package that talks to Ray: sessions, device and storage probes, dispatch of tasks.

It knows no job: it runs calls of importable functions as Ray tasks and imports nothing of
distmerge but ``distmerge.errors`` (the jobs dispatch their units through ``app.driver``).

* ``session``: ``RaySession`` starts an embedded Ray, joins a cluster or reuses the Ray already
  running in this process, in the background, and chooses device and concurrency (``settings``);
* ``watchdog``: ends an embedded session whose driver died without shutting it down;
* ``probe``: whether each GPU node's torch can really use CUDA (``usable_device``), and whether
  every node sees the inputs and output at the same paths (``check_shared_storage``);
* ``dispatch``: ``run_calls`` runs each ``Call`` as a task, a bounded number in flight, and ends
  the rest on the first failure or Ctrl-C.

Example:
        with RaySession() as s:
            results = run_calls(fn, [Call((x,), f"item {x}") for x in items], settings=s.settings(device="auto"))
"""

from __future__ import annotations

from distmerge.cluster.dispatch import Call, DispatchSettings, Slot, placement_slots, run_calls, task_options
from distmerge.cluster.probe import PROBE_TIMEOUT_S, DeviceProbe, check_shared_storage, probe_devices, usable_device
from distmerge.cluster.session import REACH_TIMEOUT_S, RaySession
from distmerge.cluster.watchdog import Watchdog

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
    "task_options",
    "usable_device",
    "PROBE_TIMEOUT_S",
    "REACH_TIMEOUT_S",
]

_Watchdog = Watchdog  # its former name here (``tests/test_session_lifetime.py`` starts one by it)
