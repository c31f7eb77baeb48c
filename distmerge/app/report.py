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
import math
import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from distmerge.errors import DistmergeError
from distmerge.inputs.objstore import is_s3

if TYPE_CHECKING:
    from distmerge.tasks.checks import ValueStats

__all__ = ["ExtractReport", "JobReport", "MergeReport", "UnitReport", "VerifyReport", "save_report"]

logger = logging.getLogger("distmerge.report")  # the name users see in -v logs


def save_report(data: dict[str, Any], path: str | os.PathLike[str]) -> bool:
    """Write a run's JSON report at ``path`` (creating missing folders), after the output is
    published: a failure then is a warning, never a failed run. Its place was checked before any
    work (``validate.check_report_path``). Returns whether it was written.
    """
    if is_s3(path):
        return _put_report(data, os.fspath(path))
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


def _put_report(data: dict[str, Any], url: str) -> bool:
    from distmerge.inputs.objwrite import put_bytes

    try:
        put_bytes(url, (json.dumps(data, indent=2) + "\n").encode("utf-8"))
    except DistmergeError as e:
        logger.warning("the report could not be written (%s); the output itself is published", e)
        return False
    return True


@dataclass(kw_only=True)
class JobReport:
    """What every job's report holds (merge, extract, verify): where the output is, how long the
    job took, on which Ray session, and when each driver step ended."""

    output: str = ""
    seconds: float = 0.0
    ray: dict[str, Any] = field(default_factory=dict)  #: session mode, device, tasks in flight
    #: when each driver step ended, in seconds after the job started (``-vv`` logs them too)
    phases: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write_json(self, path: str | os.PathLike[str]) -> bool:
        """``save_report`` of this report (a failure is a warning)."""
        return save_report(self.to_dict(), path)


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
    direct_read_bytes: int = 0  #: base bytes read with O_DIRECT (the rest came from the page cache)
    #: seconds the task waited for reads, computed, and waited for writes (``tasks.pipeline.Waits``)
    waits: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclass
class MergeReport(JobReport):
    """What a merge did: the summary line and the ``--report`` JSON."""

    pairs_merged: int = 0
    tensors_written: int = 0
    tensors_merged: int = 0
    shards: list[str] = field(default_factory=list)
    total_bytes: int = 0
    unmatched: list[dict[str, str]] = field(default_factory=list)
    loras: list[dict[str, Any]] = field(default_factory=list)
    units: list[UnitReport] = field(default_factory=list)
    units_reused: int = 0  #: finished units of an interrupted run kept by ``--resume``
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
        return {**asdict(self), "nodes": self.per_node()}


@dataclass
class ExtractReport(JobReport):
    """What an extraction did: the summary line and the ``--report`` JSON."""

    layout: str = "comfy"
    dtype: str = "BF16"
    base: str = ""
    tuned: str = ""
    base_naming: str = ""
    rank: int | None = None
    energy: float | None = None
    exact: bool = False
    min_diff: float = 0.0
    output_bytes: int = 0
    input_bytes: int = 0
    tensors: list[dict[str, Any]] = field(default_factory=list)  #: one ``TensorStats`` per base tensor
    units: list[dict[str, Any]] = field(default_factory=list)
    units_reused: int = 0
    #: keys of full differences a loader leaves out: ``diffusers`` (norms, modulation, conv kernels,
    #: as diffusers' Wan LoRA loader drops them) and ``peft`` (parameters PEFT cannot hold)
    not_loaded_by: dict[str, list[str]] = field(default_factory=dict)

    def count(self, kind: str) -> int:
        return sum(t["kind"] == kind for t in self.tensors)

    @property
    def ranks(self) -> list[int]:
        return [t["rank"] for t in self.tensors if t["kind"] == "lora"]

    @property
    def retained_energy(self) -> float:
        """Of ‖ΔW‖²_F summed over the LoRA matrices, the fraction their factors keep."""
        total = sum(t["norm"] ** 2 for t in self.tensors if t["kind"] == "lora")
        kept = sum(t["energy"] * t["norm"] ** 2 for t in self.tensors if t["kind"] == "lora")
        return kept / total if total > 0 else 1.0

    @property
    def predicted_error(self) -> float:
        """‖ΔW − B·A‖_F / ‖ΔW‖_F over all LoRA matrices together (float32 factors)."""
        return math.sqrt(max(0.0, 1.0 - self.retained_energy))

    def summary_line(self) -> str:
        ranks = self.ranks
        rk = (
            ""
            if not ranks
            else f" (rank {ranks[0]})"
            if min(ranks) == max(ranks)
            else f" (ranks {min(ranks)}-{max(ranks)})"
        )
        full = self.count("diff") + self.count("set")
        reused = f", {self.units_reused} units reused" if self.units_reused else ""
        return (
            f"extracted {len(ranks)} LoRA pairs{rk} and {full} full differences from {len(self.tensors)} tensors "
            f"({self.count('identical')} identical), retained energy {100 * self.retained_energy:.2f}%, "
            f"predicted error {self.predicted_error:.3g}, {self.output_bytes / 1e9:.3f} GB in {self.seconds:.1f} s"
            f"{reused} -> {self.output}"
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            lora_pairs=len(self.ranks),
            full_differences=self.count("diff"),
            replacements=self.count("set"),
            identical=self.count("identical"),
            retained_energy=self.retained_energy,
            predicted_error=self.predicted_error,
        )
        return d


