"""How a base checkpoint names its tensors, and where a LoRA's target lands in that naming.

LoRA files name their targets in the naming they were trained on (original Wan, diffusers, a
ComfyUI prefix, kohya underscores, an LLM's module paths), and bases come in all of these too. Every
key is compared in one *canonical* naming: the original Wan names for Wan-family models
(``blocks.0.self_attn.q.weight``), the keys as they are for anything else (HF LLMs). ``NAMINGS`` is
the table of base namings, tried in order; ``BaseNames`` detects a base's naming from its keys,
indexes its keys by canonical name and answers "which base key is this target".

Example:
    >>> names = BaseNames(["blocks.0.attn1.to_q.weight", "scale_shift_table", "proj_out.weight"])
    >>> names.naming.name, names.find("blocks.0.self_attn.q.weight"), names.find("head.modulation")
    ('diffusers', 'blocks.0.attn1.to_q.weight', 'scale_shift_table')
    >>> BaseNames(["model.diffusion_model.head.head.weight"]).find("head.head.weight")
    'model.diffusion_model.head.head.weight'
    >>> BaseNames(["model.diffusion_model.head.head.weight"]).native("blocks.9.ffn.0.weight")
    'model.diffusion_model.blocks.9.ffn.0.weight'
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from distmerge.formats.keymap import diffusers_param_to_wan, wan_param_to_diffusers

__all__ = ["NAMINGS", "BaseNames", "Naming", "detect_naming", "first_detecting"]


@dataclass(frozen=True)
class Naming:
    """One way a base checkpoint names its tensors: a prefix in front of the model's keys and
    whether the model's keys are diffusers Wan names."""

    name: str
    description: str
    detect: re.Pattern[str]  #: a base key that only this naming (of those before it) has
    prefix: str = ""
    diffusers: bool = False

    def canonical(self, key: str) -> str | None:
        """The canonical name of base key ``key`` (``None`` for keys outside the model's prefix,
        e.g. a ComfyUI checkpoint's VAE)."""
        if self.prefix:
            if not key.startswith(self.prefix):
                return None
            key = key[len(self.prefix) :]
        return diffusers_param_to_wan(key) if self.diffusers else key

    def native(self, canonical: str) -> str:
        """What this naming calls canonical key ``canonical``."""
        return self.prefix + (wan_param_to_diffusers(canonical) if self.diffusers else canonical)


_P = re.compile
#: Tried in order: the first naming whose ``detect`` matches a base key names the base.
NAMINGS: tuple[Naming, ...] = (
    Naming(
        "comfy-checkpoint",
        "ComfyUI full checkpoint (model.diffusion_model.blocks.0.self_attn.q.weight)",
        _P(r"^model\.diffusion_model\."),
        prefix="model.diffusion_model.",
    ),
    Naming(
        "comfy",
        "ComfyUI / native single file (diffusion_model.blocks.0.self_attn.q.weight)",
        _P(r"^diffusion_model\."),
        prefix="diffusion_model.",
    ),
    Naming(
        "diffusers",
        "diffusers (blocks.0.attn1.to_q.weight, condition_embedder.…)",
        _P(r"^(?:blocks\.\d+\.attn[12]\.to_|condition_embedder\.|scale_shift_table$)"),
        diffusers=True,
    ),
    Naming(
        "wan",
        "original Wan / DiffSynth (blocks.0.self_attn.q.weight)",
        _P(r"^(?:blocks\.\d+\.(?:self|cross)_attn\.|head\.head\.)"),
    ),
    Naming("hf", "keys as the checkpoint has them (HF LLMs and every other model)", _P(r"")),
)


class _Detects(Protocol):
    """An entry of a table told by its ``detect`` pattern (a ``Naming``, a LoRA ``Layout``)."""

    @property
    def detect(self) -> re.Pattern[str]: ...


_D = TypeVar("_D", bound=_Detects)


def first_detecting(table: Sequence[_D], keys: Iterable[str]) -> _D:
    """The first entry of ``table`` whose ``detect`` pattern finds one of ``keys``; the last entry
    (the catch-all) when none does. Base namings and LoRA layouts are both told this way."""
    keys = list(keys)
    return next((entry for entry in table if any(entry.detect.search(k) for k in keys)), table[-1])


def detect_naming(keys: Iterable[str]) -> Naming:
    """The first naming of ``NAMINGS`` that recognises one of ``keys``.

    >>> detect_naming(["model.layers.0.self_attn.q_proj.weight"]).name
    'hf'
    """
    return first_detecting(NAMINGS, keys)


class BaseNames:
    """The keys of one base checkpoint, indexed by their canonical names."""

    def __init__(self, keys: Iterable[str]) -> None:
        self.keys = frozenset(keys)
        self.naming = detect_naming(self.keys)
        self._by_canonical: dict[str, str] = {}
        for k in sorted(self.keys):
            c = self.naming.canonical(k)
            if c is not None:
                self._by_canonical.setdefault(c, k)

    @property
    def canonical_keys(self) -> list[str]:
        return sorted(self._by_canonical)

    def find(self, key: str, *, diffusers_names: bool = False) -> str | None:
        """The base key a LoRA target ``key`` (module path + parameter) lands on, or ``None``.

        A key the base has as it is wins; then ``key`` read as a canonical name; then ``key`` read
        as a diffusers name (a LoRA trained on a diffusers model). ``diffusers_names`` says the
        LoRA's layout uses diffusers names, so that reading is tried first.
        """
        if key in self.keys:
            return key
        readings = [diffusers_param_to_wan(key), key] if diffusers_names else [key, diffusers_param_to_wan(key)]
        for c in readings:
            if c in self._by_canonical:
                return self._by_canonical[c]
        return None

    def native(self, key: str, *, diffusers_names: bool = False) -> str:
        """The name this base would give target ``key`` (for messages about a missing target)."""
        return self.naming.native(diffusers_param_to_wan(key) if diffusers_names else key)
