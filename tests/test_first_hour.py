"""A new user's first hour (issue #21): every path a run will write is checked before any work,
nothing after publishing turns a success into a failure, and a mistyped path says what is there."""

from __future__ import annotations

import json
import logging
import os
import re
import textwrap

import pytest

import distmerge
from distmerge.app.jobfile import check_job, parse_job
from distmerge.app.report import save_report
from distmerge.errors import UsageError


@pytest.mark.ray
def test_report_into_missing_folders_is_written(tiny_base, lora, tmp_path, ray_local):
    """``--report nodir/sub/r.json``: the folders are made, as for a folder output (this published
    the output and then failed with FileNotFoundError before)."""
    report = tmp_path / "nodir" / "sub" / "r.json"
    rep = distmerge.merge(tiny_base, [lora], str(tmp_path / "out"), report=str(report))
    assert json.loads(report.read_text())["pairs_merged"] == rep.pairs_merged > 0


@pytest.mark.ray
@pytest.mark.parametrize("where", ["folder", "under_file"])
def test_unwritable_report_refused_before_work(where, tiny_base, lora, tmp_path, ray_local):
    (tmp_path / "plain").write_text("x")
    report = {"folder": tmp_path, "under_file": tmp_path / "plain" / "r.json"}[where]
    out = tmp_path / "out"
    with pytest.raises(UsageError, match=r"^--report .*: (is a folder|cannot write there)"):
        distmerge.merge(tiny_base, [lora], str(out), report=str(report))
    assert not out.exists()


def test_job_checks_every_report_before_the_first_merge(tiny_base, lora, tmp_path):
    """A job whose second merge cannot write its report fails before the first merge runs."""
    (tmp_path / "plain").write_text("x")
    text = textwrap.dedent(
        f"""
        merges:
          - name: one
            base: {tiny_base}
            loras: [{lora}]
            output: {tmp_path / "out1"}
            report: {tmp_path / "reports" / "one.json"}
          - name: two
            base: {tiny_base}
            loras: [{lora}]
            output: {tmp_path / "out2"}
            report: {tmp_path / "plain" / "two.json"}
        """
    )
    job = parse_job(text, source="job.yaml", base_dir=str(tmp_path))
    with pytest.raises(UsageError, match=r"^merge 'two': --report .*plain/two.json: cannot write there"):
        check_job(job)
    assert not (tmp_path / "out1").exists() and not (tmp_path / "reports").exists()


def test_report_failure_after_publish_is_a_warning(tmp_path, caplog):
    (tmp_path / "plain").write_text("x")
    with caplog.at_level(logging.WARNING, logger="distmerge"):
        assert save_report({"a": 1}, str(tmp_path / "plain" / "r.json")) is False
    assert "the report could not be written" in caplog.text and "published" in caplog.text
    assert save_report({"a": 1}, str(tmp_path / "x" / "r.json")) is True
    assert json.loads((tmp_path / "x" / "r.json").read_text()) == {"a": 1}
    assert os.path.isfile(tmp_path / "plain")


@pytest.mark.ray
def test_output_folder_that_cannot_be_written_says_why(tiny_base, lora, tmp_path, ray_local):
    """An immutable output folder (EPERM even for root): the real reason, not a retry's ENOENT."""
    import shutil
    import subprocess

    from distmerge.errors import OutputError

    if shutil.which("chattr") is None:
        pytest.skip("needs chattr (e2fsprogs)")
    frozen = tmp_path / "frozen"
    frozen.mkdir()
    if subprocess.run(["chattr", "+i", str(frozen)], capture_output=True).returncode != 0:
        pytest.skip("this filesystem has no immutable attribute")
    try:
        with pytest.raises(OutputError, match=r"cannot create the lock file .*: Operation not permitted \(.*read-only"):
            distmerge.merge(tiny_base, [lora], str(frozen / "out"))
        assert os.listdir(frozen) == []
    finally:
        subprocess.run(["chattr", "-i", str(frozen)], check=True)


