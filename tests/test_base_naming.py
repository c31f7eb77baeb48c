"""Every LoRA layout × every Wan base naming, judged by diffusers' own loader (issue #12).

One tiny Wan transformer (2 blocks, dim 64, fp32) is written in four namings with the SAME weights:

* ``wan``: original Wan / DiffSynth names (``blocks.0.self_attn.q.weight``), an HF-sharded folder
  with ``diffusion_pytorch_model.safetensors.index.json``;
* ``comfy``: a ComfyUI single file, every key prefixed ``model.diffusion_model.``;
* ``comfy-bare``: a single file with the bare ``diffusion_model.`` prefix;
* ``diffusers``: the folder ``WanTransformer3DModel.save_pretrained`` writes, reached through
  diffusers' own single-file converter (``from_single_file`` on the Wan weights).

Each LoRA layout of the README is written with fixed seeds. The reference is never hand-built: it
is the diffusers transformer (loaded from the diffusers base) with the LoRA loaded through diffusers
(``WanPipeline.lora_state_dict`` converts non-diffusers files, ``load_lora_adapter``,
``fuse_lora(lora_scale=weight)``, ``unload_lora``), or PEFT's own ``merge_and_unload`` for the PEFT
adapter folder. ROLL and DiffSynth files, which diffusers cannot read, are renamed key by key to
the equivalent ComfyUI ``diffusion_model.…lora_A/lora_B.weight`` form (no ``.alpha``: scale 1)
and handed to diffusers' converter. Where diffusers deliberately drops keys (``.diff``/``.diff_b``
on norms, ``.diff_m`` on modulations) the expected extra delta is added to the reference explicitly
and the test asserts distmerge applied it (see ``DROPPED_BY_DIFFUSERS``).

Each cell merges with distmerge, loads the output *into diffusers* (``from_pretrained`` for the
diffusers folder, ``from_single_file`` for the Wan and ComfyUI namings) and compares every parameter
(fp32: rtol 1e-5, atol 1e-6) and one forward pass with the reference; the output keeps the base's
key set and naming exactly.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import pytest
import torch
from diffusers import WanPipeline, WanTransformer3DModel
from safetensors.torch import load_file, save_file

import distmerge
from distmerge.app.synth import BLOCK_LINEARS, wan_shapes, write_wan_base
from distmerge.errors import MatchError

from .helpers import DIFFUSERS_CONFIG, TINY, load_checkpoint

pytestmark = [
    pytest.mark.ray,
    # PEFT's save_pretrained takes the 1-D lora_B.bias (lora_bias=True) for an ungathered shard
    pytest.mark.filterwarnings(r"ignore:.*LoRA tensor\(s\) have invalid shape"),
]


RANK = 4
NAMINGS = ["wan", "comfy", "comfy-bare", "diffusers"]
SHAPES = dict(wan_shapes(TINY))
LINEARS = [f"blocks.{n}.{m}" for n in range(TINY.blocks) for m in BLOCK_LINEARS]

#: Wan -> diffusers module names, written out here (not taken from distmerge.keymap) for building
#: diffusers-named LoRAs and the explicit deltas diffusers drops
_WAN_TO_DIFFUSERS = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
    "norm3": "norm2",
}
_WAN_TOP_TO_DIFFUSERS = {
    "head.head": "proj_out",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
}


def to_diffusers_module(m: str) -> str:
    """``blocks.0.self_attn.o`` -> ``blocks.0.attn1.to_out.0``; ``head.head`` -> ``proj_out``."""
    if m in _WAN_TOP_TO_DIFFUSERS:
        return _WAN_TOP_TO_DIFFUSERS[m]
    mm = re.fullmatch(r"blocks\.(\d+)\.(.+)", m)
    assert mm and mm.group(2) in _WAN_TO_DIFFUSERS, m
    return f"blocks.{mm.group(1)}.{_WAN_TO_DIFFUSERS[mm.group(2)]}"


def _rng(seed: int):
    g = torch.Generator().manual_seed(seed)

    def draw(*shape: int, std: float = 0.05) -> torch.Tensor:
        return (torch.randn(shape, generator=g) * std).contiguous()

    return draw


def _factors(draw, module: str, rank: int = RANK) -> tuple[torch.Tensor, torch.Tensor]:
    out_f, in_f = SHAPES[module + ".weight"]
    return draw(rank, in_f), draw(out_f, rank)


# --------------------------------------------------------------------------------------------- bases


@dataclass
class Base:
    naming: str
    path: str  #: what distmerge gets as --base
    keys: frozenset[str]  #: the base's own key set (its naming)
    prefix: str = ""  #: the single-file key prefix


@dataclass
class Bases:
    config_dir: str  #: a folder with the diffusers config.json (for from_single_file)
    by_naming: dict[str, Base] = field(default_factory=dict)


def _load_wan_into_diffusers(sd: dict[str, torch.Tensor], config_dir: str) -> WanTransformer3DModel:
    """diffusers' single-file loader on an original-Wan (or ``model.diffusion_model.``) state dict."""
    return WanTransformer3DModel.from_single_file(
        dict(sd), config=config_dir, local_files_only=True, torch_dtype=torch.float32
    )


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> Bases:
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    root = tmp_path_factory.mktemp("bases")
    config_dir = str(root / "diffusers_config")
    WanTransformer3DModel(**DIFFUSERS_CONFIG).save_config(config_dir)
    wan_dir = str(root / "wan")
    write_wan_base(wan_dir, TINY, num_shards=3, seed=5)
    wan_sd = load_checkpoint(wan_dir)

    # the tiny config is exact: diffusers' converter maps every Wan key onto one model key, none left
    model_keys = set(WanTransformer3DModel(**DIFFUSERS_CONFIG).state_dict())
    converted = convert_wan_transformer_to_diffusers(dict(wan_sd))
    assert set(converted) == model_keys, set(converted) ^ model_keys

    out = Bases(config_dir)
    out.by_naming["wan"] = Base("wan", wan_dir, frozenset(wan_sd))
    for naming, prefix in (("comfy", "model.diffusion_model."), ("comfy-bare", "diffusion_model.")):
        f = str(root / naming / "wan2.2_t2v_tiny.safetensors")
        os.makedirs(os.path.dirname(f))
        save_file({prefix + k: v for k, v in wan_sd.items()}, f)
        out.by_naming[naming] = Base(naming, f, frozenset(prefix + k for k in wan_sd), prefix)

    model = _load_wan_into_diffusers(wan_sd, config_dir)
    diff_dir = str(root / "diffusers" / "transformer")
    model.save_pretrained(diff_dir, safe_serialization=True)
    diff_sd = load_checkpoint(diff_dir)
    assert set(diff_sd) == model_keys and "config.json" in os.listdir(diff_dir)
    for k, v in converted.items():  # the same weights, only renamed
        assert torch.equal(diff_sd[k], v), k
    out.by_naming["diffusers"] = Base("diffusers", diff_dir, frozenset(diff_sd))
    for d in (wan_dir, diff_dir):  # what a Hub folder carries besides weights
        with open(os.path.join(d, "README.md"), "w") as f:
            f.write("---\nlicense: apache-2.0\n---\n# tiny Wan2.2\n")
        with open(os.path.join(d, "LICENSE.txt"), "w") as f:
            f.write("Apache License 2.0\n")
    return out


