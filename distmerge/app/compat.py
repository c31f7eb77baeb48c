"""Drop-in replacements for the two functions of ROLL's ``merge_lora.py`` seed script.

Same names and signatures, but distmerge's key rules (every layout ``distmerge.lora`` knows, with
``α/r`` honoured) and float32 math with a single rounding. Unlike the seed, LoRA tensors that
cannot be placed raise ``MatchError`` instead of being skipped with a warning.

Example:
    >>> import torch
    >>> base = {"blocks.0.ffn.0.weight": torch.zeros(4, 3, dtype=torch.bfloat16)}
    >>> lora = {"diffusion_model.blocks.0.ffn.0.lora_A.weight": torch.ones(2, 3),
    ...         "diffusion_model.blocks.0.ffn.0.lora_B.weight": torch.ones(4, 2)}
    >>> merged = merge_lora_into_state_dict(base, lora, alpha=0.5)
    >>> merged["blocks.0.ffn.0.weight"][0].tolist(), merged["blocks.0.ffn.0.weight"].dtype
    ([1.0, 1.0, 1.0], torch.bfloat16)
"""

from __future__ import annotations

import os

import torch
from safetensors import safe_open

from distmerge.errors import FormatError, MatchError
from distmerge.formats.normalize import normalize
from distmerge.inputs.checkpoint import open_base
from distmerge.inputs.lorafile import LoraFile, TensorMeta
from distmerge.inputs.torch_dtypes import code_of
from distmerge.tasks.mergemath import merge_tensor
from distmerge.tasks.terms import load_terms

__all__ = ["load_state_dict_from_safetensors", "merge_lora_into_state_dict"]


class _MemoryReader:
    """A ``TensorSource`` over a state dict (the path is ignored)."""

    def __init__(self, sd: dict[str, torch.Tensor]) -> None:
        self.sd = sd

    def read(self, path: str, key: str) -> torch.Tensor:
        return self.sd[key]


def load_state_dict_from_safetensors(file_path: str | os.PathLike[str], device: str = "cpu") -> dict[str, torch.Tensor]:
    """Load every tensor of a ``.safetensors`` file (or an HF sharded folder) onto ``device``."""
    base = open_base(file_path)
    out: dict[str, torch.Tensor] = {}
    for f in base.files:
        with safe_open(f, framework="pt", device=str(device)) as h:
            for k in h.keys():  # noqa: SIM118  (a safe_open handle, not a dict)
                out[k] = h.get_tensor(k)
    return out


def _metas(sd: dict[str, torch.Tensor], what: str, *, skip_unknown: bool = False) -> dict[str, TensorMeta]:
    """dtype/shape of every tensor; with ``skip_unknown`` tensors whose dtype safetensors cannot
    name (e.g. a complex rotary buffer) are left out, so they pass through untouched."""
    metas = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise FormatError(f"{what}: '{k}' is a {type(v).__name__}, expected a tensor")
        try:
            metas[k] = TensorMeta(code_of(v.dtype), tuple(v.shape))
        except KeyError:
            if skip_unknown:
                continue
            raise FormatError(f"{what}: '{k}' has dtype {v.dtype}, which distmerge cannot merge") from None
    return metas


def merge_lora_into_state_dict(
    base_state_dict: dict[str, torch.Tensor],
    lora_state_dict: dict[str, torch.Tensor],
    alpha: float = 1.0,
    device: str = "cpu",
    dtype: torch.dtype | None = torch.bfloat16,
) -> dict[str, torch.Tensor]:
    """Return a new state dict with ``alpha ·`` the LoRA's deltas merged into the base.

    Args:
        base_state_dict: base tensors (not modified).
        lora_state_dict: LoRA tensors in any layout distmerge reads (ROLL/PEFT, DiffSynth,
            ``diffusion_model.``, kohya …); ``.alpha`` tensors are honoured (scale α/r).
        alpha: global multiplier (the seed's ``--alpha``).
        device: where the float32 math runs.
        dtype: dtype of the merged tensors (the seed's default bf16); ``None`` keeps each
            tensor's dtype. Untouched tensors are returned as they are.

    Raises:
        MatchError: LoRA tensors with no target, a missing factor, or shapes that do not fit.
    """
    metas = _metas(lora_state_dict, "<lora_state_dict>")
    lf = LoraFile("<lora_state_dict>", "memory", metas, reader=_MemoryReader(lora_state_dict))
    n = normalize(lf, _metas(base_state_dict, "<base_state_dict>", skip_unknown=True), strength=alpha)
    if n.unmatched:
        first = "; ".join(f"'{u.key}' ({u.reason})" for u in n.unmatched[:3])
        raise MatchError(f"<lora_state_dict>: {len(n.unmatched)} LoRA tensor(s) cannot be placed: {first}")
    if not n.deltas:
        raise MatchError("<lora_state_dict>: no LoRA tensor matched the base state dict")
    by_target: dict[str, list] = {}
    for d in n.deltas:
        by_target.setdefault(d.target, []).append(d)
    out = dict(base_state_dict)
    for key, deltas in by_target.items():
        w = base_state_dict[key]
        terms = load_terms(deltas, lambda path, k: lora_state_dict[k])
        out[key] = merge_tensor(w.to(device), terms, out_dtype=dtype or w.dtype).to(w.device)
    return out
