"""End to end through Ray: every issue-2 layout merged into a sharded Wan-shaped base and compared
with a float64 reference rounded once; output layout, determinism, strictness, output safety."""

from __future__ import annotations

import hashlib
import json
import os
import zlib

import pytest
import torch

import distmerge
from distmerge.app.synth import make_factors, write_lora
from distmerge.errors import MatchError, OutputError, ShardWriteError
from distmerge.tasks import writer

from .conftest import snapshot
from .helpers import TINY, assert_close_to_reference, direct_io_works, load_checkpoint, lora_terms, reference_merge

pytestmark = pytest.mark.ray

LAYOUTS = [
    ("roll", "diffusion_module.pth", None),
    ("roll", "roll.safetensors", None),
    ("diffsynth", "epoch-1.safetensors", None),
    ("diffusion_model", "comfy.safetensors", 2.0),
    ("seko", "seko.safetensors", 0.5),
]


@pytest.mark.parametrize("layout,name,alpha", LAYOUTS, ids=[n for _, n, _ in LAYOUTS])
def test_each_layout_matches_float64_reference(ray_local, tiny_base, tiny_factors, tmp_path, layout, name, alpha):
    lora = write_lora(str(tmp_path / name), tiny_factors, layout=layout, alpha=alpha)
    before = snapshot(tiny_base)
    rep = distmerge.merge(tiny_base, [str(tmp_path / name)], str(tmp_path / "out"))
    scale = (alpha / 4) if alpha is not None else 1.0  # rank 4
    base = load_checkpoint(tiny_base)
    ref = reference_merge(base, lora_terms(tiny_factors, scale))
    assert_close_to_reference(load_checkpoint(str(tmp_path / "out")), ref)
    assert rep.pairs_merged == len(tiny_factors) == rep.tensors_merged
    assert rep.tensors_written == len(base)
    expected_layout = {"roll": "roll", "diffsynth": "diffsynth"}.get(layout, "diffusion_model")
    assert rep.loras[0]["layout"] == expected_layout
    assert snapshot(tiny_base) == before  # inputs untouched
    assert len(lora) == 2 * len(tiny_factors) + (len(tiny_factors) if alpha is not None else 0)


def test_dtype_bf16_and_alpha(ray_local, tiny_base, tiny_factors, tmp_path):
    write_lora(str(tmp_path / "l.pth"), tiny_factors)
    distmerge.merge(tiny_base, [str(tmp_path / "l.pth")], str(tmp_path / "out"), dtype="bf16", alpha=0.5)
    ref = reference_merge(load_checkpoint(tiny_base), lora_terms(tiny_factors, 0.5), out_dtype=torch.bfloat16)
    out = load_checkpoint(str(tmp_path / "out"))
    assert all(t.dtype == torch.bfloat16 for t in out.values())
    assert_close_to_reference(out, ref)


def test_two_weighted_loras_sum_before_one_rounding(ray_local, tiny_base, tiny_factors, tmp_path):
    other = make_factors(TINY, rank=2, seed=7, dtype=torch.float32)
    write_lora(str(tmp_path / "a.pth"), tiny_factors)
    write_lora(str(tmp_path / "b.safetensors"), other, layout="seko", alpha=1.0)
    rep = distmerge.merge(
        tiny_base,
        [(str(tmp_path / "a.pth"), 0.7), (str(tmp_path / "b.safetensors"), -0.3)],
        str(tmp_path / "out"),
        dtype="fp16",
    )
    terms = lora_terms(tiny_factors, 0.7)
    for k, v in lora_terms(other, -0.3 * 0.5).items():
        terms[k] = terms.get(k, []) + v
    ref = reference_merge(load_checkpoint(tiny_base), terms, out_dtype=torch.float16)
    assert_close_to_reference(load_checkpoint(str(tmp_path / "out")), ref)
    assert rep.pairs_merged == 2 * len(tiny_factors)
    assert rep.tensors_merged == len(tiny_factors)


