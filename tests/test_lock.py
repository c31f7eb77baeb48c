"""The per-output advisory lock (issue 14, "Build" 2): one run writes an output at a time, a second
gets a one-line refusal naming the holder, a crashed run never leaves an output stuck; and two real
CLI merges raced into one output give one refusal and one verified result."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
import torch

from distmerge.app.synth import write_lora
from distmerge.errors import OutputError
from distmerge.output import lock as lockmod
from distmerge.output.lock import OutputLock, lock_path, read_holder

from .helpers import assert_close_to_reference, load_checkpoint, lora_terms, reference_merge

HOST = socket.gethostname()
_REAL_FLOCK = fcntl.flock  # the lock module's fcntl is this module: patches below replace it


def _refusal(output) -> str:
    with pytest.raises(OutputError) as e:
        OutputLock(output).__enter__()
    msg = str(e.value)
    assert "\n" not in msg and "another distmerge run" in msg and "choose another --output" in msg, msg
    return msg


def test_second_lock_is_refused_naming_pid_and_host_then_free(tmp_path):
    out = str(tmp_path / "merged")
    with OutputLock(out) as held:
        assert held.locked and os.path.isfile(held.path)
        assert held.path == str(tmp_path / ".merged.distmerge-lock")
        assert not os.path.exists(out)  # only the lock file beside it: the output is not created
        msg = _refusal(out)
        assert msg.startswith(f"{out}: another distmerge run (pid {os.getpid()} on host {HOST}, since ")
        assert re.fullmatch(
            rf"{re.escape(out)}: another distmerge run \(pid {os.getpid()} on host {re.escape(HOST)}, "
            r"since \d\d:\d\d:\d\d\) is writing this output; wait for it to finish or choose "
            r"another --output",
            msg,
        ), msg
        holder = read_holder(out)
        assert holder is not None and holder.pid == os.getpid() and holder.host == HOST
    assert not held.locked
    assert os.listdir(tmp_path) == []  # released: the lock file is removed
    with OutputLock(out) as again:
        assert again.locked
    assert os.listdir(tmp_path) == []


def test_single_file_output_and_a_failing_run_release_the_lock(tmp_path):
    out = str(tmp_path / "model.safetensors")
    with pytest.raises(RuntimeError, match="boom"), OutputLock(out) as held:
        assert held.path == str(tmp_path / ".model.safetensors.distmerge-lock")
        _refusal(out)
        raise RuntimeError("boom")
    with OutputLock(out):
        pass


def test_two_spellings_of_one_output_share_one_lock(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    os.symlink(tmp_path / "a", tmp_path / "link")
    (tmp_path / "a" / "real_out").mkdir()
    os.symlink(tmp_path / "a" / "real_out", tmp_path / "a" / "out_link")
    monkeypatch.chdir(tmp_path)
    with OutputLock(str(tmp_path / "a" / "out")):
        for spelling in ["a/out", "a/out/", "./a/../a/out", "link/out", str(tmp_path / "link" / "out")]:
            _refusal(spelling)
            assert lock_path(spelling) == str(tmp_path / "a" / ".out.distmerge-lock")
        with OutputLock("a/other"):  # another output beside it is its own lock
            pass
    with OutputLock("link/out_link"):  # an output named through a link locks its target
        _refusal(tmp_path / "a" / "real_out")
    assert sorted(os.listdir(tmp_path / "a")) == ["out_link", "real_out"]


_HOLD = """
import subprocess, sys
from distmerge.output.lock import OutputLock
lock = OutputLock(sys.argv[1]).__enter__()
if len(sys.argv) > 2:  # start a daemon that outlives us, as Ray's do, handing it every fd it may take
    print(subprocess.Popen(["sleep", "120"], close_fds=False, start_new_session=True).pid, flush=True)
