"""Where a job's output is staged until it is published, as one interface for every job.

A ``Staging`` is what the job driver (``app.driver``) knows of an output: ``prepare`` it, give each
unit its ``dest``, find the units an interrupted run left ``reusable``, take each finished unit
(``unit_done``: what the resume manifest records of it), then ``publish`` the result atomically or
``abort`` and leave no trace. ``ShardStaging`` is a merge's sharded checkpoint (this module),
``output.parts.PartStaging`` an extraction's LoRA file or adapter folder, ``NoStaging`` a job that
writes nothing (``verify``). A GGUF file or an object store is one more implementation.

``ShardStaging`` writes into hidden part files (``.<name>.distmerge-part``) in the output folder;
only when every unit has finished are they renamed to their final names and, last, the index
written (temp file + fsync + rename). A run that dies at any point leaves no index, so nothing that
looks like a finished checkpoint; ``abort`` removes the parts and puts an earlier index back.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from distmerge.errors import OutputError
from distmerge.output.atomic import write_atomic
from distmerge.output.durable import ShardHasher, Writeback, fsync_dir, fsync_files, fsync_path, shard_crc32s
from distmerge.output.manifest import Manifest, Payload
from distmerge.output.publish import OutputTarget, manifest_path, part_path
from distmerge.plan.merge_plan import MergePlan, WorkUnit
from distmerge.tasks.checksum import ALGORITHMS

__all__ = ["ModelOutput", "NoStaging", "RunChecks", "ShardStaging", "Staging"]

#: how a staging runs its resume checks as tasks: ``run(fn, [(args, label, nbytes), …])`` -> results
RunChecks = Callable[[Callable, Sequence[tuple[tuple, str, int]]], list]

_MARK = "distmerge"


class Staging(Protocol):
    """An output being written by a job's units (see the module docstring)."""

    manifest_path: str  #: where the resume manifest lives ("" when the job keeps none)

    def prepare(self, plan: Any, *, resume: bool) -> None: ...
    def dest(self, unit: Any) -> str: ...
    def reusable(self, plan: Any, previous: Manifest, run: RunChecks) -> dict[int, Any]: ...
    def unit_done(self, unit: Any, result: Any) -> Payload: ...
    def publish(self, plan: Any, results: Mapping[int, Any]) -> Any: ...
    def abort(self) -> None: ...


class NoStaging:
    """A job that writes nothing (``verify``): no manifest, no files, nothing to publish."""

    manifest_path = ""

    def prepare(self, plan: Any, *, resume: bool) -> None:
        return None

    def dest(self, unit: Any) -> str:
        return ""

    def reusable(self, plan: Any, previous: Manifest, run: RunChecks) -> dict[int, Any]:
        return {}

    def unit_done(self, unit: Any, result: Any) -> Payload:
        return {}

    def publish(self, plan: Any, results: Mapping[int, Any]) -> None:
        return None

    def abort(self) -> None:
        return None


@dataclass
class _Undo:
    """What ``prepare`` changed, so ``publish`` can finish it and ``abort`` can undo it."""

    created: bool = False  #: the output folder did not exist before
    index_backup: str | None = None  #: an earlier index, set aside until publish
    previous_shards: tuple[str, ...] = ()  #: shards named by an earlier distmerge index
    published: bool = False  #: the result is in place: nothing may be undone any more
    extras: tuple[str, ...] = ()  #: names of the non-weight files staged as parts (config, recipe, …)


