"""Find and validate the base checkpoint: one file, an HF-style sharded folder, or a one-file folder.

Only headers are read. The result lists every base tensor with its file and absolute byte range,
in a fixed order (shard order, then data offset), which is the order everything downstream uses.

Example:
    >>> import tempfile, os, torch
    >>> from safetensors.torch import save_file
    >>> d = tempfile.mkdtemp()
    >>> save_file({"a.weight": torch.zeros(4, 4)}, os.path.join(d, "model.safetensors"))
    >>> base = open_base(d)
    >>> base.stem, list(base.tensors), base.total_bytes
    ('model', ['a.weight'], 64)
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath, PureWindowsPath

from distmerge.errors import FormatError
from distmerge.inputs import objstore
from distmerge.inputs.gguffile import ARCH_KEY, GGUF_SUFFIX, is_gguf_name, read_gguf
from distmerge.inputs.header import Header, TensorInfo, read_header
from distmerge.inputs.hub import local_path
from distmerge.inputs.objstore import is_s3
from distmerge.inputs.paths import missing

__all__ = ["BaseCheckpoint", "open_base", "INDEX_SUFFIX"]

INDEX_SUFFIX = ".safetensors.index.json"
#: a diffusers/transformers weight variant (``diffusion_pytorch_model.fp16.safetensors``)
_VARIANT = re.compile(r"\.(?:fp16|bf16|fp32|fp8[a-z0-9_]*|ema|non_ema)\.safetensors$")
logger = logging.getLogger("distmerge.checkpoint")  # the name users see in -v logs


@dataclass(frozen=True)
class BaseCheckpoint:
    """The base model as seen from its headers."""

    path: str  #: what the user gave (file or folder)
    stem: str  #: ``model``, ``diffusion_pytorch_model``, … (names the output shards)
    files: tuple[str, ...]  #: shard paths in order
    tensors: dict[str, TensorInfo]  #: key -> where its bytes are, in shard/offset order
    headers: tuple[Header, ...]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def is_gguf(self) -> bool:
        """A GGUF file (ComfyUI-GGUF's Wan models), not safetensors."""
        return is_gguf_name(self.files[0])

    def require_safetensors(self, command: str) -> BaseCheckpoint:
        """This checkpoint, if it is safetensors: ``command`` reads no GGUF (merge does)."""
        if self.is_gguf:
            raise FormatError(
                f"{self.path}: {command} reads safetensors checkpoints; a GGUF file is a merge's --base or --output"
            )
        return self

    def model_config(self) -> dict | None:
        """The base folder's transformers ``config.json`` (None when there is none, or for a single
        file given alone); a file that is not a JSON object is an error naming it."""
        folder = self.path if os.path.isdir(self.path) else None
        cfg = os.path.join(folder, "config.json") if folder else ""
        if not cfg or not os.path.isfile(cfg):
            return None
        try:
            with open(cfg, encoding="utf-8") as f:
                obj = json.load(f)
        except (OSError, ValueError) as e:
            raise FormatError(f"{cfg}: cannot read the base's config ({e})") from None
        return obj if isinstance(obj, dict) else None


def open_base(path: str | os.PathLike[str]) -> BaseCheckpoint:
    """Locate the base checkpoint at ``path`` and read every shard header.

    Args:
        path: a ``.safetensors`` file; a folder with one ``*.safetensors.index.json``; or a folder
            holding exactly one ``.safetensors`` file.

    Raises:
        FormatError: nothing usable found, an ambiguous folder, a bad index (unsafe or missing
            shard names, keys in the wrong shard), duplicate keys across shards, bad headers.
    """
    if is_s3(path):
        return _from_bucket(os.fspath(path))
    p = local_path(path)  # an ``owner/repo/sub`` Hugging Face cache reference -> its snapshot
    if os.path.isfile(p) and is_gguf_name(p):
        return _from_gguf(p)
    if os.path.isfile(p):
        if not p.endswith(".safetensors"):
            raise FormatError(
                f"{p}: base must be a .safetensors or .gguf file or a folder of safetensors, "
                f"found a '{os.path.splitext(p)[1] or 'no'}' extension"
            )
        _refuse_lone_shard(p)
        return _assemble(p, os.path.basename(p)[: -len(".safetensors")], [p])
    if not os.path.isdir(p):
        raise FormatError(f"{p}: base checkpoint not found: {missing(p)}")
    names = sorted(os.listdir(p))
    indexes = [n for n in names if n.endswith(INDEX_SUFFIX)]
    if len(indexes) > 1:
        raise FormatError(f"{p}: found {len(indexes)} index files ({', '.join(indexes)}), expected one")
    if indexes:
        return _from_index(p, os.path.join(p, indexes[0]))
    files = [n for n in names if n.endswith(".safetensors")]
    plain = [n for n in files if not _VARIANT.search(n)]
    if len(files) > 1 and len(plain) == 1:  # diffusers' variants beside the weights (variant=...)
        logger.info(
            "%s: reading %s; variants beside it are not read: %s",
            p,
            plain[0],
            ", ".join(sorted(set(files) - set(plain))),
        )
        files = plain
    if len(files) == 1:
        f = os.path.join(p, files[0])
        return _assemble(p, files[0][: -len(".safetensors")], [f])
    if not files:
        raise FormatError(f"{p}: no .safetensors file and no *{INDEX_SUFFIX} in this folder")
    raise FormatError(
        f"{p}: {len(files)} .safetensors files but no *{INDEX_SUFFIX} saying how they "
        f"fit together ({', '.join(files[:4])}{', …' if len(files) > 4 else ''})"
    )


def _refuse_lone_shard(path: str) -> None:
    """A file that an index beside it lists as one of several shards is not a checkpoint by
    itself: merging into it would leave most LoRA keys without a target."""
    folder, name = os.path.split(os.path.abspath(path))
    for index in sorted(n for n in os.listdir(folder) if n.endswith(INDEX_SUFFIX)):
        try:
            with open(os.path.join(folder, index), "rb") as f:
                shards = set(json.loads(f.read().decode("utf-8")).get("weight_map", {}).values())
        except (OSError, ValueError, AttributeError):
            continue
        if name in shards and len(shards) > 1:
            raise FormatError(
                f"{path}: is one of {len(shards)} shards of the checkpoint indexed by {index}; "
                f"pass the folder as --base ({folder})"
            )


def _from_bucket(url: str) -> BaseCheckpoint:
    """A base in object storage (``s3://bucket/key``): one ``.safetensors`` object, or a prefix
    holding an index and its shards, or one ``.safetensors``; only headers are read (ranged GETs)."""
    url = url.rstrip("/")
    if url.endswith(".safetensors"):  # its header's read says what is wrong with it
        return _assemble(url, url.rsplit("/", 1)[-1][: -len(".safetensors")], [url])
    if is_gguf_name(url):
        raise FormatError(f"{url}: a GGUF base is read from a local or mounted path, not from object storage")
    sizes = {o.url[len(url) + 1 :]: o.size for o in objstore.list_objects(url)}
    names = [n for n in sizes if "/" not in n]  # the folder's own objects
    indexes = [n for n in names if n.endswith(INDEX_SUFFIX)]
    if len(indexes) > 1:
        raise FormatError(f"{url}: found {len(indexes)} index files ({', '.join(indexes)}), expected one")
    if indexes:
        index = f"{url}/{indexes[0]}"
        raw = objstore.read_range(index, 0, sizes[indexes[0]])  # its size is the listing's: one GET
        return _from_index(url, index, raw=raw, exists=lambda shard: shard in names)
    files = [n for n in names if n.endswith(".safetensors") and not _VARIANT.search(n)]
    if len(files) == 1:
        return _assemble(url, files[0][: -len(".safetensors")], [f"{url}/{files[0]}"])
    what = f"{len(files)} .safetensors objects" if files else "no .safetensors object"
    raise FormatError(f"{url}: {what} and no *{INDEX_SUFFIX} below this prefix; expected one checkpoint")


def _from_index(
    folder: str, index_path: str, *, raw: bytes | None = None, exists: Callable[[str], bool] | None = None
) -> BaseCheckpoint:
    """A sharded checkpoint from its index (``raw``: the index's bytes, already read; ``exists``:
    whether a shard name is in the folder, for a folder that is not on a filesystem)."""
    try:
        if raw is None:
            with open(index_path, "rb") as f:
                raw = f.read()
        index = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FormatError(f"{index_path}: cannot read index ({type(e).__name__}: {e})") from None
    wmap = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wmap, dict) or not wmap:
        raise FormatError(f"{index_path}: expected a JSON object with a non-empty 'weight_map'")
    shards: list[str] = []
    for key, shard in wmap.items():
        if not isinstance(shard, str) or not _is_safe_name(shard):
            raise FormatError(
                f"{index_path}: key '{key}' maps to shard {shard!r}; expected a plain "
                "file name ending in .safetensors inside this folder"
            )
        if shard not in shards:
            shards.append(shard)
    files = []
    for shard in shards:
        shard_path = f"{folder}/{shard}" if exists else os.path.join(folder, shard)
        if not (exists(shard) if exists else os.path.isfile(shard_path)):
            raise FormatError(f"{index_path}: names shard '{shard}', which does not exist in {folder}")
        files.append(shard_path)
    stem = os.path.basename(index_path)[: -len(INDEX_SUFFIX)]
    base = _assemble(folder, stem, files)
    for key, shard in wmap.items():
        info = base.tensors.get(key)
        if info is None or os.path.basename(info.path) != shard:
            raise FormatError(
                f"{index_path}: key '{key}' is listed in '{shard}' but that shard's header does not hold it"
            )
    extra = [k for k in base.tensors if k not in wmap]
    if extra:
        raise FormatError(
            f"{index_path}: {len(extra)} tensors in the shards are missing from "
            f"'weight_map' (first: '{extra[0]}' in {base.tensors[extra[0]].path})"
        )
    return base


