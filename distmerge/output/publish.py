"""The output's location: the rules a merge's output must pass before anything is written.

The output is a folder (sharded checkpoint + index) or a path ending in ``.safetensors`` (one file).
It must not be an input or inside one, and an existing output or an interrupted run's parts need
``--overwrite`` or ``--resume``. Where the parts and the manifest of a run live is named here too;
``output.staging`` writes them.

Example:
    >>> part_path("/out", "model-00001-of-00002.safetensors")
    '/out/.model-00001-of-00002.safetensors.distmerge-part'
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from distmerge.errors import OutputError
from distmerge.inputs.checkpoint import INDEX_SUFFIX, BaseCheckpoint
from distmerge.inputs.objstore import is_s3
from distmerge.inputs.paths import inside, is_file_output, refuse_url

__all__ = ["OutputTarget", "manifest_path", "part_path", "refuse_inputs_as_output", "resolve_output"]

_PART = ".distmerge-part"


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
    refuse_url(output, "--output", s3=True)
    if is_s3(output):
        return _refuse_bucket_inputs(os.fspath(output).rstrip("/"), base, loras)
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


def _refuse_bucket_inputs(out: str, base: BaseCheckpoint, loras: list[str]) -> str:
    """An ``s3://`` output must not be the base, a LoRA, or inside either (URLs compared as given)."""
    for name, where in [("the base checkpoint", base.path), *(("a LoRA input", lora) for lora in loras)]:
        if is_s3(where) and inside(out, where.rstrip("/")):
            raise OutputError(f"{out}: output must not be {name} or inside it ({where}); choose another --output")
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
            raise OutputError(f"{out}: is a folder; a {os.path.splitext(out)[1]} output must be a file path")
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
