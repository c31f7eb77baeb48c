"""Everything checked before Ray starts (issue 14): numbers, usage errors (exit 2), output rules,
a lone shard given as the base, fp8 refusals, free space, and ``distmerge run --check``.

Each error must come in one line, before any Ray session exists, with nothing written."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from safetensors.torch import save_file

import distmerge
from distmerge.app.cli import main
from distmerge.app.preflight import check_free_space, validate_options
from distmerge.app.synth import write_lora
from distmerge.errors import FormatError, OutputError, PlanError, UsageError

from .conftest import snapshot


@pytest.fixture
def inputs(tiny_base, tiny_factors, tmp_path):
    lora = str(tmp_path / "diffusion_module.pth")
    write_lora(lora, tiny_factors)
    return tiny_base, lora


def _no_ray() -> bool:
    import ray

    return not ray.is_initialized()


def _cli(capsys, args: list[str]) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize(
    "flags, said",
    [
        (["--alpha", "nan"], "--alpha nan is not a finite number"),
        (["--weight", "nan"], "--weight nan is not a finite number"),
        (["--weight", "inf"], "--weight inf is not a finite number"),
        (["--alpha", "1e39"], "--alpha 1e+39 overflows float32"),
        (["--alpha", "1e30", "--weight", "1e10"], "x --alpha 1e+40 overflows float32"),
        (["--weight", "1", "--weight", "2"], "got 1 --lora but 2 --weight"),
        (["--num-workers", "0"], "--num-workers must be an integer >= 1"),
        (["--max-retries", "-1"], "--max-retries must be an integer >= 0"),
        (["--unit-size", "0"], "--unit-size: size must be positive"),
        (["--max-shard-size", "lots"], "--max-shard-size: cannot parse size"),
    ],
)
def test_bad_numbers_are_usage_errors_before_ray(inputs, tmp_path, capsys, flags, said):
    base, lora = inputs
    before = snapshot(os.path.dirname(lora)) | snapshot(base)
    t0 = time.monotonic()
    code, err = _cli(capsys, ["merge", "--base", base, "--lora", lora, "--output", str(tmp_path / "out"), *flags])
    assert code == 2 and said in err and len(err.splitlines()) == 1, err
    assert time.monotonic() - t0 < 3 and _no_ray()  # answered without starting Ray
    assert not os.path.exists(tmp_path / "out")
    assert snapshot(os.path.dirname(lora)) | snapshot(base) == before


def test_the_api_refuses_nan_too():
    with pytest.raises(UsageError, match="not a finite number"):
        validate_options(weights=[1.0], alpha=float("nan"))
    assert validate_options(weights=[0.5, -1.0], alpha=2.0, dtype="fp16") == "F16"


@pytest.mark.ray
def test_a_scale_times_weight_beyond_float32_is_refused_before_ray(tiny_base, tiny_factors, tmp_path):
    """α/r from the file (1e30) times an ordinary-looking weight (1e9) overflows float32."""
    from safetensors.torch import load_file

    write_lora(str(tmp_path / "l.safetensors"), tiny_factors, layout="diffusion_model", alpha=4.0)
    sd = load_file(str(tmp_path / "l.safetensors"))
    sd = {k: (torch.tensor(4e30) if k.endswith(".alpha") else v) for k, v in sd.items()}
    save_file(sd, str(tmp_path / "big.safetensors"))
    with pytest.raises(UsageError, match=r"big\.safetensors: the coefficient of '.*' .* beyond float32"):
        distmerge.merge(tiny_base, [(str(tmp_path / "big.safetensors"), 1e9)], str(tmp_path / "out"))
    assert _no_ray() and not os.path.exists(tmp_path / "out")


@pytest.mark.ray
def test_one_shard_as_the_base_names_the_folder(inputs, tmp_path, capsys):
    base, lora = inputs
    shard = os.path.join(base, min(n for n in os.listdir(base) if n.endswith("-of-00003.safetensors")))
    code, err = _cli(capsys, ["merge", "--base", shard, "--lora", lora, "--output", str(tmp_path / "out")])
    assert code == 1 and "is one of 3 shards" in err and f"pass the folder as --base ({base})" in err, err
    # the same with the output inside the base's folder: the base is named first, not 62 LoRA keys
    code, err = _cli(capsys, ["merge", "--base", shard, "--lora", lora, "--output", os.path.join(base, "x")])
    assert code == 1 and "pass the folder as --base" in err and _no_ray()
    with pytest.raises(FormatError, match="is one of 3 shards"):
        distmerge.merge(shard, [lora], str(tmp_path / "out"))


@pytest.mark.ray
def test_output_rules_come_before_lora_matching(inputs, tmp_path, capsys):
    """An output that cannot be used is reported before a LoRA that does not fit."""
    base, _ = inputs
    bad = str(tmp_path / "bad.safetensors")
    save_file({"nowhere.lora_A.weight": torch.ones(2, 4), "nowhere.lora_B.weight": torch.ones(4, 2)}, bad)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("mine")
    code, err = _cli(capsys, ["merge", "--base", base, "--lora", bad, "--output", str(tmp_path / "full")])
    assert code == 1 and "folder is not empty" in err, err
    parent_is_a_file = str(tmp_path / "full" / "x" / "out")
    code, err = _cli(capsys, ["merge", "--base", base, "--lora", bad, "--output", parent_is_a_file])
    assert code == 1 and "out" in err and len(err.splitlines()) == 1 and _no_ray(), err


@pytest.mark.ray
def test_fp8_refusal_comes_before_ray(tiny_base, tiny_factors, tmp_path):
    from safetensors.torch import load_file

    from .helpers import load_checkpoint

    sd = load_checkpoint(tiny_base)
    q = "blocks.0.self_attn.q.weight"
    sd[q] = sd[q].to(torch.float8_e4m3fn)
    sd["blocks.0.self_attn.q.scale_weight"] = torch.tensor(1.0)
    sd["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(sd, str(tmp_path / "wan_fp8_scaled.safetensors"))
    write_lora(str(tmp_path / "l.pth"), tiny_factors)
    assert load_file(str(tmp_path / "wan_fp8_scaled.safetensors"))[q].dtype == torch.float8_e4m3fn
    with pytest.raises(PlanError, match="--dtype bf16"):
        distmerge.merge(
            str(tmp_path / "wan_fp8_scaled.safetensors"), [str(tmp_path / "l.pth")], str(tmp_path / "out"), dtype="bf16"
        )
    assert _no_ray() and not os.path.exists(tmp_path / "out")


def test_free_space_is_checked_against_the_plan(inputs, tmp_path):
    """The real filesystem here: a plan needing more than the free bytes is refused, one that fits
    is not (the figures in the message are the plan's and the disk's)."""
    import shutil

    from distmerge.inputs.checkpoint import open_base
    from distmerge.output.publish import OutputTarget
    from distmerge.plan.merge_plan import make_plan

    base, _ = inputs
    plan = make_plan(open_base(base), [])
    target = OutputTarget(str(tmp_path / "out"), None)
    check_free_space(plan, target)  # ~1 MB fits
    free = shutil.disk_usage(str(tmp_path)).free
    huge = type(plan.shards[0])("x.safetensors", b"", free + (1 << 30), ())
    big = type(plan)(plan.stem, False, (huge,), ())
    with pytest.raises(OutputError, match=r"No space left on device for the output: it needs \d+\.\d+ GB"):
        check_free_space(big, target)


def test_run_check_runs_the_preflight(inputs, tmp_path, capsys):
    """``distmerge run --check`` finds what the real run would stop at: a missing LoRA, and a LoRA
    whose keys do not fit the base, without starting Ray."""
    base, lora = inputs
    job = tmp_path / "job.yaml"
    job.write_text(
        json.dumps(
            {
                "merges": [
                    {"name": "ok", "base": base, "loras": [lora], "output": str(tmp_path / "o1")},
                    {
                        "name": "gone",
                        "base": base,
                        "loras": [str(tmp_path / "missing.pth")],
                        "output": str(tmp_path / "o2"),
                    },
                ]
            }
        )
    )
    code, err = _cli(capsys, ["run", str(job), "--check"])
    assert code == 1 and "merge 'gone'" in err and "missing.pth" in err, err
    bad = str(tmp_path / "bad.safetensors")
    save_file({"nowhere.lora_A.weight": torch.ones(2, 4), "nowhere.lora_B.weight": torch.ones(4, 2)}, bad)
    job.write_text(
        json.dumps({"merges": [{"name": "nofit", "base": base, "loras": [bad], "output": str(tmp_path / "o3")}]})
    )
    code, err = _cli(capsys, ["run", str(job), "--check"])
    assert code == 1 and "merge 'nofit'" in err and "no LoRA tensor matches" in err and _no_ray(), err
    job.write_text(
        json.dumps({"merges": [{"name": "ok", "base": base, "loras": [lora], "output": str(tmp_path / "o4")}]})
    )
    code, _ = _cli(capsys, ["run", str(job), "--check"])
    assert code == 0 and not os.path.exists(tmp_path / "o4")