#: what a GGUF base may hold: a Wan diffusion model, as ComfyUI-GGUF writes and loads it
#: (``general.architecture = wan``; its loader's ``IMG_ARCH_LIST`` has the other image models)
GGUF_ARCHS = ("wan",)


def _from_gguf(path: str) -> BaseCheckpoint:
    """A GGUF base: one file of a Wan diffusion model (``general.architecture`` ``wan``, or absent
    with Wan's ``head.modulation``, as ComfyUI-GGUF's loader accepts)."""
    h = read_gguf(path)
    arch = h.metadata.get(ARCH_KEY, "")
    if arch not in GGUF_ARCHS and not (arch == "" and "head.modulation" in h.tensors):
        what = f"general.architecture '{arch}'" if arch else "no general.architecture and no Wan tensors"
        raise FormatError(
            f"{path}: a GGUF with {what}; distmerge merges GGUF Wan diffusion models "
            f"(general.architecture 'wan', as ComfyUI-GGUF writes them)"
        )
    if not h.tensors:
        raise FormatError(f"{path}: the base checkpoint holds no tensors")
    stem = os.path.basename(path)[: -len(GGUF_SUFFIX)]
    return BaseCheckpoint(path=path, stem=stem, files=(path,), tensors=dict(h.tensors), headers=(h,))


def _is_safe_name(name: str) -> bool:
    if not name.endswith(".safetensors") or name in (".", ".."):
        return False
    for pure in (PurePosixPath(name), PureWindowsPath(name)):
        if pure.is_absolute() or pure.drive or len(pure.parts) != 1:
            return False
    return True


def _assemble(path: str, stem: str, files: list[str]) -> BaseCheckpoint:
    headers = tuple(read_header(f) for f in files)
    tensors: dict[str, TensorInfo] = {}
    for h in headers:
        for key, info in sorted(h.tensors.items(), key=lambda kv: kv[1].offset):
            if key in tensors:
                raise FormatError(
                    f"{h.path}: key '{key}' also appears in {tensors[key].path}; each key must be in exactly one shard"
                )
            tensors[key] = info
    if not tensors:
        raise FormatError(f"{path}: the base checkpoint holds no tensors")
    return BaseCheckpoint(path=path, stem=stem, files=tuple(files), tensors=tensors, headers=headers)
