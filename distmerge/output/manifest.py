"""The resume manifest: what a run was asked to do, and which work units are already on disk.

It lives next to the part files (``.distmerge-manifest.json`` in the output folder) while a run is
in progress and is removed when the result is published. A crashed run leaves it behind; a rerun
with ``--resume`` reuses every unit whose bytes still check out (size, CRC-32 of the computed
bytes, copied bytes equal to the base) and refuses if the inputs or options changed.

Example:
    >>> m = Manifest({"alpha": 1.0}, unit_size=1024)
    >>> m.record(3, crc32=12345, nbytes=4096)
    >>> m.units[3]
    {'crc32': 12345, 'bytes': 4096}
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

from distmerge.inputs.checkpoint import BaseCheckpoint
from distmerge.output.atomic import write_atomic
from distmerge.plan.merge_plan import MergePlan
from distmerge.tasks.checksum import sha256_file

__all__ = ["Manifest", "fingerprint", "fingerprint_changes", "lora_sha256", "MANIFEST_VERSION"]

MANIFEST_VERSION = 1


def lora_sha256(path: str) -> str:
    """A LoRA's content hash: the file itself, or for a folder every LoRA file and
    ``adapter_config.json`` in it (the config's r/alpha/patterns change the result too)."""
    if not os.path.isdir(path):
        return sha256_file(path)
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        if name == "adapter_config.json" or name.endswith((".safetensors", ".bin", ".pth", ".pt", ".ckpt")):
            h.update(name.encode() + b"\0" + sha256_file(os.path.join(path, name)).encode())
    for where, dirs, names in sorted(os.walk(path))[1:]:  # a Megatron checkpoint: configs and rank files
        dirs.sort()
        for name in sorted(n for n in names if n in _MEGATRON_FILES):
            rel = os.path.relpath(os.path.join(where, name), path)
            h.update(rel.encode() + b"\0" + sha256_file(os.path.join(where, name)).encode())
    return h.hexdigest()


#: the files of a Megatron checkpoint below its adapter folder that decide the merge
_MEGATRON_FILES = ("model_optim_rng.pt", "mca_config.json", "adapter_config.json", "latest_checkpointed_iteration.txt")


def fingerprint(
    base: BaseCheckpoint, loras: list[tuple[str, float]], *, alpha: float, out_dtype: str | None, plan: MergePlan
) -> dict[str, Any]:
    """Everything that determines the output bytes: base headers, LoRA contents, weights, options,
    and the plan (shard names, headers, unit boundaries)."""
    h = hashlib.sha256()
    for hdr in base.headers:
        h.update(os.path.basename(hdr.path).encode())
        h.update(str(hdr.file_size).encode())
        h.update(
            json.dumps(
                {k: [t.dtype, list(t.shape), t.offset, t.nbytes] for k, t in hdr.tensors.items()}, sort_keys=True
            ).encode()
        )
    p = hashlib.sha256()
    for s in plan.shards:
        p.update(s.name.encode() + s.header)
    for u in plan.units:
        p.update(f"{u.index}:{u.shard}:{u.tensors[0].key}:{u.tensors[-1].key}".encode())
    return {
        "base": h.hexdigest(),
        "loras": [{"path": os.path.abspath(path), "sha256": lora_sha256(path)} for path, _ in loras],
        "weights": [w for _, w in loras],
        "alpha": alpha,
        "dtype": out_dtype or "keep",
        "plan": p.hexdigest(),
    }


def fingerprint_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human names of what differs between two fingerprints (empty: same job)."""
    out = []
    if old.get("base") != new.get("base"):
        out.append("the base checkpoint's headers")
    olds, news = old.get("loras", []), new.get("loras", [])
    if [x["path"] for x in olds] != [x["path"] for x in news]:
        out.append("the list of LoRA files")
    else:
        out += [f"LoRA file {n['path']} (contents)" for o, n in zip(olds, news) if o["sha256"] != n["sha256"]]
    for key, name in (("weights", "--weight"), ("alpha", "--alpha"), ("dtype", "--dtype")):
        if old.get(key) != new.get(key):
            out.append(f"{name} ({old.get(key)} -> {new.get(key)})")
    if not out and old.get("plan") != new.get("plan"):
        out.append("the output plan (--max-shard-size or output path)")
    return out


@dataclass
class Manifest:
    fingerprint: dict[str, Any]
    unit_size: int
    units: dict[int, dict[str, int]] = field(default_factory=dict)
    path: str = ""

    def record(self, index: int, *, crc32: int, nbytes: int) -> None:
        self.units[index] = {"crc32": crc32, "bytes": nbytes}

    def save(self, path: str | None = None) -> None:
        """Write atomically (temp + rename), without fsync: it would force the part files' dirty
        gigabytes out on every unit (see ``write_atomic``), and it would buy nothing, since the
        parts are not durable before the end either and ``--resume`` re-checks every unit's bytes
        (a manifest lost in a power cut only means those units are redone)."""
        self.path = path or self.path
        write_atomic(
            self.path,
            json.dumps(
                {
                    "version": MANIFEST_VERSION,
                    "fingerprint": self.fingerprint,
                    "unit_size": self.unit_size,
                    "units": {str(k): v for k, v in sorted(self.units.items())},
                }
            ),
            durable=False,
        )

    @classmethod
    def load(cls, path: str) -> Manifest | None:
        """The manifest at ``path``, or None when absent or unreadable (nothing to resume)."""
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
            if d.get("version") != MANIFEST_VERSION:
                return None
            units = {int(k): {"crc32": int(v["crc32"]), "bytes": int(v["bytes"])} for k, v in d["units"].items()}
            return cls(d["fingerprint"], int(d["unit_size"]), units, path)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
