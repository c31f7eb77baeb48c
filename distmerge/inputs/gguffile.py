"""Read a GGUF file's header (gguf-py's ``GGUFReader``): its architecture and every tensor's type,
torch-order shape and absolute byte range, as a ``Header`` like a safetensors file's.

GGUF stores dimensions innermost first (ggml's order); they are reversed here, as gguf-py's own
reader does, so ``blocks.0.ffn.0.weight`` of a Wan 14B model is ``(13824, 5120)`` as in torch.
Nothing but the header and tensor infos is read (the reader maps the file; no tensor page is
touched).

Example:
    >>> import os, tempfile, numpy as np, gguf
    >>> p = os.path.join(tempfile.mkdtemp(), "m.gguf")
    >>> w = gguf.GGUFWriter(p, "wan")
    >>> w.add_tensor("head.modulation", np.zeros((1, 2, 8), np.float32))
    >>> w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    >>> h = read_gguf(p)
    >>> h.metadata["general.architecture"], [(t.key, t.dtype, t.shape, t.nbytes) for t in h.tensors.values()]
    ('wan', [('head.modulation', 'F32', (1, 2, 8), 64)])
"""

from __future__ import annotations

import os

from distmerge.errors import FormatError
from distmerge.inputs.header import Header, TensorInfo

__all__ = ["ARCH_KEY", "GGUF_SUFFIX", "is_gguf_name", "read_gguf"]

GGUF_SUFFIX = ".gguf"
#: the metadata key naming what a GGUF holds (``wan`` for ComfyUI-GGUF's Wan files)
ARCH_KEY = "general.architecture"


def is_gguf_name(path: str | os.PathLike[str]) -> bool:
    """A ``….gguf`` name (in any case): a GGUF file to read, or to write."""
    return os.fspath(path).rstrip(os.sep).lower().endswith(GGUF_SUFFIX)


def read_gguf(path: str | os.PathLike[str]) -> Header:
    """The tensors of GGUF file ``path`` in file order, with ``general.architecture`` (``""`` when
    absent) and ``general.file_type`` in ``metadata``.

    Raises:
        FormatError: the file cannot be read or is not a valid GGUF (naming the file and what is wrong).
    """
    p = os.fspath(path)
    try:
        from gguf import GGUFReader
    except ImportError:  # pragma: no cover - a core dependency
        raise FormatError(f"{p}: reading GGUF needs the gguf package: pip install gguf") from None
    try:
        reader = GGUFReader(p, "r")
    except OSError as e:
        raise FormatError(f"{p}: cannot read file ({e.strerror or e})") from None
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise FormatError(f"{p}: not a valid GGUF file ({e})") from None
    tensors: dict[str, TensorInfo] = {}
    size = os.path.getsize(p)
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        info = TensorInfo(t.name, t.tensor_type.name, shape, p, int(t.data_offset), int(t.n_bytes))
        if info.offset + info.nbytes > size:
            raise FormatError(
                f"{p}: not a valid GGUF file: tensor '{t.name}' ends at byte {info.offset + info.nbytes}, "
                f"past the end of the file ({size} bytes; truncated?)"
            )
        tensors[t.name] = info
    meta = {ARCH_KEY: _text(reader, ARCH_KEY), "general.file_type": _text(reader, "general.file_type")}
    start = min((t.offset for t in tensors.values()), default=size)
    return Header(path=p, tensors=tensors, metadata=meta, data_start=start, file_size=size)


def _text(reader: object, key: str) -> str:
    field = reader.get_field(key)  # type: ignore[attr-defined]
    if field is None or not field.types:
        return ""
    try:
        return str(field.contents())
    except (ValueError, IndexError, UnicodeDecodeError):
        return ""
