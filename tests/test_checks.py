"""``tasks.checks.check_group``, the body of every ``distmerge verify`` task, called directly (no Ray).

Tiny hand-computed files: a base ``blk.weight`` = [[1, 2], [3, 4]] (F32) with a LoRA pair
down = [[1, 0.5]], up = [[2], [4]] at weight 0.5, so the merged weight is exactly
[[1, 2], [3, 4]] + 0.5·[[2, 1], [4, 2]] = [[2, 2.5], [5, 5]]; ``blk.bias`` and ``norm.weight`` are
untouched. The checks are built from the headers and the normalized LoRA as
``app.verify._tensor_checks`` builds them; outputs are damaged by a known number of ulps, a NaN or a
flipped byte, and the ``GroupResult`` is compared field by field.

Failure ranks (``GroupResult.failures`` = (rank, ulp, message), most serious first): 0 structure,
1 non-finite, 2 value, 3 untouched bytes, 4 checksum.
"""

from __future__ import annotations

import hashlib
import os
import zlib

import pytest
import torch

from distmerge.formats.normalize import normalize
from distmerge.inputs.header import read_header
from distmerge.inputs.lorafile import open_lora
from distmerge.tasks.checks import CheckGroup, TensorCheck, check_group, show_value, ulp_distance
from distmerge.tasks.writer import write_safetensors

STRUCTURE, NONFINITE, VALUE, UNTOUCHED, CHECKSUM = range(5)

BASE = {
    "blk.weight": torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
    "blk.bias": torch.tensor([0.1, 0.2, 0.3]),
    "norm.weight": torch.tensor([1.5, -2.5]),
}
LORA = {
    "diffusion_model.blk.lora_down.weight": torch.tensor([[1.0, 0.5]]),
    "diffusion_model.blk.lora_up.weight": torch.tensor([[2.0], [4.0]]),
}
WEIGHT = 0.5
MERGED = torch.tensor([[2.0, 2.5], [5.0, 5.0]])  # by hand, exact in float32


def _bumped(x: torch.Tensor, ulps: int) -> torch.Tensor:
    """``x`` (positive float32) moved up by ``ulps`` units in the last place."""
    return (x.view(torch.int32) + ulps).view(torch.float32)


@pytest.fixture
def inputs(tmp_path):
    base, lora = str(tmp_path / "base.safetensors"), str(tmp_path / "lora.safetensors")
    write_safetensors(base, BASE)
    write_safetensors(lora, LORA)
    return base, lora


def _output(tmp_path, name: str = "out.safetensors", **changes: torch.Tensor) -> str:
    """A correct output (``blk.weight`` merged, the rest copied), with ``changes`` applied."""
    path = str(tmp_path / name)
    write_safetensors(path, {**BASE, "blk.weight": MERGED, **changes})
    return path


def _checks(base: str, lora: str, out: str, weight: float = WEIGHT) -> tuple[TensorCheck, ...]:
    """One ``TensorCheck`` per output tensor, the deltas from the normalized LoRA."""
    b, o = read_header(base).tensors, read_header(out).tensors
    deltas = normalize(open_lora(lora), b, strength=weight).deltas
    by_target: dict[str, list] = {}
    for d in deltas:
        by_target.setdefault(d.target, []).append(d)
    return tuple(TensorCheck(k, b[k], info, tuple(by_target.get(k, ()))) for k, info in o.items())


def _flip_byte(path: str, key: str, byte: int) -> None:
    """XOR byte ``byte`` of tensor ``key``'s data with 0x01 (the lowest mantissa bit of an element)."""
    info = read_header(path).tensors[key]
    with open(path, "r+b") as f:
        f.seek(info.offset + byte)
        old = f.read(1)[0]
        f.seek(info.offset + byte)
        f.write(bytes([old ^ 0x01]))


def test_a_correct_output_passes_with_every_row_compared(inputs, tmp_path):
    base, lora = inputs
    out = _output(tmp_path)
    r = check_group(CheckGroup(7, _checks(base, lora, out)))
    assert (r.index, r.tensors, r.merged, r.rows_compared) == (7, 3, 1, 2)
    assert r.failures == () and r.n_failures == 0
    assert (r.stats.values, r.stats.worst_ulp, r.stats.worst_key, r.stats.near) == (4, 0, "blk.weight", 0)
    assert r.stats.worst_rel == 0.0
    assert r.digest == "" and r.hashed == ""  # nothing hashed without hash_path


def test_rows_sampled_full_and_none(inputs, tmp_path):
    base, lora = inputs
    checks = _checks(base, lora, _output(tmp_path))
    one = check_group(CheckGroup(0, checks, rows=1))
    assert one.rows_compared == 1 and one.stats.values == 2 and one.failures == ()
    assert check_group(CheckGroup(0, checks, rows=0)).rows_compared == 0
    full = check_group(CheckGroup(0, checks, rows=0, full=True))
    assert full.rows_compared == 2 and full.stats.values == 4


