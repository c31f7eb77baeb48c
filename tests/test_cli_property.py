"""The CLI's one promise, driven by hypothesis: for ANY combination of options and inputs, a merge
either exits 0 and the output verifies, or it exits 1 (a distmerge error) or 2 (a usage error)
with one line on stderr, nothing published and the inputs unchanged.

Inputs are a tiny Wan base (fp32 and bf16) and LoRAs in several layouts, some of them spoiled (a key
with no target, a rank that does not fit, a NaN factor). Options are drawn from everything the
merge command takes, ordinary and absurd values alike (NaN, Inf, 1e39, 0, negative counts). All
merges share this module's Ray session, as a caller's would.
"""

from __future__ import annotations

import math
import os
import shutil

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from distmerge.app.cli import main
from distmerge.app.synth import WanConfig, make_factors, write_lora, write_wan_base

from .conftest import snapshot

pytestmark = pytest.mark.ray

CFG = WanConfig(dim=32, ffn=48, blocks=1, in_dim=4, text_dim=16, freq_dim=8, dtype="F32")
LAYOUTS = ("roll", "diffsynth", "diffusion_model", "seko")
SPOILS = ("none", "unmatched", "rank", "nan")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    bases = {}
    for code in ("F32", "BF16"):
        bases[code] = str(root / f"base-{code}")
        write_wan_base(bases[code], WanConfig(**{**CFG.__dict__, "dtype": code}), num_shards=2)
    factors = make_factors(CFG, rank=4, dtype=torch.float32)
    loras = {}
    for layout in LAYOUTS:
        for spoil in SPOILS:
            path = str(root / f"{layout}-{spoil}.safetensors")
            write_lora(path, factors, layout=layout, alpha=2.0 if layout == "seko" else None)
            _spoil(path, spoil)
            loras[layout, spoil] = path
    return str(root), bases, loras


def _spoil(path: str, how: str) -> None:
    if how == "none":
        return
    sd = load_file(path)
    key = sorted(k for k in sd if "down" in k or "lora_A" in k)[0]
    if how == "unmatched":
        sd[key.replace("blocks.0", "blocks.7").replace("blocks_0", "blocks_7")] = sd[key].clone()
    elif how == "rank":
        sd[key] = torch.cat([sd[key], sd[key]])
    else:
        sd[key] = sd[key].clone()
        sd[key][0, 0] = float("nan")
    save_file(sd, path)


ordinary = st.floats(-3, 3, allow_nan=False).map(lambda x: round(x, 3))
absurd = st.sampled_from([0.0, math.nan, math.inf, -math.inf, 1e39, -1e39, 1e-40])
numbers = st.one_of(ordinary, ordinary, ordinary, absurd)  # mostly runs that should succeed
cases = st.fixed_dictionaries(
    {
        "base": st.sampled_from(["F32", "BF16"]),
        "loras": st.lists(
            st.tuples(st.sampled_from(LAYOUTS), st.sampled_from(SPOILS[:1] * 4 + SPOILS[1:])), min_size=1, max_size=2
        ),
        "weights": st.one_of(st.none(), st.lists(numbers, min_size=1, max_size=2)),  # one too many: usage
        "alpha": st.one_of(st.none(), st.none(), numbers),
        "dtype": st.sampled_from([None, "keep", "bf16", "fp16", "fp32"]),
        "shard": st.sampled_from([None, None, "40KB", "1GB", "0", "lots"]),
        "unit": st.sampled_from([None, None, "8KB", "0"]),
        "workers": st.sampled_from([None, None, 1, 2, 0, -1]),
        "skip": st.booleans(),
        "output": st.sampled_from(
            ["folder", "folder", "file", "file", "nonempty", "inside-base", "nonempty-overwrite"]
        ),
    }
)


SENSIBLE = {
    "shard": [None, "40KB", "1GB"],
    "unit": [None, "8KB"],
    "workers": [None, 1, 2],
    "output": ["folder", "file", "nonempty-overwrite"],
}


