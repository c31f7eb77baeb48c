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

import json
import os
from dataclasses import dataclass

from .checkpoint import INDEX_SUFFIX, BaseCheckpoint
from .errors import OutputError
from .plan import MergePlan
from .writer import create_file

__all__ = ["OutputTarget", "Staging", "resolve_output", "part_path", "prepare", "publish", "abort"]

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


def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def resolve_output(output: str | os.PathLike[str], base: BaseCheckpoint, loras: list[str], *,
                   overwrite: bool = False) -> OutputTarget:
    """Decide where to write and refuse places that would touch the inputs.

    Raises:
        OutputError: output is the base or inside its folder, is a LoRA input, exists as a
            non-empty folder (or file) without ``overwrite``, or its parent is not a folder.
    """
    out = os.path.abspath(os.fspath(output))
    real = os.path.realpath(out)
    base_real = os.path.realpath(base.path)
    base_dir = base_real if os.path.isdir(base_real) else os.path.dirname(base_real)
    if _inside(real, base_dir) or any(os.path.realpath(f) == real for f in base.files):
        raise OutputError(f"{out}: output must not be the base checkpoint or inside its folder "
                          f"({base_dir}); choose another --output")
    for lora in loras:
        lr = os.path.realpath(lora)
        if real == lr or (os.path.isdir(lr) and _inside(real, lr)):
            raise OutputError(f"{out}: output must not be a LoRA input or inside one ({lora})")
    if out.endswith(".safetensors"):
        directory, name = os.path.dirname(out), os.path.basename(out)
        if os.path.isdir(out):
            raise OutputError(f"{out}: is a folder; a .safetensors output must be a file path")
        if os.path.exists(out) and not overwrite:
            raise OutputError(f"{out}: already exists; pass --overwrite to replace it")
        if not os.path.isdir(directory):
            raise OutputError(f"{directory}: folder for the output file does not exist")
        return OutputTarget(directory, name, overwrite)
    if os.path.exists(out) and not os.path.isdir(out):
        raise OutputError(f"{out}: exists and is not a folder")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise OutputError(f"{out}: folder is not empty; pass --overwrite to write into it "
                          "(only files distmerge writes are replaced)")
    return OutputTarget(out, None, overwrite)


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


def prepare(plan: MergePlan, target: OutputTarget, staging: Staging) -> None:
    """Create the output folder and every part file (header written, data area sparse).

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
        if os.path.exists(index):
            staging.previous_shards = tuple(_previous_shards(index) or ())
            staging.index_backup = part_path(target.directory, os.path.basename(index) + ".previous")
            os.replace(index, staging.index_backup)
    for s in plan.shards:
        create_file(part_path(target.directory, s.name), s.header, s.size)


def _fsync_dir(directory: str) -> None:
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


def publish(plan: MergePlan, target: OutputTarget, staging: Staging, *,
            extra_metadata: dict | None = None) -> list[str]:
    """Rename the parts to their final names, then write the index last. Returns the shard names."""
    d = target.directory
    for s in plan.shards:
        os.replace(part_path(d, s.name), os.path.join(d, s.name))
    _fsync_dir(d)
    names = [s.name for s in plan.shards]
    if not target.single_file:
        index = {"metadata": {"total_size": plan.total_size, _MARK: dict(extra_metadata or {})},
                 "weight_map": plan.weight_map}
        final = target.index_path(plan.stem)
        tmp = part_path(d, os.path.basename(final))
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        if staging.index_backup:
            os.remove(staging.index_backup)
        for stale in staging.previous_shards:  # shards of an earlier distmerge result that this one does not use
            if stale not in names and os.path.isfile(os.path.join(d, stale)):
                os.remove(os.path.join(d, stale))
        _fsync_dir(d)
    return names


def abort(plan: MergePlan, target: OutputTarget, staging: Staging) -> None:
    """Undo ``prepare`` after a failure or an interrupt: remove every part file, put an earlier
    index back, and remove the folder if this run created it and it is now empty."""
    names = [s.name for s in plan.shards] + ([] if target.single_file else
                                              [os.path.basename(target.index_path(plan.stem))])
    for name in names:
        try:
            os.remove(part_path(target.directory, name))
        except OSError:
            pass
    if staging.index_backup and os.path.exists(staging.index_backup):
        os.replace(staging.index_backup, target.index_path(plan.stem))
    if staging.created:
        try:
            os.rmdir(target.directory)
        except OSError:
            pass
