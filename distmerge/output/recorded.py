"""The checksums an output records, read back: the index's ``metadata.distmerge.crc32`` (or
``.sha256``), or beside a single-file output a ``<file>.crc32`` / ``<file>.sha256`` sidecar in the
``sha256sum`` format (``HEX  NAME``), as ``output.staging`` writes them.

Example:
    >>> import os, tempfile
    >>> from distmerge.inputs.checkpoint import BaseCheckpoint
    >>> d = tempfile.mkdtemp(); f = os.path.join(d, "m.safetensors")
    >>> with open(f + ".crc32", "w") as side:
    ...     _ = side.write("0badc0de  m.safetensors\\n")
    >>> recorded_checksums(BaseCheckpoint(f, "m", (f,), {}, ()))
    (('crc32', {'m.safetensors': '0badc0de'}), '')
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

from distmerge.errors import FormatError
from distmerge.inputs import objstore
from distmerge.inputs.checkpoint import INDEX_SUFFIX, BaseCheckpoint
from distmerge.inputs.s3client import is_s3
from distmerge.tasks.checksum import ALGORITHMS

__all__ = ["Recorded", "checksum_mismatches", "recorded_checksums"]

#: ``(algorithm, {shard name: hex})``
Recorded = tuple[str, dict[str, str]]

_SIDECAR_RE = re.compile(r"^([0-9a-fA-F]+) [ *](.+)$")
_HEX_LEN = {"crc32": 8, "sha256": 64}


def recorded_checksums(out: BaseCheckpoint) -> tuple[Recorded | None, str]:
    """What ``out`` records (None when nothing is), and what is wrong with the record ("" when
    nothing): an unreadable index or sidecar, values that are not hex checksums."""
    if is_s3(out.path):
        return _in_bucket(out)
    index = [n for n in sorted(os.listdir(out.path)) if n.endswith(INDEX_SUFFIX)] if os.path.isdir(out.path) else []
    if index:
        return _from_index(os.path.join(out.path, index[0]))
    sides = [(a, f"{out.files[0]}.{a}") for a in ALGORITHMS if os.path.isfile(f"{out.files[0]}.{a}")]
    if len(out.files) != 1 or not sides:
        return None, ""
    return _from_sidecar(*sides[0])


def _in_bucket(out: BaseCheckpoint) -> tuple[Recorded | None, str]:
    """``recorded_checksums`` of a checkpoint in a bucket: its index, or its one object's sidecar."""
    index = sorted(o.url for o in objstore.list_objects(out.path) if o.url.endswith(INDEX_SUFFIX))
    if index:
        return _from_index(index[0])
    if len(out.files) != 1:
        return None, ""
    names = {o.url for o in objstore.list_objects(out.files[0].rsplit("/", 1)[0])}
    sides = [(a, f"{out.files[0]}.{a}") for a in ALGORITHMS if f"{out.files[0]}.{a}" in names]
    return _from_sidecar(*sides[0]) if sides else (None, "")


def _text(path: str) -> str:
    """A small file's or object's text."""
    if is_s3(path):
        return objstore.read_range(path, 0, objstore.stat(path).size).decode("utf-8")
    with open(path, encoding="utf-8") as f:
        return f.read()


def _from_index(path: str) -> tuple[Recorded | None, str]:
    try:
        meta = json.loads(_text(path)).get("metadata") or {}
    except (OSError, ValueError, AttributeError, FormatError) as e:
        return None, f"{path}: cannot read the index ({type(e).__name__})"
    ours = meta.get("distmerge") if isinstance(meta, dict) else None
    ours = ours if isinstance(ours, dict) else {}
    algo = next((a for a in ALGORITHMS if a in ours), None)
    if algo is None:
        return None, ""
    sums = ours[algo]
    if not isinstance(sums, dict) or not all(isinstance(v, str) and len(v) == _HEX_LEN[algo] for v in sums.values()):
        n = _HEX_LEN[algo]
        return (algo, {}), f"{path}: metadata.distmerge.{algo} must map shard names to {n}-digit hex {algo} values"
    return (algo, {k: v.lower() for k, v in sums.items()}), ""


def _from_sidecar(algo: str, side: str) -> tuple[Recorded | None, str]:
    try:
        lines = [ln.strip() for ln in _text(side).splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError, FormatError) as e:
        return (algo, {}), f"{side}: cannot read ({type(e).__name__})"
    sums = {}
    for ln in lines:
        m = _SIDECAR_RE.match(ln)
        if not m or len(m.group(1)) != _HEX_LEN[algo]:
            n = _HEX_LEN[algo]
            return (algo, {}), f"{side}: expected 'HEX  NAME' with a {n}-digit {algo}, found {ln[:80]!r}"
        sums[os.path.basename(m.group(2))] = m.group(1).lower()
    return (algo, sums), ""


def checksum_mismatches(out: BaseCheckpoint, recorded_by: Recorded, digests: Mapping[str, str]) -> list[str]:
    """Every shard's hash (``digests``: shard name -> hex, as the tasks read them) against the
    recorded one: a shard with none recorded, a different one, a recorded name that is no shard."""
    algo, recorded = recorded_by
    names = {os.path.basename(f) for f in out.files}
    msgs = []
    for f in out.files:
        name = os.path.basename(f)
        want = recorded.get(name)
        if want is None:
            msgs.append(f"{f}: no {algo} recorded for this shard")
        elif name in digests and digests[name] != want:
            msgs.append(f"{f}: {algo} {digests[name][:12]} does not match the recorded {want[:12]}")
    where = f"{out.path}: a {algo} is recorded for"
    return msgs + [f"{where} '{n}', which is not a shard of this checkpoint" for n in recorded if n not in names]