# --------------------------------------------------------------------------------------------- LoRAs


@dataclass
class LoraCase:
    """A LoRA file, the weight it is merged with, and how diffusers (or PEFT) reads it."""

    layout: str  #: distmerge's ``inspect`` layout name
    path: str
    weight: float
    #: the state dict handed to ``WanPipeline.lora_state_dict`` (a path or a renamed dict); None: PEFT
    diffusers_input: object = None
    #: full deltas (diffusers names) that diffusers drops on purpose but distmerge applies; the
    #: reference adds weight × delta to diffusers' fused model
    dropped: dict[str, torch.Tensor] = field(default_factory=dict)
    peft_dir: str | None = None


def _comfy_lora(root: str) -> LoraCase:
    """ComfyUI / lightx2v: ``diffusion_model.…lora_down/lora_up.weight`` + ``.alpha`` on every block
    linear; ``.diff_b`` bias deltas; a time-embedding and a text-embedding LoRA (no ``.alpha``:
    diffusers' converter handles ``.alpha`` only inside blocks); the lightx2v head as full
    ``head.head.diff`` + ``.diff_b``; and the keys diffusers drops (norm ``.diff``/``.diff_b``,
    ``.diff_m``)."""
    draw = _rng(101)
    sd: dict[str, torch.Tensor] = {}
    dropped: dict[str, torch.Tensor] = {}
    for i, m in enumerate(LINEARS):
        a, b = _factors(draw, m)
        sd[f"diffusion_model.{m}.lora_down.weight"] = a
        sd[f"diffusion_model.{m}.lora_up.weight"] = b
        sd[f"diffusion_model.{m}.alpha"] = torch.tensor(float(2 + i % 3))  # scales 0.5, 0.75, 1.0
    for m in ("blocks.0.self_attn.q", "blocks.1.cross_attn.o", "blocks.0.ffn.2", "blocks.1.ffn.0"):
        sd[f"diffusion_model.{m}.diff_b"] = draw(SHAPES[m + ".bias"][0], std=0.01)
    for m in ("time_embedding.0", "text_embedding.2"):
        a, b = _factors(draw, m)
        sd[f"diffusion_model.{m}.lora_down.weight"] = a
        sd[f"diffusion_model.{m}.lora_up.weight"] = b
    sd["diffusion_model.time_embedding.0.diff_b"] = draw(TINY.dim, std=0.01)
    sd["diffusion_model.head.head.diff"] = draw(*SHAPES["head.head.weight"], std=0.01)
    sd["diffusion_model.head.head.diff_b"] = draw(*SHAPES["head.head.bias"], std=0.01)
    # dropped by diffusers' converter: norm diffs ("norm layer diff keys are just zeroed values")
    # and .diff_m (left over, only logged). distmerge applies them: norm3 == diffusers norm2,
    # blocks.N.modulation == diffusers blocks.N.scale_shift_table.
    for key, target in (
        ("blocks.0.norm3.diff", "blocks.0.norm2.weight"),
        ("blocks.0.norm3.diff_b", "blocks.0.norm2.bias"),
        ("blocks.1.diff_m", "blocks.1.scale_shift_table"),
    ):
        t = draw(
            *SHAPES[key.replace("diff_m", "modulation").replace(".diff_b", ".bias").replace(".diff", ".weight")],
            std=0.01,
        )
        sd["diffusion_model." + key] = t
        dropped[target] = t
    path = os.path.join(root, "wan22_lightx2v_style.safetensors")
    save_file(sd, path)
    return LoraCase("diffusion_model", path, 0.7, path, dropped)


