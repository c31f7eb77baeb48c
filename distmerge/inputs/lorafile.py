"""Open a LoRA file (safetensors or a torch pickle) and read its tensors one at a time.

The driver only needs names, dtypes and shapes (plus tiny ``.alpha`` scalars); Ray tasks read the
factors they need. Safetensors files are read through their header; pickles (``.pth``/``.pt``/
``.bin``) are loaded with ``torch.load(weights_only=True, mmap=True)``, which refuses pickles that
carry code and maps tensor storage lazily instead of reading it.

Example:
    >>> import tempfile, os, torch
    >>> path = os.path.join(tempfile.mkdtemp(), "diffusion_module.pth")
    >>> torch.save({"base_model.model.x.lora_A.default.weight": torch.ones(2, 3)}, path)
    >>> lf = open_lora(path)
    >>> lf.kind, lf.tensors["base_model.model.x.lora_A.default.weight"].shape
    ('pickle', (2, 3))
"""

from __future__ import annotations

import json
import math
import os
import pickle
import struct
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from safetensors import safe_open

from distmerge.errors import FormatError
from distmerge.inputs import objstore
from distmerge.inputs.header import read_header
from distmerge.inputs.hub import local_path
from distmerge.inputs.objstore import is_s3
from distmerge.inputs.paths import missing
from distmerge.inputs.rawio import read_bytes

if TYPE_CHECKING:
    import torch

    from distmerge.inputs.megatron import MegatronCheckpoint

__all__ = ["TensorMeta", "TensorSource", "LoraFile", "open_lora", "load_pickle", "LoraReader", "PICKLE_SUFFIXES"]

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_LORA_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES
_WRAPPER_KEYS = ("state_dict", "module", "model_state")


@dataclass(frozen=True)
class TensorMeta:
    dtype: str
    shape: tuple[int, ...]
    offset: int = -1  #: absolute offset of its bytes in a safetensors file (-1: not known)
    nbytes: int = 0


#: how a one-element tensor of these safetensors codes decodes without torch (BF16: the top half of
#: a float32)
_SCALARS = {"F64": "<d", "F32": "<f", "F16": "<e", "I64": "<q", "I32": "<i", "I16": "<h", "I8": "<b", "U8": "<B"}


class TensorSource(Protocol):
    """Where tensors are read from by (file, key): a ``LoraReader``, or an in-memory stand-in."""

    def read(self, path: str, key: str) -> torch.Tensor: ...


@dataclass
class LoraFile:
    """A LoRA file's table of contents: key -> dtype and shape, plus any metadata and config.

    ``reader`` serves ``read`` (a ``LoraReader`` made on first use when not given; an in-memory
    source lets a state dict pose as a file).
    """

    path: str
    kind: str  #: ``safetensors``, ``pickle`` (or ``memory`` for a state dict)
    tensors: dict[str, TensorMeta]
    metadata: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] | None = None  #: a sibling ``adapter_config.json`` (PEFT), if any
    reader: TensorSource | None = field(default=None, repr=False, compare=False)
    #: a Megatron checkpoint (``kind == "megatron"``): its rank files (``inputs.megatron``)
    megatron: MegatronCheckpoint | None = field(default=None, repr=False, compare=False)

    def read(self, key: str) -> torch.Tensor:
        """Load one tensor (CPU)."""
        if self.reader is None:
            self.reader = LoraReader()
        return self.reader.read(self.path, key)

    def scalar(self, key: str) -> tuple[tuple[int, ...], float | None]:
        """The shape of a tensor that should hold one value (an ``.alpha``), and that value (None
        when it holds more or fewer): decoded from the file's bytes for a safetensors file (no torch
        needed), else read as a tensor."""
        meta = self.tensors[key]
        if self.reader is None and meta.offset >= 0 and (meta.dtype in _SCALARS or meta.dtype == "BF16"):
            if math.prod(meta.shape) != 1:
                return meta.shape, None
            fd = os.open(self.path, os.O_RDONLY)
            try:
                raw = bytes(read_bytes(fd, meta.offset, meta.nbytes))
            finally:
                os.close(fd)
            if meta.dtype == "BF16":
                return meta.shape, float(struct.unpack("<f", b"\0\0" + raw)[0])
            value = struct.unpack(_SCALARS[meta.dtype], raw)[0]
            return meta.shape, float(struct.unpack("<f", struct.pack("<f", value))[0])  # as float32, like torch
        t = self.read(key)
        return tuple(t.shape), (float(t.float().item()) if t.numel() == 1 else None)

    @property
    def _reader(self) -> TensorSource | None:  # the earlier name of ``reader``
        return self.reader

    @_reader.setter
    def _reader(self, reader: TensorSource | None) -> None:
        self.reader = reader


