"""One declaration of the merge options: the CLI flags, the job-file schema and ``merge()``'s
keywords all come from ``MergeOptions``, with the same defaults; the grammar loads without torch."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

import distmerge
from distmerge.app.flags import build_parser
from distmerge.app.jobfile import MergeSpec, RayOptions, parse_job
from distmerge.app.options import MergeOptions, flag_of, option_fields, pair_weights
from distmerge.errors import UsageError

FIELDS = {f.name: f.default for f in dataclasses.fields(MergeOptions)}


def _merge_actions() -> dict[str, object]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    merge = sub.choices["merge"]  # type: ignore[union-attr]
    return {a.dest: a for a in merge._actions}


def test_every_option_is_a_merge_flag_with_the_same_default():
    actions = _merge_actions()
    for name, default in FIELDS.items():
        assert name in actions, name
        assert flag_of(name) in actions[name].option_strings  # type: ignore[attr-defined]
        assert actions[name].default == default, name  # type: ignore[attr-defined]
    inputs = {"help", "base", "lora", "weight", "output", "quiet", "verbose"}
    assert set(actions) - set(FIELDS) == inputs


def test_the_job_schema_has_the_merge_and_ray_groups_with_the_same_defaults():
    merge_keys = {f.name for f in option_fields("merge")}
    ray_keys = {f.name for f in option_fields("ray")}
    assert set(MergeSpec.model_fields) == merge_keys | {"name", "base", "loras", "output", "report"}
    assert set(RayOptions.model_fields) == ray_keys
    job = parse_job("merges:\n  - {name: a, base: b, loras: [l], output: o}\n")
    opts = job.merges[0].options(job.ray)
    assert opts == MergeOptions(), opts  # every default identical


def test_a_job_option_reaches_merge_options():
    job = parse_job(
        "ray: {num_workers: 3, device: cpu}\ndefaults: {dtype: bf16, unit_size: 1MB}\n"
        "merges:\n  - {name: a, base: b, loras: [l], output: o, alpha: 0.5, report: r.json}\n",
        base_dir="/x",
    )
    opts = job.merges[0].options(job.ray)
    assert (opts.dtype, opts.unit_size, opts.alpha, opts.num_workers, opts.device) == ("bf16", "1MB", 0.5, 3, "cpu")
    assert opts.report == "/x/r.json"


def test_merge_rejects_an_unknown_keyword_before_anything_runs(tmp_path):
    with pytest.raises(TypeError, match="unexpected keyword argument 'dtpye'"):
        distmerge.merge(str(tmp_path / "b"), ["l.pth"], str(tmp_path / "o"), dtpye="bf16")
    assert not (tmp_path / "o").exists()


def test_weights_pair_with_loras_or_are_refused():
    assert pair_weights(["a", "b"], None) == [("a", 1.0), ("b", 1.0)]
    with pytest.raises(UsageError, match="got 2 --lora but 1 --weight"):
        pair_weights(["a", "b"], [0.5])


def test_the_command_line_grammar_loads_without_torch_or_ray():
    code = (
        "import sys; from distmerge.app.flags import build_parser; from distmerge.app.validate import check_options;"
        "build_parser().parse_args(['merge','--base','b','--lora','l','-o','o']);"
        "print(sorted(m for m in ('torch', 'ray', 'pydantic') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_inspect_of_a_safetensors_lora_loads_neither_torch_nor_ray(tmp_path):
    import torch
    from safetensors.torch import save_file

    lora = str(tmp_path / "lora.safetensors")
    save_file(
        {
            "blocks.0.self_attn.q.lora_down.weight": torch.ones(4, 64),
            "blocks.0.self_attn.q.lora_up.weight": torch.ones(64, 4),
            "blocks.0.self_attn.q.alpha": torch.tensor(8.0, dtype=torch.bfloat16),
        },
        lora,
    )
    code = (
        "import sys; from distmerge.app.cli import main; rc = main(['inspect', '--lora', sys.argv[1]]);"
        "print(rc, sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code, lora], capture_output=True, text=True, check=True).stdout
    assert "α=8 scale=2" in out, out  # alpha 8 / rank 4, read from the file's bytes
    assert out.strip().splitlines()[-1] == "0 []", out