def _kohya_lora(root: str) -> LoraCase:
    """kohya / musubi-tuner: ``lora_unet_blocks_0_self_attn_q.lora_down.weight`` + ``.alpha``. diffusers'
    musubi converter takes exactly the 10 block linears of every block, each with ``.alpha``."""
    draw = _rng(202)
    sd = {}
    for i, m in enumerate(LINEARS):
        a, b = _factors(draw, m)
        name = "lora_unet_" + m.replace(".", "_")
        sd[f"{name}.lora_down.weight"] = a
        sd[f"{name}.lora_up.weight"] = b
        sd[f"{name}.alpha"] = torch.tensor(8.0 if i % 2 else 1.0)  # scales 2 and 0.25
    path = os.path.join(root, "musubi_wan.safetensors")
    save_file(sd, path)
    return LoraCase("kohya", path, 1.0, path)


_ROLL_MODULES = LINEARS + ["head.head", "time_embedding.0"]


def _peft_named_lora(root: str, layout: str) -> LoraCase:
    """ROLL ``diffusion_module.pth`` (``base_model.model.…lora_A.default.weight``, bf16, torch.save) or
    DiffSynth (``blocks.0.self_attn.q.lora_A.default.weight``, fp32 safetensors). Scale 1. diffusers
    reads neither; the same factors renamed to ``diffusion_model.{m}.lora_A/lora_B.weight`` (no
    ``.alpha``) go through its converter for the reference."""
    draw = _rng(303 if layout == "roll" else 404)
    pre = "base_model.model." if layout == "roll" else ""
    dtype = torch.bfloat16 if layout == "roll" else torch.float32
    sd, renamed = {}, {}
    for m in _ROLL_MODULES:
        a, b = (t.to(dtype) for t in _factors(draw, m))
        sd[f"{pre}{m}.lora_A.default.weight"] = a
        sd[f"{pre}{m}.lora_B.default.weight"] = b
        renamed[f"diffusion_model.{m}.lora_A.weight"] = a.float()
        renamed[f"diffusion_model.{m}.lora_B.weight"] = b.float()
    if layout == "roll":
        path = os.path.join(root, "roll", "diffusion_module.pth")
        os.makedirs(os.path.dirname(path))
        torch.save(sd, path)
        return LoraCase("roll", path, 1.0, renamed)
    path = os.path.join(root, "diffsynth_epoch-1.safetensors")
    save_file(sd, path)
    return LoraCase("diffsynth", path, -0.5, renamed)