def test_mistyped_flag_is_named_with_the_nearest(capsys):
    from distmerge.app.cli import main

    with pytest.raises(SystemExit) as e:
        main(["merge", "--base", "b", "--lora", "l.pth", "--ouput", "out"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("distmerge: error:") and "unknown option --ouput; did you mean --output?" in err
    assert "\n" not in err


def test_cli_takes_the_dtype_names_the_api_takes():
    from distmerge.app.flags import build_parser
    from distmerge.app.validate import resolve_dtype

    for name, code in (("bfloat16", "BF16"), ("float16", "F16"), ("fp32", "F32")):
        args = build_parser().parse_args(["merge", "--base", "b", "--lora", "l", "-o", "o", "--dtype", name])
        assert resolve_dtype(args.dtype) == code


@pytest.mark.ray
def test_single_file_outputs(tiny_base, lora, tmp_path, ray_local):
    """A single-file output creates its folders as a folder output does; the suffix is matched in
    any case; another weight-file suffix is refused instead of becoming a folder of that name."""
    deep = tmp_path / "new" / "deep" / "m.safetensors"
    distmerge.merge(tiny_base, [lora], str(deep))
    assert deep.is_file()
    upper = tmp_path / "Merged.SAFETENSORS"
    distmerge.merge(tiny_base, lora, str(upper))  # one LoRA path alone is one LoRA
    assert upper.is_file()
    with pytest.raises(UsageError, match=r"^--output .*merged\.sft: distmerge writes safetensors"):
        distmerge.merge(tiny_base, [lora], str(tmp_path / "merged.sft"))
    assert not (tmp_path / "merged.sft").exists()


@pytest.mark.ray
def test_device_cuda_without_a_gpu_fails_even_for_a_tiny_merge(tiny_base, lora, tmp_path):
    """The units the driver merges itself while Ray starts used to ignore ``--device cuda``: a
    small merge then ran on the CPU and exited 0."""
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "distmerge", "merge", "--base", tiny_base, "--lora", lora, "-o", str(out)]
    r = subprocess.run(
        [*cmd, "--device", "cuda", "--num-cpus", "2", "-q"], capture_output=True, text=True, env=env, timeout=300
    )
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("distmerge: error: --device cuda was asked for")
    assert not out.exists()


@pytest.mark.ray
def test_lora_for_another_model_says_so_briefly(tiny_base, tmp_path, ray_local):
    """An LLM adapter on a Wan base: one short line asking whether it is for another model, and no
    advice to --skip-unmatched (which would only fail with "nothing matched")."""
    from distmerge.errors import MatchError

    from .helpers import shared_path

    peft = shared_path("examples", "megatron_qwen3_tp2", "roll_peft")
    with pytest.raises(MatchError) as e:
        distmerge.merge(tiny_base, [peft], str(tmp_path / "out"))
    msg = str(e.value)
    assert msg.startswith(f"no LoRA tensor matches the base {tiny_base}: is the LoRA for another model?")
    assert "--skip-unmatched" not in msg and len(msg) < 400
    assert not (tmp_path / "out").exists()


def _on_a_terminal(cmd: str, done, *, width: int) -> str:
    """Run shell ``cmd`` in a real terminal (a tmux pane of ``width`` columns) until it creates
    ``done``; what the screen then shows."""
    import shutil
    import subprocess
    import time

    if shutil.which("tmux") is None:
        pytest.skip("needs tmux")
    tmux = ["tmux", "-L", f"dm-{os.getpid()}-{time.monotonic_ns()}"]
    subprocess.run(
        [*tmux, "new-session", "-d", "-s", "t", "-x", str(width), "-y", "30", cmd + "; sleep 60"], check=True
    )
    try:
        deadline = time.monotonic() + 240
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        return subprocess.run([*tmux, "capture-pane", "-p", "-t", "t"], capture_output=True, text=True).stdout
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)


