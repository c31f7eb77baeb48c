"""Tiny Wan GGUF files for the tests, written by gguf-py's own writer (``GGUFWriter``), and the
judge of what distmerge writes: gguf-py's own reader and dequantizer.

The K-quants (Q4_K, Q5_K, Q6_K …) have no quantizer in gguf-py, so their blocks are random bytes
with finite fp16 block scales put where ggml's block structs keep them (``block_q4_K``: ``d``,
``dmin`` first; ``block_q6_K``: ``d`` last): valid blocks whose values only gguf-py's
dequantizer defines.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFWriter, quants

from distmerge.app.synth import WanConfig, wan_shapes
from distmerge.inputs.header import TensorInfo
from distmerge.plan.gguf import gguf_type, is_block_linear

#: a Wan model whose block linears have rows of 256 values (whole K-quant blocks), ~3 MB in fp32
KQ = WanConfig(dim=256, ffn=512, blocks=1, in_dim=4, text_dim=32, freq_dim=32, out_dim=4, dtype="BF16")
#: where each K-quant keeps its fp16 scale(s) in a block (bytes), from ggml's block structs
_SCALE_AT = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q3_K": (108,), "Q2_K": (80, 82)}


def _rand(key: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    g = np.random.default_rng([seed, sum(map(ord, key)), len(key)])
    return (g.standard_normal(shape) * 0.02).astype(np.float32)


def _kquant(key: str, code: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[code]]
    g = np.random.default_rng([seed, sum(map(ord, key)), 7])
    raw = g.integers(0, 256, size=(shape[0], shape[1] // block, size), dtype=np.uint8)
    for at in _SCALE_AT[code]:
        raw[:, :, at : at + 2] = np.frombuffer(np.float16(0.0005).tobytes(), np.uint8)
    return raw.reshape(shape[0], -1)


def encode(values: np.ndarray, code: str) -> np.ndarray:
    """gguf-py's own bytes of float32 ``values`` in ``code`` (its numpy casts for F32/F16)."""
    if code == "F32":
        return values.astype(np.float32)
    if code == "F16":
        return values.astype(np.float16)
    return quants.quantize(values, GGMLQuantizationType[code])


def write_gguf_base(path: str, c: WanConfig, linears: str, *, seed: int = 0, arch: str = "wan") -> None:
    """A Wan model as city96's tools lay it out: block linears in ``linears``, the rest by
    convert.py's rules (``plan.gguf.gguf_type`` for a bf16 source)."""
    w = GGUFWriter(path, arch)
    w.add_quantization_version(2)
    for key, shape in wan_shapes(c):
        info = TensorInfo(key, "BF16", shape, "", 0, 0)
        code = linears if is_block_linear(key, shape) else gguf_type(info, None, from_gguf=False)
        if code in _SCALE_AT:
            data = _kquant(key, code, shape, seed)
        else:
            v = _rand(key, shape, seed)
            data = encode(torch.from_numpy(v).bfloat16().float().numpy(), code)
        raw = GGMLQuantizationType[code] if data.dtype == np.uint8 else None
        w.add_tensor(key, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def read_values(path: str) -> dict[str, tuple[str, np.ndarray]]:
    """Every tensor of a GGUF as (type name, float32 values in torch order), by gguf-py alone."""
    out = {}
    for t in GGUFReader(path).tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        values = quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32).reshape(shape)
        out[t.name] = (t.tensor_type.name, values)
    return out


def write_like_gguf_py(path: str, tensors: list[tuple[str, str, np.ndarray]], file_type: int) -> None:
    """The file gguf-py writes for ``(key, type, float32 values)`` with city96's key/values: what
    a distmerge output must equal byte for byte."""
    w = GGUFWriter(path, "wan")
    w.add_quantization_version(2)
    w.add_file_type(file_type)
    for key, code, values in tensors:
        data = encode(values, code)
        w.add_tensor(key, data, raw_dtype=GGMLQuantizationType[code] if data.dtype == np.uint8 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
