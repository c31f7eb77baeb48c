"""The files of a base model folder that travel with the merged weights, and the recipe file.

A model folder is more than its shards: ``config.json``, ``generation_config.json``, tokenizer and
chat-template files, preprocessor configs, the model card and the licence are what
``from_pretrained`` needs to open it. Every regular top-level file of the base folder is copied
into the output except the weights themselves: the shards distmerge rewrites and any other weight
file (a ``pytorch_model.bin`` beside the safetensors would be the *unmerged* model), their
indexes, hidden files (``.gitattributes``, caches) and an earlier ``distmerge.json``. Sub-folders
are not copied (they may hold other weights, e.g. Llama's ``original/``); they are listed as
skipped, never dropped silently.

Example:
    >>> is_weight_file("pytorch_model-00001-of-00002.bin"), is_weight_file("tokenizer.json")
    (True, False)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from distmerge.errors import OutputError
from distmerge.inputs import objstore
from distmerge.inputs.checkpoint import INDEX_SUFFIX, BaseCheckpoint
from distmerge.inputs.hub import Resolved
from distmerge.inputs.objstore import is_s3
from distmerge.inputs.paths import absolute

__all__ = [
    "RECIPE_NAME",
    "WEIGHT_SUFFIXES",
    "Companions",
    "config_for_dtype",
    "find_companions",
    "is_weight_file",
    "make_recipe",
]

#: the recipe distmerge writes into every output folder (what was merged, with which options)
RECIPE_NAME = "distmerge.json"

#: file endings of model weights (and their indexes) in any framework: never copied
WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".gguf",
    ".onnx",
    ".pkl",
    ".npz",
    ".ot",
    ".tflite",
    ".mlmodel",
    INDEX_SUFFIX,
    ".bin.index.json",
    ".pt.index.json",
    ".pth.index.json",
    ".msgpack.index.json",
    ".h5.index.json",
)


@dataclass(frozen=True)
class Companions:
    """``files``: output name -> source path, to copy; ``skipped``: what was not, with why."""

    files: dict[str, str] = field(default_factory=dict)
    skipped: tuple[tuple[str, str], ...] = ()


_SUB_FOLDER = "a sub-folder (only the model folder's own files are copied)"
#: files distmerge writes beside a single-file result (checksums, recipe): they describe that file
SIDECAR_SUFFIXES = (".crc32", ".sha256", "." + RECIPE_NAME)


def is_weight_file(name: str) -> bool:
    """True for a file name that holds (or indexes) model weights, or describes such a file."""
    low = name.lower()
    for side in SIDECAR_SUFFIXES:
        if low.endswith(side) and low[: -len(side)].endswith(WEIGHT_SUFFIXES):
            return True
    return low.endswith(WEIGHT_SUFFIXES)


#: why a hidden entry of the base folder is not copied (listed in the report, not warned about)
HIDDEN = "a hidden file or folder (git attributes, caches: not part of the model)"


def find_companions(base: BaseCheckpoint) -> Companions:
    """The files to copy from ``base``'s folder (none when the base was given as one file): a
    folder's on a filesystem, or a prefix's in object storage (each copied from this node's copy,
    ``objstore.cached``)."""
    fetch: Callable[[str], str]
    if is_s3(base.path):
        if base.path.endswith(".safetensors"):
            return Companions()
        entries, fetch = _bucket_entries(base.path), objstore.cached
    elif os.path.isdir(base.path):
        entries, fetch = _folder_entries(base.path), _readable
    else:
        return Companions()
    files: dict[str, str] = {}
    skipped: list[tuple[str, str]] = []
    for name, folder, source in entries:
        if name == RECIPE_NAME:
            continue  # the output gets a recipe of its own
        if name.startswith("."):
            skipped.append((name + ("/" if folder else ""), HIDDEN))
        elif folder:
            skipped.append((name + "/", _SUB_FOLDER))
        elif is_weight_file(name):
            if source not in base.files and name != base.stem + INDEX_SUFFIX:
                skipped.append((name, "weights that are not part of the merged checkpoint"))
        else:
            files[name] = fetch(source)
    return Companions(files, tuple(skipped))


def _folder_entries(folder: str) -> Iterator[tuple[str, bool, str]]:
    """(name, is a folder, path) of every entry of a base folder, by name."""
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        yield name, os.path.isdir(path), path


def _bucket_entries(prefix: str) -> Iterator[tuple[str, bool, str]]:
    """``_folder_entries`` of a prefix in object storage: its own objects, and each sub-prefix once."""
    folders: set[str] = set()
    for obj in objstore.list_objects(prefix):
        name = obj.url[len(prefix) + 1 :]
        if "/" not in name:
            yield name, False, obj.url
        elif (top := name.split("/", 1)[0]) not in folders:
            folders.add(top)
            yield top, True, f"{prefix}/{top}"


def _readable(path: str) -> str:
    """``path``, a file to copy; a dangling link or a pipe (a loader would miss it) is an error, so
    it is not skipped quietly."""
    if not os.path.isfile(path):
        raise OutputError(
            f"{path}: is in the base folder but is not a readable file (a broken link?); "
            "fix or remove it, or give the base as a .safetensors file"
        )
    return path


def _dtype_name(code: str | None) -> str:
    """The ``--dtype`` spelling of a safetensors code (``keep`` for None)."""
    names = {"BF16": "bf16", "F16": "fp16", "F32": "fp32", "F8_E4M3": "fp8_e4m3fn", "F8_E5M2": "fp8_e5m2"}
    return "keep" if code is None else names.get(code, code.lower())


def make_recipe(
    base: BaseCheckpoint,
    loras: list[dict[str, Any]],
    *,
    naming: str,
    alpha: float,
    dtype: str | None,
    version: str,
    references: Sequence[Resolved] = (),
    skip_unmatched: bool = False,
) -> dict[str, Any]:
    """What a merge was asked to do, as the output records it (``distmerge.json`` and the index's
    ``metadata.distmerge.recipe``): enough to tell later how a folder was made, and to redo it.

    ``loras`` are the normalizer's per-file summaries (weight, layout) with each file's ``path`` (as
    given: a PEFT folder stays a folder) and ``sha256``, as the resume fingerprint hashed them.
    ``references`` (base first, then each LoRA) add the Hugging Face cache reference and commit an
    input was resolved from.
    """
    base_entry: dict[str, Any] = {
        "path": absolute(base.path),
        "naming": naming,
        "files": [os.path.basename(f) for f in base.files],
    }
    lora_entries: list[dict[str, Any]] = [
        {"path": x["path"], "weight": x["weight"], "layout": x["layout"], "sha256": x["sha256"]} for x in loras
    ]
    for entry, ref in zip([base_entry, *lora_entries], references):
        if ref.reference:
            entry.update(reference=ref.reference, commit=ref.commit)
    return {
        "distmerge_version": version,
        "base": base_entry,
        "loras": lora_entries,
        "alpha": alpha,
        "dtype": _dtype_name(dtype),
        "skip_unmatched": skip_unmatched,
    }


_TORCH_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def config_for_dtype(path: str, dtype: str | None) -> str | None:
    """The text of a transformers ``config.json`` whose ``dtype`` (``torch_dtype`` before
    transformers 4.56) says ``dtype``, when the merge changed it; ``None`` when the file stays as it
    is (no dtype asked, no such field, already right, not a JSON object).

    Without this a bf16 merge of a float32 base would load as float32 by default, twice its size.
    """
    if dtype not in _TORCH_NAMES:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict):
        return None
    keys = [k for k in ("dtype", "torch_dtype") if isinstance(cfg.get(k), str)]
    if not keys or all(cfg[k] == _TORCH_NAMES[dtype] for k in keys):
        return None
    for k in keys:
        cfg[k] = _TORCH_NAMES[dtype]
    return json.dumps(cfg, indent=2, sort_keys=True) + "\n"