print("locked", flush=True)
sys.stdin.read()
"""


def test_lock_of_a_killed_run_is_free_at_once(tmp_path):
    out = str(tmp_path / "merged")
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLD, out], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "locked\n"
        msg = _refusal(out)
        assert f"(pid {child.pid} on host {HOST}, since " in msg
    finally:
        child.kill()  # SIGKILL: no cleanup runs, the lock file stays
        child.wait(30)
    assert os.path.exists(lock_path(out)) and read_holder(out).pid == child.pid
    with OutputLock(out) as taken:  # no wait, no stale-lock error: the kernel dropped the lock
        assert taken.locked and read_holder(out).pid == os.getpid()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"garbage\x00\n",
        b'{"pid": 999999999, "host": "gone", "started": 0}\n',
        json.dumps({"pid": 2**22 + 12345, "host": HOST, "started": 1.0}).encode(),
    ],
)
def test_leftover_lock_file_without_holder_is_taken_over(tmp_path, content):
    out = str(tmp_path / "merged")
    with open(lock_path(out), "wb") as f:
        f.write(content + b" " * 200)  # longer than what the new holder writes: it must be truncated
    with OutputLock(out):
        holder = read_holder(out)
        assert holder is not None and (holder.pid, holder.host) == (os.getpid(), HOST)
        assert abs(holder.started - time.time()) < 60
    assert os.listdir(tmp_path) == []


def test_refusal_is_one_line_when_the_holder_wrote_no_details(tmp_path, monkeypatch):
    monkeypatch.setattr(lockmod, "_INFO_WAIT_S", 0.05)
    out = str(tmp_path / "merged")
    fd = os.open(lock_path(out), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held, but empty (e.g. a holder still writing)
        msg = _refusal(out)
        assert msg == (
            f"{out}: another distmerge run (holding {lock_path(out)}) is writing this output; "
            "wait for it to finish or choose another --output"
        )
    finally:
        os.close(fd)


def test_missing_parent_folder_is_one_line(tmp_path):
    out = tmp_path / "nope" / "deeper" / "merged"
    with pytest.raises(OutputError) as e:
        OutputLock(out).__enter__()
    assert str(e.value) == f"{tmp_path / 'nope' / 'deeper'}: folder for the output does not exist"
    assert not (tmp_path / "nope").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match=r"file: is not a folder, so it cannot hold the output$"):
        OutputLock(tmp_path / "file" / "merged").__enter__()
    with OutputLock(out, create_parent=True) as held:  # opt-in: make the folders
        assert held.locked and (tmp_path / "nope" / "deeper").is_dir()
    assert os.listdir(tmp_path / "nope" / "deeper") == []


def test_lock_file_that_is_a_symlink_is_refused(tmp_path):
    os.symlink(tmp_path / "elsewhere", tmp_path / ".merged.distmerge-lock")
    with pytest.raises(OutputError, match=r"lock file .*\.merged\.distmerge-lock is a symbolic link; remove it$"):
        OutputLock(tmp_path / "merged").__enter__()
    assert not (tmp_path / "elsewhere").exists()


def test_not_reentrant(tmp_path):
    lk = OutputLock(tmp_path / "merged")
    with lk, pytest.raises(RuntimeError, match="already entered"), lk:
        pass
    lk.release()  # idempotent


class _FlockHook:
    """``fcntl.flock`` for the lock module that runs ``hook`` once, around the first call."""

    def __init__(self, before=None, after_failure=None) -> None:
        self.before, self.after_failure, self.calls = before, after_failure, 0

    def __call__(self, fd: int, op: int) -> None:
        self.calls += 1
        first = self.calls == 1
        if first and self.before:
            self.before()
        try:
            _REAL_FLOCK(fd, op)
        except OSError:
            if first and self.after_failure:
                self.after_failure()
            raise


def _same_file(lk: OutputLock) -> bool:
    st, fst = os.stat(lk.path), os.fstat(lk._fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


def test_unlink_race_old_file_locked_after_its_holder_removed_it(tmp_path, monkeypatch):
    out = str(tmp_path / "merged")
    first = OutputLock(out).__enter__()
    # the second run opened the old file; the first lets go (removes it) before the second's flock
    hook = _FlockHook(before=first.release)
    monkeypatch.setattr(lockmod.fcntl, "flock", hook)
    with OutputLock(out) as second:
        assert hook.calls == 2  # locked the removed file, noticed, started over on a new one
        assert second.locked and _same_file(second) and read_holder(out).pid == os.getpid()
        monkeypatch.setattr(lockmod.fcntl, "flock", _REAL_FLOCK)
        _refusal(out)  # and the new file really is the lock everyone sees


def test_unlink_race_a_third_run_took_the_new_file(tmp_path, monkeypatch):
    out = str(tmp_path / "merged")
    first = OutputLock(out).__enter__()
    third = OutputLock(out)

    def first_leaves_third_comes() -> None:
        first.release()
        third.__enter__()

    monkeypatch.setattr(lockmod.fcntl, "flock", _FlockHook(before=first_leaves_third_comes))
    with pytest.raises(OutputError, match=r"another distmerge run \(pid \d+ on host"):
        OutputLock(out).__enter__()  # never two holders: the second is refused by the third's file
    assert third.locked and _same_file(third)
    third.release()


def test_unlink_race_refused_while_the_holder_was_removing_it(tmp_path, monkeypatch):
    out = str(tmp_path / "merged")
    first = OutputLock(out).__enter__()
    # the flock fails because the first still holds it, then the first removes the file and lets go:
    # that is no reason to refuse, the output is free
    hook = _FlockHook(after_failure=first.release)
    monkeypatch.setattr(lockmod.fcntl, "flock", hook)
    with OutputLock(out) as second:
        assert hook.calls == 2 and second.locked and _same_file(second)


def test_lock_is_not_inherited_by_processes_the_holder_starts(tmp_path):
    """Ray's daemons, started by the driver, outlive a killed driver: they must not keep the lock."""
    out = str(tmp_path / "merged")
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLD, out, "spawn"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    daemon = None
    try:
        assert child.stdout is not None
        daemon = int(child.stdout.readline())
        assert child.stdout.readline() == "locked\n"
        _refusal(out)
        child.kill()
        child.wait(30)
        os.kill(daemon, 0)  # still running
        with OutputLock(out) as taken:
            assert taken.locked
    finally:
        child.kill()
        if daemon is not None:
            os.kill(daemon, signal.SIGKILL)


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP])
def test_filesystem_without_locks_warns_once_and_goes_on(tmp_path, monkeypatch, caplog, code):
    def no_locks(fd: int, op: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(lockmod.fcntl, "flock", no_locks)
    monkeypatch.setattr(lockmod, "_warned_unsupported", False)
    with caplog.at_level(logging.WARNING, logger="distmerge.lock"):
        for name in ("a", "b", "a"):
            with OutputLock(tmp_path / name) as lk:
                assert not lk.locked
    warnings = [r for r in caplog.records if r.name == "distmerge.lock"]
    assert len(warnings) == 1 and "does not support file locks" in warnings[0].getMessage()
    assert "merging without a lock" in warnings[0].getMessage()
    assert os.listdir(tmp_path) == []  # no empty lock files left behind


def test_other_flock_errors_are_one_line_output_errors(tmp_path, monkeypatch):
    def broken(fd: int, op: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(lockmod.fcntl, "flock", broken)
    with pytest.raises(OutputError, match=r"merged: cannot lock .*\.merged\.distmerge-lock: Input/output error$"):
        OutputLock(tmp_path / "merged").__enter__()


# -- end to end: two real CLI merges raced into one output -----------------------------------------

TIMEOUT_S = 180.0


@dataclass
class _Run:
    weight: float
    proc: subprocess.Popen
    stderr_path: str

    @property
    def stderr(self) -> str:
        with open(self.stderr_path, encoding="utf-8", errors="replace") as f:
            return f.read()


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "distmerge", *args]


def _stop(runs: list[_Run]) -> None:
    """Nothing outlives the test: continue a frozen run, interrupt it (its cleanup runs), then kill."""
    for r in runs:
        if r.proc.poll() is None:
            os.kill(r.proc.pid, signal.SIGCONT)
            r.proc.send_signal(signal.SIGINT)
    for r in runs:
        try:
            r.proc.wait(60)
        except subprocess.TimeoutExpired:
            r.proc.kill()
            r.proc.wait(30)


def _race(base: str, lora: str, out: str, weights: tuple[float, float], folder: str) -> tuple[list[_Run], bool]:
    """Start both merges at once. The moment one of them records itself in the lock file it is
    frozen (SIGSTOP), so the other meets a held lock however the two are scheduled, and continued
    once the other has exited. Returns the runs and whether they overlapped (False: one was over
    before the other took the lock, a race that did not happen)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    runs = []
    for i, w in enumerate(weights):
        err = os.path.join(folder, f"stderr-{i}.txt")
        with open(err, "w") as f:
            cmd = _cli(
                "merge", "--base", base, "--lora", lora, "--weight", repr(w), "--output", out, "--num-cpus", "1", "-q"
            )
            runs.append(_Run(w, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=f, env=env), err))
    by_pid = {r.proc.pid: r for r in runs}
    frozen: _Run | None = None
    overlapped = True
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline and any(r.proc.poll() is None for r in runs):
            holder = read_holder(out)
            run = by_pid.get(holder.pid) if holder is not None else None
            if run is not None and run.proc.poll() is None:
                os.kill(run.proc.pid, signal.SIGSTOP)
                again = read_holder(out)
                if again is not None and again.pid == run.proc.pid:  # still the holder, now frozen
                    frozen = run
                    break
                os.kill(run.proc.pid, signal.SIGCONT)  # it let go between the two reads: look again
            time.sleep(0.01)
        if frozen is not None:
            (other,) = [r for r in runs if r is not frozen]
            overlapped = other.proc.poll() is None or "another distmerge run" in other.stderr
            other.proc.wait(TIMEOUT_S)
            os.kill(frozen.proc.pid, signal.SIGCONT)
        for r in runs:
            r.proc.wait(TIMEOUT_S)
    finally:
        _stop(runs)
    return runs, overlapped


@pytest.mark.slow
@pytest.mark.ray
def test_two_cli_merges_raced_into_one_output_one_refused_one_verified(tiny_base, tiny_factors, tmp_path):
    lora = str(tmp_path / "l.pth")
    write_lora(lora, tiny_factors)
    weights = (0.5, -1.5)
    for attempt in range(3):
        out = str(tmp_path / f"out{attempt}")
        runs, overlapped = _race(tiny_base, lora, out, weights, str(tmp_path))
        if overlapped:
            break
    else:
        pytest.fail("the two merges never overlapped in 3 races")
    report = "; ".join(f"weight {r.weight}: exit {r.proc.returncode}, stderr {r.stderr!r}" for r in runs)
    assert sorted(r.proc.returncode for r in runs) == [0, 1], report
    (winner,) = [r for r in runs if r.proc.returncode == 0]
    (loser,) = [r for r in runs if r.proc.returncode == 1]
    lines = loser.stderr.strip().splitlines()
    assert len(lines) == 1, report
    assert re.fullmatch(
        rf"distmerge: error: {re.escape(out)}: another distmerge run \(pid {winner.proc.pid} on host "
        rf"{re.escape(HOST)}, since \d\d:\d\d:\d\d\) is writing this output; wait for it to "
        r"finish or choose another --output",
        lines[0],
    ), report
    # the published output is exactly the winner's merge, and nothing else is left around it
    assert not any(n.endswith((".distmerge-part", ".distmerge-lock")) for n in os.listdir(out)), os.listdir(out)
    assert not os.path.exists(lock_path(out))
    with open(os.path.join(out, "distmerge.json"), encoding="utf-8") as f:
        assert [lo["weight"] for lo in json.load(f)["loras"]] == [winner.weight]
    base = load_checkpoint(tiny_base)
    merged = load_checkpoint(out)
    assert_close_to_reference(merged, reference_merge(base, lora_terms(tiny_factors, winner.weight)))
    loser_ref = reference_merge(base, lora_terms(tiny_factors, loser.weight))
    assert any(not torch.allclose(merged[k], loser_ref[k]) for k in loser_ref)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    verify = subprocess.run(
        _cli(
            "verify",
            "--base",
            tiny_base,
            "--lora",
            lora,
            "--weight",
            repr(winner.weight),
            "--merged",
            out,
            "--num-cpus",
            "1",
        ),
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=TIMEOUT_S,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
