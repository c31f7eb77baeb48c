"""fp8 bases and outputs: the quantize math on hand-computed tensors, the layout of weight/scale
pairs, and merges through Ray into scaled-fp8 (ComfyUI ``…_fp8_scaled``) and plain fp8 bases,
plus ``--dtype fp8_e4m3fn``. References are computed here with plain torch, independently of
``distmerge.fp8``; ComfyUI itself is not needed (its loader convention is emulated in ``_comfy_load``).
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from safetensors.torch import save_file

import distmerge
from distmerge.app.synth import BLOCK_LINEARS, make_factors, write_lora, write_wan_base
from distmerge.app.verify import verify
from distmerge.errors import PlanError, ShardWriteError
from distmerge.inputs.checkpoint import open_base
from distmerge.inputs.header import TensorInfo
from distmerge.plan.fp8 import scaled_layout
from distmerge.plan.layout import layout_shard
from distmerge.plan.merge_plan import make_plan
from distmerge.tasks.fp8 import fresh_scale, quantize
from distmerge.tasks.mergemath import NonFiniteError

from .helpers import TINY, load_checkpoint

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FMAX = {E4M3: 448.0, E5M2: 57344.0}
LINEARS = [f"blocks.{n}.{m}" for n in range(TINY.blocks) for m in BLOCK_LINEARS]
#: every Linear of the T2V Wan model (``comfy/ldm/wan/model.py`` ``WanModel``): what --dtype fp8 quantizes
ALL_LINEARS = ["text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2", "time_projection.1"]
ALL_LINEARS += [*LINEARS, "head.head"]
#: the LoRA touches block 0 and block 1's ffn; the other block-1 linears stay untouched
MERGED = [m for m in LINEARS if m.startswith("blocks.0.") or ".ffn." in m]


# --------------------------------------------------------------------------------------------- pure math


def test_quantize_hand_computed_e4m3fn():
    # amax 7 -> scale 7/448 = 1/64; codes = w * 64: 70.4 -> 72 (steps of 8 in [64, 128)), 68 ties to
    # even 64, 76 ties to even 80, -0.64 -> -0.625 (steps of 1/16 in [0.5, 1))
    w = torch.tensor([[7.0, 1.1, 1.0625], [1.1875, -0.01, 0.0]])
    q, s = quantize(w, "F8_E4M3")
    assert q.dtype == E4M3 and s.dtype == torch.float32 and s.shape == ()
    assert s.item() == 1 / 64
    assert q.float().tolist() == [[448.0, 72.0, 64.0], [80.0, -0.625, 0.0]]
    assert w.tolist()[0][0] == 7.0  # not modified without inplace


def test_quantize_e5m2_and_largest_lands_on_max():
    w = torch.tensor([-3.0, 1.5, 0.7])
    q, s = quantize(w, "F8_E5M2")
    assert s.item() == pytest.approx(3.0 / 57344, rel=1e-7)
    assert q.dtype == E5M2 and q.float()[0].item() == -57344.0
    # 1.5 / s = 28672 exactly (1.75 · 2^14 is an e5m2 value); 0.7/s = 13380.3 -> 12288 or 14336
    assert q.float()[1].item() == 28672.0 and q.float()[2].item() in (12288.0, 14336.0)


def test_quantize_zero_tensor_scale_one_and_nan_refused():
    q, s = quantize(torch.zeros(3, 4), "F8_E4M3")
    assert s.item() == 1.0 and not q.float().any()
    assert fresh_scale(0.0, "F8_E4M3").item() == 1.0
    with pytest.raises(NonFiniteError):
        quantize(torch.tensor([1.0, float("nan")]), "F8_E4M3")
    with pytest.raises(NonFiniteError):
        quantize(torch.tensor([1.0, float("inf")]), "F8_E4M3")


def test_quantize_uses_the_rounded_scale():
    """With a bf16 scale the codes are computed against the scale as stored, so the largest value
    still dequantizes to within one fp8 step of amax and nothing saturates beyond ±448."""
    w = torch.tensor([3.3, -1.0, 0.5])
    q, s = quantize(w, "F8_E4M3", scale_dtype=torch.bfloat16)
    assert s.dtype == torch.bfloat16
    expect = (w / s.float()).clamp(-448, 448).to(E4M3)
    assert torch.equal(q.view(torch.uint8), expect.view(torch.uint8))


def test_quantize_inplace_and_out_buffer():
    w = torch.tensor([2.0, -1.0, 0.25, 0.1])
    out = torch.empty(4, dtype=E4M3)
    q, s = quantize(w.clone(), "F8_E4M3", out=out, inplace=True)
    assert q is out
    ref, _ = quantize(w, "F8_E4M3")
    assert torch.equal(out.view(torch.uint8), ref.view(torch.uint8))
    assert s.item() == torch.tensor(2.0 / 448, dtype=torch.float32).item()


# --------------------------------------------------------------------------------------------- layout / plan


def test_layout_attach_keeps_pairs_adjacent_and_aligned():
    entries = [
        ("a.scale_weight", "F32", ()),
        ("b", "F32", (3,)),
        ("n", "BF16", (3,)),
        ("a.weight", "F8_E4M3", (4, 2)),
        ("m", "F8_E4M3", (3,)),
    ]
    plain = layout_shard(entries)
    lay = layout_shard(entries, attach={"a.scale_weight": "a.weight"})
    order = [e.key for e in lay.entries]
    assert order == ["b", "a.weight", "a.scale_weight", "n", "m"]
    assert [e.key for e in plain.entries] == ["a.scale_weight", "b", "n", "a.weight", "m"]
    for e in lay.entries:
        assert (e.offset - lay.data_start) % {"F32": 4, "BF16": 2, "F8_E4M3": 1}[e.dtype] == 0
    assert lay.size - lay.data_start == plain.size - plain.data_start == 4 + 12 + 6 + 8 + 3  # no holes
    with pytest.raises(ValueError, match="misaligned"):
        layout_shard([("s", "F32", ()), ("w", "F8_E4M3", (3,))], attach={"s": "w"})


def _info(key: str, code: str, shape: tuple[int, ...]) -> TensorInfo:
    from distmerge.inputs.dtypes import itemsize

    n = 1
    for d in shape:
        n *= d
    return TensorInfo(key, code, shape, "base.safetensors", 0, n * itemsize(code))


def test_scaled_layout_detection_and_refusals():
    base = {
        t.key: t
        for t in [
            _info("scaled_fp8", "F8_E4M3", (0,)),
            _info("blocks.0.q.weight", "F8_E4M3", (4, 4)),
            _info("blocks.0.q.scale_weight", "F32", ()),
            _info("blocks.0.q.scale_input", "F32", ()),
            _info("blocks.0.k.weight", "F8_E4M3", (4, 4)),
            _info("blocks.0.k.weight_scale", "F32", ()),
            _info("blocks.0.v.weight", "F8_E4M3", (4, 4)),  # no scale: refused if merged
            _info("blocks.0.norm3.weight", "BF16", (4,)),
        ]
    }
    lay = scaled_layout(base, None, path="b")
    assert lay.marker == "scaled_fp8"
    assert lay.scales == {
        "blocks.0.q.weight": "blocks.0.q.scale_weight",
        "blocks.0.k.weight": "blocks.0.k.weight_scale",
    }
    assert lay.new_scales == {} and lay.new_marker is None
    lay.check_merge("blocks.0.q.weight", base)
    lay.check_merge("blocks.0.norm3.weight", base)
    with pytest.raises(
        PlanError,
        match=r"'blocks\.0\.v\.weight' is F8_E4M3 .*marker 'scaled_fp8'.*"
        r"no 'blocks\.0\.v\.scale_weight'",
    ):
        lay.check_merge("blocks.0.v.weight", base)
    with pytest.raises(PlanError, match=r"--dtype bf16 would need its weights dequantized"):
        scaled_layout(base, "BF16", path="b")
    with pytest.raises(PlanError, match=r"fp8_e4m3fn.*--dtype fp8_e5m2 would mix"):
        scaled_layout(base, "F8_E5M2", path="b")
    assert scaled_layout(base, "F8_E4M3", path="b").new_scales == {}  # already scaled: nothing added


def test_scaled_layout_dtype_fp8_picks_every_linear_and_marker_prefix():
    """Every Linear of the diffusion model of a full checkpoint, embedders and head included (ComfyUI
    builds them all with ``scaled_fp8_ops``, ``comfy/ops.py`` ``pick_operations``); the text encoder
    and VAE of the checkpoint are built without them (only ``{unet_prefix}scaled_fp8`` is read,
    ``comfy/model_detection.py``), so their Linears stay."""
    p = "model.diffusion_model."
    keys = [
        (p + "patch_embedding.weight", "BF16", (8, 4, 1, 2, 2)),
        (p + "text_embedding.0.weight", "BF16", (8, 4)),
        (p + "blocks.0.self_attn.q.weight", "BF16", (8, 8)),
        (p + "blocks.0.self_attn.q.bias", "BF16", (8,)),
        (p + "blocks.0.self_attn.norm_q.weight", "BF16", (8,)),
        (p + "blocks.0.modulation", "F32", (1, 6, 8)),
        (p + "blocks.0.ffn.0.weight", "F32", (12, 8)),
        (p + "head.head.weight", "BF16", (4, 8)),
        ("cond_stage_model.transformer.encoder.layers.0.mlp.fc1.weight", "BF16", (8, 8)),
    ]
    base = {k: _info(k, c, s) for k, c, s in keys}
    lay = scaled_layout(base, "F8_E4M3", path="b")
    linears = ["text_embedding.0", "blocks.0.self_attn.q", "blocks.0.ffn.0", "head.head"]
    assert lay.new_scales == {p + m + ".weight": p + m + ".scale_weight" for m in linears}
    assert lay.new_inputs == {p + m + ".weight": p + m + ".scale_input" for m in linears}
    assert lay.new_marker == p + "scaled_fp8"
    assert lay.new_tensors()[p + "scaled_fp8"] == ("F8_E4M3", (0,))
    assert lay.new_tensors()[p + "head.head.scale_input"] == ("F32", ())
    changed = {k: lay.out_code(k, c) for k, c, _ in keys if lay.out_code(k, c) != c}
    assert changed == {p + m + ".weight": "F8_E4M3" for m in linears}


# --------------------------------------------------------------------------------------------- helpers (e2e)


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _requant(w32: torch.Tensor, dt: torch.dtype = E4M3) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference requantization: fresh per-tensor scale amax/fp8_max (float32), round to nearest."""
    s = w32.abs().amax() / FMAX[dt]
    return (w32 / s).clamp(-FMAX[dt], FMAX[dt]).to(dt), s


