"""An extraction's output, staged as one small part file per unit until it is published.

Each unit's task writes its LoRA tensors into ``unit-NNNNN.safetensors`` (temp file, fsync, rename;
the unit's statistics in its metadata) inside a hidden staging folder beside the output
(``.<name>.distmerge-extract``), which also holds the resume manifest. ``publish`` joins the parts
into the output, atomically: one ``.safetensors`` file (temp file, fsync, rename), or for the PEFT
layout an adapter folder with ``adapter_model.safetensors`` and ``adapter_config.json`` (a new
folder appears whole; in an existing one only those two files are replaced). ``abort`` removes the
staging folder; a crash leaves it for ``--resume``, which reuses every part that holds exactly its
unit's tensors.

Example:
    >>> p = PartStaging("/out/lora.safetensors", layout="comfy")
    >>> p.staging, os.path.basename(p.part(3))
    ('/out/.lora.safetensors.distmerge-extract', 'unit-00003.safetensors')
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from distmerge.errors import DistmergeError, OutputError, ShardWriteError, UsageError
from distmerge.inputs.checkpoint import BaseCheckpoint
from distmerge.output.atomic import write_atomic
from distmerge.output.durable import fsync_dir
from distmerge.output.manifest import Manifest, Payload
from distmerge.output.publish import part_path, refuse_inputs_as_output

__all__ = ["PEFT_CONFIG", "PEFT_WEIGHTS", "PartStaging", "assemble"]

PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"


class PartStaging:
    """The staging of an extraction into ``path`` (a ``.safetensors`` file, or a folder for the
    ``peft`` layout). ``config`` makes the folder's ``adapter_config.json`` from the unit outcomes;
    ``metadata`` is the output file's safetensors metadata."""

    def __init__(
        self,
        path: str,
        *,
        layout: str,
        metadata: Mapping[str, str] | None = None,
        config: Callable[[Sequence[Any]], str] | None = None,
    ) -> None:
        self.path, self.layout, self.folder = path, layout, layout == "peft"
        self.metadata, self.config = dict(metadata or {}), config
        parent, name = os.path.split(path)
        self.staging = os.path.join(parent, f".{name}.distmerge-extract")
        self.manifest_path = os.path.join(self.staging, "manifest.json")
        self.size = 0  #: bytes of the published LoRA weights

    def check_form(self, base: BaseCheckpoint, inputs: Sequence[str]) -> None:
        """The output's form, and that it is none of the inputs (``OutputError``/``UsageError``,
        before anything is written, even the lock file)."""
        out = refuse_inputs_as_output(self.path, base, list(inputs))
        if self.folder and out.endswith(".safetensors"):
            raise UsageError(f"{out}: --layout peft writes an adapter folder; give a folder path as --output")
        if not self.folder and not out.endswith(".safetensors"):
            raise UsageError(f"{out}: --layout {self.layout} writes one LoRA file; give a path ending in .safetensors")
        if self.folder and os.path.exists(out) and not os.path.isdir(out):
            raise OutputError(f"{out}: exists and is not a folder")
        if not self.folder and os.path.isdir(out):
            raise OutputError(f"{out}: is a folder; a .safetensors output must be a file path")

    def part(self, index: int) -> str:
        return os.path.join(self.staging, f"unit-{index:05d}.safetensors")

    def check_free(self, *, overwrite: bool, resume: bool) -> None:
        """Under the output's lock: an existing output or an unfinished run's parts need a flag."""
        taken = os.path.exists(self.path) and (not self.folder or bool(os.listdir(self.path)))
        if taken and not overwrite:
            raise OutputError(f"{self.path}: already exists; pass --overwrite to replace it")
        if os.path.exists(self.staging) and not (resume or overwrite):
            raise OutputError(
                f"{self.path}: an unfinished distmerge extract left parts in {self.staging}; pass --resume to "
                "continue it, or --overwrite to start over"
            )

    def prepare(self, plan: Any, *, resume: bool) -> None:
        """The staging folder; an unfinished run's parts are removed unless this run resumes it."""
        if not resume:
            shutil.rmtree(self.staging, ignore_errors=True)
        os.makedirs(self.staging, exist_ok=True)

    def dest(self, unit: Any) -> str:
        return self.part(unit.index)

    def reusable(self, plan: Any, previous: Manifest, run: Any) -> dict[int, Any]:
        """Finished parts of the interrupted run that hold exactly their unit's tensors: their outcomes."""
        from distmerge.tasks.extract_unit import read_part_outcome

        done = {}
        for u in plan.units:
            got = read_part_outcome(self.part(u.index))
            if got is not None and got.index == u.index and [s.key for s in got.tensors] == [x.key for x in u.tensors]:
                done[u.index] = got
        return done

    def unit_done(self, unit: Any, result: Any) -> Payload:
        return {"bytes": int(result.nbytes_written)}

    def publish(self, plan: Any, results: Mapping[int, Any]) -> int:
        """Join the parts into the output, atomically; remove the staging. Returns the weights' bytes."""
        parts = [self.part(u.index) for u in plan.units]
        if self.folder:
            assert self.config is not None  # a folder output has its adapter config
            self.size = self._publish_folder(parts, self.config([results[u.index] for u in plan.units]))
        else:
            self.size = self._publish_file(parts)
        shutil.rmtree(self.staging, ignore_errors=True)
        return self.size

    def _publish_file(self, parts: list[str]) -> int:
        directory, name = os.path.split(self.path)
        tmp = part_path(directory, name)
        try:
            size = assemble(parts, tmp, metadata=self.metadata)
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        fsync_dir(directory)
        return size

    def _publish_folder(self, parts: list[str], config: str) -> int:
        parent, name = os.path.split(self.path)
        fresh = not os.path.exists(self.path)
        where = os.path.join(parent, f".{name}.distmerge-tmp") if fresh else self.path
        os.makedirs(where, exist_ok=True)
        try:
            weights = part_path(where, PEFT_WEIGHTS)
            size = assemble(parts, weights, metadata=self.metadata)
            os.replace(weights, os.path.join(where, PEFT_WEIGHTS))
            write_atomic(os.path.join(where, PEFT_CONFIG), config, tmp=part_path(where, PEFT_CONFIG))
            fsync_dir(where)
            if fresh:
                os.rename(where, self.path)
        except BaseException:
            if fresh:
                shutil.rmtree(where, ignore_errors=True)
            raise
        fsync_dir(parent)
        return size

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def assemble(parts: Sequence[str], dest: str, *, metadata: Mapping[str, str]) -> int:
    """Join the tensors of ``parts`` (in order) into one safetensors file ``dest``, copied in the
    kernel, and fsync it; returns its size.

    Raises:
        ShardWriteError: a part is damaged, or two parts hold the same key.
    """
    from distmerge.inputs.header import TensorInfo, read_header
    from distmerge.plan.layout import layout_shard
    from distmerge.tasks.reading import OpenFiles
    from distmerge.tasks.writer import copy_range, create_file

    specs: list[tuple[str, str, tuple[int, ...]]] = []
    where: dict[str, TensorInfo] = {}
    for p in parts:
        try:
            h = read_header(p)
        except DistmergeError as e:
            raise ShardWriteError(f"{p}: part file is damaged ({e})") from None
        for info in sorted(h.tensors.values(), key=lambda i: i.offset):
            if info.key in where:
                raise ShardWriteError(f"'{info.key}' is written by both {where[info.key].path} and {p}")
            where[info.key] = info
            specs.append((info.key, info.dtype, info.shape))
    layout = layout_shard(specs, metadata=dict(metadata))
    create_file(dest, layout.header, layout.size)
    files, out = OpenFiles(), os.open(dest, os.O_WRONLY)
    try:
        for laid in layout.entries:
            src = where[laid.key]
            copy_range(files.fd(src.path), src.offset, out, laid.offset, laid.nbytes)
        os.fsync(out)
    finally:
        os.close(out)
        files.close()
    return layout.size
