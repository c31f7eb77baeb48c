"""fp8 bases and outputs: ComfyUI's scaled-fp8 convention, and the quantize/dequantize math.

A *scaled* fp8 weight is ``<layer>.weight`` in float8 (``F8_E4M3`` or ``F8_E5M2``) with a scalar
``<layer>.scale_weight`` (newer ComfyUI: ``<layer>.weight_scale``); its value is
``weight.float() * scale``. A ``scaled_fp8`` marker tensor (bare, ``model.diffusion_model.`` or
``diffusion_model.`` prefixed) tells ComfyUI the file uses the convention; its dtype names the
weights' fp8 type (a float32 marker means e4m3fn). A *plain* fp8 tensor has no scale.

Merging into a scaled weight dequantizes it, adds the deltas in float32 and rounds once to fp8
with round-to-nearest-even and a fresh per-tensor scale ``amax(|W'|) / fp8_max`` (448 for e4m3fn,
57344 for e5m2), so the largest value lands exactly on ±fp8_max and nothing saturates. Both the
new weight and its new scale are written; untouched weights, their scales, ``scale_input`` and
the marker are copied byte for byte. ``--dtype fp8_e4m3fn`` turns every Linear weight (a 2-D
``.weight`` that is not a norm's or an embedding table's, ``plan.fp8.quantizable``) into scaled fp8
with new ``scale_weight`` and ``scale_input`` (``INPUT_SCALE``, 1.0) keys and adds a marker, as
ComfyUI's loader expects of every Linear in such a file; every other tensor keeps its dtype (on a
base that is already scaled fp8 it is the same as ``--dtype keep``).

Example:
    >>> import torch
    >>> q, s = quantize(torch.tensor([0.0, 1.0, -3.5, 7.0, 1.0625]), "F8_E4M3")
    >>> s.item(), q.float().tolist()           # 7 / 448 = 1/64; 1.0625 * 64 = 68 ties to even 64
    (0.015625, [0.0, 64.0, -224.0, 448.0, 64.0])
    >>> dequantize(q, s).tolist()
    [0.0, 1.0, -3.5, 7.0, 1.0]
"""

from __future__ import annotations

import math

import torch

from distmerge.inputs.torch_dtypes import to_torch
from distmerge.plan.fp8 import INPUT_SCALE
from distmerge.tasks.mergemath import NonFiniteError

__all__ = ["FP8_MAX", "dequantize", "fresh_scale", "input_scale", "quantize"]

#: largest finite value of each fp8 code
FP8_MAX = {"F8_E4M3": 448.0, "F8_E5M2": 57344.0}


def fresh_scale(amax: float, code: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The per-tensor scale ``amax / fp8_max`` as a 0-d tensor of ``dtype`` (float32 division);
    1.0 for an all-zero tensor.

    >>> fresh_scale(7.0, "F8_E4M3").item(), fresh_scale(0.0, "F8_E4M3").item()
    (0.015625, 1.0)
    """
    if not math.isfinite(amax):
        raise NonFiniteError(f"max |value| {amax:.4g} is not finite")
    s = (torch.tensor(amax, dtype=torch.float32) / FP8_MAX[code]).to(dtype)
    return s if float(s) > 0 else torch.tensor(1.0, dtype=dtype)


def input_scale(code: str, shape: tuple[int, ...] = ()) -> torch.Tensor:
    """The bytes of a new input scale: ``INPUT_SCALE`` in dtype ``code`` and ``shape``.

    >>> input_scale("F32").tolist(), input_scale("F32").shape
    (1.0, torch.Size([]))
    """
    return torch.full(shape, INPUT_SCALE, dtype=to_torch(code))


def quantize(
    w: torch.Tensor,
    code: str,
    *,
    scale_dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round the float32 tensor ``w`` to fp8 ``code`` with a fresh per-tensor scale.

    ``q = fp8(clamp(w / s, ±fp8_max))`` with ``s = fresh_scale(amax|w|)`` rounded to
    ``scale_dtype`` first (so ``q.float() * s`` is what a loader computes). Round-to-nearest-even,
    deterministic; the clamp only absorbs the last-bit excess of ``amax / s``.

    Args:
        w: float32 values (any device).
        code: ``F8_E4M3`` or ``F8_E5M2``.
        scale_dtype: dtype of the scale tensor to write (float32 in ComfyUI's files).
        out: an fp8 tensor of ``w``'s shape to round into.
        inplace: ``w`` may be overwritten by the quotient (saves a temporary).

    Returns:
        ``(q, scale)``: the fp8 tensor (``out`` when given) and the 0-d scale (CPU).

    Raises:
        NonFiniteError: a value of ``w`` is NaN or infinite.

    >>> q, s = quantize(torch.tensor([[7.0, 1.1], [1.1875, -0.01]]), "F8_E4M3")
    >>> q.float().tolist()                      # 70.4 -> 72; 76 ties to even 80; -0.64 -> -0.625
    [[448.0, 72.0], [80.0, -0.625]]
    """
    amax = 0.0
    if w.numel():
        lo, hi = torch.aminmax(w)  # NaN propagates into both
        amax = max(-float(lo), float(hi))
    scale = fresh_scale(amax, code, scale_dtype)
    s32 = scale.to(device=w.device, dtype=torch.float32)
    quot = w.div_(s32) if inplace else w / s32
    quot.clamp_(-FP8_MAX[code], FP8_MAX[code])
    q = out.copy_(quot) if out is not None else quot.to(to_torch(code))
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``q.float() * scale`` in float32 (ComfyUI's dequantization); ``q.float()`` without a scale."""
    w = q.to(torch.float32)
    return w if scale is None else w * scale.to(device=w.device, dtype=torch.float32)
