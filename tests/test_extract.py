"""``distmerge extract`` end to end (issue #16): a fine-tune -> a LoRA -> ``distmerge merge`` -> the fine-tune.

Tiny checkpoints with fixed seeds, built here: Wan-shaped pairs in three base namings (original
Wan folder, ComfyUI single file, diffusers) whose tuned twin differs from the base by a known
rank-3 delta on every matrix and by small full differences on biases, norms, modulations and the
Conv3d patch embedding (a few tensors are left identical); a tiny diffusers ``WanTransformer3DModel``
pair for diffusers' own LoRA loader; a tiny ``Qwen2ForCausalLM`` pair for PEFT's.

* round trips: every layout on every naming recovers the tuned weights to float32 precision at
  rank 3; ``merge(base, extract(base, tuned))`` approaches ``tuned`` as the rank grows, with the
  error the report predicted; energy mode picks the smallest rank; the randomized SVD (a 1536²
  matrix, through Ray) keeps within 1% of the exact SVD's energy;
* the outputs load in diffusers (comfy and diffusers layouts) and PEFT (peft layout), and their
  merged models equal distmerge's merge of the same LoRA (except what the report says the loader
  drops);
* errors are one line naming the file and key; nothing is published on error; a crashed run
  resumes.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import distmerge
from distmerge.app.extract import ExtractReport, extract
from distmerge.app.synth import write_wan_base
from distmerge.errors import FormatError, OutputError, PlanError, ShardWriteError, UsageError
from distmerge.formats.keymap import diffusers_param_to_wan, wan_param_to_diffusers

from .conftest import snapshot
from .helpers import DIFFUSERS_CONFIG, TINY, load_checkpoint, tiny_llm_config

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

R = 3  #: rank of the known deltas
IDENTICAL = ("text_embedding.0.bias", "time_embedding.0.weight", "blocks.1.self_attn.norm_k.weight")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------------- pairs


def _delta(key: str, shape: tuple[int, ...], g: torch.Generator, *, rank: int | None = R, alpha: float = 0.0):
    """A delta for one tensor: rank-``rank`` on a 2-D weight (a power-law full-rank one with
    ``rank=None``), small noise elsewhere, ``None`` for the tensors left identical."""
    if any(key.endswith(k) for k in IDENTICAL):
        return None
    if len(shape) == 2 and key.endswith(".weight"):
        m, n = shape
        if rank is not None:
            return torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g) * (0.02 / rank)
        k = min(m, n)
        u = torch.linalg.qr(torch.randn(m, k, generator=g)).Q
        v = torch.linalg.qr(torch.randn(n, k, generator=g)).Q
        return (u * torch.arange(1, k + 1) ** -alpha) @ v.T * 0.05
    return torch.randn(shape, generator=g) * 0.01


def _tuned(base: dict[str, torch.Tensor], seed: int = 7, **kw) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k in sorted(base):
        d = _delta(diffusers_param_to_wan(k.removeprefix("diffusion_model.")), tuple(base[k].shape), g, **kw)
        out[k] = base[k].clone() if d is None else (base[k].double() + d.double()).to(base[k].dtype)
    return out


def _write_pair(root: str, naming: str, seed: int = 7, **kw) -> tuple[str, str, dict, dict]:
    """(base path, tuned path, base tensors, tuned tensors) of a TINY pair in ``naming``."""
    wan_dir = os.path.join(root, "wan-base")
    if not os.path.isdir(wan_dir):
        write_wan_base(wan_dir, TINY, num_shards=2, seed=3)
    wan = load_checkpoint(wan_dir)
    if naming == "wan":
        base, base_path = wan, wan_dir
    else:
        rename = {
            "comfy": lambda k: "diffusion_model." + k,
            "diffusers": wan_param_to_diffusers,
        }[naming]
        base = {rename(k): v for k, v in wan.items()}
        base_path = os.path.join(root, f"{naming}-base", "model.safetensors")
        os.makedirs(os.path.dirname(base_path), exist_ok=True)
        save_file(base, base_path)
    tuned = _tuned(base, seed, **kw)
    tuned_path = os.path.join(root, f"{naming}-tuned-{seed}-{sorted(kw.items())}".replace(" ", ""), "model.safetensors")
    os.makedirs(os.path.dirname(tuned_path), exist_ok=True)
    save_file(tuned, tuned_path)
    return base_path, os.path.dirname(tuned_path), base, tuned


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("extract"))


def _out(tmp_path, layout: str) -> str:
    return str(tmp_path / ("adapter" if layout == "peft" else "lora.safetensors"))


def _kinds(rep: ExtractReport) -> dict[str, int]:
    return {k: rep.count(k) for k in ("lora", "diff", "set", "identical")}


def _assert_state_close(got: dict, want: dict, label: str, *, keys=None) -> None:
    for k in keys if keys is not None else want:
        torch.testing.assert_close(
            got[k].float(), want[k].float(), rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{label}: {k}: {m}"
        )


# --------------------------------------------------------------------------------------------- round trips


@pytest.mark.ray
@pytest.mark.parametrize("naming", ["wan", "comfy", "diffusers"])
@pytest.mark.parametrize("layout", ["comfy", "diffusers", "roll", "peft"])
def test_known_rank_delta_round_trips_through_merge(ray_local, root, tmp_path, layout, naming):
    base_path, tuned_path, base, tuned = _write_pair(root, naming)
    out = _out(tmp_path, layout)
    before = snapshot(os.path.dirname(base_path) if naming != "wan" else base_path)
    rep = extract(base_path, tuned_path, out, rank=R, dtype="fp32", layout=layout)
    n_matrices = sum(1 for k, v in base.items() if v.dim() == 2 and not torch.equal(v, tuned[k]))
    kinds = _kinds(rep)
    assert kinds["lora"] == n_matrices and set(rep.ranks) == {R}, kinds
    assert kinds["identical"] == sum(torch.equal(base[k], tuned[k]) for k in base) == len(IDENTICAL)
    assert sum(kinds.values()) == len(base)
    if layout != "peft":  # only PEFT writes changed tensors whole (modules_to_save)
        assert kinds["set"] == 0
    assert max(t["predicted_error"] for t in rep.tensors) < 1e-5 and rep.retained_energy > 1 - 1e-9
    assert max(t["error"] for t in rep.tensors) < 1e-5
    merged_dir = str(tmp_path / "merged")
    mrep = distmerge.merge(base_path, [out], merged_dir)
    assert mrep.unmatched == []
    merged = load_checkpoint(merged_dir)
    assert set(merged) == set(base)
    _assert_state_close(merged, tuned, f"{layout} on {naming}")
    assert snapshot(os.path.dirname(base_path) if naming != "wan" else base_path) == before
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")], os.listdir(tmp_path)  # no staging left


@pytest.mark.ray
def test_comfy_keys_alpha_and_dtype(ray_local, root, tmp_path):
    base_path, tuned_path, _, _ = _write_pair(root, "wan")
    out = _out(tmp_path, "comfy")
    rep = extract(base_path, tuned_path, out, rank=R)  # default dtype bf16
    sd = load_file(out)
    q = "diffusion_model.blocks.0.self_attn.q"
    assert sd[f"{q}.lora_down.weight"].shape == (R, TINY.dim) and sd[f"{q}.lora_up.weight"].shape == (TINY.dim, R)
    assert sd[f"{q}.lora_down.weight"].dtype == torch.bfloat16 and float(sd[f"{q}.alpha"]) == R
    assert "diffusion_model.head.head.alpha" not in sd  # diffusers' converter refuses .alpha outside blocks
    for k in ("blocks.0.diff_m", "head.diff_m", "blocks.0.norm3.diff", "blocks.0.norm3.diff_b", "patch_embedding.diff"):
        assert "diffusion_model." + k in sd, k
    with open(out, "rb") as f:
        meta = json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]
    recipe = json.loads(meta["distmerge"])
    assert recipe["kind"] == "extract" and recipe["rank"] == R and recipe["layout"] == "comfy"
    # bf16 factors: the measured error is the rounding's, above the float32 prediction
    lora = [t for t in rep.tensors if t["kind"] == "lora"]
    assert all(t["error"] >= t["predicted_error"] for t in lora) and max(t["error"] for t in lora) < 1e-2


@pytest.mark.ray
def test_error_shrinks_with_rank_as_the_report_predicts(ray_local, root, tmp_path):
    base_path, tuned_path, base, tuned = _write_pair(root, "wan", seed=11, rank=None, alpha=0.8)
    errors = {}
    for rank in (2, 8, 24):
        out = str(tmp_path / f"lora-{rank}.safetensors")
        rep = extract(base_path, tuned_path, out, rank=rank, dtype="fp32")
        merged = load_checkpoint(str(distmerge.merge(base_path, [out], str(tmp_path / f"m{rank}")).output))
        for t in rep.tensors:
            if t["kind"] != "lora":
                continue
            k = t["key"]
            dw = tuned[k].double() - base[k].double()
            measured = float((merged[k].double() - tuned[k].double()).norm() / dw.norm())
            assert measured == pytest.approx(t["predicted_error"], rel=2e-3, abs=2e-5), (rank, k)
            errors.setdefault(k, []).append(measured)
        if rank == 24:
            assert rep.predicted_error < 0.5
    for k, errs in errors.items():
        assert errs == sorted(errs, reverse=True) and errs[-1] < errs[0], (k, errs)


@pytest.mark.ray
def test_energy_mode_picks_the_smallest_rank_per_matrix(ray_local, root, tmp_path):
    base_path, tuned_path, base, tuned = _write_pair(root, "wan", seed=11, rank=None, alpha=0.8)
    rep = extract(base_path, tuned_path, str(tmp_path / "e.safetensors"), rank=None, energy=0.9, dtype="fp32")
    capped = extract(base_path, tuned_path, str(tmp_path / "c.safetensors"), rank=5, energy=0.9, dtype="fp32")
    assert len(set(rep.ranks)) > 1, rep.ranks  # the rank depends on the matrix
    by_key = {t["key"]: t for t in capped.tensors}
    for t in rep.tensors:
        if t["kind"] != "lora":
            continue
        dw = (tuned[t["key"]].double() - base[t["key"]].double()).float()
        s2 = torch.linalg.svdvals(dw).double() ** 2
        cum = torch.cumsum(s2, 0) / s2.sum()
        want = int((cum < 0.9 - 1e-9).sum()) + 1
        assert t["rank"] == want and t["energy"] >= 0.9 - 1e-9, (t["key"], t["rank"], want)
        assert by_key[t["key"]]["rank"] == min(want, 5)


@pytest.mark.ray
def test_randomized_svd_through_ray_keeps_within_one_percent_of_exact(ray_local, tmp_path):
    """A 1536² matrix is large enough for the randomized SVD (``lowrank.uses_exact``)."""
    g = torch.Generator().manual_seed(5)
    n = 1536
    u = torch.linalg.qr(torch.randn(n, 256, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, 256, generator=g)).Q
    delta = (u * torch.arange(1, 257) ** -0.5) @ v.T * 0.1
    w = torch.randn(n, n, generator=g) * 0.02
    os.makedirs(tmp_path / "b")
    os.makedirs(tmp_path / "t")
    save_file({"layers.0.proj.weight": w}, str(tmp_path / "b" / "model.safetensors"))
    save_file({"layers.0.proj.weight": w + delta}, str(tmp_path / "t" / "model.safetensors"))
    got = {}
    for exact in (False, True):
        rep = extract(
            str(tmp_path / "b"),
            str(tmp_path / "t"),
            str(tmp_path / f"{exact}.safetensors"),
            rank=32,
            exact=exact,
            dtype="fp32",
        )
        (t,) = rep.tensors
        got[exact] = t
    assert got[False]["method"] == "randomized" and got[True]["method"] == "exact"
    assert got[False]["converged"] and got[False]["iterations"] >= 2
    ex, rn = got[True]["energy"], got[False]["energy"]
    assert rn <= ex + 1e-6 and (ex - rn) / ex < 0.01, (ex, rn)
    assert got[False]["error"] == pytest.approx(got[False]["predicted_error"], rel=1e-3)


@pytest.mark.ray
def test_min_diff_skips_small_differences(ray_local, root, tmp_path):
    base_path, tuned_path, base, tuned = _write_pair(root, "wan")
    rep = extract(base_path, tuned_path, _out(tmp_path, "comfy"), rank=R, min_diff=0.05)
    small = [k for k in base if float((tuned[k] - base[k]).abs().max()) <= 0.05]
    assert sorted(t["key"] for t in rep.tensors if t["kind"] == "identical") == sorted(small)
    assert rep.count("identical") > len(IDENTICAL)


# --------------------------------------------------------------------------------------------- diffusers


@pytest.fixture(scope="module")
def wan_diffusers_pair(root):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return _saved_pair(WanTransformer3DModel(**DIFFUSERS_CONFIG).eval(), root, "wt", seed=21)


@pytest.mark.ray
@pytest.mark.parametrize("layout", ["comfy", "diffusers"])
def test_diffusers_loads_the_lora_and_merges_like_distmerge(ray_local, wan_diffusers_pair, tmp_path, layout):
    from diffusers import WanPipeline, WanTransformer3DModel

    base_dir, tuned_dir, base, tuned = wan_diffusers_pair
    out = _out(tmp_path, layout)
    rep = extract(base_dir, tuned_dir, out, rank=R, dtype="fp32", layout=layout)
    model = WanTransformer3DModel.from_pretrained(base_dir, torch_dtype=torch.float32)
    sd, meta = WanPipeline.lora_state_dict(out, return_lora_metadata=True)
    model.load_lora_adapter(sd, prefix="transformer", adapter_name="x", metadata=meta)
    model.fuse_lora(lora_scale=1.0, adapter_names=["x"])
    model.unload_lora()
    theirs = model.state_dict()
    ours = load_checkpoint(str(distmerge.merge(base_dir, [out], str(tmp_path / "merged")).output))
    dropped = set(rep.not_loaded_by["diffusers"])
    not_loaded = {t["key"] for t in rep.tensors if set(t["entries"]) & dropped}
    assert not_loaded and all("norm" in k or "scale_shift_table" in k or "patch_embedding" in k for k in not_loaded)
    assert set(theirs) == set(ours) == set(base)
    for k in base:
        torch.testing.assert_close(ours[k], tuned[k], rtol=1e-5, atol=1e-6, msg=k)  # distmerge: everything
        if k in not_loaded:
            assert torch.equal(theirs[k], base[k]), f"diffusers now loads {k}: update the report's not_loaded_by"
        else:
            torch.testing.assert_close(theirs[k], ours[k], rtol=1e-5, atol=1e-6, msg=k)


# --------------------------------------------------------------------------------------------- PEFT / LLM


def _qwen(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(**tiny_llm_config())
    return Qwen2ForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def llm_pair(root):
    return _saved_pair(_qwen(), root, "qwen", seed=31)


def _saved_pair(model, root: str, name: str, *, seed: int):
    """``model`` saved as a base and, with ``_tuned`` weights, as its fine-tune (both folders)."""
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tuned = _tuned(base, seed=seed)
    base_dir, tuned_dir = os.path.join(root, f"{name}-base"), os.path.join(root, f"{name}-tuned")
    model.save_pretrained(base_dir)
    model.load_state_dict(tuned)
    model.save_pretrained(tuned_dir)
    return base_dir, tuned_dir, base, tuned


@pytest.mark.ray
def test_peft_loads_the_adapter_and_merges_like_distmerge(ray_local, llm_pair, tmp_path):
    from peft import PeftModel

    base_dir, tuned_dir, base, tuned = llm_pair
    out = _out(tmp_path, "peft")
    rep = extract(base_dir, tuned_dir, out, rank=R, dtype="fp32", layout="peft")
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    assert cfg["r"] == R and cfg["lora_alpha"] == R and cfg["bias"] == "lora_only"
    assert "model.embed_tokens" in cfg["target_modules"] and "lm_head" in cfg["target_modules"]
    assert "model.norm" in cfg["modules_to_save"] and "model.layers.0.input_layernorm" in cfg["modules_to_save"]
    keys = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in keys
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias" in keys
    assert rep.not_loaded_by == {"peft": []}
    peft_model = PeftModel.from_pretrained(_qwen(), out).merge_and_unload()
    theirs = {k: v.detach() for k, v in peft_model.state_dict().items()}
    ours = load_checkpoint(str(distmerge.merge(base_dir, [out], str(tmp_path / "merged")).output))
    assert set(ours) == set(base)
    _assert_state_close(ours, tuned, "distmerge merge of the PEFT adapter")
    _assert_state_close(theirs, ours, "PEFT merge_and_unload vs distmerge", keys=base)


@pytest.mark.ray
def test_peft_rank_pattern_for_energy_ranks(ray_local, llm_pair, tmp_path):
    from peft import PeftModel

    base_dir, tuned_dir, base, _ = llm_pair
    out = _out(tmp_path, "peft")
    rep = extract(base_dir, tuned_dir, out, rank=None, energy=0.95, dtype="fp32", layout="peft")
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    ranks = {t["module"]: t["rank"] for t in rep.tensors if t["kind"] == "lora"}
    assert len(set(ranks.values())) > 1 or not cfg["rank_pattern"]
    assert cfg["alpha_pattern"] == cfg["rank_pattern"]
    theirs = PeftModel.from_pretrained(_qwen(), out).merge_and_unload().state_dict()
    ours = load_checkpoint(str(distmerge.merge(base_dir, [out], str(tmp_path / "merged")).output))
    _assert_state_close({k: v.detach() for k, v in theirs.items()}, ours, "energy ranks", keys=base)


# --------------------------------------------------------------------------------------------- errors


def _other_pair(tmp_path, mutate) -> tuple[str, str]:
    base = {"a.weight": torch.randn(8, 6), "a.bias": torch.randn(8), "b.weight": torch.randn(4, 8)}
    tuned = {k: v + 0.1 for k, v in base.items()}
    mutate(tuned)
    for name, sd in (("b", base), ("t", tuned)):
        os.makedirs(tmp_path / name, exist_ok=True)
        save_file(sd, str(tmp_path / name / "model.safetensors"))
    return str(tmp_path / "b"), str(tmp_path / "t")


@pytest.mark.ray
@pytest.mark.parametrize(
    "case, mutate, error, pattern",
    [
        (
            "shape",
            lambda t: t.update({"a.weight": torch.randn(8, 5)}),
            PlanError,
            r"'a\.weight' has shape \(8, 5\), expected \(8, 6\)",
        ),
        ("missing", lambda t: t.pop("b.weight"), PlanError, r"no tensor 'b\.weight'"),
        (
            "extra",
            lambda t: t.update({"c.weight": torch.ones(2, 2)}),
            PlanError,
            r"tensor 'c\.weight' is not in the base",
        ),
        (
            "dtype",
            lambda t: t.update({"a.bias": t["a.bias"].double()}),
            PlanError,
            r"'a\.bias' has dtype F64, expected F32",
        ),
        (
            "nan",
            lambda t: t["b.weight"].__setitem__((0, 0), float("nan")),
            ShardWriteError,
            r"'b\.weight' minus the base holds NaN",
        ),
        ("int", lambda t: t.update({"a.bias": torch.arange(8)}), PlanError, r"'a\.bias' has dtype I64"),
    ],
)
def test_bad_pair_is_one_line_and_publishes_nothing(ray_local, tmp_path, case, mutate, error, pattern):
    base, tuned = _other_pair(tmp_path, mutate)
    out = str(tmp_path / "out" / "lora.safetensors")
    os.makedirs(tmp_path / "out")
    with pytest.raises(error, match=pattern) as exc:
        extract(base, tuned, out, rank=2)
    msg = str(exc.value)
    assert "\n" not in msg and ("model.safetensors" in msg), msg
    assert os.listdir(tmp_path / "out") == []  # no output, no staging, no lock file


@pytest.mark.ray
def test_identical_checkpoints_are_an_error(ray_local, tmp_path):
    base, tuned = _other_pair(tmp_path, lambda t: None)
    with pytest.raises(PlanError, match=r"no tensor differs from the base .* by more than --min-diff 0.5"):
        extract(base, tuned, str(tmp_path / "l.safetensors"), rank=2, min_diff=0.5)
    with pytest.raises(PlanError, match="there is no LoRA to extract"):
        extract(base, base, str(tmp_path / "l.safetensors"), rank=2)
    assert not [n for n in os.listdir(tmp_path) if n not in ("b", "t")], os.listdir(tmp_path)


@pytest.mark.ray
def test_differing_integer_tensor_is_refused(ray_local, tmp_path):
    def mutate(t):
        pass

    base, tuned = _other_pair(tmp_path, mutate)
    b = load_file(os.path.join(base, "model.safetensors"))
    t = load_file(os.path.join(tuned, "model.safetensors"))
    b["step"], t["step"] = torch.tensor([1, 2]), torch.tensor([1, 3])
    save_file(b, os.path.join(base, "model.safetensors"))
    save_file(t, os.path.join(tuned, "model.safetensors"))
    with pytest.raises(FormatError, match=r"'step' \(I64\) differs from the base"):
        extract(base, tuned, str(tmp_path / "l.safetensors"), rank=2)
    assert not os.path.exists(tmp_path / "l.safetensors")


@pytest.mark.parametrize(
    "kw, pattern",
    [
        ({"rank": 0}, r"--rank 0 must be a whole number"),
        ({"rank": -4}, r"--rank -4"),
        ({"rank": 2.5}, r"--rank 2.5"),
        ({"rank": None}, r"give --rank, --energy, or both"),
        ({"energy": 0.0}, r"--energy 0.0 must be a fraction"),
        ({"energy": 1.5}, r"--energy 1.5"),
        ({"layout": "kohya"}, r"--layout 'kohya' is not supported"),
        ({"dtype": "fp8_e4m3fn"}, r"--dtype 'fp8_e4m3fn' is not supported by extract"),
        ({"min_diff": -1.0}, r"--min-diff -1.0"),
        ({"num_workers": 0}, r"--num-workers 0"),
        ({"layout": "peft", "output": "x.safetensors"}, r"--layout peft writes an adapter folder"),
        ({"output": "lora.pth"}, r"give a path ending in .safetensors"),
    ],
)
def test_usage_errors_are_one_line_before_anything_runs(tmp_path, kw, pattern):
    base, tuned = _other_pair(tmp_path, lambda t: None)
    out = str(tmp_path / kw.pop("output", "lora.safetensors"))
    t0 = time.monotonic()
    with pytest.raises(UsageError, match=pattern) as exc:
        extract(base, tuned, out, **{"rank": 2, **kw})
    assert "\n" not in str(exc.value) and time.monotonic() - t0 < 5
    assert not os.path.exists(out)


@pytest.mark.ray
def test_existing_output_is_refused_unless_overwrite(ray_local, tmp_path):
    base, tuned = _other_pair(tmp_path, lambda t: None)
    out = str(tmp_path / "lora.safetensors")
    with open(out, "w") as f:
        f.write("keep me")
    with pytest.raises(OutputError, match="already exists; pass --overwrite"):
        extract(base, tuned, out, rank=2)
    assert open(out).read() == "keep me"
    with pytest.raises(OutputError, match="output must not be the base"):
        extract(base, tuned, os.path.join(base, "model.safetensors"), rank=2, overwrite=True)
    rep = extract(base, tuned, out, rank=2, overwrite=True)
    assert rep.count("lora") == 2 and set(load_file(out)) >= {"diffusion_model.a.lora_down.weight"}
    peft_out = tmp_path / "adapter"
    os.makedirs(peft_out)
    (peft_out / "README.md").write_text("mine\n")
    with pytest.raises(OutputError, match="already exists"):
        extract(base, tuned, str(peft_out), rank=2, layout="peft")
    extract(base, tuned, str(peft_out), rank=2, layout="peft", overwrite=True)
    assert sorted(os.listdir(peft_out)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def test_a_layout_that_cannot_name_the_base_is_refused_before_ray(tmp_path):
    """A GPT-2 base's keys start with ``transformer.``, which the diffusers layout's prefix is too."""
    sd = {"transformer.h.0.attn.c_attn.weight": torch.zeros(4, 12), "transformer.h.0.ln_1.weight": torch.zeros(4)}
    for name in ("b", "t"):
        os.makedirs(tmp_path / name)
        save_file({k: v + (name == "t") for k, v in sd.items()}, str(tmp_path / name / "model.safetensors"))
    with pytest.raises(PlanError, match=r"--layout diffusers: 'transformer\.transformer\.h\.0.*would not merge back"):
        extract(str(tmp_path / "b"), str(tmp_path / "t"), str(tmp_path / "l.safetensors"), rank=2, layout="diffusers")
    assert not os.path.exists(tmp_path / "l.safetensors")


def test_plan_keeps_modules_together_and_balances_units(root):
    from distmerge.inputs.checkpoint import open_base
    from distmerge.plan.extract_plan import ExtractOptions, make_extract_plan

    base_path, tuned_path, base, _ = _write_pair(root, "wan")
    b, t = open_base(base_path), open_base(tuned_path)
    plan = make_extract_plan(b, t, ExtractOptions(rank=R), workers=2)
    again = make_extract_plan(b, t, ExtractOptions(rank=R), workers=2)
    assert plan == again and len(plan.units) >= 4 and plan.naming == "wan"
    assert sorted(x.key for x in plan.tensors) == sorted(base)
    for u in plan.units:  # every parameter of a module in one unit, the weight first
        groups: dict[str, list[str]] = {}
        for x in u.tensors:
            groups.setdefault(x.key.rpartition(".")[0], []).append(x.key)
        for m, keys in groups.items():
            assert sorted(keys) == sorted(k for k in base if k.rpartition(".")[0] == m), (m, keys)
            assert keys[0].endswith(".weight") or not any(k.endswith(".weight") for k in keys)
        assert u.memory >= max(4 * x.numel for x in u.tensors)
    assert plan.total_bytes == 2 * sum(v.numel() * v.element_size() for v in base.values())
    assert not plan.options.bias_lora and make_extract_plan(b, t, ExtractOptions(layout="diffusers")).options.bias_lora


# --------------------------------------------------------------------------------------------- CLI


def _main(argv: list[str]) -> int:
    from distmerge.app import cli

    return cli.main(argv)


@pytest.mark.ray
def test_cli_prints_one_summary_line(ray_local, root, tmp_path, capsys):
    base_path, tuned_path, base, tuned = _write_pair(root, "wan")
    pairs = sum(v.dim() == 2 and not torch.equal(v, tuned[k]) for k, v in base.items())
    out, report = _out(tmp_path, "comfy"), str(tmp_path / "report.json")
    assert (
        _main(
            ["extract", "--base", base_path, "--tuned", tuned_path, "-o", out, "--rank", "3", "--report", report, "-q"]
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"extracted {pairs} LoRA pairs (rank 3)") and lines[0].endswith(out)
    doc = json.load(open(report))
    assert doc["lora_pairs"] == pairs and doc["identical"] == len(IDENTICAL) and len(doc["tensors"]) == 69
    assert {"rank", "energy", "predicted_error", "error", "seconds", "method"} <= set(doc["tensors"][0])


@pytest.mark.ray
def test_cli_errors_are_one_line(ray_local, tmp_path, capsys):
    base, tuned = _other_pair(tmp_path, lambda t: t.update({"a.weight": torch.randn(8, 5)}))
    out = str(tmp_path / "l.safetensors")
    assert _main(["extract", "--base", base, "--tuned", tuned, "-o", out, "--rank", "0"]) == 2
    assert _main(["extract", "--base", base, "--tuned", tuned, "-o", out]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("distmerge: error: ") for line in err), err
    assert "--rank 0" in err[0] and "'a.weight' has shape (8, 5)" in err[1]
    assert not os.path.exists(out)


def test_the_extract_grammar_loads_without_torch_or_ray():
    code = (
        "import sys, argparse; from distmerge.app.extract import add_extract_parser; "
        "p = argparse.ArgumentParser(); common = argparse.ArgumentParser(add_help=False); "
        "add_extract_parser(p.add_subparsers(), common); "
        "bad = {'torch', 'ray'} & set(sys.modules); assert not bad, bad"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr


def _console(*args: str, timeout: float) -> subprocess.CompletedProcess:
    """``distmerge extract ARGS`` as a user runs it (the console module, no inherited Ray address)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "distmerge", "extract", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.ray
