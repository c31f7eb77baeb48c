"""GGML block types in and out of float32, by gguf-py's own quantizer and dequantizer.

``decode`` gives the exact float32 values of a piece of a GGUF tensor (gguf-py computes in
float32 from the block scales, where ComfyUI-GGUF's runtime goes through fp16 and is off by up to
3e-4); ``encode`` rounds float32 values once to a block type, with gguf-py's ``quantize`` (its Q8_0
is bit-exact with ggml's reference). Both work on whole rows, so a tensor is done in row pieces.

Example:
    >>> w = torch.tensor([[3.0, -127.0] * 16])             # one row: one Q8_0 block, scale 1.0
    >>> q = encode(w, "Q8_0")
    >>> q.dtype, q.shape, decode(q, "Q8_0", (1, 32)).equal(w)
    (torch.uint8, torch.Size([1, 34]), True)
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from gguf import GGMLQuantizationType

__all__ = ["decode", "encode"]


@functools.cache
def _qtype(code: str) -> GGMLQuantizationType:
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[code]


def decode(raw: torch.Tensor, code: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The float32 values (a new CPU tensor of ``shape``) of ``raw``, a piece's bytes in ``code``."""
    from gguf.quants import dequantize

    rows = raw.reshape(shape[0] if len(shape) >= 2 else 1, -1).cpu().numpy()
    return torch.from_numpy(np.ascontiguousarray(dequantize(rows, _qtype(code)), dtype=np.float32)).reshape(shape)


def encode(w: torch.Tensor, code: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """``w`` (float32, rows first) rounded once to ``code``: its bytes as a uint8 tensor of one row
    per row of ``w`` (written into ``out``, a uint8 buffer of as many bytes, when given)."""
    from gguf.quants import quantize

    rows = w.detach().to("cpu", torch.float32).reshape(w.shape[0] if w.dim() >= 2 else 1, -1).numpy()
    q = torch.from_numpy(np.ascontiguousarray(quantize(rows, _qtype(code))).view(np.uint8))
    if out is None:
        return q
    return out.view(torch.uint8).reshape(q.shape).copy_(q)
