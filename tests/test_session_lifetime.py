"""The embedded Ray session dies with its driver: nothing of it outlives a ``kill -9`` of the driver by
more than a few seconds, and other Ray sessions on the machine are left alone.

Without distmerge's watchdog, Ray's agents (``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``) stay
~62 s after the driver is killed: they notice the raylet is gone within 2 s, then block 60 s trying
to report that to the GCS, which is dead too. Only the driver is killed here (never a process group
or a name), and every process a test started is killed at its end whatever happened.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import psutil
import pytest
import torch

from distmerge import cluster
from distmerge.app.synth import make_factors, write_lora, write_wan_base
from distmerge.cluster.watchdog import PROGRAM as WATCHDOG_PROGRAM

from .helpers import TINY

#: the processes an embedded session is made of, each as its name or command line shows it (Ray 2.60
#: names the agents ``ray::DashboardAgent``/``ray::RuntimeEnvAgent``, Ray 2.48 shows their scripts);
#: one ``ray::`` worker at least too
SESSION = (
    ("gcs_server",),
    ("raylet",),
    ("ray::DashboardAgent", "dashboard/agent.py"),
    ("ray::RuntimeEnvAgent", "runtime_env/agent/main.py"),
)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("lifetime")
    write_wan_base(str(d / "base"), TINY)
    write_lora(str(d / "l.pth"), make_factors(TINY, rank=4, dtype=torch.bfloat16))
    return str(d / "base"), str(d / "l.pth")


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _name(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.Error:
        return "?"


def _describe(p: psutil.Process) -> str:
    """Name and command line, read while the process lives."""
    try:
        return f"{p.name()} {' '.join(p.cmdline())}"
    except psutil.Error:
        return "?"


def _wait_until(cond: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(step)
    return cond()


def _kill_all(procs: list) -> None:
    for p in procs:
        try:
            p.kill()
        except (psutil.Error, OSError):
            pass


def _merge(inputs: tuple[str, str], out: str) -> subprocess.Popen:
    base, lora = inputs
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["DISTMERGE_INLINE_UNITS"] = "0"  # every unit a Ray task: the session is the subject here
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "distmerge",
            "merge",
            "--base",
            base,
            "--lora",
            lora,
            "--output",
            out,
            "--num-cpus",
            "1",
            "--num-workers",
            "1",
            "--unit-size",
            "2KB",
            "-q",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def _session_of(driver: psutil.Process) -> list[psutil.Process]:
    try:
        return driver.children(recursive=True)
    except psutil.Error:
        return []


def _complete(procs: list[psutil.Process]) -> bool:
    seen = [_describe(p) for p in procs]
    return all(any(k in d for d in seen for k in keys) for keys in SESSION) and any(
        d.startswith("ray::") and "Agent" not in d for d in seen
    )


@pytest.mark.ray
def test_kill_9_of_the_driver_ends_its_whole_session(ray_local, inputs, tmp_path):
    p = _merge(inputs, str(tmp_path / "out"))
    driver = psutil.Process(p.pid)
    procs: list[psutil.Process] = []
    try:
        assert _wait_until(lambda: p.poll() is not None or _complete(_session_of(driver)), 180), "no session"
        procs = _session_of(driver)
        assert p.poll() is None, f"the merge ended before it could be killed: {p.stderr.read().decode()}"
        os.kill(p.pid, signal.SIGKILL)  # the driver only: its session must follow by itself
        p.wait(30)
        t0 = time.monotonic()
        gone = _wait_until(lambda: not any(_alive(q) for q in procs), 10)
        left = [f"{_name(q)} ({q.pid})" for q in procs if _alive(q)]
        assert gone, f"still alive {time.monotonic() - t0:.1f} s after kill -9 of the driver: {left}"
        # another Ray session on the machine (this process's own) is untouched and still works
        assert ray_local.get(ray_local.remote(lambda: 1).remote(), timeout=60) == 1
    finally:
        _kill_all([driver, *procs])
        p.wait(30)


@pytest.mark.ray
def test_a_finished_run_leaves_nothing_and_no_watchdog(inputs, tmp_path):
    p = _merge(inputs, str(tmp_path / "out"))
    driver = psutil.Process(p.pid)
    seen: dict[psutil.Process, str] = {}
    try:
        while p.poll() is None:  # every process the run starts, as they come
            # described again while alive: a process caught between fork and exec shows its parent
            seen.update({q: d for q in _session_of(driver) if (d := _describe(q)) != "?"})
            time.sleep(0.05)
        assert p.returncode == 0, p.stderr.read().decode()  # type: ignore[union-attr]
        names = {d.split(" ", 1)[0] for d in seen.values()}
        assert {"gcs_server", "raylet"} <= names, names
        assert any(WATCHDOG_PROGRAM in d for d in seen.values()), "no watchdog"
        assert _wait_until(lambda: not any(_alive(q) for q in seen), 10), [
            f"{n} ({q.pid})" for q, n in seen.items() if _alive(q)
        ]
    finally:
        _kill_all(list(seen))


_FAKE_DRIVER = """
import sys, time
from distmerge.cluster import _Watchdog
w = _Watchdog.start()
if sys.argv[1]:
    w.watch(sys.argv[1])
