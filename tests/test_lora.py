"""normalize(): layout detection, targets, scales, unmatched keys and shape errors; open_lora safety."""

from __future__ import annotations

import inspect
import os

import pytest
import torch
from safetensors.torch import save_file

from distmerge.app.synth import write_lora
from distmerge.errors import FormatError, MatchError
from distmerge.formats.normalize import normalize
from distmerge.formats.shapes import delta_shape_error
from distmerge.inputs.checkpoint import open_base
from distmerge.inputs.lorafile import LoraFile, TensorMeta, open_lora

M = TensorMeta

BASE = {
    "blocks.0.self_attn.q.weight": M("F32", (8, 8)),
    "blocks.0.self_attn.q.bias": M("F32", (8,)),
    "blocks.0.ffn.0.weight": M("BF16", (16, 8)),
    "blocks.0.cross_attn.k.weight": M("F32", (8, 8)),
    "blocks.0.modulation": M("F32", (1, 6, 8)),
    "patch_embedding.weight": M("F32", (8, 4, 1, 2, 2)),
    "pos_ids": M("I64", (4,)),
}
Q = "blocks.0.self_attn.q"


class _Mem:
    """A LoraFile reader over an in-memory dict (only .alpha scalars are ever read by normalize)."""

    def __init__(self, sd):
        self.sd = sd

    def read(self, path, key):
        return self.sd[key]


def lora(keys: dict[str, tuple], path="mem.safetensors", alphas: dict[str, float] | None = None) -> LoraFile:
    """LoraFile with ``keys`` (key -> shape, BF16) and ``alphas`` (key -> value, F32 scalar)."""
    tensors = {k: M("BF16", s) for k, s in keys.items()}
    sd = {}
    for k, v in (alphas or {}).items():
        tensors[k] = M("F32", ())
        sd[k] = torch.tensor(v)
    lf = LoraFile(path, "safetensors", tensors)
    lf._reader = _Mem(sd)
    return lf


def pair(a_key, b_key, r=4, inp=8, out=8):
    return {a_key: (r, inp), b_key: (out, r)}


# ----------------------------------------------------------------------------- layouts (in memory)

LAYOUT_CASES = [
    ("roll", pair(f"base_model.model.{Q}.lora_A.default.weight", f"base_model.model.{Q}.lora_B.default.weight")),
    (
        "roll",
        pair(
            f"pipe.dit.base_model.model.{Q}.lora_A.default.weight",
            f"pipe.dit.base_model.model.{Q}.lora_B.default.weight",
        ),
    ),
    (
        "roll",
        pair(
            f"pipe.dit2.base_model.model.{Q}.lora_A.default.weight",
            f"pipe.dit2.base_model.model.{Q}.lora_B.default.weight",
        ),
    ),
    ("peft", pair(f"base_model.model.{Q}.lora_A.weight", f"base_model.model.{Q}.lora_B.weight")),
    ("diffsynth", pair(f"{Q}.lora_A.default.weight", f"{Q}.lora_B.default.weight")),
    ("diffsynth", pair(f"pipe.dit.{Q}.lora_A.default.weight", f"pipe.dit.{Q}.lora_B.default.weight")),
    ("diffusion_model", pair(f"diffusion_model.{Q}.lora_down.weight", f"diffusion_model.{Q}.lora_up.weight")),
    ("diffusion_model", pair(f"diffusion_model.{Q}.lora_A.weight", f"diffusion_model.{Q}.lora_B.weight")),
    ("diffusion_model", pair(f"model.diffusion_model.{Q}.lora_A.weight", f"model.diffusion_model.{Q}.lora_B.weight")),
    ("kohya", pair("lora_unet_blocks_0_self_attn_q.lora_down.weight", "lora_unet_blocks_0_self_attn_q.lora_up.weight")),
    (
        "kohya",
        pair("lora_unet__blocks_0_self_attn_q.lora_down.weight", "lora_unet__blocks_0_self_attn_q.lora_up.weight"),
    ),
    ("plain", pair(f"{Q}.lora_A.weight", f"{Q}.lora_B.weight")),
    ("plain", pair(f"{Q}.lora.down.weight", f"{Q}.lora.up.weight")),
    ("plain", pair(f"{Q}_lora.down.weight", f"{Q}_lora.up.weight")),
    ("plain", pair(f"{Q}.lora_linear_layer.down.weight", f"{Q}.lora_linear_layer.up.weight")),
    ("plain", pair(f"{Q}.lora_A", f"{Q}.lora_B")),
]