@st.composite
def matched(draw, cases=cases):
    """Half the cases are sensible throughout (they must merge and verify), half draw every option
    from its whole range; mostly one ``--weight`` per ``--lora`` (a wrong count is one usage error)."""
    case = draw(cases)
    if case["weights"] is not None and draw(st.integers(0, 4)):
        case["weights"] = (case["weights"] * 2)[: len(case["loras"])]
    if draw(st.booleans()):
        for key, choices in SENSIBLE.items():
            case[key] = draw(st.sampled_from(choices))
        case["loras"] = [(layout, "none") for layout, _ in case["loras"]]
        case["weights"] = [draw(ordinary) for _ in case["loras"]] if case["weights"] is not None else None
        case["alpha"] = draw(st.one_of(st.none(), ordinary))
    return case


def _args(world, case, out: str) -> list[str]:
    _, bases, loras = world
    args = ["merge", "--base", bases[case["base"]], "--output", out, "-q"]
    for layout, spoil in case["loras"]:
        args += ["--lora", loras[layout, spoil]]
    for w in case["weights"] or ():
        args.append(f"--weight={w!r}")  # `--weight -inf` would read as an option
    for flag, key in (
        ("--alpha", "alpha"),
        ("--dtype", "dtype"),
        ("--max-shard-size", "shard"),
        ("--unit-size", "unit"),
        ("--num-workers", "workers"),
    ):
        if case[key] is not None:
            args.append(f"{flag}={case[key]}")
    if case["skip"]:
        args.append("--skip-unmatched")
    if case["output"] == "nonempty-overwrite":
        args.append("--overwrite")
    return args


def _output(world, case, n: int) -> str:
    root, bases, _ = world
    where = os.path.join(root, f"out-{n}")
    shutil.rmtree(where, ignore_errors=True)
    os.makedirs(where)
    kind = case["output"]
    if kind == "file":
        return os.path.join(where, "merged.safetensors")
    if kind == "inside-base":
        return os.path.join(bases[case["base"]], "merged")
    out = os.path.join(where, "merged")
    if kind.startswith("nonempty"):
        os.makedirs(out)
        with open(os.path.join(out, "notes.txt"), "w") as f:
            f.write("the user's")
    return out


def _verify(case, args: list[str], out: str) -> int:
    v = ["verify", "--merged", out, "--base", args[args.index("--base") + 1], "-q"]
    for i, a in enumerate(args):
        if a == "--lora":
            v += [a, args[i + 1]]
        elif a.startswith(("--weight=", "--alpha=", "--dtype=")):
            v.append(a)
    if case["skip"]:
        v.append("--skip-unmatched")
    return main(v)


_counter = iter(range(10**6))


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=matched())
def test_any_options_give_a_verified_output_or_one_clean_error(ray_local, world, case, capsys):
    root, bases, loras = world
    out = _output(world, case, next(_counter))
    inputs = [bases[case["base"]], *(loras[x] for x in case["loras"])]
    before = {p: snapshot(p) if os.path.isdir(p) else os.stat(p).st_mtime_ns for p in inputs}
    parent_before = sorted(os.listdir(os.path.dirname(out)))
    args = _args(world, case, out)
    try:
        code = main(args)
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    err = capsys.readouterr().err.strip()
    event(f"exit {code}")  # --hypothesis-show-statistics: both outcomes must be exercised
    assert {p: snapshot(p) if os.path.isdir(p) else os.stat(p).st_mtime_ns for p in inputs} == before
    if code == 0:
        assert _verify(case, args, out) == 0, capsys.readouterr()
        return
    assert code in (1, 2), (code, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("distmerge: error: ") and "Traceback" not in err, err
    if case["output"].startswith("nonempty"):
        assert sorted(os.listdir(out)) == ["notes.txt"], os.listdir(out)  # left as it was
    else:
        assert sorted(os.listdir(os.path.dirname(out))) == parent_before, err  # nothing published