def test_console_script_extract(root, tmp_path):
    base_path, tuned_path, _, _ = _write_pair(root, "wan")
    out = _out(tmp_path, "comfy")
    pair = ["--base", base_path, "--tuned", tuned_path, "--output", out]
    r = _console(*pair, "--rank", "3", "-q", "--num-cpus", "2", timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith("extracted 25 LoRA pairs") and os.path.isfile(out)
    bad = _console(*pair, "--energy", "2", timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------- resume


_CRASHY = textwrap.dedent(
    """
    import sys, time
    import distmerge.app.extract as ex
    import distmerge.tasks.extract_unit as eu

    real = eu.run_extract_unit

    def slow(*args):  # defined in __main__: Ray ships it by value (and the real one by reference)
        time.sleep(0.4)
        return real(*args)

    eu.run_extract_unit = slow
    ex.extract(sys.argv[1], sys.argv[2], sys.argv[3], rank=3, dtype="fp32", num_workers=1, num_cpus=1, unit_size=1)
    """
)


@pytest.mark.ray
def test_crashed_run_resumes_with_finished_units_reused(root, tmp_path):
    base_path, tuned_path, _, tuned = _write_pair(root, "wan")
    out = str(tmp_path / "lora.safetensors")
    staging = str(tmp_path / ".lora.safetensors.distmerge-extract")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    p = subprocess.Popen(
        [sys.executable, "-c", _CRASHY, base_path, tuned_path, out],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and p.poll() is None:
        if (
            os.path.isdir(staging)
            and sum(n.startswith("unit-") and n.endswith(".safetensors") for n in os.listdir(staging)) >= 3
        ):
            break
        time.sleep(0.1)
    assert p.poll() is None, "the run ended before it could be killed"
    os.killpg(p.pid, signal.SIGKILL)  # the driver and its Ray, as an OOM kill would
    p.wait(timeout=60)
    assert not os.path.exists(out)
    done = sum(n.startswith("unit-") and n.endswith(".safetensors") for n in os.listdir(staging))
    with pytest.raises(OutputError, match="pass --resume"):
        extract(base_path, tuned_path, out, rank=3, dtype="fp32")
    with pytest.raises(PlanError, match="cannot resume: the options changed"):
        extract(base_path, tuned_path, out, rank=4, dtype="fp32", resume=True, num_cpus=2)
    rep = extract(base_path, tuned_path, out, rank=3, dtype="fp32", resume=True, num_cpus=2)
    assert rep.units_reused >= done >= 3 and "units reused" in rep.summary_line()
    assert not os.path.exists(staging)
    merged = load_checkpoint(str(distmerge.merge(base_path, [out], str(tmp_path / "m"), num_cpus=2).output))
    _assert_state_close(merged, tuned, "resumed")


# --------------------------------------------------------------------------------------------- benchmark


@pytest.mark.slow
@pytest.mark.ray
def test_bench_extract_smoke(tmp_path):
    bench = os.path.join(REPO, "benchmarks", "bench_extract.py")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = tmp_path / "results.json"
    r = subprocess.run(
        [
            sys.executable,
            bench,
            "--dim",
            "128",
            "--ffn",
            "256",
            "--text-dim",
            "64",
            "--blocks",
            "1",
            "--rank",
            "8",
            "--repeats",
            "1",
            "--workdir",
            str(tmp_path / "w"),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert [doc["summary"][m]["runs_ok"] for m in ("cp", "distmerge", "peer")] == [1, 1, 1]
    assert doc["ratios"]["distmerge_over_cp_time"] > 0 and doc["summary"]["distmerge"]["peak_rss_gb_median"] > 0.1
    assert doc["quality"]["distmerge"]["lora_pairs"] == doc["quality"]["peer"]["lora_pairs"] > 0
    assert abs(doc["quality"]["distmerge"]["retained_energy"] - doc["quality"]["peer"]["retained_energy"]) < 0.01
    assert math.isfinite(doc["ratios"]["peer_over_distmerge_time"])