def test_the_lora_weight_is_part_of_the_reference(inputs, tmp_path):
    base, lora = inputs
    r = check_group(CheckGroup(0, _checks(base, lora, _output(tmp_path), weight=1.0)))
    assert r.n_failures == 1 and r.merged == 1
    rank, _, text = r.failures[0]  # the reference at weight 1 is [[3, 3], [7, 6]]: worst 5 vs 7
    assert rank == VALUE and text.startswith("blk.weight row 1: 5 (0x40a00000) vs expected 7 (0x40e00000) (")
    assert "4 of 4 compared values beyond tolerance" in text


def test_a_value_off_by_1000_ulp_is_named_with_its_distance(inputs, tmp_path):
    base, lora = inputs
    bad = MERGED.clone()
    bad[1, 0] = _bumped(bad[1, 0], 1000)
    out = _output(tmp_path, "off.safetensors", **{"blk.weight": bad})
    r = check_group(CheckGroup(0, _checks(base, lora, out)))
    assert r.n_failures == 1 and len(r.failures) == 1
    rank, ulp, text = r.failures[0]
    assert (rank, ulp) == (VALUE, 1000)
    assert text.startswith("blk.weight row 1: ")
    assert f"{show_value(float(bad[1, 0]), 'F32')} vs expected {show_value(5.0, 'F32')}" in text
    assert "(1000 ulp, relative error" in text and "1 of 4 compared values beyond tolerance" in text
    assert text.endswith("(off.safetensors)")
    assert (r.stats.worst_ulp, r.stats.worst_key) == (1000, "blk.weight")
    assert r.stats.worst_rel == pytest.approx(1000 * 2.0**-21 / 5.0)  # ulp(5.0) = 2^-21; max|ref| = 5


def test_float32_tolerance_is_16_ulp_and_near_cancellation_passes(inputs, tmp_path):
    base, lora = inputs
    results = {}
    for ulps in (16, 17):
        bad = MERGED.clone()
        bad[1, 1] = _bumped(bad[1, 1], ulps)  # 5.0: 17 ulp = 8.1e-6 > 1e-6 · max|ref| = 5e-6
        out = _output(tmp_path, f"u{ulps}.safetensors", **{"blk.weight": bad})
        results[ulps] = check_group(CheckGroup(0, _checks(base, lora, out)))
    assert results[16].failures == () and results[16].stats.worst_ulp == 16 and results[16].stats.near == 0
    assert results[17].n_failures == 1 and results[17].failures[0][:2] == (VALUE, 17)
    # 20 ulp of 2.0 = 4.8e-6 <= 5e-6: beyond the ulp tolerance, within the near-cancellation allowance
    bad = MERGED.clone()
    bad[0, 0] = _bumped(bad[0, 0], 20)
    out = _output(tmp_path, "near.safetensors", **{"blk.weight": bad})
    r = check_group(CheckGroup(0, _checks(base, lora, out)))
    assert r.failures == () and (r.stats.worst_ulp, r.stats.near) == (20, 1)


def test_a_nan_in_a_merged_tensor_is_not_finite(inputs, tmp_path):
    base, lora = inputs
    bad = MERGED.clone()
    bad[0, 1] = float("nan")
    out = _output(tmp_path, "nan.safetensors", **{"blk.weight": bad})
    r = check_group(CheckGroup(0, _checks(base, lora, out)))
    assert r.n_failures == 1
    assert r.failures[0] == (NONFINITE, 0, "blk.weight row 0: nan is not finite (nan.safetensors)")
    assert r.stats.worst_ulp == 0  # the three finite values are exact


def test_a_flipped_byte_in_an_untouched_tensor(inputs, tmp_path):
    base, lora = inputs
    out = _output(tmp_path)
    _flip_byte(out, "blk.bias", 4)  # element 1 (0.2), lowest byte: 1 ulp
    r = check_group(CheckGroup(0, _checks(base, lora, out)))
    assert r.n_failures == 1 and r.merged == 1
    rank, ulp, text = r.failures[0]
    assert (rank, ulp) == (UNTOUCHED, 0)
    got = float((BASE["blk.bias"][1:2].view(torch.int32) ^ 1).view(torch.float32))  # 0x3e4ccccd -> ...cc
    assert text.startswith(f"blk.bias element 1: {show_value(got, 'F32')} vs expected {show_value(0.2, 'F32')} (1 ulp")
    assert text.endswith("untouched tensor differs from the base (out.safetensors)")


def test_failures_are_ranked_and_counted_per_tensor(inputs, tmp_path):
    base, lora = inputs
    bad = MERGED.clone()
    bad[1, 0] = _bumped(bad[1, 0], 100)
    out = _output(tmp_path, **{"blk.weight": bad, "norm.weight": torch.tensor([1.5, float("inf")])})
    _flip_byte(out, "blk.bias", 0)
    r = check_group(CheckGroup(0, _checks(base, lora, out), hash_path=str(tmp_path / "gone.safetensors")))
    assert r.n_failures == 4 and r.merged == 1 and r.tensors == 3
    assert [f[0] for f in r.failures] == [VALUE, UNTOUCHED, UNTOUCHED, CHECKSUM]
    untouched = [k for k in read_header(out).tensors if k != "blk.weight"]  # in the order they were checked
    assert [f[2].split(" ")[0] for f in r.failures[:3]] == ["blk.weight", *untouched]
    assert "gone.safetensors: cannot read to checksum" in r.failures[3][2]
    assert r.digest == ""


