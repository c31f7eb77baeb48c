"""The recipe an output records (``distmerge.json``) and the checks ``verify`` makes of it before
any tensor is read: no torch, no Ray, so a missing or stale recipe answers at once.

Example:
    >>> flag_of_code("BF16"), code_of_flag("bf16")
    ('bf16', 'BF16')
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from distmerge.app.options import pair_weights
from distmerge.errors import DistmergeError, FormatError, UsageError
from distmerge.inputs.checkpoint import INDEX_SUFFIX
from distmerge.inputs.dtypes import CLI_DTYPES
from distmerge.inputs.s3client import is_s3
from distmerge.output.companions import RECIPE_NAME

__all__ = [
    "Recipe",
    "RecordedLora",
    "by_hand",
    "code_of_flag",
    "flag_of_code",
    "merged_arg",
    "read_recipe",
    "recorded_dtype",
    "recorded_inputs",
]


_DTYPE_FLAG = {"BF16": "bf16", "F16": "fp16", "F32": "fp32", "F8_E4M3": "fp8_e4m3fn", "F8_E5M2": "fp8_e5m2"}


def flag_of_code(code: str | None) -> str:
    """The ``--dtype`` spelling of a safetensors code (``keep`` for None).

    >>> flag_of_code("BF16"), flag_of_code(None), flag_of_code("F8_E4M3")
    ('bf16', 'keep', 'fp8_e4m3fn')
    """
    return "keep" if code is None else _DTYPE_FLAG.get(code, code.lower())


_PASS_FLAGS = "pass --base and --lora (and --weight, --alpha, --dtype as given to merge)"


@dataclass(frozen=True)
class RecordedLora:
    """One LoRA of a recipe: its path, weight and (when recorded) SHA-256."""

    path: str
    weight: float = 1.0
    sha256: str | None = None


@dataclass(frozen=True)
class Recipe:
    """What an output records about how it was made (``companions.make_recipe``)."""

    source: str  #: the file it was read from (for an index: the index)
    base: str
    loras: tuple[RecordedLora, ...]
    alpha: float = 1.0
    dtype: str = "keep"  #: the ``--dtype`` spelling


def code_of_flag(flag: str) -> str | None:
    """A ``--dtype`` spelling or a safetensors float code -> the code (None for ``keep``).

    >>> code_of_flag("bf16"), code_of_flag("keep"), code_of_flag("F8_E4M3"), code_of_flag("f8_e4m3")
    ('BF16', None, 'F8_E4M3', 'F8_E4M3')
    """
    low = flag.lower()
    if low in CLI_DTYPES:
        return CLI_DTYPES[low]
    if flag.upper() in _DTYPE_FLAG:  # the code itself (older recipes wrote e.g. 'f8_e4m3')
        return flag.upper()
    raise ValueError(f"unknown dtype {flag!r}")


def _recipe_locations(merged: str) -> tuple[str, str | None]:
    """(the recipe file of ``merged``, its index or None)."""
    if os.path.isdir(merged):
        index = sorted(n for n in os.listdir(merged) if n.endswith(INDEX_SUFFIX))
        return os.path.join(merged, RECIPE_NAME), os.path.join(merged, index[0]) if index else None
    return f"{merged}.{RECIPE_NAME}", None


def _load_json(path: str, what: str) -> Any:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError) as e:
        raise FormatError(
            f"{path}: cannot read the recorded recipe {what}({type(e).__name__}: "
            f"{getattr(e, 'strerror', None) or e}); {_PASS_FLAGS}"
        ) from None


def _raw_recipe(merged: str) -> tuple[Any, str]:
    """The recipe's JSON value and the file it came from."""
    if is_s3(merged):
        raise FormatError(f"{merged}: verify reads the recipe of a local output only; {_PASS_FLAGS}")
    if not os.path.exists(merged):
        raise FormatError(f"{merged}: no such file or folder; nothing to verify")
    path, index = _recipe_locations(merged)
    if os.path.exists(path):
        return _load_json(path, ""), path
    if index is not None:
        meta = _load_json(index, "in the index ")
        ours = meta.get("metadata", {}).get("distmerge", {}) if isinstance(meta, dict) else {}
        if isinstance(ours, dict) and "recipe" in ours:
            return ours["recipe"], index
    raise FormatError(
        f"{merged}: records no recipe ({os.path.basename(path)} is missing; an output of "
        f"an older distmerge?); {_PASS_FLAGS}"
    )


