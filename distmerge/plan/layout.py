"""Write safetensors files whose header is known before any tensor exists.

``layout_shard`` turns (key, dtype, shape) entries into the exact header bytes and each tensor's
absolute offset, so many writers (Ray tasks, even on different nodes) can fill one file at known
offsets. Entries are ordered by element size, largest first (stable), which keeps every tensor
aligned to its element size, as safetensors' own serializer does; the JSON header is padded with
spaces so the data buffer starts on an 8-byte boundary.

Example:
    >>> lay = layout_shard([("b", "BF16", (3,)), ("a", "F32", (2,))], metadata={"format": "pt"})
    >>> [(e.key, e.offset - lay.data_start) for e in lay.entries], lay.data_start % 8
    ([('a', 0), ('b', 8)], 0)
    >>> lay.size - lay.data_start  # 2 x 4 bytes + 3 x 2 bytes, no holes
    14
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from distmerge.inputs.dtypes import itemsize

__all__ = ["LaidTensor", "ShardLayout", "layout_shard"]


@dataclass(frozen=True)
class LaidTensor:
    key: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  #: absolute byte offset in the file
    nbytes: int
    pad: int = 0  #: zero bytes after it, up to the next tensor (GGUF's alignment; none in safetensors)


@dataclass(frozen=True)
class ShardLayout:
    header: bytes  #: the first ``data_start`` bytes of the file (length prefix + padded JSON)
    entries: tuple[LaidTensor, ...]
    size: int  #: total file size

    @property
    def data_start(self) -> int:
        return len(self.header)


def layout_shard(
    entries: Iterable[tuple[str, str, tuple[int, ...]]],
    *,
    metadata: Mapping[str, str] | None = None,
    attach: Mapping[str, str] | None = None,
) -> ShardLayout:
    """Compute the header bytes and offsets of a safetensors file holding ``entries``.

    Args:
        entries: ``(key, safetensors dtype code, shape)`` in the preferred order.
        metadata: the ``__metadata__`` string map (e.g. ``{"format": "pt"}``).
        attach: ``{follower: leader}``: each follower is laid out right after its leader (an fp8
            weight's scale, so one task writes both); the pair sorts by the follower's element
            size, and every member must stay aligned to its own.

    >>> lay = layout_shard([("s", "F32", ()), ("h", "BF16", (2,)), ("w", "F8_E4M3", (8,))], attach={"s": "w"})
    >>> [(e.key, e.offset - lay.data_start) for e in lay.entries]
    [('w', 0), ('s', 8), ('h', 12)]
    """
    items = list(entries)
    order = _order(items, attach) if attach else sorted(range(len(items)), key=lambda i: -itemsize(items[i][1]))
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    pos = 0
    spans = []
    for i in order:
        key, dtype, shape = items[i]
        n = math.prod(shape) * itemsize(dtype)
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
        spans.append((key, dtype, tuple(shape), pos, n))
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)
    head = struct.pack("<Q", len(raw)) + raw
    laid = tuple(LaidTensor(k, d, s, len(head) + off, n) for k, d, s, off, n in spans)
    return ShardLayout(header=head, entries=laid, size=len(head) + pos)


def _order(items: list[tuple[str, str, tuple[int, ...]]], attach: Mapping[str, str]) -> list[int]:
    """Entry indices in layout order: blocks (a leader and its followers) sorted stably by the
    largest element size in the block."""
    where = {key: i for i, (key, _, _) in enumerate(items)}
    followers: dict[int, list[int]] = {}
    for f, lead in attach.items():
        if f in where and lead in where:
            followers.setdefault(where[lead], []).append(where[f])
    attached = {i for fs in followers.values() for i in fs}
    blocks = [[i] + followers.get(i, []) for i in range(len(items)) if i not in attached]
    for b in blocks:
        align, pos = max(itemsize(items[i][1]) for i in b), 0
        for i in b:
            size = itemsize(items[i][1])
            if pos % size:
                raise ValueError(f"'{items[i][0]}' would be misaligned after '{items[b[0]][0]}'")
            pos += math.prod(items[i][2]) * size
        if pos % align:
            raise ValueError(f"the block of '{items[b[0]][0]}' ({pos} bytes) breaks {align}-byte alignment")
    blocks.sort(key=lambda b: -max(itemsize(items[i][1]) for i in b))  # stable
    return [i for b in blocks for i in b]
