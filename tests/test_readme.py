"""The README's Python examples run as written (on tiny inputs placed where they name them), so the
README cannot drift from the public API again."""

from __future__ import annotations

import os
import re

import pytest
import torch

from distmerge.app.synth import make_factors, write_lora, write_wan_base

from .helpers import TINY

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _python_blocks() -> list[str]:
    with open(README, encoding="utf-8") as f:
        return re.findall(r"^```python\n(.*?)^```", f.read(), flags=re.S | re.M)


def test_readme_has_the_examples():
    blocks = _python_blocks()
    assert len(blocks) >= 3
    assert any("distmerge.merge(" in b for b in blocks) and any("verify_output(" in b for b in blocks)


@pytest.mark.ray
def test_readme_python_examples_run(tmp_path, monkeypatch, ray_local, capsys):
    monkeypatch.chdir(tmp_path)
    write_wan_base("Wan2.2-T2V-A14B/low_noise_model", TINY, num_shards=2)
    write_wan_base("my-finetune/low_noise_model", TINY, num_shards=2, seed=1)
    write_lora("diffusion_module.pth", make_factors(TINY, rank=4, dtype=torch.bfloat16))
    write_lora(
        "lightning.safetensors", make_factors(TINY, rank=2, dtype=torch.bfloat16, seed=5), layout="seko", alpha=1.0
    )
    namespace: dict[str, object] = {}
    for block in _python_blocks():
        exec(compile(block, README, "exec"), namespace)  # noqa: S102 - our own README
    printed = capsys.readouterr().out
    assert "merged 40 pairs" in printed and "/merged/low_noise_model\n" in printed
    assert "verify: OK" in printed
    assert os.path.isfile("lora.safetensors")