@pytest.mark.parametrize("layout,keys", LAYOUT_CASES, ids=lambda v: v if isinstance(v, str) else next(iter(v)))
def test_layout_without_alpha(layout, keys):
    lf = lora(keys)
    n = normalize(lf, BASE, strength=0.75)
    assert n.layout == layout
    assert n.path == "mem.safetensors"
    assert n.unmatched == []
    (d,) = n.deltas
    a_key, b_key = keys
    assert d.target == f"{Q}.weight"
    assert d.kind == "lora"
    assert [f.key for f in d.factors] == [a_key, b_key]
    assert [f.shape for f in d.factors] == [(4, 8), (8, 4)]
    assert d.factors[0].path == "mem.safetensors" and d.factors[0].dtype == "BF16"
    assert d.factors[0].nbytes == 4 * 8 * 2
    assert d.rank == 4
    assert d.scale == 1.0
    assert d.strength == 0.75 and d.coef == 0.75
    assert d.source == "mem.safetensors"


@pytest.mark.parametrize(
    "layout,keys,alpha_key",
    [
        (
            "diffusion_model",
            pair(f"diffusion_model.{Q}.lora_down.weight", f"diffusion_model.{Q}.lora_up.weight"),
            f"diffusion_model.{Q}.alpha",
        ),
        (
            "kohya",
            pair("lora_unet_blocks_0_self_attn_q.lora_down.weight", "lora_unet_blocks_0_self_attn_q.lora_up.weight"),
            "lora_unet_blocks_0_self_attn_q.alpha",
        ),
        (
            "kohya",
            pair("lora_unet__blocks_0_self_attn_q.lora_down.weight", "lora_unet__blocks_0_self_attn_q.lora_up.weight"),
            "lora_unet__blocks_0_self_attn_q.alpha",
        ),
        ("plain", pair(f"{Q}.lora_A.weight", f"{Q}.lora_B.weight"), f"{Q}.alpha"),
    ],
)
def test_layout_with_alpha(layout, keys, alpha_key):
    n = normalize(lora(keys, alphas={alpha_key: 2.0}), BASE, strength=3.0)
    assert n.layout == layout and n.unmatched == []
    (d,) = n.deltas
    assert d.target == f"{Q}.weight"
    assert d.scale == 2.0 / 4  # alpha / rank
    assert d.coef == 0.5 * 3.0


def test_kohya_resolves_underscored_module_names_through_base():
    base = dict(BASE)
    base["blocks.0.ffn.0.weight"] = M("F32", (16, 8))
    keys = {
        **pair("lora_unet_blocks_0_ffn_0.lora_down.weight", "lora_unet_blocks_0_ffn_0.lora_up.weight", out=16),
        **pair("lora_unet_blocks_0_cross_attn_k.lora_down.weight", "lora_unet_blocks_0_cross_attn_k.lora_up.weight"),
    }
    n = normalize(lora(keys), base)
    assert n.layout == "kohya" and n.unmatched == []
    assert sorted(d.target for d in n.deltas) == ["blocks.0.cross_attn.k.weight", "blocks.0.ffn.0.weight"]


def test_conv_lora_on_patch_embedding():
    keys = {
        "diffusion_model.patch_embedding.lora_down.weight": (2, 4, 1, 2, 2),
        "diffusion_model.patch_embedding.lora_up.weight": (8, 2, 1, 1, 1),
    }
    (d,) = normalize(lora(keys), BASE).deltas
    assert d.target == "patch_embedding.weight" and d.rank == 2


