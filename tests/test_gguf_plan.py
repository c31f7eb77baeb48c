"""GGUF plans without Ray: the header is gguf-py's, units cover the file (padding included) so a
resumed run's re-read CRC equals what the task reported, and the memory bound covers a packed
piece."""

from __future__ import annotations

import os

import numpy as np
import pytest
from gguf import GGUFReader

from distmerge.app.preflight import collect_deltas
from distmerge.app.synth import make_factors, write_lora
from distmerge.inputs.checkpoint import open_base
from distmerge.plan.gguf import layout_gguf
from distmerge.plan.merge_plan import make_plan
from distmerge.plan.units import TASK_OVERHEAD_BYTES
from distmerge.tasks.unit import run_unit, unit_crc32
from distmerge.tasks.writer import create_file

from .gguf_files import KQ, write_gguf_base, write_like_gguf_py


def test_the_header_is_the_one_gguf_py_writes(tmp_path):
    rng = np.random.default_rng(0)
    tensors = [("a.bias", "F32", rng.standard_normal(5).astype(np.float32))]
    tensors += [("blocks.0.ffn.0.weight", "Q8_0", rng.standard_normal((3, 64)).astype(np.float32))]
    tensors += [("head.modulation", "F32", rng.standard_normal((1, 2, 7)).astype(np.float32))]
    ref = str(tmp_path / "ref.gguf")
    write_like_gguf_py(ref, tensors, 7)
    lay = layout_gguf(
        [(k, c, v.shape) for k, c, v in tensors],
        {"general.architecture": "wan", "general.quantization_version": 2, "general.file_type": 7},
    )
    data = open(ref, "rb").read()
    assert data[: lay.data_start] == lay.header and len(data) == lay.size
    offsets = {t.name: t.data_offset for t in GGUFReader(ref).tensors}
    assert {e.key: e.offset for e in lay.entries} == offsets
    assert all(e.offset + e.nbytes + e.pad == nxt.offset for e, nxt in zip(lay.entries, lay.entries[1:]))


@pytest.mark.parametrize("linears", ["Q8_0", "Q4_K"])
def test_units_cover_the_file_and_their_crc_is_what_a_resume_re_reads(tmp_path, linears):
    base = str(tmp_path / "wan.gguf")
    write_gguf_base(base, KQ, linears)
    lora = str(tmp_path / "lora.safetensors")
    write_lora(lora, make_factors(KQ, rank=4), layout="diffusion_model", alpha=4.0)
    ck = open_base(base)
    deltas = collect_deltas(ck, [(lora, 1.0)]).deltas
    plan = make_plan(ck, deltas, out_dtype="Q8_0", single_file="out.gguf", unit_size=200_000)
    (shard,) = plan.shards
    assert len(plan.units) > 3
    spans = sorted((u.tensors[0].out_offset, u.nbytes) for u in plan.units)
    assert spans[0][0] == len(shard.header) and sum(n for _, n in spans) == shard.size - len(shard.header)
    assert all(a + n == b for (a, n), (b, _) in zip(spans, spans[1:]))  # contiguous, pads included
    part = str(tmp_path / "out.gguf.part")
    create_file(part, shard.header, shard.size)
    for u in plan.units:
        assert run_unit(u, part).crc32 == unit_crc32(u, part), u.index
    assert {t.name for t in GGUFReader(part).tensors} == set(ck.tensors)
    assert os.path.getsize(part) == shard.size


def test_a_packed_unit_s_memory_bound_covers_gguf_py_s_work(tmp_path):
    base = str(tmp_path / "wan.gguf")
    write_gguf_base(base, KQ, "Q6_K")
    plan = make_plan(open_base(base), [], out_dtype="Q8_0", single_file="out.gguf", unit_size=1)
    unit = next(u for u in plan.units if u.tensors[0].key == "blocks.0.ffn.0.weight")
    values = 512 * 256  # float32 values plus gguf-py's block arrays (~24 bytes a value), beside the buffers
    assert unit.memory - TASK_OVERHEAD_BYTES >= 24 * values


def test_the_warnings_a_user_needs_are_said_before_any_work(tmp_path, caplog):
    """A K-quant base kept (gguf-py cannot write Q4_K) and --dtype fp8_e5m2 (newer ComfyUI reads
    every scaled_fp8 file as e4m3fn: comfy/utils.py convert_old_quants) each get one warning."""
    from distmerge.app.api import check

    base = str(tmp_path / "wan-Q4_K.gguf")
    write_gguf_base(base, KQ, "Q4_K")
    lora = str(tmp_path / "lora.safetensors")
    write_lora(lora, make_factors(KQ, rank=4), layout="diffusion_model", alpha=4.0)
    with caplog.at_level("WARNING", logger="distmerge"):
        check(base, [lora], str(tmp_path / "out.gguf"))
        check(base, [lora], str(tmp_path / "out.safetensors"), dtype="bf16")  # named: nothing to say
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(said) == 1 and "Q4_K tensors are written as Q8_0" in said[0], said
    caplog.clear()
    st = str(tmp_path / "st")
    from distmerge.app.synth import write_wan_base

    write_wan_base(st, KQ, num_shards=1)
    with caplog.at_level("WARNING", logger="distmerge"):
        check(st, [lora], str(tmp_path / "fp8.safetensors"), dtype="fp8_e5m2")
    assert any("fp8_e4m3fn for ComfyUI" in r.getMessage() for r in caplog.records)
