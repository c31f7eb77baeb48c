"""Work units without Ray: chunked streaming is exact, copies are byte-for-byte, errors name the key."""

from __future__ import annotations

import os

import pytest
import torch

from distmerge import unit as unit_mod
from distmerge.api import collect_deltas
from distmerge.checkpoint import open_base
from distmerge.errors import ShardWriteError
from distmerge.output import OutputTarget, Staging, part_path, prepare
from distmerge.plan import make_plan
from distmerge.synth import write_lora

from .helpers import assert_close_to_reference, load_checkpoint, lora_terms, reference_merge


def _run_all(base_dir, lora, out_dir, monkeypatch, chunk, dtype=None):
    monkeypatch.setattr(unit_mod, "CHUNK_BYTES", chunk)
    base = open_base(base_dir)
    deltas = collect_deltas(base, [(lora, 1.0)]).deltas
    plan = make_plan(base, deltas, out_dtype=dtype, max_shard_size="5GB", workers=2)
    target = OutputTarget(out_dir, None)
    prepare(plan, target, Staging())
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
    ref = reference_merge(load_checkpoint(tiny_base), lora_terms(tiny_factors, 1.0),
                          out_dtype=torch.bfloat16 if dtype else None)
    assert_close_to_reference(load_checkpoint(out_file), ref)


def test_read_error_names_file_and_key(tiny_base, tiny_factors, tmp_path, monkeypatch):
    lora = str(tmp_path / "l.pth")
    write_lora(lora, tiny_factors)
    base = open_base(tiny_base)
    plan = make_plan(base, collect_deltas(base, [(lora, 1.0)]).deltas, workers=1, unit_size="1GB")
    out = str(tmp_path / "o")
    prepare(plan, OutputTarget(out, None), Staging())
    victim = next(t for t in plan.units[0].tensors if t.action == "merge")
    real_read = unit_mod.read_into

    def failing(fd, offset, buf):
        if offset == victim.src_offset:
            raise OSError(5, "Input/output error")
        return real_read(fd, offset, buf)

    monkeypatch.setattr(unit_mod, "read_into", failing)
    with pytest.raises(ShardWriteError, match=f"'{victim.key}'.*Input/output error"):
        unit_mod.run_unit(plan.units[0], part_path(out, plan.units[0].shard))
    assert os.path.exists(part_path(out, plan.units[0].shard))  # the driver's abort removes it


def test_unit_checksum_is_plain_crc32_in_chunks():
    """The manifest's per-unit checksum is zlib's CRC-32 (whichever implementation computes it),
    chained over chunks, so manifests written with or without python-isal stay resumable."""
    import zlib

    data = os.urandom(3 << 20)
    chained = unit_mod.crc32(data[1 << 20:], unit_mod.crc32(data[: 1 << 20]))
    assert chained == zlib.crc32(data)
    assert unit_mod.crc32(b"") == 0
