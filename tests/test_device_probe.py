"""``--device auto`` means what it says: GPUs that Ray advertises are probed before the first unit.

On a machine without CUDA, a local Ray started with ``num_gpus=1`` is exactly "a cluster that
advertises GPUs whose workers have no CUDA" (a CPU-only torch on the workers): ``auto`` must fall back
to CPU tasks with one warning naming the node, ``cuda`` must fail in one line naming the node and the
fix, before anything is published; the same inside a placement group holding a GPU bundle, and when
the probe cannot get a GPU at all. On a machine with CUDA only the last test runs: the probe says yes.
"""

from __future__ import annotations

import logging
import os

import pytest
import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group

import distmerge
from distmerge import cluster
from distmerge.errors import ClusterError

from .helpers import start_local_ray

pytestmark = pytest.mark.ray
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="the fake GPU needs a machine without CUDA")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def fake_gpu():
    """A local Ray whose one node advertises a GPU; the node, as ``ray.nodes()`` has it."""
    start_local_ray(num_gpus=1)
    node = next(n for n in ray.nodes() if n["Alive"])
    yield {"id": node["NodeID"], "ip": node["NodeManagerAddress"]}
    ray.shutdown()


@pytest.fixture(scope="module")
def cpu_output(fake_gpu, tiny_base, lora, tmp_path_factory) -> dict[str, bytes]:
    out = str(tmp_path_factory.mktemp("cpu") / "out")
    rep = distmerge.merge(tiny_base, [lora], out, device="cpu", max_shard_size="150KB")
    assert rep.ray["device"] == "cpu"
    return _files(out)


@pytest.fixture
def gpu_group(fake_gpu):
    """A ROLL-style placement group holding the GPU and both CPUs (removed after the test)."""
    pg = placement_group([{"GPU": 1, "CPU": 2}])
    ray.get(pg.ready(), timeout=60)
    yield {0: pg}
    remove_placement_group(pg)


def _files(folder: str) -> dict[str, bytes]:
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "distmerge.cluster" and r.levelno == logging.WARNING]


def _names_node(text: str, node: dict) -> bool:
    return node["ip"] in text and node["id"][:12] in text


@no_cuda
def test_auto_falls_back_to_cpu_tasks_with_one_warning(fake_gpu, tiny_base, lora, cpu_output, tmp_path, caplog):
    out = str(tmp_path / "out")
    with caplog.at_level(logging.WARNING, logger="distmerge.cluster"):
        rep = distmerge.merge(tiny_base, [lora], out, device="auto", max_shard_size="150KB")
    assert rep.ray["device"] == "cpu" and rep.ray["workers"] == 2
    assert rep.units and {u.device for u in rep.units} == {"cpu"}
    (warning,) = _warnings(caplog)
    assert _names_node(warning, fake_gpu), warning
    assert "advertises 1 GPU but torch there has no CUDA" in warning and f"torch {torch.__version__}" in warning
    assert warning.endswith("running CPU tasks")
    assert _files(out) == cpu_output


@no_cuda
def test_cuda_without_cuda_is_one_line_naming_the_node_and_publishes_nothing(fake_gpu, tiny_base, lora, tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(ClusterError) as e:
        distmerge.merge(tiny_base, [lora], out, device="cuda")
    msg = str(e.value)
    assert "\n" not in msg and _names_node(msg, fake_gpu), msg
    assert "no CUDA" in msg and "install a CUDA build of torch on the workers" in msg and "--device cpu" in msg
    assert not os.path.exists(out)


@no_cuda
def test_auto_in_a_placement_group_with_a_gpu_bundle_runs_cpu_seats(
    fake_gpu, gpu_group, tiny_base, lora, cpu_output, tmp_path, caplog
):
    out = str(tmp_path / "out")
    with caplog.at_level(logging.WARNING, logger="distmerge.cluster"):
        rep = distmerge.merge(tiny_base, [lora], out, device="auto", placement_groups=gpu_group, max_shard_size="150KB")
    assert rep.ray["device"] == "cpu" and rep.ray["workers"] == 2  # the group's two CPU seats
    assert {u.device for u in rep.units} == {"cpu"}
    (warning,) = _warnings(caplog)
    assert _names_node(warning, fake_gpu) and "placement group" in warning and "no CUDA" in warning, warning
    assert _files(out) == cpu_output


@no_cuda
def test_cuda_in_a_placement_group_without_cuda_fails_before_publishing(fake_gpu, gpu_group, tiny_base, lora, tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(ClusterError) as e:
        distmerge.merge(tiny_base, [lora], out, device="cuda", placement_groups=gpu_group)
    msg = str(e.value)
    assert "\n" not in msg and _names_node(msg, fake_gpu) and "placement group" in msg, msg
    assert "--device cpu" in msg
    assert not os.path.exists(out)


@no_cuda
def test_a_probe_that_gets_no_gpu_does_not_hang_the_run(
    fake_gpu, tiny_base, lora, cpu_output, tmp_path, caplog, monkeypatch
):
    monkeypatch.setattr("distmerge.cluster.probe.PROBE_TIMEOUT_S", 2.0)  # read where probe_devices lives
    pg = placement_group([{"GPU": 1}])  # holds the only GPU: a num_gpus=1 task waits forever
    ray.get(pg.ready(), timeout=60)
    try:
        with caplog.at_level(logging.WARNING, logger="distmerge.cluster"):
            rep = distmerge.merge(tiny_base, [lora], str(tmp_path / "a"), device="auto", max_shard_size="150KB")
        assert rep.ray["device"] == "cpu"
        (warning,) = _warnings(caplog)
        assert _names_node(warning, fake_gpu) and "no answer within 2 s" in warning, warning
        assert _files(str(tmp_path / "a")) == cpu_output
        with pytest.raises(ClusterError) as e:
            distmerge.merge(tiny_base, [lora], str(tmp_path / "b"), device="cuda")
        assert "free a GPU there" in str(e.value) and "--device cpu" in str(e.value)
        assert not os.path.exists(tmp_path / "b")
    finally:
        remove_placement_group(pg)


@no_cuda
def test_cpu_and_gpu_free_clusters_are_not_probed(fake_gpu, monkeypatch):
    def no_probe(*a, **k):
        raise AssertionError("probed")

    monkeypatch.setattr("distmerge.cluster.probe.probe_devices", no_probe)  # as usable_device calls it
    with cluster.RaySession() as s:  # the fixture's session: reused
        assert s.settings(device="cpu").device == "cpu"
        monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
        assert s.settings(device="auto").device == "cpu"


@no_cuda
def test_the_probe_reports_the_workers_torch(fake_gpu):
    (p,) = cluster.probe_devices()
    assert not p.ok and p.cuda is None and p.torch == torch.__version__ and p.node_id == fake_gpu["id"]


@needs_cuda
def test_probe_on_a_real_gpu_says_cuda(fake_gpu):
    probes = cluster.probe_devices()
    assert probes and all(p.ok and p.devices for p in probes), probes
    assert cluster.usable_device("auto") == "cuda"
