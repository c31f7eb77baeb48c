"""``tasks.extract_unit``, the body of every ``distmerge extract`` task, called directly (no Ray).

A tiny base and a fine-tune of it: ``blk.lin.weight`` (4×3) changed by an exact rank-1 outer
product u·vᵀ (dyadic values: ``tuned − base`` is u·vᵀ exactly in float32), ``blk.lin.bias`` changed
by a known vector, ``blk.norm.weight`` and an integer ``pos.ids`` unchanged. The plan is cut from
the headers (``make_extract_plan``) and each unit is run with ``compute_unit`` / ``run_extract_unit``.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from safetensors.torch import load_file

from distmerge.errors import FormatError, ShardWriteError
from distmerge.inputs.checkpoint import open_base
from distmerge.inputs.header import read_header
from distmerge.output.parts import assemble
from distmerge.plan.extract_plan import ExtractOptions, make_extract_plan
from distmerge.tasks.extract_unit import PART_META, UnitOutcome, compute_unit, read_part_outcome, run_extract_unit
from distmerge.tasks.writer import write_safetensors

W = torch.arange(12, dtype=torch.float32).reshape(4, 3) / 8
U, V = torch.tensor([1.0, 2.0, -1.0, 0.5]), torch.tensor([0.5, -1.0, 2.0])
BIAS = torch.tensor([0.0, 1.0, 2.0, 3.0])
DBIAS = torch.tensor([0.25, 0.0, 0.0, -0.5])
BASE = {
    "blk.lin.weight": W,
    "blk.lin.bias": BIAS,
    "blk.norm.weight": torch.ones(3),
    "pos.ids": torch.arange(5),
}
TUNED = {**BASE, "blk.lin.weight": W + torch.outer(U, V), "blk.lin.bias": BIAS + DBIAS}
PRE = "diffusion_model.blk.lin."  # the comfy layout's keys of module blk.lin


def _pair(tmp_path, tuned: dict[str, torch.Tensor] | None = None) -> tuple[str, str]:
    b, t = str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors")
    write_safetensors(b, BASE)
    write_safetensors(t, TUNED if tuned is None else tuned)
    return b, t


def _plan(base: str, tuned: str, **options):
    opts = ExtractOptions(**{"rank": 1, "layout": "comfy", "out_dtype": "F32", **options})
    return make_extract_plan(open_base(base), open_base(tuned), opts)


def _run_all(plan) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Every unit's tensors and every base tensor's stats."""
    tensors, stats = {}, {}
    for unit in plan.units:
        got, outcome = compute_unit(unit, plan.options, device="cpu")
        assert outcome.index == unit.index and outcome.device == "cpu"
        assert outcome.nbytes_read == unit.nbytes == 2 * sum(t.nbytes for t in unit.tensors)
        assert outcome.nbytes_written == sum(v.numel() * v.element_size() for v in got.values())
        assert [s.key for s in outcome.tensors] == [t.key for t in unit.tensors]
        assert not set(got) & set(tensors)
        tensors.update(got)
        stats.update({s.key: s for s in outcome.tensors})
    return tensors, stats


def test_rank_one_difference_bias_difference_and_nothing_for_the_rest(tmp_path):
    plan = _plan(*_pair(tmp_path))
    tensors, stats = _run_all(plan)
    assert set(stats) == set(BASE)
    assert set(tensors) == {PRE + "lora_down.weight", PRE + "lora_up.weight", PRE + "alpha", PRE + "diff_b"}
    down, up = tensors[PRE + "lora_down.weight"], tensors[PRE + "lora_up.weight"]
    assert (down.dtype, down.shape, up.dtype, up.shape) == (torch.float32, (1, 3), torch.float32, (4, 1))
    torch.testing.assert_close(up @ down, torch.outer(U, V), rtol=1e-6, atol=1e-6)
    assert tensors[PRE + "alpha"].item() == 1.0 and tensors[PRE + "alpha"].shape == ()  # alpha = rank: scale 1
    assert torch.equal(tensors[PRE + "diff_b"], DBIAS)  # a full difference, exact

    w, b = stats["blk.lin.weight"], stats["blk.lin.bias"]
    assert (w.kind, w.rank, w.module, w.shape) == ("lora", 1, "blk.lin", (4, 3))
    assert w.energy == pytest.approx(1.0, abs=1e-6) and w.predicted_error == pytest.approx(0.0, abs=1e-3)
    assert w.error < 1e-6 and w.converged
    assert w.max_abs == 4.0  # |2 · 2|
    assert w.norm == pytest.approx(float(torch.linalg.norm(U) * torch.linalg.norm(V)), rel=1e-6)
    assert w.entries == (PRE + "lora_down.weight", PRE + "lora_up.weight", PRE + "alpha")
    assert (b.kind, b.entries, b.max_abs, b.error) == ("diff", (PRE + "diff_b",), 0.5, 0.0)
    assert b.norm == pytest.approx(math.sqrt(0.25**2 + 0.5**2))
    for key in ("blk.norm.weight", "pos.ids"):
        assert (stats[key].kind, stats[key].entries, stats[key].rank) == ("identical", (), 0)