def read_recipe(merged: str | os.PathLike[str]) -> Recipe:
    """The recipe recorded with the output ``merged`` (see the module docstring).

    Raises:
        FormatError: no recipe, or one that cannot be read or lacks a field (one line, saying to
            pass ``--base``/``--lora`` instead).
    """
    raw, source = _raw_recipe(os.fspath(merged))

    def bad(what: str) -> FormatError:
        return FormatError(f"{source}: the recorded recipe has no valid {what}; {_PASS_FLAGS}")

    base = raw.get("base") if isinstance(raw, dict) else None
    if not isinstance(base, dict) or not isinstance(base.get("path"), str):
        raise bad("'base.path'")
    loras = raw.get("loras")
    if not isinstance(loras, list) or not loras:
        raise bad("'loras'")
    recorded = []
    for i, x in enumerate(loras):
        if not isinstance(x, dict) or not isinstance(x.get("path"), str) or not _number(x.get("weight", 1.0)):
            raise bad(f"'loras[{i}]' (a path and a finite weight)")
        sha = x.get("sha256")
        recorded.append(RecordedLora(x["path"], float(x.get("weight", 1.0)), sha if isinstance(sha, str) else None))
    if not _number(raw.get("alpha", 1.0)):
        raise bad("'alpha' (a finite number)")
    dtype = raw.get("dtype", "keep")
    try:
        flag = flag_of_code(code_of_flag(dtype)) if isinstance(dtype, str) else None
    except ValueError:
        flag = None
    if flag is None:
        raise bad("'dtype' (keep, bf16, fp16, fp32, fp8_e4m3fn or fp8_e5m2)")
    return Recipe(source, base["path"], tuple(recorded), float(raw.get("alpha", 1.0)), flag)


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def recorded_dtype(merged: str) -> str | None:
    """The ``--dtype`` recorded with ``merged``, or None when it records no (readable) recipe."""
    try:
        return read_recipe(merged).dtype
    except DistmergeError:
        return None


def _check_recorded_input(path: str, what: str, flag: str, recipe: Recipe) -> None:
    if not os.path.exists(path):
        raise FormatError(
            f"the {what} recorded in {recipe.source} no longer exists: {path}; pass {flag} with where it is now"
        )


def _check_lora_unchanged(lora: RecordedLora, recipe: Recipe) -> None:
    """The LoRA still has the SHA-256 recorded at the merge (a folder: as the resume manifest
    hashes it), so a result that differs is not blamed on the output."""
    from distmerge.output.manifest import lora_sha256

    if lora.sha256 is None:
        return
    now = lora_sha256(lora.path)
    if now != lora.sha256.lower():
        raise FormatError(
            f"LoRA {lora.path} changed since the merge (sha256 {now[:12]}, recorded "
            f"{lora.sha256[:12]} in {recipe.source}); verify against the original file, "
            "or pass --lora to check against this one"
        )


def by_hand(loras: Sequence[str], weights: Sequence[float] | None) -> list[tuple[str, float]]:
    """``--lora`` paths with their ``--weight`` (1.0 each when none is given)."""
    return pair_weights(list(loras), list(weights) if weights else None)


def _recorded_loras(recipe: Recipe, weights: Sequence[float] | None) -> list[tuple[str, float]]:
    """The recipe's LoRAs, each still there and unchanged, with ``weights`` or the recorded ones."""
    if weights and len(weights) != len(recipe.loras):
        raise UsageError(
            f"{recipe.source} records {len(recipe.loras)} LoRA(s) but {len(weights)} --weight "
            "were given; give one --weight per recorded LoRA, or --lora too"
        )
    for lo in recipe.loras:
        _check_recorded_input(lo.path, "LoRA", "--lora", recipe)
        _check_lora_unchanged(lo, recipe)
    return [(lo.path, w) for lo, w in zip(recipe.loras, weights or [lo.weight for lo in recipe.loras], strict=True)]


def merged_arg(args: argparse.Namespace) -> str:
    out, merged = getattr(args, "output", None), getattr(args, "merged", None)
    if out and merged and os.path.abspath(out) != os.path.abspath(merged):
        raise UsageError(f"OUTPUT ({out}) and --merged ({merged}) name different outputs; give one")
    if not (out or merged):
        raise UsageError("give the output to check: distmerge verify OUTPUT [--base PATH --lora PATH …]")
    return str(out or merged)


def recorded_inputs(
    merged: str, *, base: object = None, loras: Sequence[str] | None = None, weights: Sequence[float] | None = None
) -> tuple[Recipe | None, list[tuple[str, float]] | None]:
    """What ``verify_output`` takes from the recipe: the recipe (None when ``base`` and ``loras``
    are both given) and the LoRAs to check against (recorded ones checked to exist and be
    unchanged; None when given by hand). Every recipe error is raised here, before torch loads.
    """
    if base is not None and loras is not None:
        return None, None
    recipe = read_recipe(merged)
    if base is None:
        _check_recorded_input(recipe.base, "base checkpoint", "--base", recipe)
    return recipe, (_recorded_loras(recipe, weights) if loras is None else None)


def precheck(args: argparse.Namespace) -> None:
    """``distmerge verify``'s argument and recipe errors, before torch and Ray are imported."""
    recorded_inputs(merged_arg(args), base=args.base, loras=args.lora, weights=args.weight)