def _diffusers_lora(root: str, with_metadata: bool) -> LoraCase:
    """diffusers' own file: ``WanPipeline.save_lora_weights`` of ``blocks.0.attn1.to_q.lora_A.weight``
    … (saved as ``transformer.…``), with ``lora_B.bias`` bias deltas, the head (``proj_out``) and the
    embedders; with or without ``lora_adapter_metadata`` (r 4, α 8: scale 2, else 1)."""
    draw = _rng(505 if with_metadata else 606)
    modules = [to_diffusers_module(m) for m in LINEARS + ["head.head", "time_embedding.0", "text_embedding.2"]]
    wan_of = dict(zip(modules, LINEARS + ["head.head", "time_embedding.0", "text_embedding.2"]))
    layers = {}
    for dm in modules:
        a, b = _factors(draw, wan_of[dm])
        layers[f"{dm}.lora_A.weight"] = a
        layers[f"{dm}.lora_B.weight"] = b
    for dm in ("blocks.0.attn1.to_q", "blocks.1.ffn.net.2", "proj_out"):
        layers[f"{dm}.lora_B.bias"] = draw(SHAPES[wan_of[dm] + ".bias"][0], std=0.01)
    d = os.path.join(root, "diffusers-meta" if with_metadata else "diffusers-plain")
    meta = None
    if with_metadata:
        meta = {"r": RANK, "lora_alpha": 8, "target_modules": sorted(modules), "lora_bias": True}
    WanPipeline.save_lora_weights(d, transformer_lora_layers=layers, transformer_lora_adapter_metadata=meta)
    path = os.path.join(d, "pytorch_lora_weights.safetensors")
    assert os.path.isfile(path)
    with open(path, "rb") as f:  # diffusers prefixed every key (and the metadata) with transformer.
        head = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert all(k.startswith("transformer.") for k in head if k != "__metadata__")
    assert ("lora_adapter_metadata" in head.get("__metadata__", {})) == with_metadata
    return LoraCase("diffusers", path, 0.7 if with_metadata else 1.0, path)


PEFT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2", "proj_out", "linear_1"]


def _peft_lora(root: str, diffusers_base: str) -> tuple[LoraCase, WanTransformer3DModel]:
    """A PEFT adapter folder trained on the diffusers transformer (``get_peft_model``, r 4, α 6,
    ``rank_pattern``/``alpha_pattern`` on the head, ``lora_bias``); returns the case and PEFT's own
    ``merge_and_unload`` model (the reference)."""
    from peft import LoraConfig, get_peft_model

    model = WanTransformer3DModel.from_pretrained(diffusers_base, local_files_only=True, torch_dtype=torch.float32)
    cfg = LoraConfig(
        r=RANK,
        lora_alpha=6,
        target_modules=PEFT_TARGETS,
        lora_bias=True,
        rank_pattern={"proj_out": 8},
        alpha_pattern={"proj_out": 2},
    )
    pm = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(707)
    with torch.no_grad():
        for name, p in sorted(pm.named_parameters()):
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (0.01 if name.endswith(".bias") else 0.05))
    d = os.path.join(root, "peft_adapter")
    pm.save_pretrained(d)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(d))
    keys = load_file(os.path.join(d, "adapter_model.safetensors"))
    assert "base_model.model.blocks.0.attn1.to_q.lora_A.weight" in keys
    assert "base_model.model.proj_out.lora_B.bias" in keys
    merged = pm.merge_and_unload()
    merged.eval()
    return LoraCase("peft", d, 1.0, None, peft_dir=d), merged


