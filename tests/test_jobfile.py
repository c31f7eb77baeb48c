"""Job files (``distmerge run``): schema errors with file:line, path resolution, defaults, and
several merges run through one Ray session, stopping at (and naming) the first failing merge."""

from __future__ import annotations

import argparse
import os
import shutil
import textwrap

import pytest
import torch

from distmerge.app.jobfile import Job, add_run_parser, cmd_run, load_job, parse_job, run_job
from distmerge.app.synth import make_factors, write_lora
from distmerge.errors import DistmergeError, FormatError, PlanError

from .helpers import TINY, assert_close_to_reference, load_checkpoint, lora_terms, reference_merge


def _write(path, text: str) -> str:
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(textwrap.dedent(text).lstrip("\n"))
    return str(path)


def _line(path: str, marker: str) -> int:
    """1-based line of the first line of ``path`` containing ``marker``."""
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if marker in line:
                return i
    raise AssertionError(marker)


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    add_run_parser(sub, argparse.ArgumentParser(add_help=False))
    return p


# --- schema and resolution (no Ray) --------------------------------------------------------------

GOOD = """
    merges:
      - name: one
        base: base
        loras: [a.pth]
        output: out1
    """

# (yaml, marker of the line the error must point at, field path in the message, message part)
BAD = {
    "wrong_type": (
        """
        merges:
          - name: one
            base: base
            loras: [a.pth]
            output: out1
          - name: two
            base: base
            loras:
              - path: a.pth
                weight: high
            output: out2
        """,
        "weight: high",
        "merges[1].loras[0].weight",
        "valid number",
    ),
    "unknown_key": (
        """
        defaults:
          dtype: bf16
          alpah: 0.5
        merges:
          - {name: one, base: base, loras: [a.pth], output: out1}
        """,
        "alpah",
        "defaults.alpah",
        "Extra inputs are not permitted",
    ),
    "unknown_key_in_merge": (
        """
        merges:
          - name: one
            base: base
            lora: [a.pth]
            loras: [a.pth]
            output: out1
        """,
        "lora: [a.pth]",
        "merges[0].lora",
        "Extra inputs",
    ),
    "unknown_top_level": (
        """
        merges:
          - {name: one, base: base, loras: [a.pth], output: out1}
        rayy: {address: auto}
        """,
        "rayy",
        "rayy",
        "Extra inputs",
    ),
    "missing_field": (
        """
        ray: {device: cpu}
        merges:
          - name: one
            base: base
            loras: [a.pth]
          - name: two
            base: base
            loras: [a.pth]
            output: out2
        """,
        "name: one",
        "merges[0].output",
        "Field required",
    ),
    "missing_merges": (
        """
        defaults: {dtype: bf16}
        """,
        "defaults",
        "merges",
        "Field required",
    ),
    "empty_merges": (
        """
        ray: {device: cpu}
        merges: []
        """,
        "merges: []",
        "merges",
        "at least 1",
    ),
    "empty_loras": (
        """
        merges:
          - name: one
            base: base
            loras: []
            output: out1
        """,
        "loras: []",
        "merges[0].loras",
        "at least 1",
    ),
    "bad_dtype": (
        """
        merges:
          - name: one
            base: base
            loras: [a.pth]
            output: out1
            dtype: int8
        """,
        "dtype: int8",
        "merges[0].dtype",
        "'keep', 'bf16', 'bfloat16', 'fp16', 'float16', 'fp32', 'float32', 'fp8_e4m3fn', 'float8_e4m3fn',",
    ),
    "bad_device": (
        """
        ray:
          address: null
          device: tpu
        merges:
          - {name: one, base: base, loras: [a.pth], output: out1}
        """,
        "device: tpu",
        "ray.device",
        "'auto', 'cpu' or 'cuda'",
    ),
    "bad_size": (
        """
        defaults:
          max_shard_size: 5XB
        merges:
          - {name: one, base: base, loras: [a.pth], output: out1}
        """,
        "5XB",
        "defaults.max_shard_size",
        "cannot parse size '5XB'",
    ),
    "negative_retries": (
        """
        merges:
          - {name: one, base: base, loras: [a.pth], output: out1,
             max_retries: -1}
        """,
        "max_retries: -1",
        "merges[0].max_retries",
        "greater than or equal to 0",
    ),
    "nan_weight": (
        """
        merges:
          - name: one
            base: base
            loras: [{path: a.pth, weight: .nan}]
            output: out1
        """,
        "weight: .nan",
        "merges[0].loras[0].weight",
        "finite",
    ),
    "duplicate_names": (
        """
        merges:
          - name: expert
            base: base
            loras: [a.pth]
            output: out1
          - name: expert   # second
            base: base
            loras: [a.pth]
            output: out2
        """,
        "# second",
        "merges[1].name",
        "duplicate merge name 'expert'",
    ),
    "duplicate_outputs_after_resolution": (
        """
        merges:
          - {name: one, base: base, loras: [a.pth], output: out}
          - name: two
            base: base
            loras: [a.pth]
            output: ./sub/../out
        """,
        "output: ./sub/../out",
        "merges[1].output",
        "same output as merges[0]",
    ),
    "output_is_another_base": (
        """
        merges:
          - {name: one, base: base, loras: [a.pth], output: out1}
          - name: two
            base: other
            loras: [a.pth]
            output: base/merged
        """,
        "output: base/merged",
        "merges[1].output",
        "is the base of merges[0]",
    ),
    "output_is_a_lora": (
        """
        merges:
          - {name: one, base: base, loras: [a.pth], output: out1}
          - {name: two, base: base, loras: [out1], output: out2}
        """,
        "name: one",
        "merges[0].output",
        "overlaps the LoRA",
    ),
    "duplicate_yaml_key": (
        """
        merges:
          - name: one
            base: base
            loras: [a.pth]
            output: out1
            output: out2
        """,
        "output: out2",
        "merges[0].output",
        "duplicate key",
    ),
    "lora_not_a_string_or_mapping": (
        """
        merges:
          - name: one
            base: base
            loras:
              - 42
            output: out1
        """,
        "- 42",
        "merges[0].loras[0]",
        "valid dictionary",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_schema_errors_point_at_the_line(tmp_path, case):
    text, marker, field, part = BAD[case]
    path = _write(tmp_path / "job.yaml", text)
    with pytest.raises(PlanError) as ei:
        load_job(path)
    msg = str(ei.value)
    assert msg.startswith(f"{path}:{_line(path, marker)}: {field}: "), msg
    assert part in msg, msg
    assert "\n" not in msg


def test_wrong_type_message_shows_the_value(tmp_path):
    path = _write(tmp_path / "j.yaml", BAD["wrong_type"][0])
    with pytest.raises(PlanError, match=r"\(got 'high'\)"):
        load_job(path)


def test_not_yaml_and_not_a_mapping_and_missing_file(tmp_path):
    bad = _write(tmp_path / "bad.yaml", "merges:\n  - name: [one\n")
    with pytest.raises(FormatError, match=rf"^{bad}:\d+: not a valid YAML file"):
        load_job(bad)
    lst = _write(tmp_path / "list.yaml", "- name: one\n")
    with pytest.raises(PlanError, match=r"list.yaml:1: a job file must be a mapping"):
        load_job(lst)
    empty = _write(tmp_path / "empty.yaml", "# nothing\n")
    with pytest.raises(PlanError, match="got empty"):
        load_job(empty)
    with pytest.raises(PlanError, match="cannot read the job file"):
        load_job(tmp_path / "absent.yaml")


def test_relative_paths_resolve_against_the_job_file_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the cwd must not matter
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = _write(
        tmp_path / "jobs" / "sub" / "job.yaml",
        """
        merges:
          - name: one
            base: ../../models/base
            loras:
              - a.pth
              - {path: /abs/b.safetensors, weight: 0.25}
              - ~/c.pth
            output: out/one
            report: one.json
        """,
    )
    os.chdir(tmp_path / "jobs")
    m = load_job(os.path.relpath(path)).merges[0]
    here = str(tmp_path / "jobs" / "sub")
    assert m.base == str(tmp_path / "models" / "base")
    assert [(lo.path, lo.weight) for lo in m.loras] == [
        (os.path.join(here, "a.pth"), 1.0),
        ("/abs/b.safetensors", 0.25),
        (str(tmp_path / "home" / "c.pth"), 1.0),
    ]
    assert m.output == os.path.join(here, "out", "one")
    assert m.report == os.path.join(here, "one.json")


def test_defaults_and_per_merge_overrides():
    job = parse_job("""
        ray: {num_workers: 3, device: cpu}
        defaults: {alpha: 0.5, dtype: bf16, unit_size: 1MB, overwrite: true}
        merges:
          - {name: one, base: /b, loras: [/a.pth], output: /o1}
          - {name: two, base: /b, loras: [/a.pth], output: /o2, alpha: 2, dtype: keep, unit_size: null,
             max_shard_size: 1000}
        """)
    one, two = job.merges
    assert (one.alpha, one.dtype, one.unit_size, one.overwrite, one.max_shard_size) == (0.5, "bf16", "1MB", True, "5GB")
    assert (two.alpha, two.dtype, two.unit_size, two.overwrite, two.max_shard_size) == (2.0, "keep", None, True, "1000")
    assert one.max_retries == 3 and one.skip_unmatched is False and one.report is None
    assert (job.ray.num_workers, job.ray.device, job.ray.address) == (3, "cpu", None)
    kw = two.merge_kwargs()
    assert kw["alpha"] == 2.0 and kw["unit_size"] is None and kw["report"] is None


def test_job_is_frozen_select_and_with_ray():
    job = parse_job(
        textwrap.dedent(GOOD) + "  - {name: two, base: base, loras: [a.pth], output: out2}\n", base_dir="/j"
    )
    with pytest.raises(Exception):
        job.merges[0].alpha = 3.0  # type: ignore[misc]
    assert [m.name for m in job.select(["two"]).merges] == ["two"]
    with pytest.raises(PlanError, match="no merge named 'three'"):
        job.select(["three"])
    j2 = job.with_ray(address="auto", num_workers=None, device="cpu")
    assert (j2.ray.address, j2.ray.num_workers, j2.ray.device) == ("auto", None, "cpu")
    assert job.ray.address is None  # the original is unchanged
    with pytest.raises(PlanError, match="ray.device"):
        job.with_ray(device="tpu")
    assert isinstance(j2, Job)


def test_check_prints_the_merges_without_running(tmp_path, capsys, tiny_base, tiny_factors):
    """``--check`` runs every check a merge makes before Ray (real inputs here), runs nothing."""
    shutil.copytree(tiny_base, tmp_path / "base")
    write_lora(str(tmp_path / "a.pth"), tiny_factors)
    path = _write(tmp_path / "job.yaml", GOOD)
    args = _run_parser().parse_args(["run", path, "--check", "--address", "auto"])
    assert cmd_run(args, None) == 0
    out = capsys.readouterr().out
    assert f"one: {tmp_path / 'base'} + [{tmp_path / 'a.pth'}×1]" in out
    assert "1 merge OK" in out
    assert not os.path.exists(tmp_path / "out1")


# --- running (Ray) -------------------------------------------------------------------------------


@pytest.fixture
def two_loras(tmp_path, tiny_factors):
    other = make_factors(TINY, rank=2, seed=11, dtype=torch.float32)
    os.makedirs(tmp_path / "loras")
    write_lora(str(tmp_path / "loras" / "a.pth"), tiny_factors)
    write_lora(str(tmp_path / "loras" / "b.safetensors"), other, layout="seko", alpha=1.0)  # scale 1/2
    return tiny_factors, other


@pytest.mark.ray
def test_two_merges_run_in_one_session(ray_local, tiny_base, two_loras, tmp_path):
    a, b = two_loras
    path = _write(
        tmp_path / "job.yaml",
        f"""
        ray: {{num_workers: 2, device: cpu}}
        defaults: {{alpha: 0.5, max_shard_size: 400KB}}
        merges:
          - name: high_noise_model
            base: {tiny_base}
            loras:
              - loras/a.pth
            output: merged/high_noise_model
            report: merged/high.json
          - name: low_noise_model
            base: {tiny_base}
            loras:
              - {{path: loras/a.pth, weight: 0.7}}
              - {{path: loras/b.safetensors, weight: -0.3}}
            output: merged/low_noise_model
            dtype: bf16
            alpha: 1.0
        """,
    )
    os.makedirs(tmp_path / "merged")
    events: list = []
    calls: list = []
    reports = run_job(
        load_job(path),
        progress=lambda *a: calls.append(a),
        on_start=lambda i, m: events.append(("start", i, m.name)),
        on_done=lambda i, m, r: events.append(("done", i, m.name, r.output)),
    )
    assert ray_local.is_initialized()  # the caller's session is reused and left running
    assert len(reports) == 2 and all(r.ray["mode"] == "existing" for r in reports)
    hi, lo = str(tmp_path / "merged" / "high_noise_model"), str(tmp_path / "merged" / "low_noise_model")
    assert events == [
        ("start", 0, "high_noise_model"),
        ("done", 0, "high_noise_model", hi),
        ("start", 1, "low_noise_model"),
        ("done", 1, "low_noise_model", lo),
    ]
    assert calls and calls[-1][0] == calls[-1][1]  # progress reached the end
    base = load_checkpoint(tiny_base)
    assert_close_to_reference(load_checkpoint(hi), reference_merge(base, lora_terms(a, 0.5)))
    terms = lora_terms(a, 0.7)
    for k, v in lora_terms(b, -0.3 * 0.5).items():
        terms[k] = terms.get(k, []) + v
    assert_close_to_reference(load_checkpoint(lo), reference_merge(base, terms, out_dtype=torch.bfloat16))
    assert os.path.isfile(tmp_path / "merged" / "high.json")
    assert len(reports[0].shards) > 1  # max_shard_size from defaults reached the merge


@pytest.mark.ray
def test_failing_merge_is_named_and_stops_the_job(ray_local, tiny_base, two_loras, tmp_path):
    """A merge that fails only once its tasks run (a NaN factor: no check before Ray can see it)
    is named and stops the job; the merge before it stays published, the one after never runs."""
    a, _ = two_loras
    bad = dict(a)
    down, up = bad["blocks.1.ffn.0"]
    up = up.clone()
    up[0, 0] = float("nan")
    bad["blocks.1.ffn.0"] = (down, up)
    write_lora(str(tmp_path / "loras" / "nan.pth"), bad)
    path = _write(
        tmp_path / "job.yaml",
        f"""
        merges:
          - {{name: first, base: {tiny_base}, loras: [loras/a.pth], output: out1}}
          - {{name: broken, base: {tiny_base}, loras: [loras/nan.pth], output: out2}}
          - {{name: third, base: {tiny_base}, loras: [loras/a.pth], output: out3}}
        """,
    )
    done: list = []
    with pytest.raises(DistmergeError) as ei:
        run_job(load_job(path), on_done=lambda i, m, r: done.append(m.name))
    msg = str(ei.value)
    assert msg.startswith("merge 'broken': ") and "nan.pth" in msg and "NaN" in msg, msg
    cause = ei.value.__cause__
    assert isinstance(cause, DistmergeError) and type(ei.value) is type(cause)
    assert done == ["first"]
    assert os.path.isdir(tmp_path / "out1") and not os.path.exists(tmp_path / "out2")
    assert not os.path.exists(tmp_path / "out3")
    assert ray_local.is_initialized()


def test_a_bad_lora_in_a_later_merge_stops_the_job_before_the_first(tiny_base, two_loras, tmp_path, monkeypatch):
    with open(tmp_path / "loras" / "corrupt.safetensors", "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    path = _write(
        tmp_path / "job.yaml",
        f"""
        merges:
          - {{name: first, base: {tiny_base}, loras: [loras/a.pth], output: out1}}
          - {{name: broken, base: {tiny_base}, loras: [loras/corrupt.safetensors], output: out2}}
        """,
    )
    import distmerge.cluster

    def no_ray(self):
        raise AssertionError("Ray session entered before the inputs were checked")

    monkeypatch.setattr(distmerge.cluster.RaySession, "__enter__", no_ray)
    with pytest.raises(DistmergeError, match=r"^merge 'broken': .*corrupt\.safetensors"):
        run_job(load_job(path))
    assert not os.path.exists(tmp_path / "out1")


@pytest.mark.ray
def test_cmd_run_prints_one_summary_per_merge(ray_local, tiny_base, two_loras, tmp_path, capsys):
    path = _write(
        tmp_path / "job.yaml",
        f"""
        merges:
          - {{name: one, base: {tiny_base}, loras: [loras/a.pth], output: o1}}
          - {{name: two, base: {tiny_base}, loras: [loras/b.safetensors], output: o2.safetensors}}
        """,
    )
    args = _run_parser().parse_args(["run", path, "--only", "two", "--num-workers", "1"])
    assert cmd_run(args, None) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("two: merged ") and out[0].endswith("o2.safetensors")
    assert os.path.isfile(tmp_path / "o2.safetensors") and not os.path.exists(tmp_path / "o1")


def test_missing_inputs_are_found_before_any_merge_runs(tiny_base, tmp_path, monkeypatch):
    path = _write(
        tmp_path / "job.yaml",
        f"""
        merges:
          - {{name: first, base: {tiny_base}, loras: [{tiny_base}/config.json], output: out1}}
          - {{name: second, base: {tiny_base}, loras: [missing.pth], output: out2}}
        """,
    )
    import distmerge.cluster

    def no_ray(self):
        raise AssertionError("Ray session entered before the inputs were checked")

    monkeypatch.setattr(distmerge.cluster.RaySession, "__enter__", no_ray)
    with pytest.raises(PlanError, match=r"^merge 'second': LoRA .*missing.pth not found"):
        run_job(load_job(path))
    assert not os.path.exists(tmp_path / "out1")