def _resolve_path(path: str) -> tuple[str, dict[str, Any] | None]:
    path = local_path(path)  # an ``owner/repo/file`` Hugging Face cache reference -> its snapshot
    if os.path.isfile(path):
        return path, None
    if not os.path.isdir(path):
        raise FormatError(f"{path}: LoRA file not found: {missing(path)}")
    config = None
    cfg_path = os.path.join(path, "adapter_config.json")
    if os.path.isfile(cfg_path):
        try:
            with open(cfg_path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            raise FormatError(f"{cfg_path}: cannot read adapter config ({e})") from None
        for name in ("adapter_model.safetensors", "adapter_model.bin"):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name), config
        raise FormatError(f"{path}: has adapter_config.json but no adapter_model.safetensors or adapter_model.bin")
    found = sorted(n for n in os.listdir(path) if n.endswith(_LORA_SUFFIXES))
    if len(found) == 1:
        return os.path.join(path, found[0]), None
    if not found:
        raise FormatError(
            f"{path}: no LoRA file in this folder (looked for adapter_config.json and *{', *'.join(_LORA_SUFFIXES)})"
        )
    raise FormatError(
        f"{path}: {len(found)} candidate LoRA files ({', '.join(found[:4])}); pass the file itself with --lora"
    )


def _torch_load(path: str) -> object:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        # legacy (non-zip) pickles cannot be mapped: load them whole
        return torch.load(path, map_location="cpu", weights_only=True)


