"""Shared test helpers: load checkpoints whole, and a float64 reference merge rounded once."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file

from distmerge.app.synth import WanConfig

#: a tiny Wan-shaped model: same key set and shape pattern as Wan2.2, ~1 MB in fp32
TINY = WanConfig(dim=64, ffn=96, blocks=2, in_dim=16, text_dim=32, freq_dim=16, dtype="F32")

#: the diffusers config of TINY (dim 64 = 2 heads × 32, ffn 96, 2 blocks, text 32, freq 16); T2V, so
#: no image embedder and no added k/v projections: the key sets of both namings match one to one
DIFFUSERS_CONFIG = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 32,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": TINY.text_dim,
    "freq_dim": TINY.freq_dim,
    "ffn_dim": TINY.ffn,
    "num_layers": TINY.blocks,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024,
}
assert DIFFUSERS_CONFIG["num_attention_heads"] * DIFFUSERS_CONFIG["attention_head_dim"] == TINY.dim


def tiny_llm_config(**overrides: object) -> dict[str, object]:
    """Keyword arguments of a tiny decoder-only config (Llama, Qwen2): 2 layers, hidden 32, GQA 4/2."""
    return {
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "tie_word_embeddings": False,
    } | overrides


def start_local_ray(**overrides: object):
    """A fresh embedded Ray for a test module (any running one is shut down first): 2 CPUs,
    dashboard off, a 100 MB object store, quiet; ``overrides`` change any of these."""
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    if ray.is_initialized():
        ray.shutdown()
    options: dict[str, object] = {
        "address": "local",
        "num_cpus": 2,
        "include_dashboard": False,
        "object_store_memory": 100 << 20,
        "logging_level": "WARNING",
        "log_to_driver": False,
    }
    ray.init(**(options | overrides))
    return ray


def load_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file or of an output/base folder (index or single file)."""
    if os.path.isfile(path):
        return load_file(path)
    names = os.listdir(path)
    index = [n for n in names if n.endswith(".safetensors.index.json")]
    if index:
        with open(os.path.join(path, index[0])) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = [n for n in names if n.endswith(".safetensors")]
    out: dict[str, torch.Tensor] = {}
    for n in files:
        out.update(load_file(os.path.join(path, n)))
    return out


def reference_merge(
    base: dict[str, torch.Tensor],
    terms: dict[str, list[tuple[float, torch.Tensor]]],
    out_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """``terms[key]`` = [(coef, ΔW)]: W + Σ coef·ΔW in float64, rounded once to the output dtype."""
    out = {}
    for k, w in base.items():
        dt = out_dtype if (out_dtype is not None and w.is_floating_point()) else w.dtype
        if k in terms:
            acc = w.double()
            for coef, d in terms[k]:
                acc = acc + coef * d.double().reshape(w.shape)
            out[k] = acc.to(dt)
        else:
            out[k] = w.to(dt)
    return out


def lora_terms(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], coef: float) -> dict[str, list]:
    """ΔW = B @ A (float64) per module's ``.weight`` key."""
    return {m + ".weight": [(coef, (b.double().flatten(1) @ a.double().flatten(1)))] for m, (a, b) in factors.items()}


def assert_close_to_reference(out: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    """The issue's tolerances: fp32 rtol 1e-5/atol 1e-6; bf16/fp16 ≥ 99.9 % bit-exact, rest ≤ 1 ulp
    (or within 1e-6 of the tensor's largest value where W and ΔW cancel)."""
    assert set(out) == set(ref), set(out) ^ set(ref)
    for k, r in ref.items():
        o = out[k]
        assert o.dtype == r.dtype and o.shape == r.shape, (k, o.dtype, r.dtype, o.shape, r.shape)
        if o.dtype == torch.float32:
            torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-6, msg=k)
        elif o.dtype in (torch.bfloat16, torch.float16):
            same = o.view(torch.int16) == r.view(torch.int16)
            assert same.float().mean().item() >= 0.999, (k, same.float().mean().item())
            ulp = (o.view(torch.int16).int() - r.view(torch.int16).int()).abs()
            near = (o.float() - r.float()).abs() <= 1e-6 * r.float().abs().max()
            assert bool(((ulp <= 1) | near).all()), k
        else:
            assert torch.equal(o, r), k


def direct_io_works(folder) -> bool:
    """Whether this filesystem takes an aligned O_DIRECT write (ext4/xfs yes; tmpfs only on
    kernels from 6.6, FUSE mounts often not)."""
    import mmap

    path = os.path.join(str(folder), ".probe")
    with open(path, "wb") as f:
        f.truncate(8192)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    except OSError:
        return False
    try:
        return os.pwrite(fd, memoryview(mmap.mmap(-1, 4096)), 4096) == 4096
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(path)


def shared_path(*parts: str) -> str:
    """A path under the project's ``shared/`` folder: beside this checkout (as CI lays it out), else
    the workplace's ``/work/shared``."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for root in (os.path.join(os.path.dirname(repo), "shared"), "/work/shared"):
        if os.path.isdir(root):
            return os.path.join(root, *parts)
    return os.path.join(os.path.dirname(repo), "shared", *parts)


#: the repository's ``benchmarks/`` folder
BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def load_benchmark(name: str, prefix: str = "_bench"):
    """``benchmarks/<name>.py`` imported as a module (the folder is not a package)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(f"{prefix}_{name}", os.path.join(BENCHMARKS, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is made
    spec.loader.exec_module(mod)
    return mod
