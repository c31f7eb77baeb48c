"""The output location: checks before work starts, part files during, atomic publish at the end.

Tasks write into hidden part files (``.<name>.distmerge-part``) in the output folder. Only when
every unit has finished are the parts renamed to their final names and, last, the index written
(temp file + fsync + rename). A run that dies at any point leaves no index, so nothing that looks
like a finished checkpoint; ``abort`` removes the parts. Part names are deterministic, so a retried
task simply writes the same bytes again.

Example:
    >>> part_path("/out", "model-00001-of-00002.safetensors")
    '/out/.model-00001-of-00002.safetensors.distmerge-part'
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from distmerge.errors import OutputError
from distmerge.inputs.checkpoint import INDEX_SUFFIX, BaseCheckpoint
from distmerge.inputs.paths import inside, is_file_output
from distmerge.inputs.rawio import EndOfFile, pread_exact
from distmerge.output.atomic import write_atomic
from distmerge.plan.merge_plan import MergePlan
from distmerge.tasks.checksum import ALGORITHMS, crc32, crc32_combine, format_crc32
from distmerge.tasks.writer import create_file, start_writeback

__all__ = [
    "OutputTarget",
    "Staging",
    "resolve_output",
    "refuse_inputs_as_output",
    "part_path",
    "manifest_path",
    "prepare",
    "publish",
    "abort",
    "ShardHasher",
    "shard_crc32s",
    "fsync_files",
    "fsync_dir",
    "Writeback",
    "write_atomic",
]

_PART = ".distmerge-part"
_MARK = "distmerge"


@dataclass(frozen=True)
class OutputTarget:
    directory: str
    single_file: str | None  #: file name when the output is one ``.safetensors``
    overwrite: bool = False

    def index_path(self, stem: str) -> str:
        return os.path.join(self.directory, stem + INDEX_SUFFIX)


def part_path(directory: str, name: str) -> str:
    return os.path.join(directory, f".{name}{_PART}")


def manifest_path(target: OutputTarget) -> str:
    """Where the resume manifest of a run into ``target`` lives."""
    name = f".{target.single_file}" if target.single_file else ""
    return os.path.join(target.directory, f"{name}.distmerge-manifest.json")


def refuse_inputs_as_output(output: str | os.PathLike[str], base: BaseCheckpoint, loras: list[str]) -> str:
    """Refuse an output that is an input or inside one (before anything, even a lock file, is
    written there); returns the output as an absolute path.

    Raises:
        OutputError: output is the base or inside its folder, or is a LoRA input or inside one.
    """
    out = os.path.abspath(os.fspath(output))
    real = os.path.realpath(out)
    base_real = os.path.realpath(base.path)
    if any(os.path.realpath(f) == real for f in base.files):
        raise OutputError(f"{out}: output must not be the base checkpoint; choose another --output")
    if os.path.isdir(base_real) and inside(real, base_real):  # a single-file base may have neighbours
        raise OutputError(
            f"{out}: output must not be the base checkpoint or inside its folder ({base_real}); choose another --output"
        )
    for lora in loras:
        lr = os.path.realpath(lora)
        if real == lr or (os.path.isdir(lr) and inside(real, lr)):
            raise OutputError(f"{out}: output must not be a LoRA input or inside one ({lora})")
    return out


def resolve_output(
    output: str | os.PathLike[str],
    base: BaseCheckpoint,
    loras: list[str],
    *,
    overwrite: bool = False,
    resume: bool = False,
) -> OutputTarget:
    """Decide where to write and refuse places that would touch the inputs.

    Raises:
        OutputError: output is the base or inside its folder, is a LoRA input, exists as a
            non-empty folder (or file) without ``overwrite``, or its parent is not a folder.
    """
    out = refuse_inputs_as_output(output, base, loras)
    if is_file_output(out):
        directory, name = os.path.dirname(out), os.path.basename(out)
        if os.path.isdir(out):
            raise OutputError(f"{out}: is a folder; a .safetensors output must be a file path")
        if os.path.exists(out) and not overwrite:
            raise OutputError(f"{out}: already exists; pass --overwrite to replace it")
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise OutputError(f"{directory}: is a file, so it cannot hold the output")
        return _check_unfinished(OutputTarget(directory, name, overwrite), resume)
    if os.path.exists(out) and not os.path.isdir(out):
        raise OutputError(f"{out}: exists and is not a folder")
    target = OutputTarget(out, None, overwrite)
    unfinished = os.path.exists(manifest_path(target))
    if os.path.isdir(out) and os.listdir(out) and not (overwrite or (resume and unfinished)):
        if unfinished:
            raise OutputError(
                f"{out}: holds an unfinished distmerge run; pass --resume to continue it, or --overwrite to start over"
            )
        raise OutputError(
            f"{out}: folder is not empty; pass --overwrite to write into it (only files distmerge writes are replaced)"
        )
    return target


def _check_unfinished(target: OutputTarget, resume: bool) -> OutputTarget:
    if os.path.exists(manifest_path(target)) and not (resume or target.overwrite):
        raise OutputError(
            f"{os.path.join(target.directory, target.single_file or '')}: an unfinished "
            "distmerge run left parts here; pass --resume to continue it, or --overwrite "
            "to start over"
        )
    return target


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


@dataclass
class Staging:
    """What ``prepare`` changed, so ``publish`` can finish it and ``abort`` can undo it."""

    created: bool = False  #: the output folder did not exist before
    index_backup: str | None = None  #: an earlier index, set aside until publish
    previous_shards: tuple[str, ...] = ()  #: shards named by an earlier distmerge index
    manifest: str = ""  #: the resume manifest of this run
    published: bool = False  #: the result is in place: nothing may be undone any more
    extras: tuple[str, ...] = ()  #: names of the non-weight files staged as parts (config, recipe, …)


def prepare(
    plan: MergePlan,
    target: OutputTarget,
    staging: Staging,
    *,
    keep_parts: bool = False,
    files: Mapping[str, str] | None = None,
    texts: Mapping[str, str] | None = None,
) -> None:
    """Create the output folder and every part file (header written, data area sparse), and stage
    the non-weight files: ``files`` (output name -> source path, copied) and ``texts`` (output
    name -> contents), each as a part that ``publish`` renames with the shards.

    An earlier index in the folder is set aside first, so from now on the folder does not look
    finished; ``abort`` puts it back, ``publish`` replaces it. ``staging`` records each change as
    it is made, so ``abort`` can undo a ``prepare`` that failed half way.
    """
    staging.created = not os.path.isdir(target.directory)
    try:
        os.makedirs(target.directory, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{target.directory}: cannot create output folder ({e.strerror or e})") from None
    if not target.single_file:
        index = target.index_path(plan.stem)
        backup = part_path(target.directory, os.path.basename(index) + ".previous")
        if os.path.exists(index):
            staging.previous_shards = tuple(_previous_shards(index) or ())
            staging.index_backup = backup
            os.replace(index, backup)
        elif os.path.exists(backup):  # set aside by the interrupted run this one resumes
            staging.previous_shards = tuple(_previous_shards(backup) or ())
            staging.index_backup = backup
    staging.manifest = manifest_path(target)
    for s in plan.shards:
        part = part_path(target.directory, s.name)
        if keep_parts and _part_matches(part, s.header, s.size):
            continue
        create_file(part, s.header, s.size)
    _stage_extras(target.directory, staging, files or {}, texts or {})


def _stage_extras(directory: str, staging: Staging, files: Mapping[str, str], texts: Mapping[str, str]) -> None:
    for name, src in files.items():
        staging.extras += (name,)
        try:
            shutil.copyfile(src, part_path(directory, name))
        except OSError as e:
            raise OutputError(f"{src}: cannot copy it into the output ({e.strerror or e})") from None
    for name, text in texts.items():
        staging.extras += (name,)
        with open(part_path(directory, name), "w", encoding="utf-8") as f:
            f.write(text)


def _part_matches(part: str, header: bytes, size: int) -> bool:
    try:
        if os.path.getsize(part) != size:
            return False
        with open(part, "rb") as f:
            return f.read(len(header)) == header
    except OSError:
        return False


def _hash_range(h: hashlib._Hash, fd: int, start: int, end: int, buf: bytearray, path: str) -> None:
    """Feed bytes ``[start, end)`` of ``fd`` to ``h``, read into the reused buffer ``buf`` (plain
    reads, not a mapping: an I/O error must stay an exception, never a SIGBUS in the driver)."""
    view = memoryview(buf)
    pos = start
    while pos < end:
        block = view[: min(len(buf), end - pos)]
        try:
            pread_exact(fd, block, pos)
        except EndOfFile as e:
            raise OutputError(f"{path}: file ends at byte {e.offset}, expected at least {end}") from None
        h.update(block)  # hashlib releases the GIL for blocks this size
        pos += len(block)


def shard_crc32s(plan: MergePlan, unit_crcs: dict[int, int]) -> dict[str, str]:
    """The CRC-32 of every whole output shard, joined from its header and its units' CRCs (each
    unit covers a contiguous byte range, in file order), without reading the shards.

    Raises:
        OutputError: a unit's CRC is missing, or units leave a gap (a bug, never published).
    """
    state = {s.name: (crc32(s.header), len(s.header)) for s in plan.shards}
    for u in sorted(plan.units, key=lambda u: (u.shard, min((t.out_offset for t in u.tensors), default=0))):
        crc, pos = state[u.shard]
        if u.index not in unit_crcs:
            raise OutputError(f"unit {u.index} of {u.shard} has no checksum")
        if u.tensors and u.tensors[0].out_offset != pos:
            raise OutputError(f"{u.shard}: units leave a gap at byte {pos}")
        state[u.shard] = (crc32_combine(crc, unit_crcs[u.index], u.nbytes), pos + u.nbytes)
    for s in plan.shards:
        if state[s.name][1] != s.size:
            raise OutputError(f"{s.name}: units cover {state[s.name][1]} bytes, expected {s.size}")
    return {name: format_crc32(crc) for name, (crc, _) in state.items()}


class Writeback:
    """Starts the disk writing each finished unit's byte range at once, on a background thread
    (``sync_file_range`` may block while the device queue is full; only this thread waits then),
    so the disk works while later units compute and the final fsync finds little left to write.

    Example:
        >>> import os, tempfile
        >>> part = os.path.join(tempfile.mkdtemp(), "part")
        >>> with open(part, "wb") as f:
        ...     _ = f.write(bytes(8192))
        >>> wb = Writeback()
        >>> wb.unit_done(part, 0, 4096); wb.unit_done(part, 4096, 4096)
        >>> wb.close(); fsync_files([part])
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="distmerge-writeback")

    def unit_done(self, path: str, start: int, nbytes: int) -> None:
        self._pool.submit(self._kick, path, start, nbytes)

    @staticmethod
    def _kick(path: str, start: int, nbytes: int) -> None:
        try:
            fd = os.open(path, os.O_WRONLY)
        except OSError:
            return  # a head start only: the final fsync reports real errors
        try:
            start_writeback(fd, start, nbytes)
        finally:
            os.close(fd)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def fsync_files(paths: list[str]) -> None:
    """Flush each file to disk, in parallel (each call waits on the device, not the CPU)."""
    with ThreadPoolExecutor(max(1, min(8, len(paths))), thread_name_prefix="distmerge-fsync") as pool:
        list(pool.map(_fsync_path, paths))


