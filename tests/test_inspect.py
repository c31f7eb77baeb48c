"""``distmerge inspect``: layout, groups, scale and base checks before any merge (no Ray)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import save_file

from distmerge.app.inspect import format_description, inspect_lora
from distmerge.app.synth import BLOCK_LINEARS, write_lora
from distmerge.tasks.writer import write_safetensors


def test_describes_seko_groups_with_alpha_and_scale(tiny_base, tiny_factors, tmp_path):
    path = str(tmp_path / "seko.safetensors")
    write_lora(path, tiny_factors, layout="seko", alpha=2.0)
    d = inspect_lora(path, tiny_base)
    assert d.layout == "diffusion_model" and d.deltas == len(tiny_factors) and d.ok
    groups = {g["group"]: g for g in d.groups}
    assert set(groups) == {f"blocks.N.{m}" for m in BLOCK_LINEARS}  # the layers the generator wrote factors for
    q = groups["blocks.N.self_attn.q"]
    assert (q["modules"], q["rank"], q["alpha"], q["scale"]) == (2, 4, 2.0, 0.5)
    assert d.matched_targets == len(tiny_factors) and d.unmatched == []
    text = format_description(d)
    assert "layout: diffusion_model" in text and "scale=0.5" in text and "shapes ok" in text


def test_reports_unmatched_and_bad_shapes_against_the_base(tiny_base, tmp_path):
    path = str(tmp_path / "i2v.safetensors")
    save_file(
        {
            "diffusion_model.blocks.0.cross_attn.k_img.lora_A.weight": torch.zeros(4, 64),
            "diffusion_model.blocks.0.cross_attn.k_img.lora_B.weight": torch.zeros(64, 4),
            "diffusion_model.blocks.0.ffn.0.lora_A.weight": torch.zeros(4, 63),
            "diffusion_model.blocks.0.ffn.0.lora_B.weight": torch.zeros(96, 4),
        },
        path,
    )
    d = inspect_lora(path, tiny_base)
    assert not d.ok
    assert d.error and "blocks.0.ffn.0.weight" in d.error
    alone = inspect_lora(path)  # without a base: no target checks, both pairs described
    assert alone.ok and alone.deltas == 2


def test_cli_text_json_and_exit_codes(tiny_base, tiny_factors, tmp_path):
    good = str(tmp_path / "diffusion_module.pth")
    write_lora(good, tiny_factors)
    bad = str(tmp_path / "bad.safetensors")
    save_file(
        {
            "diffusion_model.img_emb.proj.1.lora_A.weight": torch.zeros(2, 8),
            "diffusion_model.img_emb.proj.1.lora_B.weight": torch.zeros(8, 2),
        },
        bad,
    )
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "distmerge", "inspect", *a],
        capture_output=True,
        text=True,
        timeout=120,
    )
    r = run("--lora", good, "--base", tiny_base)
    assert r.returncode == 0 and "layout: roll" in r.stdout and "20 target tensors matched" in r.stdout
    r = run("--lora", good, "--lora", bad, "--base", tiny_base, "--json")
    assert r.returncode == 1
    data = json.loads(r.stdout)
    assert [d["layout"] for d in data] == ["roll", "diffusion_model"]
    assert [len(d["unmatched"]) for d in data] == [0, 2]


def test_zero_dim_tensors_are_written(tmp_path):
    path = str(tmp_path / "s.safetensors")
    write_safetensors(path, {"alpha": torch.tensor(8.0), "w": torch.ones(2)})
    from safetensors.torch import load_file

    out = load_file(path)
    assert out["alpha"].item() == 8.0 and out["alpha"].shape == () and os.path.getsize(path) > 12
