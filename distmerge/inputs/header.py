"""Read and validate safetensors headers without touching tensor data.

A safetensors file is ``u64 little-endian N`` + ``N`` bytes of JSON + the data buffer. The JSON maps
each tensor name to ``dtype``, ``shape`` and ``data_offsets`` (relative to the buffer); the buffer
must be covered exactly, with no holes or overlaps. ``read_header`` checks all of that against the
file size, so a truncated or tampered file fails here, on the driver, before any work starts.

Example:
    >>> import tempfile, os, torch
    >>> from safetensors.torch import save_file
    >>> path = os.path.join(tempfile.mkdtemp(), "t.safetensors")
    >>> save_file({"w": torch.zeros(2, 3)}, path)
    >>> h = read_header(path)
    >>> h.tensors["w"].shape, h.tensors["w"].dtype, h.tensors["w"].nbytes
    ((2, 3), 'F32', 24)
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field

from distmerge.errors import FormatError
from distmerge.inputs import objstore
from distmerge.inputs.dtypes import ITEMSIZES
from distmerge.inputs.objstore import is_s3

__all__ = ["TensorInfo", "Header", "read_header", "parse_header_bytes", "MAX_HEADER_BYTES"]

#: the safetensors reference implementation refuses headers above 100 MB; so do we
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live: ``path`` at absolute ``offset``, ``nbytes`` long."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    path: str
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    """A parsed, validated header: tensors in file order, plus the file's ``__metadata__``."""

    path: str
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    data_start: int = 8
    file_size: int = 0


def _fail(path: str, what: str) -> FormatError:
    return FormatError(f"{path}: not a valid safetensors file: {what}")


def _header_length(path: str, head: bytes, size: int) -> int:
    """The header length the first 8 bytes ``head`` of a ``size``-byte file give, checked."""
    if len(head) < 8:
        raise _fail(path, f"file is {size} bytes, expected at least 8 (header length)")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES:
        raise _fail(path, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if 8 + n > size:
        raise _fail(path, f"header length {n} points past the end of the file ({size} bytes)")
    return int(n)


def _read_prefix(path: str) -> tuple[bytes, int]:
    if is_s3(path):  # two ranged GETs: the length, then the header
        size = objstore.stat(path).size
        n = _header_length(path, objstore.read_range(path, 0, min(8, size)), size)
        return objstore.read_range(path, 8, n), size
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            n = _header_length(path, f.read(8), size)
            return f.read(n), size
    except FileNotFoundError:
        raise FormatError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise FormatError(f"{path}: expected a file, found a directory") from None
    except PermissionError:
        raise FormatError(f"{path}: cannot read file (permission denied)") from None
    except OSError as e:
        raise FormatError(f"{path}: cannot read file ({e.strerror or e})") from None


def parse_header_bytes(path: str, raw: bytes, file_size: int) -> Header:
    """Validate the JSON header ``raw`` of a file of ``file_size`` bytes (pure; used by fuzzing).

    Raises:
        FormatError: naming ``path`` and, where one is at fault, the tensor key.
    """
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise _fail(path, f"header is not UTF-8 JSON ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise _fail(path, f"header must be a JSON object, found {type(obj).__name__}")
    data_start = 8 + len(raw)
    meta = obj.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _fail(path, "__metadata__ must map strings to strings")
    entries: list[TensorInfo] = []
    for key, spec in obj.items():
        entries.append(_parse_entry(path, key, spec, data_start))
    # The buffer must be covered exactly: sorted by offset, each tensor starts where the last ended.
    entries.sort(key=lambda t: (t.offset, t.nbytes))
    pos = data_start
    for t in entries:
        if t.offset != pos:
            kind = "overlaps the previous tensor" if t.offset < pos else "leaves a gap before it"
            raise _fail(
                path,
                f"tensor '{t.key}' data starts at byte {t.offset - data_start} of the "
                f"buffer, expected {pos - data_start} ({kind})",
            )
        pos = t.offset + t.nbytes
    if pos != file_size:
        what = "truncated" if pos > file_size else "has trailing bytes"
        raise _fail(path, f"file is {file_size} bytes but its header describes {pos} bytes ({what})")
    return Header(
        path=path, tensors={t.key: t for t in entries}, metadata=dict(meta), data_start=data_start, file_size=file_size
    )


def _parse_entry(path: str, key: str, spec: object, data_start: int) -> TensorInfo:
    if not isinstance(spec, dict):
        raise _fail(path, f"tensor '{key}' entry must be an object")
    dtype, shape, offs = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in ITEMSIZES:
        raise _fail(path, f"tensor '{key}' has dtype {dtype!r}, expected one of {sorted(ITEMSIZES)}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise _fail(path, f"tensor '{key}' has shape {shape!r}, expected a list of non-negative ints")
    if (
        not isinstance(offs, list)
        or len(offs) != 2
        or not all(type(o) is int for o in offs)
        or not 0 <= offs[0] <= offs[1]
    ):
        raise _fail(path, f"tensor '{key}' has data_offsets {offs!r}, expected [begin, end] with 0 <= begin <= end")
    nbytes = math.prod(shape) * ITEMSIZES[dtype]
    if offs[1] - offs[0] != nbytes:
        raise _fail(path, f"tensor '{key}' spans {offs[1] - offs[0]} bytes, but {dtype} {tuple(shape)} needs {nbytes}")
    return TensorInfo(key=key, dtype=dtype, shape=tuple(shape), path=path, offset=data_start + offs[0], nbytes=nbytes)


def read_header(path: str | os.PathLike[str]) -> Header:
    """Read and validate the header of one ``.safetensors`` file (reads only the header bytes).

    Args:
        path: the file.

    Returns:
        A ``Header`` whose ``TensorInfo`` offsets are absolute file offsets.

    Raises:
        FormatError: missing/unreadable file, bad JSON, unknown dtype, offsets past the end of the
            file, overlapping or gapped offsets, truncated file.
    """
    p = os.fspath(path)
    raw, size = _read_prefix(p)
    return parse_header_bytes(p, raw, size)