# ----------------------------------------------------------------------------------------- diffs


@pytest.mark.parametrize("prefix", ["diffusion_model.", ""])
def test_diff_targets(prefix):
    module = Q
    keys = {f"{prefix}{module}.diff": (8, 8), f"{prefix}{module}.diff_b": (8,), f"{prefix}blocks.0.diff_m": (1, 6, 8)}
    n = normalize(lora(keys), BASE, strength=0.5)
    assert n.unmatched == []
    got = {d.target: (d.kind, [f.key for f in d.factors], d.scale, d.coef) for d in n.deltas}
    assert got == {
        f"{Q}.weight": ("diff", [f"{prefix}{module}.diff"], 1.0, 0.5),
        f"{Q}.bias": ("diff", [f"{prefix}{module}.diff_b"], 1.0, 0.5),
        "blocks.0.modulation": ("diff", [f"{prefix}blocks.0.diff_m"], 1.0, 0.5),
    }
    assert all(d.rank is None for d in n.deltas)


def test_kohya_diffs_resolve_through_base():
    keys = {
        "lora_unet_blocks_0_self_attn_q.diff": (8, 8),
        "lora_unet_blocks_0_self_attn_q.diff_b": (8,),
        "lora_unet_blocks_0.diff_m": (1, 6, 8),
    }
    n = normalize(lora(keys), BASE)
    assert n.layout == "kohya" and n.unmatched == []
    assert sorted(d.target for d in n.deltas) == sorted([f"{Q}.weight", f"{Q}.bias", "blocks.0.modulation"])


def test_diff_and_lora_on_same_module_with_alpha():
    keys = {
        **pair(f"diffusion_model.{Q}.lora_down.weight", f"diffusion_model.{Q}.lora_up.weight", r=2),
        f"diffusion_model.{Q}.diff_b": (8,),
    }
    n = normalize(lora(keys, alphas={f"diffusion_model.{Q}.alpha": 1.0}), BASE)
    got = {d.target: (d.kind, d.scale) for d in n.deltas}
    assert got == {f"{Q}.weight": ("lora", 0.5), f"{Q}.bias": ("diff", 1.0)}  # alpha only scales the pair


def test_diff_shape_mismatch():
    with pytest.raises(MatchError) as ei:
        normalize(lora({f"diffusion_model.{Q}.diff_b": (4,)}), BASE)
    msg = str(ei.value)
    assert "mem.safetensors" in msg and f"diffusion_model.{Q}.diff_b" in msg and f"{Q}.bias" in msg


# ------------------------------------------------------------------------------------- unmatched


def test_a_without_b():
    n = normalize(lora({f"diffusion_model.{Q}.lora_down.weight": (4, 8)}), BASE)
    assert n.deltas == []
    (u,) = n.unmatched
    assert u.key == f"diffusion_model.{Q}.lora_down.weight"
    assert "without" in u.reason and "B/up" in u.reason


def test_b_without_a():
    (u,) = normalize(lora({f"diffusion_model.{Q}.lora_up.weight": (8, 4)}), BASE).unmatched
    assert u.key == f"diffusion_model.{Q}.lora_up.weight" and "A/down" in u.reason


def test_alpha_without_factors():
    n = normalize(lora({}, alphas={f"diffusion_model.{Q}.alpha": 4.0}), BASE)
    (u,) = n.unmatched
    assert u.key == f"diffusion_model.{Q}.alpha" and "alpha" in u.reason


def test_unknown_suffix():
    keys = {
        **pair(f"diffusion_model.{Q}.lora_A.weight", f"diffusion_model.{Q}.lora_B.weight"),
        f"diffusion_model.{Q}.weird_thing": (3,),
    }
    n = normalize(lora(keys), BASE)
    assert len(n.deltas) == 1
    (u,) = n.unmatched
    assert u.key == f"diffusion_model.{Q}.weird_thing" and "unknown key suffix" in u.reason


