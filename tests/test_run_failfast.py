"""A merge that fails inside ``distmerge run`` ends the job at once: the job runner owns its Ray
session and hands it to every merge, so the failure ends the session (no in-flight units waited
out, no later merge started), nothing of the failing merge is left and no Ray process outlives it.

The failure is one no check before Ray can see: an ``inf`` in a base tensor that a LoRA changes, found
by the task that merges it (merged values are checked to be finite before they are written).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file

from distmerge.app.jobfile import parse_job, run_job
from distmerge.app.synth import WanConfig, make_factors, write_lora, write_wan_base
from distmerge.errors import DistmergeError

pytestmark = pytest.mark.ray

MEDIUM = WanConfig(dim=256, ffn=704, blocks=8, in_dim=16, text_dim=256, freq_dim=64, dtype="F32")
BAD_KEY = "blocks.0.self_attn.q.weight"  # in the first unit to run: the others are still to come


@pytest.fixture(scope="module")
def job_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("failfast")
    base = str(d / "base")
    (shard,) = write_wan_base(base, MEDIUM, num_shards=1)
    tensors = load_file(shard)
    tensors[BAD_KEY][0, 0] = float("inf")
    save_file(tensors, shard, metadata={"format": "pt"})
    lora = str(d / "lora.pth")
    write_lora(lora, make_factors(MEDIUM, rank=8, dtype=torch.bfloat16))
    job = str(d / "job.yaml")
    with open(job, "w", encoding="utf-8") as f:
        f.write(
            textwrap.dedent(
                """
                ray: {num_cpus: 2, num_workers: 2}
                defaults: {unit_size: 1MB}
                merges:
                  - {name: one, base: base, loras: [lora.pth], output: out/one}
                  - {name: two, base: base, loras: [lora.pth], output: out/two}
                """
            )
        )
    return str(d), job


def _ray_processes_of(pid: int) -> list[psutil.Process]:
    try:
        return [p for p in psutil.Process(pid).children(recursive=True) if p.is_running()]
    except psutil.NoSuchProcess:
        return []


def test_cli_run_fails_fast_names_the_merge_and_leaves_nothing(job_files):
    folder, job = job_files
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.monotonic()
    p = subprocess.Popen(
        [sys.executable, "-m", "distmerge", "run", job, "-q"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen: set[psutil.Process] = set()
    while p.poll() is None:
        seen.update(_ray_processes_of(p.pid))
        time.sleep(0.05)
    out, err = p.communicate()
    elapsed = time.monotonic() - t0
    assert p.returncode == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distmerge: error: merge 'one': "), err
    assert BAD_KEY in lines[0] and "finite" in lines[0], lines[0]
    assert "two" not in out and not os.path.exists(os.path.join(folder, "out", "two"))
    assert not os.path.exists(os.path.join(folder, "out", "one")), os.listdir(os.path.join(folder, "out"))
    assert seen, "the job started no Ray processes"
    deadline = time.monotonic() + 5
    while any(q.is_running() and q.status() != psutil.STATUS_ZOMBIE for q in seen) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = [q for q in seen if q.is_running() and q.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [q.name() for q in alive]
    assert elapsed < 60, f"the failing job took {elapsed:.1f} s"


def test_run_job_owns_its_session_and_ends_it_on_failure(job_files):
    import ray

    folder, job_path = job_files
    with open(job_path, encoding="utf-8") as f:
        job = parse_job(f.read(), source=job_path, base_dir=folder)
    assert not ray.is_initialized()
    t0 = time.monotonic()
    with pytest.raises(DistmergeError, match=r"^merge 'one': .*not finite"):
        run_job(job)
    assert time.monotonic() - t0 < 60
    assert not ray.is_initialized()  # the runner's own session: ended with the failing merge
    assert not os.path.exists(os.path.join(folder, "out", "one"))
    assert not os.path.exists(os.path.join(folder, "out", "two"))
