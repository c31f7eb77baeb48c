"""Faults: a worker killed mid-merge, Ctrl-C, a crashed driver resumed, a full disk.

A medium Wan-shaped base (~30 MB, fp32) is merged in ~1 MB work units one at a time, so each fault
can be injected while the merge is provably in progress (the resume manifest already records a
finished unit)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import distmerge
from distmerge.app.synth import WanConfig, make_factors, write_lora, write_wan_base

from .helpers import assert_close_to_reference, load_checkpoint, lora_terms, reference_merge

pytestmark = pytest.mark.ray

MEDIUM = WanConfig(dim=256, ffn=704, blocks=8, in_dim=16, text_dim=256, freq_dim=64, dtype="F32")
SLOW = dict(num_workers=1, unit_size="1MB")
SLOW_CLI = ["--num-workers", "1", "--unit-size", "1MB", "--num-cpus", "2", "-q"]


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    d = tmp_path_factory.mktemp("medium")
    base = str(d / "base")
    write_wan_base(base, MEDIUM, num_shards=2)
    factors = make_factors(MEDIUM, rank=8, dtype=torch.bfloat16)
    lora = str(d / "diffusion_module.pth")
    write_lora(lora, factors)
    return base, lora, factors


@pytest.fixture(scope="module")
def reference_output(medium, tmp_path_factory, ray_local):
    base, lora, _ = medium
    out = str(tmp_path_factory.mktemp("ref") / "out")
    distmerge.merge(base, [lora], out, **SLOW)
    return _files(out)


def _files(folder: str) -> dict[str, bytes]:
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


def _units_done(out: str) -> int:
    try:
        with open(os.path.join(out, ".distmerge-manifest.json")) as f:
            return len(json.load(f)["units"])
    except (OSError, ValueError, KeyError):
        return 0


def _wait_units(out: str, n: int, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while _units_done(out) < n:
        if time.monotonic() > end:
            raise AssertionError(f"merge into {out} did not record {n} finished units in {timeout}s")
        time.sleep(0.01)


def _task_worker_pids() -> list[int]:
    """Ray workers currently executing a distmerge task (their process title names the task)."""
    pids = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                cmd = open(f"/proc/{p}/cmdline", "rb").read().replace(b"\0", b" ")
            except OSError:
                continue
            if cmd.startswith(b"ray::distmerge-") or cmd.startswith(b"ray::_call"):
                pids.append(int(p))
    return pids


def test_killed_worker_is_retried_and_output_is_bitwise_identical(ray_local, medium, reference_output, tmp_path):
    base, lora, _ = medium
    out = str(tmp_path / "out")
    box: dict = {}

    def run() -> None:
        try:
            box["report"] = distmerge.merge(base, [lora], out, **SLOW)
        except BaseException as e:  # surfaced below
            box["error"] = e

    th = threading.Thread(target=run)
    th.start()
    _wait_units(out, 1)
    killed = []
    end = time.monotonic() + 30
    while not killed and time.monotonic() < end and th.is_alive():
        for pid in _task_worker_pids():
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        time.sleep(0.005)
    th.join(120)
    assert killed, "no distmerge task was running to kill"
    assert "error" not in box, box.get("error")
    assert _files(out) == reference_output


def _cli(args: list[str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.Popen(
        [sys.executable, "-m", "distmerge", "merge", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def test_ctrl_c_cancels_cleans_up_and_exits_130(medium, tmp_path):
    base, lora, _ = medium
    out = str(tmp_path / "out")
    p = _cli(["--base", base, "--lora", lora, "--output", out, *SLOW_CLI])
    _wait_units(out, 1)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("distmerge: interrupted")
    assert "Traceback" not in err
    assert not os.path.exists(out), os.listdir(out)  # parts, manifest and the folder it created: gone


def test_ctrl_c_through_a_dead_pipe_still_exits_130(medium, tmp_path):
    """``distmerge merge … 2>&1 | tee log``: Ctrl-C ends ``tee`` too, so stdout and stderr are pipes
    nobody reads any more; the run must still clean up and exit 130, not die of a BrokenPipeError
    while saying so."""
    base, lora, _ = medium
    out = str(tmp_path / "out")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r, w = os.pipe()  # one pipe for both streams, as `2>&1 |` makes it
    p = subprocess.Popen(
        [sys.executable, "-m", "distmerge", "merge", "--base", base, "--lora", lora, "--output", out, *SLOW_CLI[:-1]],
        env=env,
        stdout=w,
        stderr=w,
        start_new_session=True,
    )  # without -q: the progress lines go to the pipe too
    os.close(w)
    reader = threading.Thread(target=lambda: os.read(r, 1 << 20), daemon=True)
    reader.start()
    _wait_units(out, 1)
    os.close(r)  # tee is gone
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=120) == 130
    assert not os.path.exists(out), os.listdir(out)


@pytest.mark.slow
def test_crashed_driver_resumes_with_finished_units_reused(medium, reference_output, tmp_path):
    base, lora, _ = medium
    out = str(tmp_path / "out")
    args = ["--base", base, "--lora", lora, "--output", out, *SLOW_CLI]
    p = _cli(args)
    _wait_units(out, 3)
    os.killpg(p.pid, signal.SIGKILL)  # the driver and the Ray it started, as an OOM kill would
    p.communicate(timeout=60)
    assert not any(n.endswith(".index.json") for n in os.listdir(out))  # nothing looks finished
    done = _units_done(out)
    assert done >= 3

    again = _cli(args)  # without --resume: refused, with advice
    _, err = again.communicate(timeout=120)
    assert again.returncode == 1 and "--resume" in err

    changed = _cli(args + ["--resume", "--alpha", "0.5"])
    _, err = changed.communicate(timeout=120)
    assert changed.returncode == 1 and "cannot resume" in err and "--alpha" in err, err

    resumed = _cli(args + ["--resume"])
    stdout, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    reused = int(stdout.split(" units reused")[0].rsplit(", ", 1)[-1])
    assert reused >= done - 1  # a unit being written at the kill may be redone
    assert _files(out) == reference_output


def test_resume_redoes_a_unit_whose_bytes_were_damaged(medium, reference_output, tmp_path):
    base, lora, _ = medium
    out = str(tmp_path / "out")
    args = ["--base", base, "--lora", lora, "--output", out, *SLOW_CLI]
    p = _cli(args)
    _wait_units(out, 3)
    os.killpg(p.pid, signal.SIGKILL)
    p.communicate(timeout=60)
    manifest = json.load(open(os.path.join(out, ".distmerge-manifest.json")))
    part = next(os.path.join(out, n) for n in os.listdir(out) if n.endswith(".distmerge-part"))
    with open(part, "r+b") as f:  # zero the whole data area: every finished unit is now wrong
        f.seek(4096)
        f.write(b"\0" * (os.path.getsize(part) - 4096))
    resumed = _cli(args + ["--resume"])
    stdout, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert len(manifest["units"]) >= 3
    assert _files(out) == reference_output


@pytest.fixture
def tiny_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.decode().strip()}")
    yield str(mnt)
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_fails_cleanly(medium, tmp_path, tiny_disk):
    base, lora, _ = medium
    out = os.path.join(tiny_disk, "out")
    p = _cli(["--base", base, "--lora", lora, "--output", out, *SLOW_CLI])
    _, err = p.communicate(timeout=300)
    assert p.returncode == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "No space left on device" in lines[0], err
    assert not os.path.exists(out)
    assert os.listdir(tiny_disk) == []


def test_the_undisturbed_reference_is_itself_correct(ray_local, medium, reference_output, tmp_path):
    base, lora, factors = medium
    folder = tmp_path / "ref"
    folder.mkdir()
    for name, data in reference_output.items():
        (folder / name).write_bytes(data)
    assert_close_to_reference(
        load_checkpoint(str(folder)), reference_merge(load_checkpoint(base), lora_terms(factors, 1.0))
    )