def _files_bytes(folder: str) -> dict[str, bytes]:
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


def test_output_bytes_identical_for_any_workers_and_units(ray_local, tiny_base, tiny_factors, tmp_path):
    write_lora(str(tmp_path / "l.pth"), tiny_factors)
    runs = [dict(num_workers=1, unit_size="100GB"), dict(num_workers=2), dict(num_workers=2, unit_size="20KB")]
    outs, units = [], []
    for i, kw in enumerate(runs):
        rep = distmerge.merge(
            tiny_base, [str(tmp_path / "l.pth")], str(tmp_path / f"o{i}"), max_shard_size="400KB", **kw
        )
        outs.append(_files_bytes(str(tmp_path / f"o{i}")))
        units.append(len(rep.units))
    assert units[0] < units[1] < units[2]
    assert outs[0] == outs[1] == outs[2]
    assert len([n for n in outs[0] if n.endswith(".safetensors")]) >= 2


def test_output_layout_index_and_untouched_bytes(ray_local, tiny_base, tiny_factors, tmp_path):
    write_lora(str(tmp_path / "l.pth"), tiny_factors)
    rep = distmerge.merge(
        tiny_base,
        [str(tmp_path / "l.pth")],
        str(tmp_path / "out"),
        max_shard_size="150KB",
        report=str(tmp_path / "r.json"),
    )
    out_dir = str(tmp_path / "out")
    names = sorted(os.listdir(out_dir))
    n = len(rep.shards)
    assert n >= 3
    assert names == sorted(
        [f"diffusion_pytorch_model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        + ["diffusion_pytorch_model.safetensors.index.json", "config.json", "distmerge.json"]
    )
    # the base folder's config travels as it is; the recipe says how the folder was made
    assert (
        open(os.path.join(out_dir, "config.json"), "rb").read()
        == open(os.path.join(tiny_base, "config.json"), "rb").read()
    )
    recipe = json.load(open(os.path.join(out_dir, "distmerge.json")))
    assert recipe["base"]["path"] == os.path.abspath(tiny_base) and recipe["base"]["naming"] == "wan"
    assert [(x["path"], x["weight"], x["layout"]) for x in recipe["loras"]] == [(str(tmp_path / "l.pth"), 1.0, "roll")]
    assert recipe["alpha"] == 1.0 and recipe["dtype"] == "keep" and recipe["distmerge_version"] == distmerge.__version__
    index = json.load(open(os.path.join(out_dir, "diffusion_pytorch_model.safetensors.index.json")))
    assert index["metadata"]["distmerge"]["recipe"] == recipe
    base = load_checkpoint(tiny_base)
    out = load_checkpoint(out_dir)
    assert set(index["weight_map"]) == set(base) == set(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in base.values())
    for k, t in base.items():
        assert out[k].shape == t.shape and out[k].dtype == t.dtype
        if k.removesuffix(".weight") not in tiny_factors:
            assert torch.equal(out[k].view(torch.uint8), t.view(torch.uint8)), k
    report = json.load(open(tmp_path / "r.json"))
    assert report["pairs_merged"] == len(tiny_factors) and report["tensors_written"] == len(base)
    assert report["shards"] == rep.shards and report["unmatched"] == []
    assert len(report["units"]) == len(rep.units) >= 2
    assert {"node_id", "device", "bytes", "seconds"} <= set(report["units"][0])
    assert sum(u["bytes"] for u in report["units"]) == index["metadata"]["total_size"]
    sums = index["metadata"]["distmerge"]["crc32"]  # joined from the tasks' CRCs, never re-read
    assert sorted(sums) == rep.shards and "sha256" not in index["metadata"]["distmerge"]
    for name, digest in sums.items():
        assert f"{zlib.crc32(open(os.path.join(out_dir, name), 'rb').read()):08x}" == digest


def test_single_file_output(ray_local, tiny_base, tiny_factors, tmp_path):
    write_lora(str(tmp_path / "l.safetensors"), tiny_factors, layout="diffusion_model")
    out = str(tmp_path / "merged.safetensors")
    rep = distmerge.merge(tiny_base, [str(tmp_path / "l.safetensors")], out)
    assert rep.shards == ["merged.safetensors"]
    assert sorted(os.listdir(tmp_path)) == [
        "l.safetensors",
        "merged.safetensors",
        "merged.safetensors.crc32",
        "merged.safetensors.distmerge.json",
    ]
    assert json.load(open(out + ".distmerge.json"))["loras"][0]["layout"] == "diffusion_model"
    assert open(out + ".crc32").read() == f"{zlib.crc32(open(out, 'rb').read()):08x}  merged.safetensors\n"
    again = distmerge.merge(tiny_base, [str(tmp_path / "l.safetensors")], out, overwrite=True, checksum="sha256")
    assert again.shards == ["merged.safetensors"]  # the crc32 sidecar of the first run is replaced
    assert sorted(os.listdir(tmp_path)) == [
        "l.safetensors",
        "merged.safetensors",
        "merged.safetensors.distmerge.json",
        "merged.safetensors.sha256",
    ]
    digest = hashlib.sha256(open(out, "rb").read()).hexdigest()
    assert open(out + ".sha256").read() == f"{digest}  merged.safetensors\n"
    # O_DIRECT only while no driver thread reads the output back (the SHA-256 hasher does)
    assert sum(u.direct_bytes for u in again.units) == 0
    local = writer.filesystem_type(str(tmp_path)) in writer.DIRECT_FILESYSTEMS
    assert (sum(u.direct_bytes for u in rep.units) > 0) == (local and direct_io_works(str(tmp_path)))
    assert_close_to_reference(
        load_checkpoint(out), reference_merge(load_checkpoint(tiny_base), lora_terms(tiny_factors, 1.0))
    )


def test_existing_ray_session_is_reused_and_left_running(ray_local, tiny_base, tiny_factors, tmp_path):
    write_lora(str(tmp_path / "l.pth"), tiny_factors)
    rep = distmerge.merge(tiny_base, [str(tmp_path / "l.pth")], str(tmp_path / "out"))
    assert rep.ray["mode"] == "existing"
    assert ray_local.is_initialized()


def test_unmatched_keys_are_an_error_unless_skipped(ray_local, tiny_base, tiny_factors, tmp_path):
    sd = {f"diffusion_model.{m}.lora_A.weight": a for m, (a, b) in tiny_factors.items()}
    sd.update({f"diffusion_model.{m}.lora_B.weight": b for m, (a, b) in tiny_factors.items()})
    # Wan2.1-I2V keys that have no target in a Wan2.2 base
    sd["diffusion_model.blocks.0.cross_attn.k_img.lora_A.weight"] = torch.zeros(4, 64)
    sd["diffusion_model.blocks.0.cross_attn.k_img.lora_B.weight"] = torch.zeros(64, 4)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "i2v.safetensors"))
    with pytest.raises(MatchError, match=r"2 LoRA tensor\(s\) cannot be placed.*k_img.*--skip-unmatched"):
        distmerge.merge(tiny_base, [str(tmp_path / "i2v.safetensors")], str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")
    rep = distmerge.merge(tiny_base, [str(tmp_path / "i2v.safetensors")], str(tmp_path / "out"), skip_unmatched=True)
    assert rep.pairs_merged == len(tiny_factors)
    assert sorted(u["key"] for u in rep.unmatched) == [
        "diffusion_model.blocks.0.cross_attn.k_img.lora_A.weight",
        "diffusion_model.blocks.0.cross_attn.k_img.lora_B.weight",
    ]
    assert "2 unmatched LoRA keys skipped" in rep.summary_line()


def test_zero_pairs_is_always_an_error(ray_local, tiny_base, tmp_path):
    from safetensors.torch import save_file

    save_file(
        {
            "diffusion_model.img_emb.proj.1.lora_A.weight": torch.zeros(2, 8),
            "diffusion_model.img_emb.proj.1.lora_B.weight": torch.zeros(8, 2),
        },
        str(tmp_path / "x.safetensors"),
    )
    with pytest.raises(MatchError, match="no LoRA tensor matches"):
        distmerge.merge(tiny_base, [str(tmp_path / "x.safetensors")], str(tmp_path / "out"), skip_unmatched=True)
    assert not os.path.exists(tmp_path / "out")


def test_output_location_rules(ray_local, tiny_base, tiny_factors, tmp_path):
    lora = str(tmp_path / "l.pth")
    write_lora(lora, tiny_factors)
    with pytest.raises(OutputError, match="inside its folder"):
        distmerge.merge(tiny_base, [lora], os.path.join(tiny_base, "merged"))
    with pytest.raises(OutputError, match="must not be the base"):
        distmerge.merge(tiny_base, [lora], tiny_base, overwrite=True)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty.*--overwrite"):
        distmerge.merge(tiny_base, [lora], str(out))
    first = distmerge.merge(tiny_base, [lora], str(out), overwrite=True, max_shard_size="200KB")
    second = distmerge.merge(tiny_base, [lora], str(out), overwrite=True, max_shard_size="5GB")
    assert len(first.shards) > 1 and len(second.shards) == 1
    # the earlier distmerge shards are gone, the user's file stays
    assert sorted(os.listdir(out)) == sorted(
        second.shards + ["diffusion_pytorch_model.safetensors.index.json", "notes.txt", "config.json", "distmerge.json"]
    )


def test_failed_task_publishes_nothing(ray_local, tiny_base, tiny_factors, tmp_path):
    bad = dict(tiny_factors)
    a, b = bad["blocks.1.ffn.0"]
    b = b.clone()
    b[0, 0] = float("nan")
    bad["blocks.1.ffn.0"] = (a, b)
    write_lora(str(tmp_path / "nan.pth"), bad)
    with pytest.raises(ShardWriteError, match=r"blocks\.1\.ffn\.0\.weight.*NaN/Inf.*nan\.pth"):
        distmerge.merge(tiny_base, [str(tmp_path / "nan.pth")], str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_merge_from_hugging_face_cache_references(ray_local, tiny_base, tiny_factors, tmp_path, monkeypatch):
    """``--base owner/repo/sub`` and ``--lora owner/repo/file`` read the cached snapshots (through
    their blob links); the result equals the merge of the same files by path, and the recipe
    names the references and the commit."""
    from .test_hub import COMMIT, cache_repo, folder_files

    cache = str(tmp_path / "hf-cache")
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    lora = str(tmp_path / "high_noise_model.safetensors")
    write_lora(lora, tiny_factors, layout="diffusion_model")
    cache_repo(cache, "Wan-AI/Wan2.2-I2V-A14B", folder_files(tiny_base, "high_noise_model"))
    cache_repo(cache, "lightx2v/Wan2.2-Lightning", {"4steps/high_noise_model.safetensors": lora})
    by_ref = str(tmp_path / "by-ref")
    distmerge.merge(
        "Wan-AI/Wan2.2-I2V-A14B/high_noise_model",
        ["lightx2v/Wan2.2-Lightning/4steps/high_noise_model.safetensors"],
        by_ref,
    )
    by_path = str(tmp_path / "by-path")
    distmerge.merge(tiny_base, [lora], by_path)
    a, b = load_checkpoint(by_ref), load_checkpoint(by_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    recipe = json.load(open(os.path.join(by_ref, "distmerge.json")))
    assert recipe["base"]["reference"] == "Wan-AI/Wan2.2-I2V-A14B/high_noise_model"
    assert recipe["loras"][0]["reference"] == "lightx2v/Wan2.2-Lightning/4steps/high_noise_model.safetensors"
    assert recipe["base"]["commit"] == recipe["loras"][0]["commit"] == COMMIT
    assert not os.path.islink(os.path.join(by_ref, "config.json"))  # copied content, not the cache's link