def test_no_base_tensor_wan21_k_img():
    keys = {
        **pair(f"diffusion_model.{Q}.lora_A.weight", f"diffusion_model.{Q}.lora_B.weight"),
        **pair(
            "diffusion_model.blocks.0.cross_attn.k_img.lora_A.weight",
            "diffusion_model.blocks.0.cross_attn.k_img.lora_B.weight",
        ),
    }
    n = normalize(lora(keys), BASE)
    assert [d.target for d in n.deltas] == [f"{Q}.weight"]
    assert sorted(u.key for u in n.unmatched) == [
        "diffusion_model.blocks.0.cross_attn.k_img.lora_A.weight",
        "diffusion_model.blocks.0.cross_attn.k_img.lora_B.weight",
    ]
    assert all("no base tensor 'blocks.0.cross_attn.k_img.weight'" in u.reason for u in n.unmatched)


def test_kohya_unknown_module_is_unmatched():
    keys = pair("lora_unet_blocks_0_self_attn_z.lora_down.weight", "lora_unet_blocks_0_self_attn_z.lora_up.weight")
    n = normalize(lora(keys), BASE)
    assert n.deltas == [] and len(n.unmatched) == 2
    assert all("no base tensor" in u.reason for u in n.unmatched)


def test_duplicate_role():
    keys = {**pair(f"{Q}.lora_A.weight", f"{Q}.lora_B.weight"), f"{Q}.lora_down.weight": (4, 8)}
    n = normalize(lora(keys), BASE)
    assert len(n.deltas) == 1
    (u,) = n.unmatched
    assert u.key == f"{Q}.lora_down.weight" and "duplicate" in u.reason


def test_empty_lora():
    with pytest.raises(FormatError, match="mem.safetensors"):
        normalize(lora({}), BASE)


# ---------------------------------------------------------------------------------- match errors


def test_rank_mismatch():
    keys = {f"diffusion_model.{Q}.lora_A.weight": (4, 8), f"diffusion_model.{Q}.lora_B.weight": (8, 2)}
    with pytest.raises(MatchError) as ei:
        normalize(lora(keys, path="/x/bad.safetensors"), BASE)
    msg = str(ei.value)
    assert "/x/bad.safetensors" in msg
    assert f"diffusion_model.{Q}.lora_A.weight" in msg and f"'{Q}.weight'" in msg
    assert "rank 4" in msg and "rank 2" in msg


def test_shape_does_not_fit():
    keys = {f"diffusion_model.{Q}.lora_A.weight": (4, 16), f"diffusion_model.{Q}.lora_B.weight": (8, 4)}
    with pytest.raises(MatchError) as ei:
        normalize(lora(keys, path="/x/wide.safetensors"), BASE)
    msg = str(ei.value)
    assert "/x/wide.safetensors" in msg and f"diffusion_model.{Q}.lora_B.weight" in msg
    assert f"'{Q}.weight' (8, 8)" in msg


def test_non_float_target():
    keys = {"diffusion_model.pos_ids.diff": (4,)}
    with pytest.raises(MatchError, match="pos_ids"):
        normalize(lora(keys), {**BASE, "pos_ids.weight": M("I64", (4,))})


def test_non_float_factor():
    lf = LoraFile(
        "m.safetensors",
        "safetensors",
        {
            f"diffusion_model.{Q}.lora_A.weight": M("I8", (4, 8)),
            f"diffusion_model.{Q}.lora_B.weight": M("BF16", (8, 4)),
        },
    )
    with pytest.raises(MatchError, match="I8"):
        normalize(lf, BASE)


@pytest.mark.parametrize("alpha", [torch.tensor([1.0, 2.0]), torch.tensor(float("inf")), torch.tensor(float("nan"))])
def test_bad_alpha(alpha):
    keys = pair(f"diffusion_model.{Q}.lora_A.weight", f"diffusion_model.{Q}.lora_B.weight")
    lf = lora(keys, alphas={f"diffusion_model.{Q}.alpha": 1.0})
    lf._reader.sd[f"diffusion_model.{Q}.alpha"] = alpha
    with pytest.raises(MatchError, match="alpha"):
        normalize(lf, BASE)