@dataclass
class VerifyReport(JobReport):
    """The outcome of ``verify``: ``ok`` and the one-line ``verdict`` (what the CLI prints)."""

    ok: bool = False
    verdict: str = ""
    worst_ulp: int = 0  #: the largest ulp distance of any compared value, allowance or not
    worst_key: str = ""
    near: int = 0  #: values beyond the ulp tolerance that passed by the near-cancellation allowance
    worst_rel: float = 0.0  #: the largest ``|out - ref|`` relative to its tensor's ``max|ref|``
    worst_rel_key: str = ""
    values: int = 0  #: values recomputed and compared
    tensors: int = 0  #: tensors of the base
    merged: int = 0  #: tensors with deltas (recomputed)
    failures: list[str] = field(default_factory=list)  #: most serious first
    checksums: str = "missing"  #: ``match``, ``missing`` or ``mismatch``
    shards: int = 0  #: files of the merged checkpoint
    rows_compared: int = 0

    def add_stats(self, s: ValueStats) -> None:
        """Fold one task's statistics into the report."""
        mine = type(s)(self.values, self.worst_ulp, self.worst_key, self.near, self.worst_rel, self.worst_rel_key)
        m = mine.merge(s)
        self.values, self.worst_ulp, self.worst_key = m.values, m.worst_ulp, m.worst_key
        self.near, self.worst_rel, self.worst_rel_key = m.near, m.worst_rel, m.worst_rel_key

    def finish(
        self, found: list[tuple[int, int, str]], *, full: bool, rows: int, near: float, extra: int = 0
    ) -> VerifyReport:
        """The verdict on ``found`` (``(rank, ulp, message)``, most serious first once sorted; ``extra``
        failures only counted), with ``rows`` sampled per tensor or ``full``; ``near``: the
        near-cancellation allowance, relative to a tensor's largest value."""
        found = sorted(found, key=lambda f: (f[0], -f[1]))
        self.failures = [" ".join(m.split()) for _, _, m in found]
        self.ok = not found
        if not self.ok:
            more = len(found) - 3 + extra
            self.verdict = "verify: FAILED — " + "; ".join(self.failures[:3]) + (f"; … {more} more" if more > 0 else "")
            return self
        sample = "all rows" if full else f"sampled {rows} rows each"
        if self.checksums == "match":
            csum = f"{self.shards} shard checksum{'s match' if self.shards != 1 else ' matches'}"
        else:
            csum = "no shard checksums recorded" + ("" if full else " (values outside the compared rows not checked)")
        self.verdict = (
            f"verify: OK — {self.tensors} tensors, {self.merged} merged ({sample}, "
            f"{self.values} values){self._values_part(near)}, {csum}"
        )
        return self

    def _values_part(self, near: float) -> str:
        """The verdict's account of the recomputed values: the true worst ulp, the allowance, the
        worst error relative to its tensor's largest value."""
        if not self.worst_key:
            return ""
        n, bound = self.near, f"{near:g}".replace("e-0", "e-")
        allowance = (
            f"{n} value{'s' if n != 1 else ''} passed only by the cancellation allowance "
            f"(|error| ≤ {bound} × the tensor's max)"
            if n
            else "no value needed the cancellation allowance"
        )
        return (
            f", worst {self.worst_ulp} ulp ({self.worst_key}), {allowance}, largest error "
            f"{self.worst_rel:.2g} × the tensor's max ({self.worst_rel_key})"
        )
