"""Fixtures: tiny on-disk Wan-shaped checkpoints and one shared local Ray session per module."""

from __future__ import annotations

import os

import pytest
import torch

from distmerge.app.synth import make_factors, write_lora, write_wan_base

from .helpers import TINY, start_local_ray


@pytest.fixture(autouse=True)
def _no_inherited_ray_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> str:
    """A 3-shard fp32 Wan-shaped base (dim 64, 2 blocks) with an HF index; read-only for tests."""
    d = str(tmp_path_factory.mktemp("base") / "low_noise_model")
    write_wan_base(d, TINY, num_shards=3)
    return d


@pytest.fixture(scope="session")
def tiny_factors():
    """Rank-4 bf16 factors for the 20 linear layers of TINY."""
    return make_factors(TINY, rank=4, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def lora(tiny_factors, tmp_path_factory) -> str:
    """TINY's factors as a ROLL ``diffusion_module.pth`` (a module may define its own ``lora``)."""
    path = str(tmp_path_factory.mktemp("lora") / "diffusion_module.pth")
    write_lora(path, tiny_factors)
    return path


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray per test module: 2 CPUs, dashboard off, small object store."""
    ray = start_local_ray()
    yield ray
    ray.shutdown()


def snapshot(folder: str) -> dict[str, tuple[int, float]]:
    """(size, mtime) of every file under ``folder``: inputs must be unchanged after any run."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            st = os.stat(os.path.join(root, f))
            out[os.path.join(root, f)] = (st.st_size, st.st_mtime_ns)
    return out