class ShardHasher:
    """SHA-256 of every output shard, computed front to back in a background thread as the work
    units finish (units of a shard are contiguous byte ranges after its header), then fsynced.

    The driver calls ``unit_done`` as results arrive and ``digests`` before publishing; hashing
    overlaps the units still running instead of re-reading every shard at the end.
    """

    def __init__(self, plan: MergePlan, dests: dict[str, str]) -> None:
        self._dests = dests
        self._spans: dict[str, list[tuple[int, int, int]]] = {}  # shard -> (unit, start, end) in order
        for s in plan.shards:
            self._spans[s.name] = []
        for u in plan.units:
            start = min(t.out_offset for t in u.tensors)
            end = max(t.out_offset + t.out_nbytes for t in u.tensors)
            self._spans[u.shard].append((u.index, start, end))
        self._sizes = {s.name: (len(s.header), s.size) for s in plan.shards}
        self._shard_of = {u.index: u.shard for u in plan.units}
        self._state: dict[str, list[Any]] = {
            name: [hashlib.sha256(), 0, 0] for name in self._spans
        }  # hash, next span, pos
        self._done: set[int] = set()
        self._digests: dict[str, str] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="distmerge-sha256")
        self._buf = bytearray(16 << 20)  # one read buffer for the hashing thread
        self._futures: list[Future] = []
        for name, spans in self._spans.items():
            spans.sort(key=lambda x: x[1])
            if not spans:  # a shard with no tensors is just its header
                self._futures.append(self._pool.submit(self._advance, name))

    def unit_done(self, index: int) -> None:
        self._done.add(index)
        self._futures.append(self._pool.submit(self._advance, self._shard_of[index]))

    def _advance(self, name: str) -> None:
        h, k, pos = self._state[name]
        spans = self._spans[name]
        header, size = self._sizes[name]
        with open(self._dests[name], "rb", buffering=0) as f:
            if pos == 0:
                h.update(f.read(header))
                pos = header
            while k < len(spans) and spans[k][0] in self._done:
                _, start, end = spans[k]
                if start != pos:
                    raise OutputError(f"{self._dests[name]}: units leave a gap at byte {pos}")
                _hash_range(h, f.fileno(), pos, end, self._buf, self._dests[name])
                pos = end
                k += 1
            if k == len(spans) and name not in self._digests:
                if pos != size:
                    raise OutputError(f"{self._dests[name]}: hashed {pos} bytes, expected {size}")
                os.fsync(f.fileno())
                self._digests[name] = h.hexdigest()
        self._state[name] = [h, k, pos]

    def digests(self) -> dict[str, str]:
        """Wait for the hashing to finish; shard name -> hex SHA-256."""
        for fut in self._futures:
            fut.result()
        missing = [n for n in self._spans if n not in self._digests]
        if missing:
            raise OutputError(f"shard {missing[0]} was not complete when publishing")
        return dict(self._digests)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: str) -> None:
    """Make a folder's entries (files created, renamed or removed in it) durable; best effort."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish(
    plan: MergePlan,
    target: OutputTarget,
    staging: Staging,
    *,
    extra_metadata: dict | None = None,
    checksums: tuple[str, dict[str, str]] | None = None,
) -> list[str]:
    """Rename the parts to their final names, then write the index last. Returns the shard names.

    ``checksums`` is ``(algorithm, {shard name: hex})`` with algorithm ``crc32`` or ``sha256``; it
    goes into the index's ``metadata.distmerge.<algorithm>``, or for a single-file output into a
    ``<file>.<algorithm>`` sidecar (``HEX  NAME``, the ``sha256sum`` format) written first, after
    removing a sidecar of the other algorithm left by an earlier run.
    """
    d = target.directory
    algo, sums = checksums or ("", {})
    if target.single_file:
        for other in ALGORITHMS:
            stale = os.path.join(d, f"{target.single_file}.{other}")
            if other != algo and os.path.isfile(stale):
                os.remove(stale)
        if sums:
            write_atomic(
                os.path.join(d, f"{target.single_file}.{algo}"), f"{sums[target.single_file]}  {target.single_file}\n"
            )
    for s in plan.shards:
        os.replace(part_path(d, s.name), os.path.join(d, s.name))
    for name in staging.extras:  # config, tokenizer, recipe: in place before the index appears
        _fsync_path(part_path(d, name))
        os.replace(part_path(d, name), os.path.join(d, name))
    fsync_dir(d)
    names = [s.name for s in plan.shards]
    if not target.single_file:
        meta = dict(extra_metadata or {})
        if sums:
            meta[algo] = {name: sums[name] for name in names}
        index = {"metadata": {"total_size": plan.total_size, _MARK: meta}, "weight_map": plan.weight_map}
        final = target.index_path(plan.stem)
        write_atomic(final, json.dumps(index, indent=2) + "\n", tmp=part_path(d, os.path.basename(final)))
        staging.published = True
        if staging.index_backup:
            os.remove(staging.index_backup)
        for stale in staging.previous_shards:  # shards of an earlier distmerge result that this one does not use
            if stale not in names and os.path.isfile(os.path.join(d, stale)):
                os.remove(os.path.join(d, stale))
    if staging.manifest and os.path.exists(staging.manifest):
        os.remove(staging.manifest)
    fsync_dir(d)
    return names


def abort(plan: MergePlan, target: OutputTarget, staging: Staging) -> None:
    """Undo ``prepare`` after a failure or an interrupt: remove every part file, put an earlier
    index back, and remove the folder if this run created it and it is now empty. After the
    result is published (an interrupt during ``publish``'s last steps) only leftovers are removed."""
    names = (
        [s.name for s in plan.shards]
        + list(staging.extras)
        + ([] if target.single_file else [os.path.basename(target.index_path(plan.stem))])
    )
    for name in names:
        try:
            os.remove(part_path(target.directory, name))
        except OSError:
            pass
    for leftover in (staging.manifest, staging.manifest + ".tmp") if staging.manifest else ():
        if os.path.exists(leftover):  # .tmp: an interrupt can land while the manifest is saved
            os.remove(leftover)
    if staging.index_backup and os.path.exists(staging.index_backup):
        if staging.published:
            os.remove(staging.index_backup)
        else:
            os.replace(staging.index_backup, target.index_path(plan.stem))
    if staging.created:
        try:
            os.rmdir(target.directory)
        except OSError:
            pass
