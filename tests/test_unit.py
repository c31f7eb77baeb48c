"""Work units without Ray: chunked streaming is exact, copies are byte-for-byte, errors name the key."""

from __future__ import annotations

import os

import pytest
import torch

from distmerge.app.api import collect_deltas
from distmerge.app.synth import write_lora
from distmerge.errors import DistmergeError, ShardWriteError
from distmerge.inputs.checkpoint import open_base
from distmerge.output.publish import OutputTarget, part_path
from distmerge.output.staging import ShardStaging
from distmerge.plan.merge_plan import make_plan
from distmerge.tasks import pieces as pieces_mod
from distmerge.tasks import unit as unit_mod

from .helpers import assert_close_to_reference, direct_io_works, load_checkpoint, lora_terms, reference_merge


def _run_all(base_dir, lora, out_dir, monkeypatch, chunk, dtype=None):
    monkeypatch.setattr(pieces_mod, "CHUNK_BYTES", chunk)
    base = open_base(base_dir)
    deltas = collect_deltas(base, [(lora, 1.0)]).deltas
    plan = make_plan(base, deltas, out_dtype=dtype, max_shard_size="5GB", workers=2)
    target = OutputTarget(out_dir, None)
    ShardStaging(target).prepare(plan)
    for u in plan.units:
        unit_mod.run_unit(u, part_path(out_dir, u.shard), threads=1)
    return [open(part_path(out_dir, s.name), "rb").read() for s in plan.shards]


def test_row_chunks_cover_rows_with_a_minimum_height():
    assert unit_mod.row_chunks((96, 64), 512) == [(r, r + 16) for r in range(0, 96, 16)]
    assert unit_mod.row_chunks((100, 8), 32 * 8 * 4) == [(0, 32), (32, 64), (64, 96), (96, 100)]
    assert unit_mod.row_chunks((7,), 4) == [(0, 7)]


@pytest.mark.parametrize("dtype", [None, "BF16"])
def test_chunked_streaming_matches_reference(tiny_base, tiny_factors, tmp_path, monkeypatch, dtype):
    lora = str(tmp_path / "l.pth")
    write_lora(lora, tiny_factors)
    calls = []
    real = unit_mod._compute
    monkeypatch.setattr(unit_mod, "_compute", lambda job, *rest: calls.append(job.r1 - job.r0) or real(job, *rest))
    data = _run_all(tiny_base, lora, str(tmp_path / "o"), monkeypatch, 16 * 64 * 4, dtype)
    assert any(rows == 16 for rows in calls) and len(calls) > len(tiny_factors)  # really chunked
    out_file = str(tmp_path / "merged.safetensors")
    with open(out_file, "wb") as f:
        f.write(data[0])
    ref = reference_merge(
        load_checkpoint(tiny_base), lora_terms(tiny_factors, 1.0), out_dtype=torch.bfloat16 if dtype else None
    )
    assert_close_to_reference(load_checkpoint(out_file), ref)


def test_read_error_names_file_and_key(tiny_base, tiny_factors, tmp_path, monkeypatch):
    lora = str(tmp_path / "l.pth")
    write_lora(lora, tiny_factors)
    base = open_base(tiny_base)
    plan = make_plan(base, collect_deltas(base, [(lora, 1.0)]).deltas, workers=1, unit_size="1GB")
    out = str(tmp_path / "o")
    ShardStaging(OutputTarget(out, None)).prepare(plan)
    victim = next(t for t in plan.units[0].tensors if t.action == "merge")
    real_read = unit_mod.read_placed

    def failing(files, path, offset, *rest, **kw):
        if offset == victim.src_offset:
            raise OSError(5, "Input/output error")
        return real_read(files, path, offset, *rest, **kw)

    monkeypatch.setattr(unit_mod, "read_placed", failing)
    with pytest.raises(ShardWriteError, match=f"'{victim.key}'.*Input/output error"):
        unit_mod.run_unit(plan.units[0], part_path(out, plan.units[0].shard))
    assert os.path.exists(part_path(out, plan.units[0].shard))  # the driver's abort removes it


def test_unit_checksum_is_plain_crc32_in_chunks():
    """The manifest's per-unit checksum is zlib's CRC-32 (whichever implementation computes it),
    chained over chunks, so manifests written with or without python-isal stay resumable."""
    import zlib

    data = os.urandom(3 << 20)
    chained = unit_mod.crc32(data[1 << 20 :], unit_mod.crc32(data[: 1 << 20]))
    assert chained == zlib.crc32(data)
    assert unit_mod.crc32(b"") == 0