@pytest.mark.ray
def test_terminal_shows_the_bar_then_the_summary_last(tiny_base, lora, tmp_path):
    """On a real terminal (tmux): the finished bar, then the summary alone as the last line (the
    summary used to be glued onto the bar, which was then redrawn below it)."""
    import sys

    out, done = tmp_path / "out", tmp_path / "done"
    cmd = (
        f"env -u RAY_ADDRESS {sys.executable} -m distmerge merge --base {tiny_base} --lora {lora} -o {out} "
        f"--num-cpus 2 --unit-size 20KB; echo $? > {done}"
    )
    screen = _on_a_terminal(cmd, done, width=160)
    assert done.read_text().strip() == "0", screen
    lines = [ln for ln in screen.splitlines() if ln.strip()]
    assert lines[-1].startswith("merged ") and lines[-1].endswith(f"-> {out}"), screen
    merge_s, whole_s = (float(x) for x in re.search(r"in ([\d.]+) s \(([\d.]+) s with start-up\)", lines[-1]).groups())
    assert whole_s >= merge_s, lines[-1]  # the summary says what the user waited, not only the merge
    assert lines[-2].startswith("merging: 100%") and "units" in lines[-2], screen
    assert sum("merging:" in ln for ln in lines) == 1 and "Exception ignored" not in screen, screen


@pytest.mark.parametrize("reader", ["cat > /dev/null", "true"])
def test_interrupted_line_reaches_the_terminal_through_a_pipe(reader, tmp_path):
    """``… 2>&1 | tee log`` and Ctrl-C: the pipe's reader may die with the same Ctrl-C, so the
    interrupted line also goes to the terminal (tmux), whether the reader is alive or gone."""
    import sys

    done = tmp_path / "done"
    code = (
        "import time; from distmerge.app.cli import _say\n"
        "class P:\n    def close(self): pass\n"
        "time.sleep(0.5); _say(P(), 'distmerge: interrupted; LINE', terminal_too=True)"
    )
    screen = _on_a_terminal(f'{sys.executable} -c "{code}" 2>&1 | {reader}; touch {done}', done, width=120)
    assert "distmerge: interrupted; LINE" in screen, screen


