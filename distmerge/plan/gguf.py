"""GGUF outputs as plain data: each tensor's GGML type, and the file's header and offsets.

The type rules are city96's (ComfyUI-GGUF ``tools/convert.py`` then its patched
``llama-quantize``, ``tools/lcpp.patch``), so a file distmerge writes loads in ComfyUI-GGUF as one
made by those tools:

* the **block linears** (2-D ``…weight`` of ``blocks.N.``: attention ``q/k/v/o``, ``k_img``/``v_img``,
  ``ffn.0``/``ffn.2``; ``lcpp.patch`` quantizes 2-D weights except names holding ``modulation.``,
  ``patch_embedding.``, ``text_embedding.``, ``time_projection.``, ``time_embedding.``, ``img_emb.``,
  ``head.``) get the ``--dtype`` type; a Q4_0 (Q5_0) file has ``ffn.2`` in Q4_1 (Q5_1), as the
  patch's ``ffn_down`` rule says; a row that is not whole blocks falls back to F16;
* every other tensor: **F32** when 1-D, at most 1024 values or a ``modulation`` (convert.py's
  rule; ComfyUI needs modulation and the RMSNorm weights in F32/F16), the 5-D Conv3d
  ``patch_embedding`` F32 with all 5 dims (``tools/fix_5d_tensors.py``), else BF16 from a bf16
  source and F16 otherwise (convert.py), or the ``--dtype`` float type when one is asked for;
* from a GGUF base, ``--dtype keep`` keeps each tensor's type; a type gguf-py cannot write (the
  K-quants, the IQ types) becomes Q8_0, which the caller says aloud.

The header is gguf-py's own (``GGUFWriter``), rendered before any data exists: every tensor's
offset is fixed by it, so tasks fill the file at known offsets as they do a safetensors shard.

Example:
    >>> from distmerge.inputs.header import TensorInfo
    >>> T = lambda k, s, d="BF16": TensorInfo(k, d, s, "b.safetensors", 0, 0)
    >>> [gguf_type(T(k, s), "Q8_0", from_gguf=False) for k, s in [
    ...     ("blocks.0.ffn.0.weight", (64, 32)), ("blocks.0.ffn.0.bias", (64,)), ("head.head.weight", (64, 32)),
    ...     ("blocks.0.modulation", (1, 6, 32)), ("patch_embedding.weight", (8, 4, 1, 2, 2))]]
    ['Q8_0', 'F32', 'BF16', 'F32', 'F32']
    >>> gguf_type(T("blocks.0.ffn.2.weight", (32, 64)), "Q5_0", from_gguf=False)
    'Q5_1'
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterable, Mapping

from distmerge.inputs.dtypes import ITEMSIZES
from distmerge.inputs.ggml import WRITABLE, block_sizes, is_quant, tensor_nbytes
from distmerge.inputs.header import TensorInfo
from distmerge.plan.layout import LaidTensor, ShardLayout

__all__ = [
    "GGUF_FLOATS",
    "GGUF_TYPES",
    "file_type",
    "gguf_type",
    "is_block_linear",
    "layout_gguf",
]

#: the float types a GGUF output may hold (gguf-py writes them as numpy casts, BF16 as bits)
GGUF_FLOATS = ("BF16", "F16", "F32")
#: every type ``--dtype`` may ask of a GGUF output
GGUF_TYPES = WRITABLE + GGUF_FLOATS
#: name parts ``lcpp.patch`` never quantizes in a Wan model
_KEEP = (
    "modulation.",
    "patch_embedding.",
    "text_embedding.",
    "time_projection.",
    "time_embedding.",
    "img_emb.",
    "head.",
)
#: the patch's ``ffn_down`` rule: Wan's ``ffn.2`` one step up in a Q4_0 / Q5_0 file
_FFN_DOWN = {"Q4_0": "Q4_1", "Q5_0": "Q5_1"}
_SMALL = 1024  #: convert.py keeps tensors of at most this many values in F32


def _ggml_dims(shape: tuple[int, ...]) -> int:
    """``ggml_n_dims``: dimensions up to the last one above 1 in ggml order (leading 1s of torch's)."""
    dims = list(shape)
    while len(dims) > 1 and dims[0] == 1:
        dims.pop(0)
    return len(dims)


def is_block_linear(key: str, shape: tuple[int, ...]) -> bool:
    """A tensor city96's quantizer quantizes: a 2-D ``…weight`` not named in ``_KEEP``.

    >>> is_block_linear("blocks.3.cross_attn.k_img.weight", (8, 8)), is_block_linear("text_embedding.0.weight", (8, 8))
    (True, False)
    """
    return key.endswith("weight") and _ggml_dims(shape) == 2 and not any(k in key for k in _KEEP)


def gguf_type(info: TensorInfo, want: str | None, *, from_gguf: bool) -> str:
    """The GGML type of ``info`` in a GGUF output, for ``--dtype`` ``want`` (None: keep)."""
    key, shape, src = info.key, info.shape, info.dtype
    if from_gguf and (want is None or not is_block_linear(key, shape)):
        return src if (src in ITEMSIZES or src in WRITABLE) else "Q8_0"
    if len(shape) >= 5:
        return "F32"
    if is_block_linear(key, shape):
        if want is None:
            return "BF16" if src == "BF16" else "F16"
        t = _FFN_DOWN.get(want, want) if key.endswith("ffn.2.weight") else want
        return "F16" if is_quant(t) and shape[-1] % block_sizes(t)[0] else t
    if len(shape) <= 1 or info.numel <= _SMALL or ".modulation" in key or key == "modulation":
        return "F32"
    if want in GGUF_FLOATS:
        return want
    return "BF16" if src == "BF16" else "F16"


def file_type(types: Iterable[str]) -> int:
    """``general.file_type`` (a ``LlamaFileType``) for a file whose block linears have ``types``:
    named for the type holding most of them.

    >>> file_type(["Q8_0", "Q8_0", "F16"]), file_type([]), file_type(["BF16"])
    (7, 0, 32)
    """
    from gguf.constants import LlamaFileType

    common = Counter(types).most_common(1)
    if not common or common[0][0] == "F32":
        return int(LlamaFileType.ALL_F32)
    return int(LlamaFileType[f"MOSTLY_{common[0][0]}"])


def layout_gguf(entries: Iterable[tuple[str, str, tuple[int, ...]]], metadata: Mapping[str, object]) -> ShardLayout:
    """The header bytes (padded to the data's alignment) and each tensor's offset of a GGUF file
    holding ``entries`` (key, GGML type, torch shape) in this order, with ``metadata`` key/values
    (str or int; ``general.architecture`` among them). Tensors are aligned to 32 bytes, each
    followed by zeros up to the next (``LaidTensor.pad``), as ``GGUFWriter`` writes them.

    >>> lay = layout_gguf([("a", "F32", (3,)), ("b", "Q8_0", (2, 32))], {"general.architecture": "wan"})
    >>> [(e.key, e.offset - lay.data_start, e.nbytes, e.pad) for e in lay.entries], lay.data_start % 32
    ([('a', 0, 12, 20), ('b', 32, 68, 28)], 0)
    >>> lay.size - lay.data_start
    128
    """
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.gguf_writer import WriterState

    items = list(entries)
    meta = dict(metadata)
    w = GGUFWriter(None, str(meta.pop("general.architecture")))
    for k, v in meta.items():
        w.add_uint32(k, v) if isinstance(v, int) else w.add_string(k, str(v))
    for key, code, shape in items:
        w.add_tensor_info(key, shape, np.dtype(np.float32), tensor_nbytes(code, shape), GGMLQuantizationType[code])
    buf = io.BytesIO()
    w.fout, w.state = [buf], WriterState.EMPTY  # type: ignore[list-item]  # render in memory, not to a path
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    align = w.data_alignment
    head = buf.getvalue()
    head += b"\0" * (-len(head) % align)
    laid, pos = [], len(head)
    for key, code, shape in items:
        n = tensor_nbytes(code, shape)
        pad = -n % align
        laid.append(LaidTensor(key, code, tuple(shape), pos, n, pad))
        pos += n + pad
    return ShardLayout(header=head, entries=tuple(laid), size=pos)