def _dse(kind, shapes, w):
    """Call delta_shape_error with factor shapes in (A, B) / (D,) order, whichever form it takes."""
    ann = str(inspect.signature(delta_shape_error).parameters["shapes"].annotation)
    if ann.startswith("dict"):
        shapes = dict(zip(("down", "up") if kind == "lora" else (kind,), shapes))
    return delta_shape_error(kind, shapes, w)


@pytest.mark.parametrize(
    "kind,shapes,w,expected",
    [
        ("lora", ((4, 16), (8, 4)), (8, 16), None),
        ("lora", ((4, 16), (8, 2)), (8, 16), "A has rank 4 but B has rank 2"),
        ("lora", ((4, 16), (6, 4)), (8, 16), "B @ A gives (6, 16) but base needs (8, 16) for shape (8, 16)"),
        ("lora", ((4, 12), (8, 4)), (8, 16), "B @ A gives (8, 12) but base needs (8, 16) for shape (8, 16)"),
        ("lora", ((4,), (8, 4)), (8, 16), "factors must be at least 2-D, found A (4,) and B (8, 4)"),
        ("lora", ((2, 3, 3, 3), (4, 2, 1, 1)), (4, 3, 3, 3), None),
        ("lora", ((2, 27), (4, 2)), (4, 3, 3, 3), None),
        ("lora", ((2, 4, 1, 2, 2), (8, 2, 1, 1, 1)), (8, 4, 1, 2, 2), None),
        (
            "lora",
            ((2, 3, 1, 1), (4, 3, 1, 1)),
            (4, 3, 1, 1),
            "B (4, 3, 1, 1) does not match A's rank 2 (expected (4, 2, 1, …))",
        ),
        (
            "lora",
            ((2, 3, 1, 1), (4, 2, 1, 1)),
            (4, 3, 3, 3),
            "B @ A gives (4, 3) but base needs (4, 27) for shape (4, 3, 3, 3)",
        ),
        ("diff", ((8, 16),), (8, 16), None),
        ("diff", ((8,),), (8, 16), "delta has shape (8,), base needs (8, 16)"),
    ],
)
def test_delta_shape_error(kind, shapes, w, expected):
    got = _dse(kind, shapes, w)
    if expected is None or expected.startswith(("A has rank", "delta has shape")):
        assert got == expected
    else:  # the wording of the other messages may evolve: they must exist and be non-empty
        assert isinstance(got, str) and got.strip(), got


# ------------------------------------------------------------------------------------ real files


@pytest.mark.parametrize(
    "layout,name,alpha,detected,kind",
    [
        ("roll", "diffusion_module.pth", None, "roll", "pickle"),
        ("diffsynth", "ds.safetensors", None, "diffsynth", "safetensors"),
        ("diffusion_model", "dm.safetensors", 8.0, "diffusion_model", "safetensors"),
        ("seko", "seko.safetensors", 2.0, "diffusion_model", "safetensors"),
    ],
)
def test_real_files(tmp_path, tiny_base, tiny_factors, layout, name, alpha, detected, kind):
    path = str(tmp_path / name)
    sd = write_lora(path, tiny_factors, layout=layout, alpha=alpha)
    lf = open_lora(path)
    assert lf.kind == kind and lf.path == path
    assert set(lf.tensors) == set(sd)
    base = open_base(tiny_base)
    n = normalize(lf, base.tensors, strength=0.8)
    assert n.layout == detected and n.unmatched == []
    assert sorted(d.target for d in n.deltas) == sorted(m + ".weight" for m in tiny_factors)
    scale = alpha / 4 if alpha is not None else 1.0
    for d in n.deltas:
        assert d.kind == "lora" and d.rank == 4
        assert d.scale == scale and d.coef == pytest.approx(scale * 0.8, rel=1e-12)
        a, b = tiny_factors[d.target[: -len(".weight")]]
        assert d.factors[0].shape == tuple(a.shape) and d.factors[1].shape == tuple(b.shape)
        assert torch.equal(lf.read(d.factors[0].key), a) and torch.equal(lf.read(d.factors[1].key), b)


