"""Units as the parts of multipart uploads (``plan.parts``), and a part rendered on its own
(``tasks.upload.shifted``): the pure halves of a merge into a bucket, without a store.

A part rendered alone (its offsets shifted to 0, the first with the shard's header) must be exactly
the slice of the shard a local merge writes, so the object a completed upload joins is the local
file byte for byte."""

from __future__ import annotations

import os

import pytest

from distmerge.errors import PlanError
from distmerge.inputs.checkpoint import open_base
from distmerge.inputs.objwrite import MAX_PART, MAX_PARTS
from distmerge.output.durable import shard_crc32s
from distmerge.plan.merge_plan import make_plan
from distmerge.plan.parts import as_parts, check_parts, join_small
from distmerge.tasks.unit import run_unit
from distmerge.tasks.upload import shifted
from distmerge.tasks.writer import create_file


def test_join_small_keeps_every_group_but_the_last_at_least_the_minimum():
    assert join_small([], [], 5) == []
    assert join_small([(0, 1)], [1], 5) == [(0, 1)]
    assert join_small([(0, 2), (2, 3), (3, 5)], [2, 2, 1, 9, 1], 5) == [(0, 3), (3, 5)]
    assert join_small([(0, 1), (1, 2), (2, 3)], [5, 5, 5], 5) == [(0, 1), (1, 2), (2, 3)]


def test_check_parts_refuses_what_s3_would():
    check_parts("s", [MAX_PART] * 3)
    with pytest.raises(PlanError, match="at most 10000 parts"):
        check_parts("s", [1] * (MAX_PARTS + 1))
    with pytest.raises(PlanError, match="smaller --unit-size"):
        check_parts("s", [MAX_PART + 1])


@pytest.fixture(scope="module")
def plan(tiny_base):
    """The tiny base's plan in two shards, cut in small units (many per shard)."""
    return make_plan(open_base(tiny_base), [], max_shard_size="150KB", unit_size="8KB")


def test_as_parts_joins_units_within_their_shard_and_changes_no_byte(plan):
    least = 40_000
    parts = as_parts(plan, least)
    assert parts.shards == plan.shards and len(parts.units) < len(plan.units)
    assert [u.index for u in parts.units] == list(range(len(parts.units)))
    for s in plan.shards:
        before = [t for u in plan.units if u.shard == s.name for t in u.tensors]
        mine = [u for u in parts.units if u.shard == s.name]
        assert [t for u in mine for t in u.tensors] == before
        assert all(u.nbytes >= least for u in mine[:-1]), [u.nbytes for u in mine]
    crcs = {u.index: 0 for u in parts.units}  # raises unless the units cover every shard without a gap
    assert set(shard_crc32s(parts, crcs)) == {s.name for s in plan.shards}


def test_a_part_rendered_alone_is_the_slice_of_the_local_shard(plan, tmp_path):
    parts = as_parts(plan, 40_000)
    shard = parts.shards[0]
    full = str(tmp_path / "full")
    create_file(full, shard.header, shard.size)
    mine = [u for u in parts.units if u.shard == shard.name]
    for u in mine:
        run_unit(u, full, direct_io=False)
    data = open(full, "rb").read()
    for n, u in enumerate(mine):
        start = 0 if n == 0 else u.tensors[0].out_offset
        end = u.tensors[-1].out_offset + u.tensors[-1].out_nbytes + u.tensors[-1].out_pad
        alone = str(tmp_path / f"part-{n}")
        with open(alone, "wb") as f:
            f.write(shard.header if n == 0 else b"")
            f.truncate(end - start)
        run_unit(shifted(u, start), alone, direct_io=False)
        assert open(alone, "rb").read() == data[start:end], n
        os.remove(alone)
    assert mine[-1].tensors[-1].out_offset + mine[-1].tensors[-1].out_nbytes == shard.size