def test_unit_crc_covers_its_whole_output_range_and_joins_into_the_shard_crc(tiny_base, tiny_factors, tmp_path):
    """Each task's CRC covers merged and copied bytes alike, in file order, so the driver's join
    of the per-unit CRCs is exactly ``crc32`` of the finished shard, and the resume re-check
    (``unit_crc32``) agrees with what the task reported."""
    import zlib

    from distmerge.output.durable import shard_crc32s

    lora = str(tmp_path / "l.pth")
    write_lora(lora, dict(list(tiny_factors.items())[:1]))  # one pair: most tensors are plain copies
    base = open_base(tiny_base)
    plan = make_plan(base, collect_deltas(base, [(lora, 1.0)]).deltas, workers=3, unit_size=4096)
    assert len(plan.units) >= 3 and any(t.action == "copy" for u in plan.units for t in u.tensors)
    out = str(tmp_path / "o")
    ShardStaging(OutputTarget(out, None)).prepare(plan)
    crcs = {}
    for u in plan.units:
        dest = part_path(out, u.shard)
        crcs[u.index] = unit_mod.run_unit(u, dest).crc32
        start = u.tensors[0].out_offset
        with open(dest, "rb") as f:
            f.seek(start)
            assert crcs[u.index] == zlib.crc32(f.read(u.nbytes)) == unit_mod.unit_crc32(u, dest)
    joined = shard_crc32s(plan, crcs)
    for s in plan.shards:
        assert joined[s.name] == f"{zlib.crc32(open(part_path(out, s.name), 'rb').read()):08x}"
    with pytest.raises(DistmergeError, match="has no checksum"):
        shard_crc32s(plan, {i: c for i, c in crcs.items() if i != plan.units[-1].index})


def test_pure_python_crc32_combine_matches_zlib():
    """The fallback used where python-isal has no wheel joins CRCs exactly as zlib would."""
    import random
    import zlib

    from distmerge.tasks.checksum import crc32_combine_py

    rng = random.Random(7)
    for n in (0, 1, 3, 64, 4097, 1 << 20):
        a, b = rng.randbytes(rng.randrange(1, 500)), rng.randbytes(n)
        assert crc32_combine_py(zlib.crc32(a), zlib.crc32(b), n) == zlib.crc32(a + b)


def _small_wan_plan(tmp_path):
    """A one-block Wan base (128-256 KB bf16 tensors, 2 shards) and a rank-4 ROLL LoRA, planned."""
    from distmerge.app.synth import WanConfig, make_factors, write_wan_base

    cfg = WanConfig(dim=256, ffn=512, blocks=1, text_dim=64, dtype="BF16")
    base_dir = str(tmp_path / "base")
    write_wan_base(base_dir, cfg, num_shards=2)
    lora = str(tmp_path / "l.pth")
    write_lora(lora, make_factors(cfg, rank=4))
    base = open_base(base_dir)
    return make_plan(base, collect_deltas(base, [(lora, 1.0)]).deltas, workers=2)


def test_direct_io_writes_the_same_bytes_as_the_page_cache(tmp_path, monkeypatch):
    """Merged and copied pieces go out with O_DIRECT where the filesystem takes it; the shards are
    byte-for-byte those of page-cache writes, and the report's ``direct_bytes`` says how much went
    direct."""
    plan = _small_wan_plan(tmp_path)
    shards, direct = {}, {}
    for env in ("0", "1"):
        monkeypatch.setenv("DISTMERGE_DIRECT_IO", env)
        out = str(tmp_path / f"o{env}")
        ShardStaging(OutputTarget(out, None)).prepare(plan)
        results = [unit_mod.run_unit(u, part_path(out, u.shard), threads=1) for u in plan.units]
        direct[env] = sum(r.direct_bytes for r in results)
        shards[env] = [open(part_path(out, s.name), "rb").read() for s in plan.shards]
    assert shards["1"] == shards["0"]
    assert direct["0"] == 0
    if direct_io_works(tmp_path):
        merged = sum(t.out_nbytes for u in plan.units for t in u.tensors if t.deltas)
        total = sum(u.nbytes for u in plan.units)
        assert merged < direct["1"] <= total  # merged and copied, all but partial edge blocks


def test_cold_base_is_read_direct_and_gives_the_same_bytes(tmp_path, monkeypatch):
    """A base the page cache does not hold is read with O_DIRECT into placed buffers (every tensor
    at any offset within its 4 KiB block, the file's last one too); a cached one through the cache;
    the output bytes are the same either way."""
    plan = _small_wan_plan(tmp_path)
    files = sorted({t.src_path for u in plan.units for t in u.tensors})
    outputs, read_direct = {}, {}
    for mode in ("cached", "cold"):
        if mode == "cold":
            for path in files:  # drop the base's clean pages: what a cold disk read finds
                fd = os.open(path, os.O_RDONLY)
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)
        out = str(tmp_path / mode)
        ShardStaging(OutputTarget(out, None)).prepare(plan)
        results = [unit_mod.run_unit(u, part_path(out, u.shard), threads=1) for u in plan.units]
        read_direct[mode] = sum(r.direct_read_bytes for r in results)
        outputs[mode] = [open(part_path(out, s.name), "rb").read() for s in plan.shards]
        assert all(r.waits[1] >= 0 and len(r.waits) == 3 for r in results)
    assert outputs["cold"] == outputs["cached"]
    assert read_direct["cached"] == 0  # just written: the page cache holds it
    if direct_io_works(tmp_path):
        total = sum(t.src_nbytes for u in plan.units for t in u.tensors)
        assert 0.9 * total < read_direct["cold"] <= total
