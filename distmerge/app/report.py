"""What a merge did, as data: the summary line and the ``--report`` JSON.

Example:
    >>> r = MergeReport(output="/out", pairs_merged=80, tensors_written=219, shards=["m.safetensors"],
    ...                 total_bytes=6_100_000_000, seconds=12.5)
    >>> r.summary_line()
    'merged 80 pairs into 219 tensors, 1 shard, 6.10 GB in 12.5 s -> /out'
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["UnitReport", "MergeReport", "save_report"]

logger = logging.getLogger("distmerge.report")  # the name users see in -v logs


def save_report(data: dict[str, Any], path: str | os.PathLike[str]) -> bool:
    """Write a run's JSON report at ``path`` (creating missing folders), after the output is
    published: a failure then is a warning, never a failed run. Its place was checked before any
    work (``validate.check_report_path``). Returns whether it was written.
    """
    try:
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
    except OSError as e:
        logger.warning(
            "%s: the report could not be written (%s); the output itself is published", path, e.strerror or e
        )
        return False
    return True


@dataclass
class UnitReport:
    index: int
    shard: str
    node_id: str
    device: str
    bytes: int
    seconds: float
    tensors_merged: int
    started_s: float = 0.0  #: when the task began, in seconds after the merge started (worker clock)
    direct_bytes: int = 0  #: of ``bytes``, written with O_DIRECT (0 where the filesystem has none)


@dataclass
class MergeReport:
    output: str
    pairs_merged: int = 0
    tensors_written: int = 0
    tensors_merged: int = 0
    shards: list[str] = field(default_factory=list)
    total_bytes: int = 0
    seconds: float = 0.0
    unmatched: list[dict[str, str]] = field(default_factory=list)
    loras: list[dict[str, Any]] = field(default_factory=list)
    units: list[UnitReport] = field(default_factory=list)
    units_reused: int = 0  #: finished units of an interrupted run kept by ``--resume``
    ray: dict[str, Any] = field(default_factory=dict)
    #: when each driver stage ended, in seconds after the merge started (``-vv`` logs them too)
    phases: dict[str, float] = field(default_factory=dict)
    started_at: float = 0.0  #: when the merge started (Unix time): ``phases`` and units count from it
    base_naming: str = ""  #: how the base names its tensors (``naming.NAMINGS``)
    files_copied: list[str] = field(default_factory=list)  #: the base folder's non-weight files
    files_skipped: list[dict[str, str]] = field(default_factory=list)  #: what was not copied, and why

    def summary_line(self, since_start: float | None = None) -> str:
        """One line for the terminal; ``since_start`` (the command's whole wall time, interpreter
        and Ray start-up included) is shown beside the merge's own seconds when given."""
        skipped = f", {len(self.unmatched)} unmatched LoRA keys skipped" if self.unmatched else ""
        if self.units_reused:
            skipped += f", {self.units_reused} units reused from the interrupted run"
        n = len(self.shards)
        return (
            f"merged {self.pairs_merged} pairs into {self.tensors_written} tensors, {n} "
            f"shard{'s' if n != 1 else ''}, {self.total_bytes / 1e9:.2f} GB in {self.seconds:.1f} s"
            f"{f' ({since_start:.1f} s with start-up)' if since_start is not None else ''}{skipped} -> {self.output}"
        )

    def per_node(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for u in self.units:
            n = out.setdefault(u.node_id or "?", {"units": 0, "bytes": 0, "seconds": 0.0})
            n["units"] += 1
            n["bytes"] += u.bytes
            n["seconds"] += u.seconds
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["nodes"] = self.per_node()
        return d

    def write_json(self, path: str | os.PathLike[str]) -> bool:
        """``save_report`` of this report (a failure is a warning)."""
        return save_report(self.to_dict(), path)
