"""The resume manifest of every job: what a run was asked to do, and which work units are done.

It lives beside the staged output (``.distmerge-manifest.json`` in a merge's output folder, the
``manifest.json`` of an extraction's staging folder) while a run is in progress, and goes with the
staging when the result is published. A crashed run leaves it behind; a rerun with ``--resume``
reuses every unit whose result still checks out, and refuses when what decides the output changed.

A fingerprint is plain data (``fingerprint``): small values are kept as they are, so that
``changes`` can say ``--alpha (1.0 -> 2.0)``; anything larger is kept as its SHA-256.

Example:
    >>> m = Manifest({"alpha": 1.0}, unit_size=1024)
    >>> m.record(3, {"crc32": 12345, "bytes": 4096})
    >>> m.units[3]
    {'crc32': 12345, 'bytes': 4096}
    >>> old, new = fingerprint(alpha=1.0, base={"w": "F32"}), fingerprint(alpha=2.0, base={"w": "BF16"})
    >>> changes(old, new, {"base": "the base's headers", "alpha": "--alpha"})
    ["the base's headers", '--alpha (1.0 -> 2.0)']
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from distmerge.inputs.checkpoint import BaseCheckpoint
from distmerge.output.atomic import write_atomic
from distmerge.tasks.checksum import sha256_file

__all__ = [
    "MANIFEST_VERSION",
    "Manifest",
    "changes",
    "checkpoint_headers",
    "digest",
    "fingerprint",
    "load_previous",
    "lora_sha256",
]

logger = logging.getLogger("distmerge.manifest")  # the name users see in -v logs

#: the manifest format; a manifest of another version means nothing to resume
MANIFEST_VERSION = 2

Payload = Mapping[str, "int | str"]


def digest(obj: object) -> str:
    """The SHA-256 of ``obj``'s canonical JSON.

    >>> digest({"b": 1, "a": [2]}) == digest({"a": [2], "b": 1})
    True
    """
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _small(value: object) -> bool:
    """Kept as it is in a fingerprint (and shown by ``changes``): a number, a short text, a short
    list of those."""
    if value is None or isinstance(value, (bool, int, float)):
        return True
    if isinstance(value, str):
        return len(value) <= 32
    return isinstance(value, (list, tuple)) and len(value) <= 8 and all(_small(v) for v in value)


def fingerprint(**parts: object) -> dict[str, Any]:
    """What decides a job's output, part by part: small values as they are, the rest hashed."""
    return {k: (list(v) if isinstance(v, tuple) else v) if _small(v) else digest(v) for k, v in parts.items()}


def changes(old: Mapping[str, Any], new: Mapping[str, Any], labels: Mapping[str, str]) -> list[str]:
    """Human names (``labels``) of the parts that differ between two fingerprints, with both values
    where they are small; empty: the same job."""
    out = []
    for key, label in labels.items():
        before, after = old.get(key), new.get(key)
        if before != after:
            shown = _small(before) and _small(after)  # a hashed part (64 hex digits) is never small
            out.append(f"{label} ({before} -> {after})" if shown else label)
    return out


def checkpoint_headers(c: BaseCheckpoint) -> list[Any]:
    """Each file of ``c`` by name and size, with every tensor's dtype, shape, offset and size: what a
    fingerprint records of a checkpoint."""
    return [
        [
            os.path.basename(h.path),
            h.file_size,
            {k: [t.dtype, list(t.shape), t.offset, t.nbytes] for k, t in h.tensors.items()},
        ]
        for h in c.headers
    ]


#: the files of a Megatron checkpoint below its adapter folder that decide the merge
_MEGATRON_FILES = ("model_optim_rng.pt", "mca_config.json", "adapter_config.json", "latest_checkpointed_iteration.txt")
_LORA_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")


def lora_sha256(path: str) -> str:
    """A LoRA's content hash: the file itself, or for a folder every LoRA file and
    ``adapter_config.json`` in it (the config's r/alpha/patterns change the result too), and the rank
    files and configs of a Megatron checkpoint below it."""
    if not os.path.isdir(path):
        return sha256_file(path)
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        if name == "adapter_config.json" or name.endswith(_LORA_SUFFIXES):
            h.update(name.encode() + b"\0" + sha256_file(os.path.join(path, name)).encode())
    for where, dirs, names in sorted(os.walk(path))[1:]:
        dirs.sort()
        for name in sorted(n for n in names if n in _MEGATRON_FILES):
            rel = os.path.relpath(os.path.join(where, name), path)
            h.update(rel.encode() + b"\0" + sha256_file(os.path.join(where, name)).encode())
    return h.hexdigest()


def load_previous(path: str, resume: bool, output: str) -> Manifest | None:
    """The interrupted run ``--resume`` continues (None without ``resume``, or when none is there:
    a warning says the run starts from scratch)."""
    previous = Manifest.load(path) if resume else None
    if resume and previous is None:
        logger.warning("--resume: no unfinished run in %s; starting from scratch", output)
    return previous


@dataclass
class Manifest:
    """A run's fingerprint, the unit size its units were cut with, and each finished unit's record."""

    fingerprint: dict[str, Any]
    unit_size: int
    units: dict[int, dict[str, int | str]] = field(default_factory=dict)
    path: str = ""

    def record(self, index: int, payload: Payload) -> None:
        """Unit ``index`` is done; ``payload`` (e.g. its CRC-32 and size) lets a resumed run check it."""
        self.units[index] = dict(payload)

    def save(self, path: str | None = None) -> None:
        """Write atomically (temp + rename), without fsync: it would force the part files' dirty
        gigabytes out on every unit (see ``write_atomic``), and it would buy nothing, since the
        parts are not durable before the end either and ``--resume`` re-checks every unit
        (a manifest lost in a power cut only means those units are redone)."""
        self.path = path or self.path
        units = {str(k): v for k, v in sorted(self.units.items())}
        data = {"version": MANIFEST_VERSION, "fingerprint": self.fingerprint, "unit_size": self.unit_size}
        write_atomic(self.path, json.dumps({**data, "units": units}), durable=False)

    @classmethod
    def load(cls, path: str) -> Manifest | None:
        """The manifest at ``path``, or None when absent, unreadable or of another version."""
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
            if d.get("version") != MANIFEST_VERSION:
                return None
            units = {int(k): _payload(v) for k, v in d["units"].items()}
            return cls(dict(d["fingerprint"]), int(d["unit_size"]), units, path)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None


def _payload(v: object) -> dict[str, int | str]:
    if not isinstance(v, dict) or not v or not all(isinstance(x, (int, str)) for x in v.values()):
        raise ValueError("a unit record must map names to numbers or texts")
    return dict(v)