def _scaled_base(
    src: dict[str, torch.Tensor], folder, *, suffix: str = ".scale_weight", drop_scale: str | None = None
) -> dict[str, torch.Tensor]:
    """A ComfyUI-style scaled-fp8 single file from the tiny fp32 Wan base: the 20 block linears in
    e4m3fn with float32 scalar scales (and a ``scale_input`` on the self-attention q), the rest bf16,
    a bare ``scaled_fp8`` marker."""
    sd: dict[str, torch.Tensor] = {"scaled_fp8": torch.empty(0, dtype=E4M3)}
    for k, w in src.items():
        m = k[: -len(".weight")]
        if m in LINEARS and k.endswith(".weight"):
            sd[k], s = _requant(w.float())
            if k != drop_scale:
                sd[m + suffix] = s.reshape(())
            if m.endswith("self_attn.q"):
                sd[m + ".scale_input"] = torch.tensor(1.0)
        else:
            sd[k] = w.to(torch.bfloat16)
    os.makedirs(folder, exist_ok=True)
    save_file(sd, os.path.join(folder, "wan_fp8_scaled.safetensors"))
    return sd


def _comfy_load(sd: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """ComfyUI's legacy scaled-fp8 reading, emulated: the marker ``{prefix}scaled_fp8`` (its dtype
    names the fp8 type), each fp8 ``.weight`` times its ``.scale_weight`` (1.0 if absent)."""
    assert prefix + "scaled_fp8" in sd
    out = {}
    for k, v in sd.items():
        if k.endswith(".weight") and v.dtype in (E4M3, E5M2):
            out[k] = v.float() * sd.get(k[: -len(".weight")] + ".scale_weight", torch.tensor(1.0)).float()
        elif not k.endswith((".scale_weight", ".scale_input")) and k != prefix + "scaled_fp8":
            out[k] = v.float()
    return out


@pytest.fixture(scope="module")
def fp32_sd(tiny_base) -> dict[str, torch.Tensor]:
    return load_checkpoint(tiny_base)


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> tuple[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    factors = make_factors(TINY, rank=4, dtype=torch.bfloat16, modules=MERGED)
    path = str(tmp_path_factory.mktemp("lora") / "diffusion_module.pth")
    write_lora(path, factors, layout="roll")
    return path, factors


def _dw(factors, m: str) -> torch.Tensor:
    a, b = factors[m]
    return b.double() @ a.double()


# --------------------------------------------------------------------------------------------- e2e: scaled


@pytest.mark.ray
@pytest.mark.parametrize("suffix", [".scale_weight", ".weight_scale"])
def test_merge_into_scaled_fp8_base(ray_local, fp32_sd, lora, tmp_path, suffix):
    path, factors = lora
    base = _scaled_base(fp32_sd, tmp_path / "base", suffix=suffix)
    out_dir = tmp_path / "out"
    rep = distmerge.merge(str(tmp_path / "base"), [(path, 0.75)], str(out_dir), unit_size="3KB")
    assert rep.pairs_merged == len(MERGED) and rep.tensors_merged == len(MERGED)
    assert len(rep.units) > 4  # small units: every weight/scale pair still written by one task
    out = load_checkpoint(str(out_dir))
    assert set(out) == set(base)
    for k, v in base.items():
        m = k.removesuffix(".weight").removesuffix(suffix)
        if m in MERGED and k.endswith((".weight", suffix)):
            continue
        assert out[k].dtype == v.dtype and _raw(out[k]) == _raw(v), k  # untouched: byte for byte
    for m in MERGED:
        w32 = base[m + ".weight"].float() * base[m + suffix]
        q, s = _requant((w32.double() + 0.75 * _dw(factors, m)).float())
        got_q, got_s = out[m + ".weight"], out[m + suffix]
        assert got_q.dtype == E4M3 and got_s.dtype == torch.float32 and got_s.shape == ()
        assert _raw(got_s) == _raw(s), m
        assert _raw(got_q) == _raw(q), m
        assert got_q.float().abs().max().item() == 448.0
    res = verify(str(tmp_path / "base"), [(path, 0.75)], str(out_dir), full=True)
    assert res.ok, res.verdict
    assert res.merged == len(MERGED) and res.worst_ulp <= 1


@pytest.mark.ray
def test_verify_catches_a_wrong_scale(ray_local, fp32_sd, lora, tmp_path):
    path, _ = lora
    _scaled_base(fp32_sd, tmp_path / "base")
    out = str(tmp_path / "merged.safetensors")
    distmerge.merge(str(tmp_path / "base"), [path], out)
    info = open_base(out).tensors["blocks.0.self_attn.k.scale_weight"]
    with open(out, "r+b") as f:  # double the scale: every value off by 2x, codes unchanged
        f.seek(info.offset)
        s = torch.frombuffer(bytearray(f.read(4)), dtype=torch.float32)[0].item()
        f.seek(info.offset)
        f.write(_raw(torch.tensor([2 * s], dtype=torch.float32)))
    os.remove(out + ".crc32")  # the checksum would catch it anyway: check the values themselves
    res = verify(str(tmp_path / "base"), [path], out, full=True)
    assert not res.ok and "blocks.0.self_attn.k.weight" in res.verdict and "fp8 ulp" in res.verdict


@pytest.mark.ray
def test_missing_scale_is_refused(ray_local, fp32_sd, lora, tmp_path):
    path, _ = lora
    _scaled_base(fp32_sd, tmp_path / "base", drop_scale="blocks.0.cross_attn.v.weight")
    with pytest.raises(
        PlanError,
        match=r"wan_fp8_scaled\.safetensors: 'blocks\.0\.cross_attn\.v\.weight' is "
        r"F8_E4M3 .*no 'blocks\.0\.cross_attn\.v\.scale_weight'",
    ):
        distmerge.merge(str(tmp_path / "base"), [path], str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.ray
def test_scaled_base_with_non_fp8_dtype_is_refused(ray_local, fp32_sd, lora, tmp_path):
    path, _ = lora
    _scaled_base(fp32_sd, tmp_path / "base")
    with pytest.raises(PlanError, match=r"scaled-fp8 checkpoint \('scaled_fp8'\); --dtype bf16"):
        distmerge.merge(str(tmp_path / "base"), [path], str(tmp_path / "out"), dtype="bf16")


# --------------------------------------------------------------------------------------------- e2e: plain fp8


@pytest.mark.ray
def test_merge_into_plain_fp8_base(ray_local, fp32_sd, lora, tmp_path):
    path, factors = lora
    base = {k: v.to(E5M2 if "ffn" in k else E4M3) for k, v in fp32_sd.items()}
    os.makedirs(tmp_path / "base")
    save_file(base, str(tmp_path / "base" / "model.safetensors"))
    distmerge.merge(str(tmp_path / "base"), [path], str(tmp_path / "out"))
    out = load_checkpoint(str(tmp_path / "out"))
    assert set(out) == set(base) and "scaled_fp8" not in out
    for k, v in base.items():
        m = k.removesuffix(".weight")
        if m in MERGED and k.endswith(".weight"):
            ref = (v.double() + _dw(factors, m)).float().to(v.dtype)  # rounded once, no scale
            assert out[k].dtype == v.dtype and _raw(out[k]) == _raw(ref), k
        else:
            assert _raw(out[k]) == _raw(v), k
    res = verify(str(tmp_path / "base"), [path], str(tmp_path / "out"), full=True)
    assert res.ok, res.verdict


@pytest.mark.ray
def test_plain_fp8_overflow_is_an_error(ray_local, fp32_sd, tmp_path):
    base = {k: v.to(E4M3) for k, v in fp32_sd.items()}
    os.makedirs(tmp_path / "base")
    save_file(base, str(tmp_path / "base" / "model.safetensors"))
    big = str(tmp_path / "big.safetensors")
    save_file(
        {
            "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.full((1, TINY.dim), 30.0),
            "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.full((TINY.dim, 1), 30.0),
        },
        big,
    )
    with pytest.raises(
        ShardWriteError,
        match=r"'blocks\.0\.self_attn\.q\.weight' overflows F8_E4M3.*beyond the "
        r"largest torch\.float8_e4m3fn value 448",
    ):
        distmerge.merge(str(tmp_path / "base"), [big], str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


# --------------------------------------------------------------------------------------------- e2e: --dtype fp8


@pytest.mark.ray
@pytest.mark.parametrize("dtype,dt,rel", [("fp8_e4m3fn", E4M3, 2.0**-4), ("fp8_e5m2", E5M2, 2.0**-3)])
def test_dtype_fp8_writes_a_scaled_checkpoint(ray_local, lora, tmp_path, dtype, dt, rel):
    path, factors = lora
    bf16 = dataclasses.replace(TINY, dtype="BF16")
    write_wan_base(str(tmp_path / "bf16"), bf16, num_shards=2)
    base = load_checkpoint(str(tmp_path / "bf16"))
    out_dir = str(tmp_path / "out")
    rep = distmerge.merge(str(tmp_path / "bf16"), [path], out_dir, dtype=dtype, max_shard_size="100KB")
    out = load_checkpoint(out_dir)
    assert len(rep.shards) >= 2
    new = set(out) - set(base)
    assert new == {"scaled_fp8"} | {m + s for m in ALL_LINEARS for s in (".scale_weight", ".scale_input")}
    assert out["scaled_fp8"].dtype == dt and out["scaled_fp8"].shape == (0,)
    stayed = {k for k, v in out.items() if v.dtype == torch.bfloat16}
    assert stayed == set(base) - {m + ".weight" for m in ALL_LINEARS}  # conv, norms, biases, modulation
    assert {"patch_embedding.weight", "blocks.0.modulation", "blocks.0.norm3.weight", "head.modulation"} <= stayed
    assert "blocks.1.ffn.2.bias" in stayed and "text_embedding.0.weight" not in stayed
    for k in stayed:
        assert _raw(out[k]) == _raw(base[k]), k
    loaded = _comfy_load(out)
    for m in ALL_LINEARS:
        s = out[m + ".scale_weight"]
        assert out[m + ".weight"].dtype == dt and s.dtype == torch.float32 and s.shape == ()
        assert out[m + ".scale_input"].dtype == torch.float32 and out[m + ".scale_input"].tolist() == 1.0
        ref = base[m + ".weight"].double() + (_dw(factors, m) if m in MERGED else 0.0)
        ref = ref.float()
        assert _raw(out[m + ".weight"]) == _raw(_requant(ref, dt)[0]), m  # one rounding from float32
        err = (loaded[m + ".weight"].double() - ref.double()).abs()
        tiny = float(s) * (2.0**-10 if dt == E4M3 else 2.0**-17)  # half the smallest subnormal step
        assert bool((err <= ref.double().abs() * rel + tiny).all()), m
    res = verify(str(tmp_path / "bf16"), [path], out_dir, dtype=dtype, full=True)
    assert res.ok, res.verdict


def test_dtype_fp8_plan_keeps_pairs_in_one_unit(tiny_base, lora):
    path, _ = lora
    from distmerge.app.api import collect_deltas

    base = open_base(tiny_base)
    deltas = collect_deltas(base, [(path, 1.0)]).deltas
    plan = make_plan(base, deltas, out_dtype="F8_E4M3", unit_size=1000, max_shard_size="60KB")
    assert len(plan.units) > 10
    for u in plan.units:
        for i, t in enumerate(u.tensors):
            if t.quant:
                follower, inp = u.tensors[i + 1], u.tensors[i + 2]  # the scale, then the input scale
                assert follower.key == t.scale_key and follower.derived_from == t.key
                assert follower.out_offset == t.out_offset + t.out_nbytes and follower.out_offset % 4 == 0
                assert inp.key == t.input_key == t.key.removesuffix(".weight") + ".scale_input"
                assert inp.derived_from == t.key and inp.out_offset == follower.out_offset + 4
                assert t.whole and (t.action == "merge") == (t.key[: -len(".weight")] in MERGED)
                n = t.out_nbytes  # fp8: one byte per element; fp32 source, float64-sized accumulator
                assert u.memory >= 2 * 4 * n + 8 * n + 4 * n
    assert plan.weight_map["scaled_fp8"] == plan.shards[-1].name
