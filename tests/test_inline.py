"""Units merged by the driver while its embedded Ray starts (``tasks.inline``): the same bytes as
Ray tasks write, every unit exactly once, and the first error stops the merge with one line.

These merges start their own embedded Ray (no shared session in this module), as the CLI does."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import distmerge
from distmerge.app.synth import WanConfig, make_factors, write_lora, write_wan_base
from distmerge.errors import ShardWriteError

pytestmark = pytest.mark.ray

MEDIUM = WanConfig(dim=256, ffn=704, blocks=8, in_dim=16, text_dim=256, freq_dim=64, dtype="F32")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inline")
    base = str(d / "base")
    write_wan_base(base, MEDIUM, num_shards=2)
    lora = str(d / "lora.pth")
    write_lora(lora, make_factors(MEDIUM, rank=8, dtype=torch.bfloat16))
    return base, lora


def _files(folder: str) -> dict[str, bytes]:
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def ray_only(inputs, tmp_path_factory):
    """The same merge with every unit a Ray task (the driver merges nothing itself)."""
    base, lora = inputs
    out = str(tmp_path_factory.mktemp("ray-only") / "out")
    mp = pytest.MonkeyPatch()
    mp.setenv("DISTMERGE_INLINE_UNITS", "0")
    try:
        rep = distmerge.merge(base, [lora], out, num_cpus=2, unit_size="1MB")
    finally:
        mp.undo()
    assert all(u.node_id != "driver" for u in rep.units)
    return _files(out)


def test_units_merged_while_ray_starts_write_the_same_bytes(inputs, ray_only, tmp_path):
    import ray

    base, lora = inputs
    out = str(tmp_path / "out")
    rep = distmerge.merge(base, [lora], out, num_cpus=2, unit_size="1MB")
    on_driver = [u for u in rep.units if u.node_id == "driver"]
    assert on_driver, "the driver merged no unit while Ray was starting"
    assert sorted(u.index for u in rep.units) == list(range(len(rep.units)))  # each unit once
    assert _files(out) == ray_only
    assert not ray.is_initialized()  # the merge's own session is ended


def test_an_error_in_a_unit_on_the_driver_stops_the_merge_and_publishes_nothing(tmp_path):
    base = str(tmp_path / "base")
    (shard,) = write_wan_base(base, MEDIUM, num_shards=1)
    tensors = load_file(shard)
    tensors["blocks.0.self_attn.q.weight"][0, 0] = float("inf")
    save_file(tensors, shard, metadata={"format": "pt"})
    lora = str(tmp_path / "lora.pth")
    write_lora(lora, make_factors(MEDIUM, rank=8, dtype=torch.bfloat16))
    out = str(tmp_path / "out")
    with pytest.raises(ShardWriteError, match=r"blocks\.0\.self_attn\.q\.weight.*finite"):
        distmerge.merge(base, [lora], out, num_cpus=2, unit_size="1MB")
    assert not os.path.exists(out)