def test_only_the_first_failures_are_listed_but_all_are_counted(tmp_path):
    base, out = str(tmp_path / "b.safetensors"), str(tmp_path / "o.safetensors")
    tensors = {f"t{i}.weight": torch.full((2,), float(i + 1)) for i in range(10)}
    write_safetensors(base, tensors)
    write_safetensors(out, tensors)
    for k in tensors:
        _flip_byte(out, k, 0)
    b, o = read_header(base).tensors, read_header(out).tensors
    r = check_group(CheckGroup(0, tuple(TensorCheck(k, b[k], o[k]) for k in tensors)))
    assert (r.tensors, r.merged, r.n_failures, len(r.failures)) == (10, 0, 10, 8)
    assert all(f[0] == UNTOUCHED and "element 0" in f[2] for f in r.failures)


@pytest.mark.parametrize("algo", ["sha256", "crc32"])
def test_checksum_of_hash_path_equals_hashlib_and_zlib(tmp_path, algo):
    out = _output(tmp_path)
    data = open(out, "rb").read()
    r = check_group(CheckGroup(3, hash_path=out, hash_algo=algo))
    want = hashlib.sha256(data).hexdigest() if algo == "sha256" else f"{zlib.crc32(data):08x}"
    assert (r.index, r.digest, r.hashed, r.tensors, r.n_failures) == (3, want, out, 0, 0)


def test_a_bf16_output_of_an_f32_base(inputs, tmp_path):
    """``--dtype bf16``: merged values within 1 bf16 ulp, untouched ones equal the base converted."""
    base, lora = inputs
    out = str(tmp_path / "bf16.safetensors")
    tensors = {k: v.to(torch.bfloat16) for k, v in {**BASE, "blk.weight": MERGED}.items()}
    write_safetensors(out, tensors)
    ok = check_group(CheckGroup(0, _checks(base, lora, out)))
    assert ok.failures == () and ok.stats.worst_ulp == 0 and ok.rows_compared == 2
    w = tensors["blk.weight"].clone()
    w[0, 0] = (w[0, 0:1].view(torch.int16) + 2).view(torch.bfloat16)[0]  # 2 bf16 ulp off 2.0
    bad = str(tmp_path / "bf16-bad.safetensors")
    write_safetensors(bad, {**tensors, "blk.weight": w})
    _flip_byte(bad, "norm.weight", 2)  # element 1
    r = check_group(CheckGroup(0, _checks(base, lora, bad)))
    assert r.n_failures == 2 and r.stats.worst_ulp == 2
    (rank, ulp, text), (rank2, _, text2) = r.failures
    assert (rank, ulp) == (VALUE, 2) and text.startswith("blk.weight row 0: 2.031 (0x4002) vs expected 2 (0x4000) (")
    assert rank2 == UNTOUCHED and text2.startswith("norm.weight element 1: ")
    assert text2.endswith("untouched tensor differs from the base converted to BF16 (bf16-bad.safetensors)")


def test_an_output_file_that_is_gone_is_a_structure_failure(inputs, tmp_path):
    base, lora = inputs
    out = _output(tmp_path)
    checks = _checks(base, lora, out)
    os.remove(out)
    r = check_group(CheckGroup(0, checks))
    assert r.n_failures == 3 and {f[0] for f in r.failures} == {STRUCTURE}
    assert any("'blk.weight': cannot read" in f[2] for f in r.failures)


def test_ulp_distance_is_monotonic_across_zero():
    one = torch.tensor([1.0])
    up = torch.nextafter(one, torch.tensor([2.0]))
    assert ulp_distance(one, up).tolist() == [1]
    tiny = torch.tensor([1e-45])  # smallest positive fp32 subnormal
    assert ulp_distance(tiny, -tiny).tolist() == [2]
    assert ulp_distance(torch.tensor([0.0]), torch.tensor([-0.0])).tolist() == [0]
    x = torch.tensor([-1.0, 2.0], dtype=torch.bfloat16)
    y = torch.tensor([-1.0078125, 2.0], dtype=torch.bfloat16)
    assert ulp_distance(x, y).tolist() == [1, 0]
    h = torch.tensor([65504.0], dtype=torch.float16)
    assert ulp_distance(h, torch.tensor([-65504.0], dtype=torch.float16)).item() == 2 * 0x7BFF
    f = torch.tensor([1.0, 3e38])
    assert ulp_distance(f, -f).tolist() == [2 * 0x3F800000, 2 * f[1:].view(torch.int32).item()]
    d = torch.tensor([1.0, 1e300, 2.0], dtype=torch.float64)
    e = torch.tensor([-1.0, -1e300, 2.0], dtype=torch.float64)  # 1e300 and -1e300: more than 2**63 apart
    assert ulp_distance(d, e).tolist() == [2 * 0x3FF0000000000000, torch.iinfo(torch.int64).max, 0]