print(w.proc.pid, flush=True)
time.sleep(600)
"""

_HOLDER = "import sys, time; f = open(sys.argv[1], sys.argv[2]); print('open', flush=True); time.sleep(600)"


def _hold(path: str, mode: str) -> subprocess.Popen:
    """A process holding ``path`` open (``a``: writing, like a Ray process's log; ``r``: a reader)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    h = subprocess.Popen([sys.executable, "-c", _HOLDER, path, mode], stdout=subprocess.PIPE, text=True)
    assert h.stdout.readline().strip() == "open"  # type: ignore[union-attr]
    return h


@pytest.mark.parametrize("told", [True, False], ids=["session-folder-known", "died-during-ray-init"])
def test_the_watchdog_kills_writers_of_its_session_only(tmp_path, told):
    if not sys.platform.startswith("linux"):
        pytest.skip("the watchdog reads /proc")
    mine = tmp_path / "ray" / "session_2026-12-01_10-00-00_123456_PID"
    driver = subprocess.Popen(
        [sys.executable, "-c", _FAKE_DRIVER, str(mine) if told else ""],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    holders: list[subprocess.Popen] = []
    try:
        watchdog = psutil.Process(int(driver.stdout.readline()))  # type: ignore[union-attr]
        # told: the folder as given; not told: Ray's folder name ends in the driver's pid
        mine = mine if told else mine.with_name(mine.name.replace("PID", str(driver.pid)))
        writer = _hold(str(mine / "logs" / "raylet.out"), "a")
        reader = _hold(str(mine / "logs" / "raylet.out"), "r")  # e.g. ``tail -f``: spared
        other = _hold(str(mine.with_name("session_2026-12-01_10-00-00_123456_1") / "logs" / "raylet.out"), "a")
        holders = [writer, reader, other]
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(30)
        assert _wait_until(lambda: writer.poll() is not None, 10), "the session's writer survived"
        assert writer.returncode == -signal.SIGKILL
        assert _wait_until(lambda: not _alive(watchdog), 10), "the watchdog did not exit"
        assert reader.poll() is None and other.poll() is None
    finally:
        for h in [driver, *holders]:
            h.kill()
            h.wait(30)


@pytest.mark.ray
def test_sessions_distmerge_does_not_start_get_no_watchdog(ray_local):
    with cluster.RaySession() as s:
        assert s.mode == "existing" and s._watchdog is None
    assert ray_local.is_initialized()


def test_a_lazy_session_starts_nothing_until_something_waits_for_ray():
    """``lazy``: ``start`` and ``wait_or`` leave Ray alone (the driver merges every unit itself);
    the session is still the embedded, local kind, so the driver's units run."""
    import threading

    s = cluster.RaySession(lazy=True)
    assert s.start() is s and s.mode == "" and s.local and not s.ready
    done = threading.Event()
    threading.Timer(0.1, done.set).start()
    assert s.wait_or(done) is False  # returns when the driver's units are done, Ray never started
    assert s.mode == "" and s._thread is None
    s.close()