LAYOUTS = ["diffusers-meta", "diffusers-plain", "comfy", "kohya", "roll", "diffsynth", "peft"]


@dataclass
class Reference:
    case: LoraCase
    model: WanTransformer3DModel  #: the diffusers transformer with the LoRA fused and unloaded
    state: dict[str, torch.Tensor]


def _diffusers_reference(case: LoraCase, diffusers_base: str, name: str) -> WanTransformer3DModel:
    model = WanTransformer3DModel.from_pretrained(diffusers_base, local_files_only=True, torch_dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inp = case.diffusers_input
    sd, metadata = WanPipeline.lora_state_dict(dict(inp) if isinstance(inp, dict) else inp, return_lora_metadata=True)
    model.load_lora_adapter(sd, prefix="transformer", adapter_name=name, metadata=metadata)
    model.fuse_lora(lora_scale=case.weight, adapter_names=[name])
    model.unload_lora()
    state = model.state_dict()
    assert set(state) == set(before)
    changed = [k for k in state if not torch.equal(state[k], before[k])]
    assert len(changed) >= len(LINEARS), f"diffusers merged only {changed}"
    with torch.no_grad():  # what diffusers drops on purpose, added explicitly (see LoraCase.dropped)
        for k, delta in case.dropped.items():
            assert torch.equal(state[k], before[k]), f"diffusers now applies {k}: drop this explicit delta"
            state[k].add_(case.weight * delta.reshape(state[k].shape))
    model.eval()
    return model


@pytest.fixture(scope="module")
def loras(tmp_path_factory, bases) -> dict[str, Reference]:
    root = str(tmp_path_factory.mktemp("loras"))
    diffusers_base = bases.by_naming["diffusers"].path
    out: dict[str, Reference] = {}
    cases = {
        "diffusers-meta": _diffusers_lora(root, True),
        "diffusers-plain": _diffusers_lora(root, False),
        "comfy": _comfy_lora(root),
        "kohya": _kohya_lora(root),
        "roll": _peft_named_lora(root, "roll"),
        "diffsynth": _peft_named_lora(root, "diffsynth"),
    }
    for name, case in cases.items():
        model = _diffusers_reference(case, diffusers_base, name.replace("-", "_"))
        out[name] = Reference(case, model, {k: v.detach().clone() for k, v in model.state_dict().items()})
    case, model = _peft_lora(root, diffusers_base)
    out["peft"] = Reference(case, model, {k: v.detach().clone() for k, v in model.state_dict().items()})
    return out


# --------------------------------------------------------------------------------------------- checks


def _output_path(tmp_path, base: Base) -> str:
    """A folder for folder bases; a single ``.safetensors`` for the single-file ComfyUI bases."""
    return str(tmp_path / "merged") if base.naming in ("wan", "diffusers") else str(tmp_path / "merged.safetensors")


def _load_output(out: str, base: Base, bases: Bases) -> WanTransformer3DModel:
    """Open distmerge's output as a user's loader would."""
    if base.naming == "diffusers":
        return WanTransformer3DModel.from_pretrained(out, local_files_only=True, torch_dtype=torch.float32)
    if base.naming == "comfy":  # the file itself: diffusers strips model.diffusion_model.
        return WanTransformer3DModel.from_single_file(
            out, config=bases.config_dir, local_files_only=True, torch_dtype=torch.float32
        )
    sd = load_checkpoint(out)
    if base.prefix:  # diffusers' converter only knows model.diffusion_model.; strip the bare prefix
        sd = {k.removeprefix(base.prefix): v for k, v in sd.items()}
    return _load_wan_into_diffusers(sd, bases.config_dir)


def _forward(model: WanTransformer3DModel) -> torch.Tensor:
    g = torch.Generator().manual_seed(9)
    x = torch.randn(1, 16, 2, 4, 4, generator=g)
    ctx = torch.randn(1, 6, TINY.text_dim, generator=g)
    with torch.no_grad():
        return model(hidden_states=x, timestep=torch.tensor([321]), encoder_hidden_states=ctx, return_dict=False)[0]


def _assert_same_model(got: WanTransformer3DModel, ref: Reference, label: str) -> None:
    gs = got.state_dict()
    assert set(gs) == set(ref.state), set(gs) ^ set(ref.state)
    for k, r in ref.state.items():
        assert gs[k].dtype == r.dtype == torch.float32, (label, k, gs[k].dtype)
        torch.testing.assert_close(gs[k], r, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{label}: {k}: {m}")
    torch.testing.assert_close(_forward(got), _forward(ref.model), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("naming", NAMINGS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_on_base_naming_matches_diffusers(ray_local, bases, loras, tmp_path, layout, naming):
    base = bases.by_naming[naming]
    ref = loras[layout]
    case = ref.case
    out = _output_path(tmp_path, base)
    rep = distmerge.merge(base.path, [(case.path, case.weight)], out)
    assert rep.loras[0]["layout"] == case.layout, rep.loras
    assert rep.pairs_merged > 0 and rep.unmatched == []
    # the output keeps the base's naming: same key set, nothing renamed, nothing left over
    out_sd = load_checkpoint(out)
    assert set(out_sd) == base.keys, sorted(set(out_sd) ^ base.keys)[:10]
    assert {t.dtype for t in out_sd.values()} == {torch.float32}
    if naming in ("wan", "diffusers"):
        assert any(n.endswith(".safetensors.index.json") for n in os.listdir(out))
        assert all(
            n.startswith("diffusion_pytorch_model")
            for n in os.listdir(out)
            if n.endswith((".safetensors", ".index.json"))
        )
    _assert_same_model(_load_output(out, base, bases), ref, f"{layout} on {naming}")
    # deltas diffusers drops on purpose were applied by distmerge (asserted in the comparison
    # above; here: they really moved the tensor, so a silent drop could not pass)
    if case.dropped:
        base_sd = load_checkpoint(base.path)
        for k in case.dropped:
            wan_key = base.prefix + _diffusers_to_wan_param(k) if naming != "diffusers" else k
            assert not torch.equal(out_sd[wan_key], base_sd[wan_key]), wan_key


def _diffusers_to_wan_param(k: str) -> str:
    """The inverse of this file's tables for the handful of keys in ``DROPPED_BY_DIFFUSERS``."""
    m = re.fullmatch(r"blocks\.(\d+)\.scale_shift_table", k)
    if m:
        return f"blocks.{m.group(1)}.modulation"
    m = re.fullmatch(r"blocks\.(\d+)\.norm2\.(weight|bias)", k)
    assert m, k
    return f"blocks.{m.group(1)}.norm3.{m.group(2)}"


#: what diffusers drops on purpose from a ComfyUI/lightx2v file (documented for the report)
DROPPED_BY_DIFFUSERS = ("blocks.N.norm*.diff / .diff_b", "blocks.N.diff_m (modulation)")


# --------------------------------------------------------------------------------------------- model folder


@pytest.mark.parametrize("naming", ["wan", "diffusers"])
def test_folder_output_is_a_model_folder(ray_local, bases, loras, tmp_path, naming):
    """Everything in the base folder that is not a weight shard or its index (config.json …) is
    copied into the output; for diffusers that is what makes ``from_pretrained`` work."""
    base = bases.by_naming[naming]
    out = str(tmp_path / "merged")
    distmerge.merge(base.path, [loras["comfy"].case.path], out)
    src = sorted(n for n in os.listdir(base.path) if not n.endswith((".safetensors", ".safetensors.index.json")))
    assert "config.json" in src
    for n in src:
        assert os.path.isfile(os.path.join(out, n)), f"{n} not copied into {out}: {sorted(os.listdir(out))}"
        with open(os.path.join(base.path, n), "rb") as a, open(os.path.join(out, n), "rb") as b:
            assert a.read() == b.read(), n


# --------------------------------------------------------------------------------------------- errors

#: a Wan2.1-I2V image-attention module (no target in a T2V / Wan2.2 base), per LoRA layout:
#: (its LoRA keys, the base tensor looked for in original Wan names, in diffusers names)
_K_IMG = "blocks.1.cross_attn.k_img"
_K_IMG_DIFFUSERS = "blocks.1.attn2.add_k_proj"


def _unmatched_lora(root: str, layout: str) -> tuple[str, list[str]]:
    """A valid LoRA on ``blocks.0.self_attn.q`` plus one on ``cross_attn.k_img``; returns the path and
    the k_img keys."""
    draw = _rng(808)
    a, b = _factors(draw, "blocks.0.self_attn.q")
    a2, b2 = draw(RANK, TINY.dim), draw(TINY.dim, RANK)
    if layout == "comfy":
        names = {"blocks.0.self_attn.q": "diffusion_model.blocks.0.self_attn.q", _K_IMG: f"diffusion_model.{_K_IMG}"}
        suffix = (".lora_down.weight", ".lora_up.weight")
    elif layout == "kohya":
        names = {m: "lora_unet_" + m.replace(".", "_") for m in ("blocks.0.self_attn.q", _K_IMG)}
        suffix = (".lora_down.weight", ".lora_up.weight")
    else:
        names = {"blocks.0.self_attn.q": "transformer.blocks.0.attn1.to_q", _K_IMG: f"transformer.{_K_IMG_DIFFUSERS}"}
        suffix = (".lora_A.weight", ".lora_B.weight")
    q, k = names["blocks.0.self_attn.q"], names[_K_IMG]
    sd = {q + suffix[0]: a, q + suffix[1]: b, k + suffix[0]: a2, k + suffix[1]: b2}
    path = os.path.join(root, f"i2v_{layout}.safetensors")
    save_file(sd, path)
    return path, [k + suffix[0], k + suffix[1]]


def _native_target(naming: str, base: Base) -> str:
    return f"{_K_IMG_DIFFUSERS}.weight" if naming == "diffusers" else f"{base.prefix}{_K_IMG}.weight"


@pytest.mark.parametrize("naming", NAMINGS)
@pytest.mark.parametrize("layout", ["comfy", "kohya", "diffusers"])
def test_key_without_target_names_key_and_native_target(ray_local, bases, tmp_path, layout, naming):
    base = bases.by_naming[naming]
    path, k_img_keys = _unmatched_lora(str(tmp_path), layout)
    out = _output_path(tmp_path, base)
    with pytest.raises(MatchError) as exc:
        distmerge.merge(base.path, [path], out)
    msg = str(exc.value)
    assert any(f"'{k}'" in msg for k in k_img_keys), msg
    target = _native_target(naming, base)
    assert f"'{target}'" in msg, f"expected the base tensor {target!r} in: {msg}"
    assert "--skip-unmatched" in msg
    assert not os.path.exists(out)


@pytest.mark.parametrize("naming", NAMINGS)
def test_skip_unmatched_lists_the_key_and_merges_the_rest(ray_local, bases, tmp_path, naming):
    base = bases.by_naming[naming]
    path, k_img_keys = _unmatched_lora(str(tmp_path), "comfy")
    out = _output_path(tmp_path, base)
    rep = distmerge.merge(base.path, [path], out, skip_unmatched=True)
    assert rep.pairs_merged == 1
    assert sorted(u["key"] for u in rep.unmatched) == sorted(k_img_keys)
    out_sd, base_sd = load_checkpoint(out), load_checkpoint(base.path)
    assert set(out_sd) == base.keys
    q = "blocks.0.attn1.to_q.weight" if naming == "diffusers" else f"{base.prefix}blocks.0.self_attn.q.weight"
    changed = [k for k in out_sd if not torch.equal(out_sd[k], base_sd[k])]
    assert changed == [q], changed