def test_open_lora_peft_folder_and_single_file_folder(tmp_path, tiny_factors):
    peft = tmp_path / "adapter"
    peft.mkdir()
    (peft / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 4}')
    write_lora(str(peft / "adapter_model.safetensors"), tiny_factors, layout="diffsynth")
    lf = open_lora(peft)
    assert lf.path == str(peft / "adapter_model.safetensors") and lf.config == {"r": 4, "lora_alpha": 4}
    one = tmp_path / "one"
    write_lora(str(one / "x.pth"), tiny_factors, layout="roll")
    assert open_lora(one).path == str(one / "x.pth")
    write_lora(str(one / "y.safetensors"), tiny_factors, layout="diffsynth")
    with pytest.raises(FormatError, match="2 candidate"):
        open_lora(one)


def test_open_lora_missing_and_unknown_type(tmp_path):
    with pytest.raises(FormatError, match="not found"):
        open_lora(tmp_path / "nope.safetensors")
    p = tmp_path / "x.gguf"
    p.write_bytes(b"GGUF")
    with pytest.raises(FormatError, match="unknown LoRA file type"):
        open_lora(p)


# ------------------------------------------------------------------------------------ pickle safety


class _Payload:
    """Unpickling this would run a shell command creating the marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zipfile", [True, False])
def test_pickle_with_code_is_refused(tmp_path, zipfile):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    torch.save(
        {"x.lora_A.weight": torch.ones(2, 2), "evil": _Payload(str(marker))},
        str(path),
        _use_new_zipfile_serialization=zipfile,
    )
    assert not marker.exists()
    with pytest.raises(FormatError) as ei:
        open_lora(path)
    assert str(path) in str(ei.value) and "refused" in str(ei.value)
    assert not marker.exists()


def test_pickle_state_dict_wrapper_unwrapped(tmp_path, tiny_factors):
    m = "blocks.0.self_attn.q"
    a, b = tiny_factors[m]
    sd = {f"base_model.model.{m}.lora_A.default.weight": a, f"base_model.model.{m}.lora_B.default.weight": b}
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": sd}, str(path))
    lf = open_lora(path)
    assert set(lf.tensors) == set(sd)
    assert lf.tensors[f"base_model.model.{m}.lora_A.default.weight"] == M("BF16", tuple(a.shape))
    assert torch.equal(lf.read(f"base_model.model.{m}.lora_B.default.weight"), b)


def test_legacy_pickle_loads(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"k.lora_A.weight": torch.arange(6.0).reshape(2, 3)}, str(path), _use_new_zipfile_serialization=False)
    lf = open_lora(path)
    assert lf.tensors == {"k.lora_A.weight": M("F32", (2, 3))}
    assert lf.read("k.lora_A.weight").tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]


@pytest.mark.parametrize("obj", [[torch.ones(1)], {"a": 1}, {"a": torch.ones(1), "b": "text"}, {1: torch.ones(1)}])
def test_pickle_not_a_tensor_dict(tmp_path, obj):
    path = tmp_path / "odd.pth"
    torch.save(obj, str(path))
    with pytest.raises(FormatError, match="odd.pth"):
        open_lora(path)


def test_corrupt_pickle(tmp_path):
    path = tmp_path / "junk.pth"
    path.write_bytes(b"not a pickle at all")
    with pytest.raises(FormatError, match="junk.pth"):
        open_lora(path)


def test_safetensors_lora_header_errors_propagate(tmp_path):
    path = tmp_path / "l.safetensors"
    save_file({"x.lora_A.weight": torch.ones(2, 2)}, str(path))
    with open(path, "ab") as f:
        f.write(b"extra")
    with pytest.raises(FormatError, match="trailing"):
        open_lora(path)
