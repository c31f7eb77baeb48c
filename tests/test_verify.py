"""``distmerge verify``: accepts correct merges (fp32 keep, bf16, two weighted LoRAs, single file) and
rejects every kind of damage: a changed merged value (full recompute, no checksums), a changed
untouched tensor, a flipped byte caught only by the shard checksums, missing/extra keys, wrong
dtype/shape, NaN; the verdict is always one line. It reports what it saw (the true worst ulp, the
values that needed the near-cancellation allowance, values with enough digits to differ), and
``distmerge verify OUTPUT`` re-checks an output against the recipe it records."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import zlib

import pytest
import torch
from safetensors.torch import load_file, save_file

import distmerge
from distmerge.app.cli import main
from distmerge.app.synth import make_factors, write_lora
from distmerge.app.verify import add_verify_parser, cmd_verify, verify
from distmerge.inputs.checkpoint import open_base
from distmerge.tasks.checks import ulp_distance

from .helpers import TINY, load_checkpoint, lora_terms, reference_merge

pytestmark = pytest.mark.ray

MERGED_KEY = "blocks.1.self_attn.q.weight"
UNTOUCHED_KEY = "blocks.0.norm3.weight"


# -- helpers ----------------------------------------------------------------------------------


def _index_path(folder: str) -> str:
    (name,) = [n for n in os.listdir(folder) if n.endswith(".safetensors.index.json")]
    return os.path.join(folder, name)


def _load_index(folder: str) -> tuple[str, dict]:
    p = _index_path(folder)
    with open(p) as f:
        return p, json.load(f)


def _save_json(path: str, value: dict) -> None:
    with open(path, "w") as f:
        json.dump(value, f)


def _crc32(path: str) -> str:
    with open(path, "rb") as f:
        return f"{zlib.crc32(f.read()):08x}"


def _drop_checksums(folder: str) -> None:
    p, idx = _load_index(folder)
    for algo in ("crc32", "sha256"):
        idx["metadata"]["distmerge"].pop(algo, None)
    _save_json(p, idx)


def _rehash(folder: str) -> None:
    """Record the current crc32 of every shard (as merge does), so only other checks can fail."""
    p, idx = _load_index(folder)
    idx["metadata"]["distmerge"]["crc32"] = {
        n: _crc32(os.path.join(folder, n)) for n in sorted(set(idx["weight_map"].values()))
    }
    _save_json(p, idx)


def _poke(path: str, key: str, flat: int, value: float | None = None, xor: int | None = None) -> None:
    """Overwrite element ``flat`` of ``key`` in place (value in the tensor's dtype), or xor its
    lowest byte with ``xor``."""
    info = open_base(path).tensors[key]
    size = {"F32": 4, "BF16": 2, "F16": 2}[info.dtype]
    with open(info.path, "r+b") as f:
        f.seek(info.offset + flat * size)
        if xor is not None:
            b = f.read(1)
            f.seek(info.offset + flat * size)
            f.write(bytes([b[0] ^ xor]))
        elif info.dtype == "F32":
            f.write(struct.pack("<f", value))
        else:
            dt = torch.bfloat16 if info.dtype == "BF16" else torch.float16
            f.write(torch.tensor([value], dtype=dt).view(torch.uint8).numpy().tobytes())


def _rewrite(folder: str, key: str, change) -> None:
    """Rewrite the shard holding ``key`` with ``change(tensors)`` applied; keep the index consistent
    and drop the checksums (the structure check must catch it on its own)."""
    p, idx = _load_index(folder)
    shard = idx["weight_map"][key]
    tensors = load_file(os.path.join(folder, shard))
    change(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(folder, shard), metadata={"format": "pt"})
    idx["weight_map"] = {k: s for k, s in idx["weight_map"].items() if s != shard or k in tensors}
    idx["weight_map"].update({k: shard for k in tensors})
    idx["metadata"]["distmerge"].pop("crc32", None)
    _save_json(p, idx)


def _assert_one_line(rep) -> None:
    assert "\n" not in rep.verdict and rep.verdict.startswith("verify: ")
    assert rep.verdict.startswith("verify: OK — ") == rep.ok


@pytest.fixture(scope="module")
def good(ray_local, tiny_base, lora, tmp_path_factory) -> str:
    """A correct fp32 merge in 3+ shards with checksums (copied before any test changes it)."""
    out = str(tmp_path_factory.mktemp("merged") / "out")
    distmerge.merge(tiny_base, [lora], out, max_shard_size="150KB")
    return out


@pytest.fixture
def damaged(good, tmp_path) -> str:
    out = str(tmp_path / "copy")
    shutil.copytree(good, out)
    return out


# -- accepts correct merges -------------------------------------------------------------------


def test_accepts_fp32_keep_with_checksums(good, tiny_base, lora, tiny_factors):
    rep = verify(tiny_base, [lora], good)
    _assert_one_line(rep)
    assert rep.ok, rep.failures
    n_shards = len(open_base(good).files)
    assert n_shards >= 3
    assert rep.checksums == "match" and f"{n_shards} shard checksums match" in rep.verdict
    assert rep.tensors == len(open_base(tiny_base).tensors)
    assert rep.merged == len(tiny_factors)
    assert rep.worst_key in {m + ".weight" for m in tiny_factors}
    assert f"worst {rep.worst_ulp} ulp ({rep.worst_key})" in rep.verdict  # the true worst, allowance included
    assert rep.worst_ulp <= 16 or rep.near > 0
    assert f"{rep.merged} merged (sampled 32 rows each, {rep.values} values)" in rep.verdict
    # the same with every row, and split into many small tasks
    full = verify(tiny_base, [lora], good, full=True, group_size="40KB")
    assert full.ok and "all rows" in full.verdict
    assert full.rows_compared == sum(open_base(tiny_base).tensors[m + ".weight"].shape[0] for m in tiny_factors)


def test_accepts_bf16_and_rejects_it_as_keep(ray_local, tiny_base, lora, tmp_path):
    out = str(tmp_path / "bf16")
    distmerge.merge(tiny_base, [lora], out, dtype="bf16", alpha=0.5)
    rep = verify(tiny_base, [lora], out, dtype="bf16", alpha=0.5)
    assert rep.ok, rep.failures
    assert rep.worst_ulp <= 1
    keep = verify(tiny_base, [lora], out, alpha=0.5)  # expects F32 tensors
    _assert_one_line(keep)
    assert not keep.ok and "has dtype BF16, expected F32" in keep.verdict
    wrong_alpha = verify(tiny_base, [lora], out, dtype="bf16", alpha=1.0)
    assert not wrong_alpha.ok and "ulp" in wrong_alpha.verdict and "more" in wrong_alpha.verdict
    _assert_one_line(wrong_alpha)


def test_accepts_two_weighted_loras_and_rejects_swapped_weights(ray_local, tiny_base, tiny_factors, tmp_path):
    other = make_factors(TINY, rank=2, seed=7, dtype=torch.float32)
    a, b = str(tmp_path / "a.pth"), str(tmp_path / "b.safetensors")
    write_lora(a, tiny_factors)
    write_lora(b, other, layout="seko", alpha=1.0)
    out = str(tmp_path / "out")
    distmerge.merge(tiny_base, [(a, 0.7), (b, -0.3)], out, dtype="fp16")
    rep = verify(tiny_base, [(a, 0.7), (b, -0.3)], out, dtype="fp16", full=True)
    assert rep.ok, rep.failures
    swapped = verify(tiny_base, [(a, -0.3), (b, 0.7)], out, dtype="fp16")
    assert not swapped.ok and "vs expected" in swapped.failures[0]


def test_single_file_sidecar(ray_local, tiny_base, lora, tmp_path):
    out = str(tmp_path / "merged.safetensors")
    distmerge.merge(tiny_base, [lora], out)
    rep = verify(tiny_base, [lora], out)
    assert rep.ok and rep.checksums == "match" and "1 shard checksum matches" in rep.verdict
    with open(out + ".crc32", "w") as f:
        f.write("0" * 8 + "  merged.safetensors\n")
    bad = verify(tiny_base, [lora], out)
    assert not bad.ok and bad.checksums == "mismatch" and "merged.safetensors: crc32" in bad.verdict
    os.remove(out + ".crc32")
    distmerge.merge(tiny_base, [lora], out, overwrite=True, checksum="sha256")
    assert not os.path.exists(out + ".crc32")
    assert verify(tiny_base, [lora], out).checksums == "match"
    with open(out + ".sha256", "w") as f:
        f.write("0" * 64 + "  merged.safetensors\n")
    bad = verify(tiny_base, [lora], out)
    assert not bad.ok and bad.checksums == "mismatch" and "merged.safetensors: sha256" in bad.verdict
    os.remove(out + ".sha256")
    missing = verify(tiny_base, [lora], out)
    assert missing.ok and missing.checksums == "missing" and "no shard checksums" in missing.verdict


# -- rejects damage ---------------------------------------------------------------------------


def test_flipped_merged_value_is_caught_by_full_recompute_without_checksums(damaged, tiny_base, lora):
    _drop_checksums(damaged)
    before = verify(tiny_base, [lora], damaged, full=True)
    assert before.ok and before.checksums == "missing" and "no shard checksums recorded" in before.verdict
    shape = open_base(damaged).tensors[MERGED_KEY].shape
    row = 41
    original = load_file(open_base(damaged).tensors[MERGED_KEY].path)[MERGED_KEY][row, 3].item()
    _poke(damaged, MERGED_KEY, row * shape[1] + 3, value=original + 0.5)
    rep = verify(tiny_base, [lora], damaged, full=True)
    _assert_one_line(rep)
    assert not rep.ok and rep.checksums == "missing"
    assert f"{MERGED_KEY} row {row}: " in rep.verdict and "ulp" in rep.verdict
    assert len(rep.failures) == 1


def test_checksum_catches_a_one_ulp_flip_that_values_allow(damaged, tiny_base, lora):
    _poke(damaged, MERGED_KEY, 5, xor=1)  # lowest mantissa bit: 1 ulp, within the fp32 tolerance
    shard = os.path.basename(open_base(damaged).tensors[MERGED_KEY].path)
    rep = verify(tiny_base, [lora], damaged, full=True)
    _assert_one_line(rep)
    assert not rep.ok and rep.checksums == "mismatch"
    assert shard in rep.verdict and "does not match the recorded" in rep.verdict
    _drop_checksums(damaged)  # the values alone cannot see it
    assert verify(tiny_base, [lora], damaged, full=True).ok


def test_changed_untouched_tensor_is_caught_by_byte_compare(damaged, tiny_base, lora):
    _poke(damaged, UNTOUCHED_KEY, 7, xor=1)
    _rehash(damaged)  # checksums agree with the damaged file: only the byte compare can fail
    rep = verify(tiny_base, [lora], damaged)
    _assert_one_line(rep)
    assert not rep.ok and rep.checksums == "match"
    assert f"{UNTOUCHED_KEY} element 7" in rep.verdict and "untouched" in rep.verdict


def test_nan_in_merged_tensor_is_caught_outside_the_sample(damaged, tiny_base, lora):
    info = open_base(damaged).tensors[MERGED_KEY]
    _poke(damaged, MERGED_KEY, info.numel - 1, value=float("nan"))
    _rehash(damaged)
    rep = verify(tiny_base, [lora], damaged, rows=1)
    _assert_one_line(rep)
    assert not rep.ok
    assert f"{MERGED_KEY} row {info.shape[0] - 1}: nan is not finite" in rep.verdict


@pytest.mark.parametrize("damage", ["missing", "extra", "dtype", "shape"])
def test_structure_damage(damaged, tiny_base, lora, damage):
    def change(t):
        if damage == "missing":
            del t[UNTOUCHED_KEY]
        elif damage == "extra":
            t["blocks.0.bonus.weight"] = torch.zeros(3)
        elif damage == "dtype":
            t[MERGED_KEY] = t[MERGED_KEY].to(torch.float16)
        else:
            t[MERGED_KEY] = t[MERGED_KEY].reshape(-1, 32)

    key = MERGED_KEY if damage in ("dtype", "shape") else UNTOUCHED_KEY
    _rewrite(damaged, key, change)
    rep = verify(tiny_base, [lora], damaged)
    _assert_one_line(rep)
    assert not rep.ok
    expected = {
        "missing": f"key '{UNTOUCHED_KEY}' of the base is missing",
        "extra": "extra key 'blocks.0.bonus.weight' is not in the base",
        "dtype": f"'{MERGED_KEY}' has dtype F16, expected F32",
        "shape": f"'{MERGED_KEY}' has shape",
    }[damage]
    assert expected in rep.verdict
    assert rep.checksums == "missing"


def test_unreadable_merged_checkpoint_is_a_failed_verdict(ray_local, tiny_base, lora, tmp_path):
    rep = verify(tiny_base, [lora], str(tmp_path / "nowhere"))
    _assert_one_line(rep)
    assert not rep.ok and "nowhere" in rep.verdict and "not found" in rep.verdict


# -- command line ------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distmerge")
    sub = p.add_subparsers(dest="command")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true")
    add_verify_parser(sub, common)
    return p


def test_cli_prints_one_line_and_returns_exit_code(damaged, tiny_base, lora, capsys):
    args = _parser().parse_args(
        [
            "verify",
            "--base_model_path",
            tiny_base,
            "--lora_path",
            lora,
            "--merged",
            damaged,
            "--rows",
            "4",
            "--seed",
            "3",
            "-q",
        ]
    )
    assert args.rows == 4 and args.seed == 3 and args.dtype is None  # keep with --base/--lora
    assert cmd_verify(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("verify: OK — ") and out.count("\n") == 1
    _poke(damaged, MERGED_KEY, 0, xor=0x40)
    assert cmd_verify(args) == 1
    assert capsys.readouterr().out.startswith("verify: FAILED — ")
    bad = _parser().parse_args(
        ["verify", "--base", tiny_base, "--lora", lora, "--weight", "1", "--weight", "2", "--merged", damaged]
    )
    with pytest.raises(distmerge.DistmergeError, match="2 --weight"):
        cmd_verify(bad)


# -- the verdict says what was seen ------------------------------------------------------------


def _write_values(path: str, key: str, values: torch.Tensor) -> None:
    """Overwrite all of ``key`` in place with ``values`` (of the tensor's dtype)."""
    info = open_base(path).tensors[key]
    with open(info.path, "r+b") as f:
        f.seek(info.offset)
        f.write(values.contiguous().view(torch.uint8).numpy().tobytes())


@pytest.fixture
def exact(good, tiny_base, tiny_factors, tmp_path) -> tuple[str, dict[str, torch.Tensor]]:
    """A copy of ``good`` whose merged tensors are the float64 reference rounded once (0 ulp
    everywhere), and that reference."""
    out = str(tmp_path / "exact")
    shutil.copytree(good, out)
    ref = reference_merge(load_checkpoint(tiny_base), lora_terms(tiny_factors, 1.0))
    for m in tiny_factors:
        _write_values(out, m + ".weight", ref[m + ".weight"])
    _rehash(out)
    return out, ref


def test_verdict_reports_the_true_worst_ulp(exact, tiny_base, lora):
    out, ref = exact
    w = ref[MERGED_KEY].clone()
    i = int(w.abs().argmax())
    w.view(-1).view(torch.int32)[i] += 3  # 3 ulp: within the fp32 tolerance, no allowance needed
    _write_values(out, MERGED_KEY, w)
    _rehash(out)
    rep = verify(tiny_base, [lora], out, full=True)
    _assert_one_line(rep)
    assert rep.ok and rep.worst_ulp == 3 and rep.worst_key == MERGED_KEY and rep.near == 0
    assert f"worst 3 ulp ({MERGED_KEY}), no value needed the cancellation allowance, largest error" in rep.verdict


def test_values_passing_only_by_the_allowance_count_toward_the_worst(exact, tiny_base, lora):
    out, ref = exact
    w = ref[MERGED_KEY].clone()
    flat = w.view(-1)
    top = float(flat.abs().max())
    i = int(torch.where(flat == 0, top, flat.abs()).argmin())  # the smallest value: many ulp per 1e-6·max
    moved = torch.tensor([float(flat[i]) + 0.5e-6 * top], dtype=torch.float32)
    u = int(ulp_distance(moved, flat[i : i + 1]))
    assert u > 16  # beyond the fp32 tolerance: passes only because |error| <= 1e-6 · max
    flat[i] = moved[0]
    _write_values(out, MERGED_KEY, w)
    _rehash(out)
    rep = verify(tiny_base, [lora], out, full=True)
    _assert_one_line(rep)
    assert rep.ok and rep.worst_ulp == u and rep.near == 1, rep.verdict
    assert (
        f"worst {u} ulp ({MERGED_KEY}), 1 value passed only by the cancellation allowance "
        "(|error| ≤ 1e-6 × the tensor's max)"
    ) in rep.verdict
    assert rep.worst_rel == pytest.approx(abs(float(moved[0]) - float(ref[MERGED_KEY].view(-1)[i])) / top, rel=1e-6)
    assert f"largest error {rep.worst_rel:.2g} × the tensor's max ({MERGED_KEY})" in rep.verdict
    assert 4e-7 < rep.worst_rel < 6e-7


_SHOWN = r"(\S+) \(0x([0-9a-f]{8})\)"  # a value with enough digits, then its bits


def test_untouched_one_ulp_flip_shows_two_different_numbers(damaged, tiny_base, lora):
    _poke(damaged, UNTOUCHED_KEY, 7, xor=1)
    _rehash(damaged)
    rep = verify(tiny_base, [lora], damaged)
    m = re.search(
        rf"{re.escape(UNTOUCHED_KEY)} element 7: {_SHOWN} vs expected {_SHOWN} \(1 ulp, relative "
        r"error [0-9.e+-]+\): untouched tensor differs from the base",
        rep.verdict,
    )
    assert m, rep.verdict
    got, got_bits, want, want_bits = m.groups()
    assert got != want and int(got_bits, 16) ^ int(want_bits, 16) == 1
    actual = load_checkpoint(damaged)[UNTOUCHED_KEY].view(-1)[7]
    assert torch.tensor(float(got), dtype=torch.float32) == actual  # the digits name the value exactly


def test_wrong_lora_failure_reads_sensibly(good, tiny_base, tmp_path):
    other = str(tmp_path / "other.pth")
    write_lora(other, make_factors(TINY, rank=4, seed=11, dtype=torch.bfloat16))
    rep = verify(tiny_base, [other], good)
    _assert_one_line(rep)
    assert not rep.ok
    m = re.fullmatch(
        rf"(\S+) row \d+: {_SHOWN} vs expected {_SHOWN} \((\d+) ulp, relative error (\S+); "
        r"(\d+) of (\d+) compared values beyond tolerance\) \(\S+\.safetensors\)",
        rep.failures[0],
    )
    assert m, rep.failures[0]
    got, want, rel = float(m.group(2)), float(m.group(4)), float(m.group(7))
    assert rel == pytest.approx(abs(got - want) / abs(want), rel=1e-2) and rel < 1e3
    assert int(m.group(8)) > 0 and int(m.group(9)) == 32 * open_base(good).tensors[m.group(1)].shape[1]


# -- distmerge verify OUTPUT: the recorded recipe ------------------------------------------------


@pytest.fixture(scope="module")
def recorded(ray_local, tiny_base, lora, tmp_path_factory) -> str:
    """A bf16 merge with a weight and an alpha: every one of them must come back from the recipe."""
    out = str(tmp_path_factory.mktemp("recorded") / "out")
    distmerge.merge(tiny_base, [(lora, 0.5)], out, alpha=0.7, dtype="bf16")
    return out


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main([*argv, "-q"])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _drop_recipe(folder: str) -> None:
    os.remove(os.path.join(folder, "distmerge.json"))
    p, idx = _load_index(folder)
    idx["metadata"]["distmerge"].pop("recipe")
    _save_json(p, idx)


def test_verify_output_alone_uses_the_recorded_recipe(recorded, capsys):
    code, out, _ = _cli(["verify", recorded], capsys)
    assert code == 0 and out.startswith("verify: OK — ") and out.count("\n") == 1, out
    code, out, _ = _cli(["verify", "--merged", recorded, "--weight", "1.0"], capsys)  # flags override
    assert code == 1 and out.startswith("verify: FAILED — ") and "ulp" in out


def test_verify_single_file_output_alone(ray_local, tiny_base, lora, tmp_path, capsys):
    out = str(tmp_path / "merged.safetensors")
    distmerge.merge(tiny_base, [(lora, -0.5)], out, dtype="fp16", alpha=2.0)
    code, text, _ = _cli(["verify", out], capsys)
    assert code == 0 and text.startswith("verify: OK — ") and "1 shard checksum matches" in text
    os.remove(out + ".distmerge.json")
    code, text, err = _cli(["verify", out], capsys)
    assert code == 1 and not text and err.count("\n") == 1
    assert "merged.safetensors: records no recipe" in err and "pass --base and --lora" in err


def test_missing_or_broken_recipe_is_a_one_line_error(recorded, tmp_path, capsys):
    out = str(tmp_path / "copy")
    shutil.copytree(recorded, out)
    os.remove(os.path.join(out, "distmerge.json"))
    assert _cli(["verify", out], capsys)[0] == 0  # the index's metadata.distmerge.recipe
    with open(os.path.join(out, "distmerge.json"), "w") as f:
        f.write("{}")
    _drop_recipe(out)
    for text, expected in (
        (None, "records no recipe (distmerge.json is missing"),
        ("{", "cannot read the recorded recipe (JSONDecodeError"),
        ("{}", "has no valid 'base.path'"),
        ('{"base": {"path": "b"}, "loras": [{"path": "l", "weight": "x"}]}', "has no valid 'loras[0]'"),
    ):
        if text is not None:
            with open(os.path.join(out, "distmerge.json"), "w") as f:
                f.write(text)
        code, stdout, err = _cli(["verify", out], capsys)
        assert code == 1 and not stdout and err.count("\n") == 1, err
        assert err.startswith("distmerge: error: ") and expected in err and "pass --base and --lora" in err
    code, _, err = _cli(["verify", str(tmp_path / "nowhere")], capsys)
    assert code == 1 and "nowhere: no such file or folder" in err


def test_changed_or_missing_recorded_inputs(ray_local, tiny_base, tiny_factors, tmp_path, capsys):
    base, lo, out = str(tmp_path / "base"), str(tmp_path / "l.pth"), str(tmp_path / "out")
    shutil.copytree(tiny_base, base)
    write_lora(lo, tiny_factors)
    distmerge.merge(base, [lo], out)
    write_lora(lo, make_factors(TINY, rank=4, seed=5, dtype=torch.bfloat16))  # same name, other contents
    code, stdout, err = _cli(["verify", out], capsys)
    assert code == 1 and not stdout and err.count("\n") == 1
    assert f"LoRA {lo} changed since the merge" in err
    shutil.move(base, base + ".moved")
    code, _, err = _cli(["verify", out], capsys)
    assert code == 1 and err.count("\n") == 1
    assert f"the base checkpoint recorded in {os.path.join(out, 'distmerge.json')} no longer exists: {base}" in err
    os.remove(lo)
    code, _, err = _cli(["verify", out, "--base", base + ".moved"], capsys)  # --base replaces the recorded one
    assert code == 1 and f"no longer exists: {lo}; pass --lora" in err


def test_dtype_hint_when_flags_are_given_by_hand(recorded, tiny_base, lora, tmp_path, capsys):
    by_hand = ["verify", "--base", tiny_base, "--lora", lora, "--weight", "0.5", "--alpha", "0.7"]
    code, out, _ = _cli([*by_hand, recorded], capsys)
    assert code == 1 and out.count("\n") == 1
    assert (
        "has dtype BF16, expected F32 (the output was written with --dtype bf16: pass --dtype bf16, "
        f"or just run 'distmerge verify {recorded}')"
    ) in out
    assert _cli([*by_hand, "--dtype", "bf16", recorded], capsys)[0] == 0
    copy = str(tmp_path / "norecipe")
    shutil.copytree(recorded, copy)
    _drop_recipe(copy)
    code, out, _ = _cli([*by_hand, copy], capsys)
    assert code == 1
    assert "(the output holds BF16 where F32 was expected: was it written with --dtype bf16? then pass it)" in out


def test_verify_output_alone_reads_an_fp8_recipe(ray_local, tiny_base, lora, tmp_path, capsys):
    out = str(tmp_path / "fp8")
    distmerge.merge(tiny_base, [(lora, 0.3)], out, dtype="fp8_e4m3fn")
    code, text, err = _cli(["verify", out], capsys)
    assert code == 0 and text.startswith("verify: OK — "), text + err