def test_a_higher_rank_cap_keeps_all_energy_and_rounds_to_the_output_dtype(tmp_path):
    plan = _plan(*_pair(tmp_path), rank=3, out_dtype="BF16")
    tensors, stats = _run_all(plan)
    w = stats["blk.lin.weight"]
    assert w.kind == "lora" and 1 <= w.rank <= 3 and w.energy == pytest.approx(1.0, abs=1e-6)
    down, up = tensors[PRE + "lora_down.weight"], tensors[PRE + "lora_up.weight"]
    assert down.dtype == up.dtype == torch.bfloat16 and down.shape == (w.rank, 3) and up.shape == (4, w.rank)
    assert tensors[PRE + "alpha"].dtype == torch.float32 and tensors[PRE + "alpha"].item() == w.rank
    torch.testing.assert_close(up.float() @ down.float(), torch.outer(U, V), rtol=2e-2, atol=2e-2)
    assert 0 < w.error < 1e-2  # measured with the bf16 factors as written
    assert torch.equal(tensors[PRE + "diff_b"], DBIAS.to(torch.bfloat16))  # 0.25 and -0.5: exact in bf16


def test_min_diff_makes_small_changes_identical(tmp_path):
    plan = _plan(*_pair(tmp_path), min_diff=0.5)  # the bias moved by at most 0.5; the weight by 4
    tensors, stats = _run_all(plan)
    assert stats["blk.lin.bias"].kind == "identical" and stats["blk.lin.bias"].max_abs == 0.5
    assert stats["blk.lin.weight"].kind == "lora"
    assert PRE + "diff_b" not in tensors


def test_an_unchanged_weight_with_a_changed_bias_gets_a_zero_lora(tmp_path):
    """comfy/diffusers loaders take a bias difference only beside a LoRA pair."""
    plan = _plan(*_pair(tmp_path, {**BASE, "blk.lin.bias": BIAS + DBIAS}))
    tensors, stats = _run_all(plan)
    assert stats["blk.lin.weight"].kind == "identical" and stats["blk.lin.bias"].kind == "diff"
    assert torch.equal(tensors[PRE + "lora_down.weight"], torch.zeros(1, 3))
    assert torch.equal(tensors[PRE + "lora_up.weight"], torch.zeros(4, 1))
    assert torch.equal(tensors[PRE + "diff_b"], DBIAS)


def test_a_changed_integer_tensor_and_a_nan_are_errors_naming_the_key(tmp_path):
    (tmp_path / "int").mkdir()
    plan = _plan(*_pair(tmp_path / "int", {**TUNED, "pos.ids": torch.arange(5) + 1}))
    with pytest.raises(FormatError, match=r"'pos\.ids' \(I64\) differs from the base"):
        _run_all(plan)
    (tmp_path / "nan").mkdir()
    bad = TUNED["blk.lin.weight"].clone()
    bad[2, 1] = float("nan")
    plan = _plan(*_pair(tmp_path / "nan", {**TUNED, "blk.lin.weight": bad}))
    with pytest.raises(ShardWriteError, match=r"'blk\.lin\.weight' minus the base holds NaN/Inf"):
        _run_all(plan)


def test_run_extract_unit_writes_a_part_whose_outcome_round_trips(tmp_path):
    plan = _plan(*_pair(tmp_path))
    parts = []
    for unit in plan.units:
        dest = str(tmp_path / f"unit{unit.index}.part")
        outcome = run_extract_unit(unit, plan.options, dest)
        assert isinstance(outcome, UnitOutcome) and read_part_outcome(dest) == outcome
        assert read_header(dest).metadata[PART_META] == outcome.to_json()
        tensors, again = compute_unit(unit, plan.options)
        assert again.tensors == tuple(
            type(s)(**{**s.__dict__, "seconds": a.seconds}) for s, a in zip(outcome.tensors, again.tensors)
        )  # the same statistics, timings aside
        stored = load_file(dest)
        assert set(stored) == set(tensors) and all(torch.equal(stored[k], tensors[k]) for k in tensors)
        assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]  # the temp file was renamed
        parts.append(dest)
    assert read_part_outcome(str(tmp_path / "missing.part")) is None
    assert read_part_outcome(str(tmp_path / "base.safetensors")) is None  # no outcome in its metadata

    lora = str(tmp_path / "lora.safetensors")
    size = assemble(parts, lora, metadata={"format": "pt"})
    assert size == os.path.getsize(lora)
    joined = load_file(lora)
    assert set(joined) == {PRE + "lora_down.weight", PRE + "lora_up.weight", PRE + "alpha", PRE + "diff_b"}
    assert torch.equal(joined[PRE + "diff_b"], DBIAS)