class ModelOutput:
    """What a merge writes besides its shards, wherever it writes them: ``files`` (output name ->
    source path, copied) and ``texts`` (output name -> contents) go with the shards; ``metadata`` into
    the index's ``metadata.distmerge``; ``checksum`` is the algorithm recorded for every shard."""

    def __init__(
        self,
        target: OutputTarget,
        *,
        files: Mapping[str, str] | None = None,
        texts: Mapping[str, str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        checksum: str = "crc32",
    ) -> None:
        self.target, self.files, self.texts = target, dict(files or {}), dict(texts or {})
        self.metadata, self.checksum = dict(metadata or {}), checksum


class ShardStaging(ModelOutput):
    """A merge's sharded (or single-file) checkpoint, staged as part files in its output folder
    (``checksum``: ``crc32`` joined from the tasks' CRCs, or ``sha256`` read by a background hasher as
    units finish)."""

    def __init__(self, target: OutputTarget, **model: Any) -> None:
        super().__init__(target, **model)
        self.manifest_path = manifest_path(target)
        self.undo = _Undo()
        self.plan: MergePlan | None = None
        self.dests: dict[str, str] = {}
        self.hasher: ShardHasher | None = None
        self.writeback: Writeback | None = None

    @property
    def direct_io(self) -> bool:
        """O_DIRECT only while nothing reads the part files: the SHA-256 hasher reads shards as units
        finish (cached pages over blocks written directly could go stale)."""
        return self.checksum != "sha256"

    def prepare(self, plan: MergePlan, *, resume: bool = False) -> None:
        """Create the output folder and every part file (header written, data area sparse; kept when
        resuming and still of the right size), stage the non-weight files, start the checksum and
        writeback threads. An earlier index is set aside first, so from now on the folder does not
        look finished; the undo record grows with each change, so ``abort`` can undo a ``prepare``
        that failed half way."""
        from distmerge.tasks.writer import create_file

        self.plan, t = plan, self.target
        self.dests = {s.name: part_path(t.directory, s.name) for s in plan.shards}
        self.undo.created = not os.path.isdir(t.directory)
        try:
            os.makedirs(t.directory, exist_ok=True)
        except OSError as e:
            raise OutputError(f"{t.directory}: cannot create output folder ({e.strerror or e})") from None
        if not t.single_file:
            self._set_index_aside(t.index_path(plan.stem))
        for s in plan.shards:
            if not (resume and _part_matches(self.dests[s.name], s.header, s.size)):
                create_file(self.dests[s.name], s.header, s.size)
        self._stage_extras()
        self.hasher = ShardHasher(plan, self.dests) if self.checksum == "sha256" else None
        self.writeback = Writeback() if self.hasher is None else None  # the hasher fsyncs shard by shard

    def _set_index_aside(self, index: str) -> None:
        backup = part_path(self.target.directory, os.path.basename(index) + ".previous")
        if os.path.exists(index):
            self.undo.previous_shards = tuple(_previous_shards(index) or ())
            self.undo.index_backup = backup
            os.replace(index, backup)
        elif os.path.exists(backup):  # set aside by the interrupted run this one resumes
            self.undo.previous_shards = tuple(_previous_shards(backup) or ())
            self.undo.index_backup = backup

    def _stage_extras(self) -> None:
        d = self.target.directory
        for name, src in self.files.items():
            self.undo.extras += (name,)
            try:
                shutil.copyfile(src, part_path(d, name))
            except OSError as e:
                raise OutputError(f"{src}: cannot copy it into the output ({e.strerror or e})") from None
        for name, text in self.texts.items():
            self.undo.extras += (name,)
            with open(part_path(d, name), "w", encoding="utf-8") as f:
                f.write(text)

    def dest(self, unit: WorkUnit) -> str:
        return self.dests[unit.shard]

    def reusable(self, plan: MergePlan, previous: Manifest, run: RunChecks) -> dict[int, Any]:
        """Units of the interrupted run whose bytes still check out (the CRC of the unit's range,
        re-read by tasks), each as its manifest record."""
        from distmerge.tasks.unit import unit_crc32

        units = [u for u in plan.units if u.index in previous.units and previous.units[u.index]["bytes"] == u.nbytes]
        crcs = run(unit_crc32, [((u, self.dest(u)), f"resume check of unit {u.index}", u.nbytes) for u in units])
        return {
            u.index: previous.units[u.index] for u, crc in zip(units, crcs) if crc == previous.units[u.index]["crc32"]
        }

    def unit_done(self, unit: WorkUnit, result: Any) -> Payload:
        """A finished unit (a task's ``UnitResult``, or a reused unit's record): started towards the
        disk (or hashed); returns its manifest record."""
        record = result if isinstance(result, Mapping) else {"crc32": result.crc32, "bytes": result.nbytes}
        if self.hasher is not None:
            self.hasher.unit_done(unit.index)
        elif self.writeback is not None and unit.tensors:
            self.writeback.unit_done(self.dest(unit), unit.tensors[0].out_offset, int(record["bytes"]))
        return record

    def checksums(self, crcs: Mapping[int, int]) -> dict[str, str]:
        """Every shard's checksum once all units are in, each shard flushed to disk."""
        assert self.plan is not None  # prepared
        if self.hasher is not None:
            return self.hasher.digests()  # each shard fsynced once hashed
        sums = shard_crc32s(self.plan, dict(crcs))
        self._stop_threads()
        fsync_files(list(self.dests.values()))
        return sums

    def _stop_threads(self) -> None:
        for worker in (self.hasher, self.writeback):
            if worker is not None:
                worker.close()

    def publish(self, plan: MergePlan, results: Mapping[int, Any]) -> list[str]:
        """Checksums, then the parts renamed to their final names, then the index written last.
        Returns the shard names.

        The checksums go into the index's ``metadata.distmerge.<algorithm>``, or for a single-file
        output into a ``<file>.<algorithm>`` sidecar (``HEX  NAME``, the ``sha256sum`` format) written
        first, after removing a sidecar of the other algorithm left by an earlier run.
        """
        crcs = {i: int(r["crc32"] if isinstance(r, Mapping) else r.crc32) for i, r in results.items()}
        sums = self.checksums(crcs)
        t, d = self.target, self.target.directory
        if t.single_file:
            self._write_sidecar(sums)
        for s in plan.shards:
            os.replace(self.dests[s.name], os.path.join(d, s.name))
        for name in self.undo.extras:  # config, tokenizer, recipe: in place before the index appears
            fsync_path(part_path(d, name))
            os.replace(part_path(d, name), os.path.join(d, name))
        fsync_dir(d)
        names = [s.name for s in plan.shards]
        if not t.single_file:
            self._write_index(plan, {**self.metadata, self.checksum: {n: sums[n] for n in names}})
        if os.path.exists(self.manifest_path):
            os.remove(self.manifest_path)
        fsync_dir(d)
        return names

    def _write_sidecar(self, sums: Mapping[str, str]) -> None:
        d, name = self.target.directory, str(self.target.single_file)
        for other in ALGORITHMS:
            stale = os.path.join(d, f"{name}.{other}")
            if other != self.checksum and os.path.isfile(stale):
                os.remove(stale)
        write_atomic(os.path.join(d, f"{name}.{self.checksum}"), f"{sums[name]}  {name}\n")

    def _write_index(self, plan: MergePlan, meta: dict[str, Any]) -> None:
        d = self.target.directory
        index = {"metadata": {"total_size": plan.total_size, _MARK: meta}, "weight_map": plan.weight_map}
        final = self.target.index_path(plan.stem)
        write_atomic(final, json.dumps(index, indent=2) + "\n", tmp=part_path(d, os.path.basename(final)))
        self.undo.published = True
        if self.undo.index_backup:
            os.remove(self.undo.index_backup)
        names = set(plan.weight_map.values())
        for stale in self.undo.previous_shards:  # shards of an earlier result that this one does not use
            if stale not in names and os.path.isfile(os.path.join(d, stale)):
                os.remove(os.path.join(d, stale))

    def abort(self) -> None:
        """Undo ``prepare`` after a failure or an interrupt: remove every part file, put an earlier
        index back, and remove the folder if this run created it and it is now empty. After the
        result is published (an interrupt during ``publish``'s last steps) only leftovers go."""
        self._stop_threads()
        if self.plan is None:
            return
        t, u = self.target, self.undo
        index = [] if t.single_file else [os.path.basename(t.index_path(self.plan.stem))]
        for name in [s.name for s in self.plan.shards] + list(u.extras) + index:
            _remove(part_path(t.directory, name))
        for leftover in (self.manifest_path, self.manifest_path + ".tmp"):
            _remove(leftover)  # .tmp: an interrupt can land while the manifest is saved
        if u.index_backup and os.path.exists(u.index_backup):
            if u.published:
                os.remove(u.index_backup)
            else:
                os.replace(u.index_backup, t.index_path(self.plan.stem))
        if u.created:
            try:
                os.rmdir(t.directory)
            except OSError:
                pass


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _previous_shards(index_path: str) -> list[str] | None:
    """Shard names listed by an index distmerge wrote earlier (None if absent or not ours)."""
    try:
        with open(index_path, encoding="utf-8") as f:
            idx = json.load(f)
        if _MARK not in idx.get("metadata", {}):
            return None
        return sorted(set(idx["weight_map"].values()))
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return None


def _part_matches(part: str, header: bytes, size: int) -> bool:
    try:
        if os.path.getsize(part) != size:
            return False
        with open(part, "rb") as f:
            return f.read(len(header)) == header
    except OSError:
        return False
