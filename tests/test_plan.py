"""Planning: sizes, greedy sharding, unit partitioning and make_plan's determinism and balance."""

from __future__ import annotations

import math
import re

import pytest
import torch
from safetensors.torch import save_file

from distmerge.app.synth import wan_shapes
from distmerge.errors import PlanError
from distmerge.formats.normalize import Delta, FactorRef
from distmerge.inputs.checkpoint import open_base
from distmerge.inputs.header import parse_header_bytes
from distmerge.plan.merge_plan import make_plan, parse_size, partition_units, split_by_size

from .helpers import TINY

# ------------------------------------------------------------------------------------- parse_size


@pytest.mark.parametrize(
    "text,expected",
    [
        ("5GB", 5 * 10**9),
        ("500MB", 500 * 10**6),
        ("2GiB", 2 * 2**30),
        ("1.5MiB", 3 * 2**19),
        (1024, 1024),
        ("1024", 1024),
        ("10kb", 10_000),
        ("3KiB", 3072),
        (" 7 gb ", 7 * 10**9),
        ("1TB", 10**12),
        ("2b", 2),
        ("4G", 4 * 10**9),
        ("4Gi", 4 * 2**30),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "bad", ["", "GB", "five GB", "5 XB", "5GBB", "-5GB", "5.GB", "1e9", "0", 0, -3, "0MB", "5 G B"]
)
def test_parse_size_rejects(bad):
    with pytest.raises(PlanError) as ei:
        parse_size(bad)
    assert repr(bad) in str(ei.value)


# ---------------------------------------------------------------------------------- split_by_size


def test_split_by_size_greedy_example():
    sizes = [("a", 6), ("b", 6), ("c", 2), ("d", 6), ("e", 2), ("f", 2)]
    assert split_by_size(sizes, 8) == [["a"], ["b", "c"], ["d", "e"], ["f"]]


@pytest.mark.parametrize(
    "sizes,limit,expected",
    [
        ([("a", 3), ("big", 20), ("c", 3)], 10, [["a"], ["big"], ["c"]]),
        ([("a", 3), ("b", 3), ("big", 20)], 10, [["a", "b"], ["big"]]),
        ([("big", 20), ("a", 3), ("b", 3)], 10, [["big"], ["a", "b"]]),
        ([("a", 5), ("b", 5), ("c", 5)], 10, [["a", "b"], ["c"]]),
        ([("a", 1), ("b", 1), ("c", 1)], 100, [["a", "b", "c"]]),
        ([("a", 0), ("b", 10), ("c", 0)], 10, [["a", "b", "c"]]),
        ([], 10, []),
    ],
)
def test_split_by_size_cases(sizes, limit, expected):
    assert split_by_size(sizes, limit) == expected


# -------------------------------------------------------------------------------- partition_units


@pytest.mark.parametrize(
    "sizes,target,expected",
    [
        ([5, 5, 5, 5, 30, 5], 10, [(0, 2), (2, 4), (4, 5), (5, 6)]),
        ([], 10, []),
        ([100], 10, [(0, 1)]),
        ([1, 1, 1, 1], 2, [(0, 2), (2, 4)]),
        ([1, 1, 1, 1], 100, [(0, 4)]),
        ([3, 3, 3], 1, [(0, 1), (1, 2), (2, 3)]),
        ([2, 9, 2], 10, [(0, 1), (1, 2), (2, 3)]),
    ],
)
def test_partition_units(sizes, target, expected):
    assert partition_units(sizes, target) == expected


# -------------------------------------------------------------------------------------- make_plan


def _deltas(base, keys=("blocks.0.self_attn.q.weight", "blocks.1.ffn.2.weight")) -> list[Delta]:
    out = []
    for k in keys:
        o, i = base.tensors[k].shape
        fa = FactorRef("l.safetensors", k + ".A", "BF16", (4, i))
        fb = FactorRef("l.safetensors", k + ".B", "BF16", (o, 4))
        out.append(Delta(k, "lora", (fa, fb), 1.0, 0.5, "l.safetensors"))
    return out


def _fingerprint(plan):
    """What must not depend on the number of workers: shard files and every tensor's placement."""
    placed = sorted(
        (t.key, u.shard, t.out_offset, t.out_nbytes, t.out_dtype, t.src_offset) for u in plan.units for t in u.tensors
    )
    return [(s.name, s.header, s.size, s.keys) for s in plan.shards], placed


@pytest.fixture(scope="module")
def base(tiny_base):
    return open_base(tiny_base)


def test_plan_deterministic(base):
    a = make_plan(base, _deltas(base), max_shard_size="300KB", workers=3)
    b = make_plan(base, _deltas(base), max_shard_size="300KB", workers=3)
    assert a == b


def test_plan_shard_names_and_weight_map(base):
    plan = make_plan(base, [], max_shard_size="300KB")
    n = len(plan.shards)
    assert n > 1
    assert plan.stem == "diffusion_pytorch_model" and not plan.single_file
    assert [s.name for s in plan.shards] == [
        f"diffusion_pytorch_model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)
    ]
    assert all(re.fullmatch(r"diffusion_pytorch_model-\d{5}-of-\d{5}\.safetensors", s.name) for s in plan.shards)
    wm = plan.weight_map
    assert set(wm) == set(base.tensors)
    for s in plan.shards:
        assert all(wm[k] == s.name for k in s.keys)


def test_plan_shards_follow_greedy_limit(base):
    limit = 300_000
    plan = make_plan(base, [], max_shard_size=limit)
    nbytes = {k: t.nbytes for k, t in base.tensors.items()}  # F32 kept
    # shards hold base keys in base order, each within the limit unless it is a single tensor,
    # and greedy: the next shard's first tensor would not have fit.
    ordered = [k for s in plan.shards for k in sorted(s.keys, key=list(base.tensors).index)]
    assert ordered == list(base.tensors)
    for s, nxt in zip(plan.shards, list(plan.shards[1:]) + [None]):
        used = sum(nbytes[k] for k in s.keys)
        assert used <= limit or len(s.keys) == 1
        if nxt is not None:
            first_next = min(nxt.keys, key=list(base.tensors).index)
            assert used + nbytes[first_next] > limit


def test_plan_single_file(base):
    plan = make_plan(base, _deltas(base), single_file="merged.safetensors", max_shard_size="1KB", workers=4)
    assert plan.single_file
    assert [s.name for s in plan.shards] == ["merged.safetensors"]
    assert set(plan.shards[0].keys) == set(base.tensors)
    assert all(u.shard == "merged.safetensors" for u in plan.units)


def test_units_cover_every_tensor_once_and_stay_in_shard(base):
    plan = make_plan(base, _deltas(base), max_shard_size="300KB", workers=4)
    seen = [t.key for u in plan.units for t in u.tensors]
    assert sorted(seen) == sorted(base.tensors)
    assert len(seen) == len(set(seen))
    shard_of = {s.name: s for s in plan.shards}
    for i, u in enumerate(plan.units):
        assert u.index == i
        s = shard_of[u.shard]
        for t in u.tensors:
            assert t.key in s.keys
            assert len(s.header) <= t.out_offset and t.out_offset + t.out_nbytes <= s.size
        # a unit is a consecutive byte run of its shard
        for x, y in zip(u.tensors, u.tensors[1:]):
            assert y.out_offset == x.out_offset + x.out_nbytes


def test_plan_headers_describe_offsets(base):
    plan = make_plan(base, [], max_shard_size="300KB")
    planned = {t.key: t for u in plan.units for t in u.tensors}
    for s in plan.shards:
        h = parse_header_bytes(s.name, s.header[8:], s.size)
        assert h.data_start == len(s.header) and h.data_start % 8 == 0
        assert h.metadata == {"format": "pt"}
        assert list(h.tensors) == list(s.keys)
        for k, info in h.tensors.items():
            p = planned[k]
            assert (info.offset, info.nbytes, info.dtype, info.shape) == (
                p.out_offset,
                p.out_nbytes,
                p.out_dtype,
                p.shape,
            )
            src = base.tensors[k]
            assert (p.src_path, p.src_offset, p.src_nbytes, p.src_dtype) == (
                src.path,
                src.offset,
                src.nbytes,
                src.dtype,
            )


def test_units_grow_with_workers_and_layout_does_not_change(base):
    plans = {w: make_plan(base, _deltas(base), max_shard_size="300KB", workers=w) for w in (1, 2, 4, 8, 16)}
    counts = [len(plans[w].units) for w in sorted(plans)]
    assert counts == sorted(counts)
    assert counts[-1] > counts[0]
    ref = _fingerprint(plans[1])
    for w, p in plans.items():
        assert _fingerprint(p) == ref, w
        assert p.total_size == plans[1].total_size


def test_unit_size_override(base):
    small = make_plan(base, [], unit_size="20KB")
    big = make_plan(base, [], unit_size="10MB")
    assert len(big.units) == len(big.shards)
    assert len(small.units) > len(big.units)
    assert _fingerprint(small) == _fingerprint(big)


@pytest.mark.parametrize(
    "kw,target",
    [
        ({"workers": 2, "unit_size": 20_000}, 20_000),
        ({"workers": 2, "unit_size": 1}, 1),
        ({"workers": 2}, None),  # four units per worker
    ],
)
def test_byte_balance(base, kw, target):
    plan = make_plan(base, [], max_shard_size="300KB", **kw)
    if target is None:
        target = math.ceil(plan.total_size / 8)
    for u in plan.units:
        assert u.nbytes <= target or len(u.tensors) == 1, (u.index, u.nbytes, len(u.tensors))
    if target == 1:
        assert all(len(u.tensors) == 1 for u in plan.units)


def test_total_size_is_sum_of_output_bytes(base):
    expected = sum(4 * math.prod(s) for _, s in wan_shapes(TINY))
    plan = make_plan(base, [], max_shard_size="300KB")
    assert plan.total_size == expected
    assert sum(s.size - len(s.header) for s in plan.shards) == expected
    bf = make_plan(base, [], out_dtype="BF16", max_shard_size="300KB")
    assert bf.total_size == expected // 2
    assert sum(s.size - len(s.header) for s in bf.shards) == expected // 2


def test_actions(base):
    deltas = _deltas(base)
    plan = make_plan(base, deltas)
    by_key = {t.key: t for u in plan.units for t in u.tensors}
    merged = by_key["blocks.0.self_attn.q.weight"]
    assert merged.action == "merge" and merged.deltas == (deltas[0],)
    assert by_key["blocks.1.ffn.2.weight"].deltas == (deltas[1],)
    assert by_key["head.head.bias"].action == "copy" and by_key["head.head.bias"].deltas == ()
    conv = make_plan(base, [], out_dtype="BF16")
    assert {t.action for u in conv.units for t in u.tensors} == {"convert"}


def test_two_deltas_on_one_target_kept_in_order(base):
    d1, d2 = _deltas(base, ("blocks.0.ffn.0.weight",)) * 2
    d2 = Delta(d2.target, d2.kind, d2.factors, 2.0, 1.0, "other.safetensors")
    plan = make_plan(base, [d1, d2])
    t = next(t for u in plan.units for t in u.tensors if t.key == "blocks.0.ffn.0.weight")
    assert t.deltas == (d1, d2)


def test_delta_with_unknown_target(base):
    bad = Delta("blocks.9.ffn.0.weight", "diff", (FactorRef("l.pth", "x", "F32", (2,)),), 1.0, 1.0, "l.pth")
    with pytest.raises(PlanError, match="blocks.9.ffn.0.weight"):
        make_plan(base, [bad])


def test_out_dtype_converts_float_tensors_only(tmp_path):
    p = tmp_path / "mixed.safetensors"
    save_file(
        {
            "f32": torch.zeros(3, 5),
            "f16": torch.zeros(7, dtype=torch.float16),
            "f64": torch.zeros(2, dtype=torch.float64),
            "i64": torch.zeros(3, dtype=torch.int64),
            "mask": torch.zeros(5, dtype=torch.bool),
            "u8": torch.zeros(9, dtype=torch.uint8),
        },
        str(p),
    )
    base = open_base(str(p))
    plan = make_plan(base, [], out_dtype="BF16")
    got = {t.key: (t.src_dtype, t.out_dtype, t.out_nbytes, t.action) for u in plan.units for t in u.tensors}
    assert got == {
        "f32": ("F32", "BF16", 30, "convert"),
        "f16": ("F16", "BF16", 14, "convert"),
        "f64": ("F64", "BF16", 4, "convert"),
        "i64": ("I64", "I64", 24, "copy"),
        "mask": ("BOOL", "BOOL", 5, "copy"),
        "u8": ("U8", "U8", 9, "copy"),
    }
    assert plan.total_size == 30 + 14 + 4 + 24 + 5 + 9
    h = parse_header_bytes("x", plan.shards[0].header[8:], plan.shards[0].size)
    for k, info in h.tensors.items():
        assert info.offset % {"BF16": 2, "I64": 8, "BOOL": 1, "U8": 1}[info.dtype] == 0, k
    keep = make_plan(base, [])
    assert all(t.out_dtype == t.src_dtype and t.action == "copy" for u in keep.units for t in u.tensors)


def test_extra_metadata(base):
    plan = make_plan(base, [], metadata={"merged_by": "distmerge"})
    h = parse_header_bytes("x", plan.shards[0].header[8:], plan.shards[0].size)
    assert h.metadata == {"format": "pt", "merged_by": "distmerge"}


def test_bad_max_shard_size(base):
    with pytest.raises(PlanError):
        make_plan(base, [], max_shard_size="lots")
