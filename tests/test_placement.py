"""Merging inside a job that holds the resources (ROLL): tasks run in its placement groups."""

from __future__ import annotations

import os

import pytest
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

import distmerge
from distmerge.app.synth import write_lora
from distmerge.cluster import DispatchSettings, Slot, placement_slots, task_options

from .helpers import assert_close_to_reference, load_checkpoint, lora_terms, reference_merge, start_local_ray

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def roll_like():
    """A 2-CPU node with one (logical) GPU, and a ROLL-style per-node placement group holding the
    GPU and every CPU, with a ROLL-style actor inside it."""
    start_local_ray(num_gpus=1, object_store_memory=80 << 20, logging_level="INFO")
    pg = placement_group([{"GPU": 1, "CPU": 2}])
    ray.get(pg.ready())

    @ray.remote(num_cpus=0.01, num_gpus=0.01)
    class Worker:  # stands in for ROLL's actor_train workers
        def ping(self) -> str:
            return "ok"

    actor = Worker.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg)).remote()
    assert ray.get(actor.ping.remote()) == "ok"
    yield {0: pg}  # the shape of ROLL's resource_manager.node2pg
    ray.kill(actor)
    remove_placement_group(pg)
    ray.shutdown()


def test_plain_tasks_would_wait_forever(roll_like):
    @ray.remote(num_cpus=1)
    def plain() -> int:
        return 1

    ref = plain.remote()
    ready, _ = ray.wait([ref], timeout=2)
    assert not ready  # the group holds every CPU: this is the deadlock distmerge must avoid
    ray.cancel(ref, force=True)


def test_merge_runs_inside_the_groups_and_leaves_the_session(roll_like, tiny_base, tiny_factors, tmp_path):
    lora = str(tmp_path / "l.pth")
    write_lora(lora, tiny_factors)
    rep = distmerge.merge(
        tiny_base, [lora], str(tmp_path / "out"), placement_groups=roll_like, device="cpu", unit_size="40KB"
    )
    assert rep.ray["mode"] == "existing" and ray.is_initialized()
    assert rep.ray["workers"] == 2 and len(rep.units) > 2
    assert_close_to_reference(
        load_checkpoint(str(tmp_path / "out")),
        reference_merge(load_checkpoint(tiny_base), lora_terms(tiny_factors, 1.0)),
    )


def test_gpu_seats_pin_one_device_each(roll_like):
    pg = roll_like[0]
    slots = placement_slots(roll_like, "cuda")
    assert slots == (Slot(pg, 0, 0),)
    opts = task_options(DispatchSettings(device="cuda", workers=1, gpus_per_task=1.0), slots[0])
    assert opts["num_gpus"] == 0.01 and opts["num_cpus"] == 0.01
    assert opts["runtime_env"]["env_vars"] == {
        "CUDA_VISIBLE_DEVICES": "0",
        "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1",
    }
    strategy = opts["scheduling_strategy"]
    assert strategy.placement_group is pg and strategy.placement_group_bundle_index == 0

    @ray.remote
    def env() -> str | None:
        return os.environ.get("CUDA_VISIBLE_DEVICES")

    # the seat really schedules inside the group (where a plain num_gpus=1 task could not) and
    # the task sees exactly its pinned device
    assert ray.get(env.options(**opts).remote(), timeout=60) == "0"
    assert len(placement_slots([pg], "cpu")) == 2