def load_pickle(path: str) -> dict[str, torch.Tensor]:
    """A pickled state dict, loaded with ``weights_only`` (mapped where possible); a Megatron rank
    file (``model_optim_rng.pt``) gives its ``model`` dict less TransformerEngine's ``_extra_state``."""
    import torch

    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols; the outcome is what counts
            warnings.simplefilter("ignore")
            obj = _torch_load(path)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = next((ln for ln in lines if "Unsupported" in ln or "GLOBAL" in ln), lines[0] if lines else "")
        raise FormatError(
            f"{path}: refused to load: the pickle holds more than tensors (only "
            f"weights_only pickles are loaded; torch says: {why[:200]})"
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise FormatError(
            f"{path}: cannot load torch pickle ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})"
        ) from None
    if os.path.basename(path) == "model_optim_rng.pt" and isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = {k: v for k, v in obj["model"].items() if not str(k).endswith("._extra_state")}
    if isinstance(obj, dict) and len(obj) == 1:
        ((only_key, only),) = obj.items()
        if only_key in _WRAPPER_KEYS and isinstance(only, dict):
            obj = only
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: expected a pickled dict of tensors, found {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise FormatError(
            f"{path}: expected a dict of str -> tensor; entry {bad[0]!r} is "
            f"{type(obj[bad[0]]).__name__} ({len(bad)} such entries)"
        )
    return obj


def open_lora(path: str | os.PathLike[str]) -> LoraFile:
    """Open a LoRA given as a file or a folder (PEFT adapter folder, or a folder with one file).

    Raises:
        FormatError: missing/unreadable file, refused pickle, non-tensor contents, unknown dtype.
    """
    from distmerge.inputs.megatron import open_megatron

    local = local_path(os.fspath(path))
    ck = open_megatron(local)
    if ck is not None:
        metas = {f"{os.path.relpath(f.path, ck.path)}:{k}": m for f in ck.files for k, m in f.tensors.items()}
        return LoraFile(ck.path, "megatron", metas, {}, None, megatron=ck)
    file, config = _resolve_path(os.fspath(path))
    if file.endswith(".safetensors"):
        h = read_header(file)
        metas = {k: TensorMeta(t.dtype, t.shape, t.offset, t.nbytes) for k, t in h.tensors.items()}
        return LoraFile(file, "safetensors", metas, h.metadata, config)
    if not file.endswith(PICKLE_SUFFIXES):
        raise FormatError(
            f"{file}: unknown LoRA file type; expected {', '.join(_LORA_SUFFIXES)} or a PEFT adapter folder"
        )
    from distmerge.inputs.torch_dtypes import code_of  # a pickle holds torch tensors: torch is loaded

    sd = load_pickle(file)
    metas = {}
    for k, v in sd.items():
        try:
            metas[k] = TensorMeta(code_of(v.dtype), tuple(v.shape))
        except KeyError:
            raise FormatError(f"{file}: key '{k}' has dtype {v.dtype}, which distmerge cannot read") from None
    return LoraFile(file, "pickle", metas, {}, config, LoraReader(pickles={file: sd}))


class LoraReader:
    """Reads LoRA tensors by (file, key), keeping each file open for the reader's lifetime.

    One reader serves one work unit; a pickle's index is loaded (its storages mapped) once per
    worker process for the last ``SHARED_PICKLES`` files, not once per unit (unpickling a ROLL
    adapter's 800-tensor index costs ~0.3 s of CPU); ``pickles`` hands it pickles already loaded
    (path -> tensors). Whole safetensors tensors are
    kept in a small cache (the last ``CACHE_ENTRIES``, at most ``CACHE_BYTES``): the per-expert
    deltas of a fused MoE adapter all take strided columns of the same B, which is then read once
    per unit instead of once per expert; their A rows are read alone (``read_rows``).
    """

    CACHE_BYTES = 512 << 20
    CACHE_ENTRIES = 4
    SHARED_PICKLES = 2
    #: bytes of shared pickles read since this process last gave back its mapped pages
    _touched: dict[str, int] = {}
    #: give the pages back once this much was read (reading ``/proc/self/smaps`` costs ~40 ms)
    DROP_AFTER = 1 << 26  # 64 MiB
    #: (path, size, mtime, inode) -> tensors, shared by the readers of one process
    _shared: OrderedDict[tuple[str, int, int, int], dict[str, torch.Tensor]] = OrderedDict()

    def __init__(self, pickles: Mapping[str, dict[str, torch.Tensor]] | None = None) -> None:
        self._pickles: dict[str, dict[str, torch.Tensor]] = dict(pickles or {})
        self._st: dict[str, Any] = {}
        self._cache: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self._cached = 0
        self._fetched: dict[str, str] = {}

    def _local(self, path: str) -> str:
        """The file to read: an ``s3://`` LoRA is this node's copy (``objstore.cached``: fetched
        once per node and version; looked up once per reader, i.e. per unit)."""
        if not is_s3(path):
            return path
        if path not in self._fetched:
            self._fetched[path] = objstore.cached(path)
        return self._fetched[path]

    def read(self, path: str, key: str) -> torch.Tensor:
        path = self._local(path)
        if path.endswith(".safetensors"):
            hit = self._cache.get((path, key))
            if hit is not None:
                self._cache.move_to_end((path, key))
                return hit
            handle = self._st.get(path)
            if handle is None:
                handle = self._st[path] = safe_open(path, framework="pt", device="cpu")
            t = handle.get_tensor(key)
            self._remember((path, key), t)
            return t
        sd = self._pickles.get(path)
        if sd is None:
            sd = self._pickles[path] = self._shared_pickle(path)
        t = sd[key]
        self._touched[path] = self._touched.get(path, 0) + t.numel() * t.element_size()
        return t

    def close(self) -> None:
        """The unit is done: give back this process's pages of the pickles it read (they stay
        mapped, and in the page cache, for the next unit)."""
        from distmerge.inputs.mapped import drop_mapped_pages

        for path in self._pickles:
            if self._touched.get(path, 0) >= self.DROP_AFTER:
                drop_mapped_pages(path)
                self._touched[path] = 0

    @classmethod
    def _shared_pickle(cls, path: str) -> dict[str, torch.Tensor]:
        st = os.stat(path)
        where = (path, st.st_size, st.st_mtime_ns, st.st_ino)
        sd = cls._shared.get(where)
        if sd is None:
            sd = cls._shared[where] = load_pickle(path)
            while len(cls._shared) > cls.SHARED_PICKLES:
                cls._shared.popitem(last=False)
        cls._shared.move_to_end(where)
        return sd

    def read_rows(self, path: str, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of a tensor; from a safetensors file only their bytes are read."""
        path = self._local(path)
        if not path.endswith(".safetensors") or (path, key) in self._cache:
            return self.read(path, key)[start:stop]
        handle = self._st.get(path)
        if handle is None:
            handle = self._st[path] = safe_open(path, framework="pt", device="cpu")
        return handle.get_slice(key)[start:stop]

    def _remember(self, where: tuple[str, str], t: torch.Tensor) -> None:
        size = t.numel() * t.element_size()
        if size > self.CACHE_BYTES:
            return
        self._cache[where] = t
        self._cached += size
        while self._cached > self.CACHE_BYTES or len(self._cache) > self.CACHE_ENTRIES:
            _, old = self._cache.popitem(last=False)
            self._cached -= old.numel() * old.element_size()
