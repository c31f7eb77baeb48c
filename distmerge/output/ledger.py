"""The driver's account of finished work units: the resume manifest, the shard checksums, the
disk writeback and the progress callback, all fed from one place as each unit lands.

``UnitLedger.unit_done`` is called on the driver for every finished unit (in completion order);
``checksums`` then gives the shard checksums once every unit is in, with the shards flushed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

from distmerge.output.manifest import Manifest
from distmerge.output.publish import ShardHasher, Writeback, fsync_files, shard_crc32s
from distmerge.plan.merge_plan import MergePlan

__all__ = ["ProgressFn", "UnitLedger"]

ProgressFn = Callable[[int, int, int, int], None]  # units done, units total, bytes done, bytes total


class UnitLedger:
    """Records finished units; with ``checksum="sha256"`` a background hasher reads each shard as
    its units finish (and fsyncs it), otherwise CRC-32s come from the tasks and the writeback
    thread starts each unit's bytes towards the disk at once. Thread-safe: units may land from
    the driver's own worker as well as from Ray."""

    def __init__(
        self,
        plan: MergePlan,
        dests: dict[str, str],
        manifest: Manifest,
        *,
        checksum: str,
        progress: ProgressFn | None = None,
    ) -> None:
        self.plan, self.dests, self.manifest, self.progress = plan, dests, manifest, progress
        self.hasher = ShardHasher(plan, dests) if checksum == "sha256" else None
        self.writeback = Writeback() if self.hasher is None else None  # the hasher fsyncs shard by shard
        self._start_of = {u.index: u.tensors[0].out_offset for u in plan.units if u.tensors}
        self._lock = threading.Lock()
        self.units = len(manifest.units)
        self.bytes = sum(v["bytes"] for v in manifest.units.values())
        for index in manifest.units:  # kept by --resume
            if self.hasher:
                self.hasher.unit_done(index)
        self._tell()

    @property
    def direct_io_safe(self) -> bool:
        """O_DIRECT only while nothing reads the part files: the SHA-256 hasher reads shards as
        units finish (cached pages over blocks written directly could go stale)."""
        return self.hasher is None

    def unit_done(self, index: int, shard: str, crc32: int, nbytes: int) -> None:
        with self._lock:
            self.manifest.record(index, crc32=crc32, nbytes=nbytes)
            self.manifest.save()
            if self.hasher:
                self.hasher.unit_done(index)
            elif self.writeback and index in self._start_of:
                self.writeback.unit_done(self.dests[shard], self._start_of[index], nbytes)
            self.units += 1
            self.bytes += nbytes
            self._tell()

    def _tell(self) -> None:
        if self.progress:
            self.progress(self.units, len(self.plan.units), self.bytes, self.plan.total_size)

    def checksums(self) -> dict[str, str]:
        """Every shard's checksum once all units are in, each shard flushed to disk."""
        if self.hasher:
            return self.hasher.digests()  # each shard fsynced once hashed
        sums = shard_crc32s(self.plan, {i: v["crc32"] for i, v in self.manifest.units.items()})
        self.close()
        fsync_files(list(self.dests.values()))
        return sums

    def close(self) -> None:
        """Stop the background threads (idempotent)."""
        for worker in _present([self.hasher, self.writeback]):
            worker.close()


def _present(items: Iterable[ShardHasher | Writeback | None]) -> list[ShardHasher | Writeback]:
    return [i for i in items if i is not None]