def test_unreachable_address_fails_at_once(tiny_base, lora, tmp_path):
    """``--address HOST:PORT`` with nothing listening: one line naming the address, in seconds
    (Ray itself retries for minutes). Only loopback is used here."""
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    start = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "distmerge", "merge", "--base", tiny_base, "--lora", lora, "-o", str(out)]
        + ["--address", "127.0.0.1:1", "-q"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("distmerge: error: --address 127.0.0.1:1: no Ray cluster answers there"), last
    assert time.monotonic() - start < 30 and not out.exists()


@pytest.mark.parametrize(
    "argv, code, says",
    [
        (["merge", "--base", "b", "--lora", "l.pth", "-o", "o", "--weight", "nan"], 2, "--weight nan is not a finite"),
        (["merge", "--base", "b", "--lora", "l.pth", "-o", "m.sft"], 2, "distmerge writes safetensors"),
        (["verify", "{missing}"], 1, "no such file or folder; nothing to verify"),
        (["verify", "{plain}"], 1, "records no recipe"),
        (["merge", "--base", "b", "--lora", "l.pth", "-o", "{busy}"], 1, "another distmerge run (pid"),
    ],
)
def test_at_once_answers_load_neither_torch_nor_ray(argv, code, says, tmp_path):
    """Usage errors, a busy output and verify's recipe errors answer before torch or Ray is imported."""
    import subprocess
    import sys

    from distmerge.output.lock import OutputLock

    (tmp_path / "plain").mkdir()
    names = {"missing": tmp_path / "nope", "plain": tmp_path / "plain", "busy": tmp_path / "busy"}
    argv = [a.format(**{k: str(v) for k, v in names.items()}) for a in argv]
    script = (
        "import sys\nfrom distmerge.app.cli import main\n"
        f"rc = main({argv!r})\n"
        "print(rc, sorted(m for m in ('torch', 'ray') if m in sys.modules))\n"
    )
    with OutputLock(str(tmp_path / "busy")):  # another run holds this output
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip().splitlines()[-1] == f"{code} []", (r.stdout, r.stderr)
    assert says in r.stderr, r.stderr


def test_job_errors_name_the_job_file_key(tiny_base, lora, tmp_path):
    """A job's rerun into a published output says which job-file key to set (``distmerge run``
    has no --overwrite flag)."""
    from distmerge.errors import OutputError

    (tmp_path / "out1").mkdir()
    (tmp_path / "out1" / "model.safetensors").write_bytes(b"x")
    text = f"merges:\n  - name: one\n    base: {tiny_base}\n    loras: [{lora}]\n    output: {tmp_path / 'out1'}\n"
    with pytest.raises(OutputError) as e:
        check_job(parse_job(text, source="job.yaml", base_dir=str(tmp_path)))
    msg = str(e.value)
    assert msg.startswith("merge 'one': ") and "set 'overwrite: true' (for this merge, or under defaults:)" in msg
    assert "--overwrite" not in msg


def test_diffusers_variant_beside_the_weights_is_not_ambiguous(tmp_path):
    """A diffusers folder with ``diffusion_pytorch_model.safetensors`` and its ``.fp16`` variant
    (what ``variant="fp16"`` loads) is read as the plain weights, not refused."""
    import torch
    from safetensors.torch import save_file

    from distmerge.inputs.checkpoint import open_base

    save_file({"w": torch.zeros(2, 2)}, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    save_file({"w": torch.zeros(2, 2, dtype=torch.float16)}, str(tmp_path / "diffusion_pytorch_model.fp16.safetensors"))
    base = open_base(str(tmp_path))
    assert base.stem == "diffusion_pytorch_model"
    assert [os.path.basename(f) for f in base.files] == ["diffusion_pytorch_model.safetensors"]
    save_file({"w": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))  # two plain files: still ambiguous
    with pytest.raises(distmerge.FormatError, match="3 .safetensors files but no"):
        open_base(str(tmp_path))


def test_fork_hook_modules_are_imported_before_ray_starts_forking():
    """``Exception ignored … RuntimeError: release unlocked lock`` at exit (about 1 run in 20):
    ``concurrent.futures.thread`` registered its at-fork hooks (imported by the main thread while
    it loads torch) in the middle of a fork on Ray's start-up thread, so the parent ran the
    ``release`` half without the ``acquire`` half. The session now imports such modules before its
    thread starts (40 CLI runs after the change printed nothing; 1 of 20 did before)."""
    import subprocess
    import sys

    code = (
        "import sys, distmerge.cluster as c\n"
        "assert 'concurrent.futures.thread' not in sys.modules\n"
        "c.RaySession._serve = lambda self, address: None  # no Ray: only the order matters here\n"
        "c.RaySession(None).start()\n"
        "print('concurrent.futures.thread' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "True", r.stderr


@pytest.mark.ray
def test_demo_says_what_it_is_doing(tmp_path, ray_local):
    """The demo's float64 check (seconds on a small machine) is announced before it runs."""
    from distmerge.app.demo import run_demo

    said: list[str] = []
    report = run_demo(str(tmp_path / "demo"), log=said.append)
    assert report.pairs_merged > 0
    checking = next(i for i, s in enumerate(said) if s.startswith("checking the "))
    assert said[checking + 1].startswith("checked ") and "max |error|" in said[checking + 1]


@pytest.mark.ray
def test_extract_report_checked_before_work_and_folders_made(tiny_base, tmp_path, ray_local):
    from distmerge.app.synth import write_wan_base

    from .helpers import TINY

    tuned = str(tmp_path / "tuned")
    write_wan_base(tuned, TINY, num_shards=2, seed=3)
    (tmp_path / "plain").write_text("x")
    with pytest.raises(UsageError, match=r"^--report .*plain/r.json: cannot write there"):
        distmerge.extract(
            tiny_base, tuned, str(tmp_path / "a.safetensors"), rank=2, report=str(tmp_path / "plain" / "r.json")
        )
    assert not (tmp_path / "a.safetensors").exists()
    report = tmp_path / "new" / "r.json"
    distmerge.extract(tiny_base, tuned, str(tmp_path / "b.safetensors"), rank=2, report=str(report))
    assert json.loads(report.read_text())["lora_pairs"] > 0
