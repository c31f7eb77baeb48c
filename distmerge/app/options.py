"""The merge options, declared once: ``merge()``'s keywords, the CLI flags and the job-file schema.

Each field of ``MergeOptions`` carries its help text and CLI spelling; ``distmerge.app.flags``
builds the argparse flags from them and ``distmerge.app.jobfile`` the pydantic schema of a job file
(``defaults:`` and each merge take the fields of the ``merge`` group, ``ray:`` those of the ``ray``
group, a merge alone its ``report``). Plain stdlib, so ``distmerge --help`` stays fast.

Example:
    >>> o = MergeOptions(dtype="bf16", num_workers=4)
    >>> o.dtype, o.alpha, o.max_shard_size
    ('bf16', 1.0, '5GB')
    >>> [f.name for f in option_fields("ray")]
    ['address', 'num_workers', 'device', 'num_cpus']
    >>> flag_of("max_shard_size")
    '--max-shard-size'
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Literal

from distmerge.inputs.dtypes import CLI_DTYPES, DTYPE_FLAGS

__all__ = [
    "CHECKSUMS",
    "DEVICES",
    "DTYPE_CHOICES",
    "MergeOptions",
    "OptionMeta",
    "flag_of",
    "from_args",
    "option_fields",
    "pair_weights",
]

#: the ``--dtype`` choices users see (``inputs.dtypes.CLI_DTYPES`` also takes the long torch names)
DTYPE_CHOICES = DTYPE_FLAGS
#: every spelling accepted (``bfloat16``, ``float32`` … as torch names them), as the Python API does
DTYPE_NAMES = tuple(CLI_DTYPES)
DEVICES = ("auto", "cpu", "cuda")
CHECKSUMS = ("crc32", "sha256")

Group = Literal["merge", "ray", "report"]


@dataclass(frozen=True)
class OptionMeta:
    """How one option is spelled and checked outside Python: its CLI flag, help and value rule."""

    help: str
    group: Group = "merge"
    choices: tuple[str, ...] = ()
    metavar: str | None = None
    kind: Literal["float", "int", "bool", "str", "size"] = "str"
    minimum: int | None = None  #: for counts


def _opt(default: Any, help: str, **meta: Any) -> Any:
    return dataclasses.field(default=default, metadata={"distmerge": OptionMeta(help, **meta)})


@dataclass(frozen=True)
class MergeOptions:
    """Every option of a merge besides its inputs (``base``, ``loras``) and ``output``.

    ``distmerge.merge(base, loras, output, **options)`` takes these as keywords; numbers and
    choices are checked by ``validate.check_options`` before anything runs.
    """

    alpha: float = _opt(1.0, "global multiplier on every delta (default 1.0)", kind="float")
    #: also a torch dtype, or None (keep), from Python
    dtype: Any = _opt(
        "keep",
        "output dtype of float tensors (default: keep the base's); fp8_* writes scaled fp8 "
        "Linears (ComfyUI's convention), other tensors keep their dtype; q8_0 … q4_0 quantize "
        "the block linears of a .gguf output (ComfyUI-GGUF)",
        choices=DTYPE_NAMES,
        metavar="{" + ",".join(DTYPE_CHOICES) + "}",
    )
    max_shard_size: int | str = _opt("5GB", "shard size limit (default 5GB)", metavar="SIZE", kind="size")
    skip_unmatched: bool = _opt(
        False, "merge what matches; list unplaceable LoRA keys in the summary and report", kind="bool"
    )
    overwrite: bool = _opt(
        False, "write into a non-empty output folder (only files distmerge writes are replaced)", kind="bool"
    )
    address: str | None = _opt(
        None,
        "join a Ray cluster: 'auto' or HOST:PORT (default: embedded local Ray, or RAY_ADDRESS if set)",
        group="ray",
        metavar="ADDR",
    )
    num_workers: int | None = _opt(
        None, "Ray tasks in flight (default: all CPUs, or all GPUs)", group="ray", metavar="N", kind="int", minimum=1
    )
    device: str = _opt(
        "auto", "where the math runs (default: GPUs when the cluster has them)", group="ray", choices=DEVICES
    )
    report: str | os.PathLike[str] | None = _opt(None, "write a JSON report here", group="report", metavar="FILE")
    unit_size: int | str | None = _opt(
        None, "target bytes per work unit (default: total / (4 x workers), at most 512MiB)", metavar="SIZE", kind="size"
    )
    max_retries: int = _opt(
        3, "Ray retries per task after a worker or node failure (default 3)", metavar="N", kind="int", minimum=0
    )
    num_cpus: int | None = _opt(
        None, "CPUs for the embedded local Ray (default: all)", group="ray", metavar="N", kind="int", minimum=1
    )
    resume: bool = _opt(
        False, "continue an interrupted run into --output, reusing its finished work units", kind="bool"
    )
    checksum: str = _opt(
        "crc32",
        "checksum recorded for every shard: crc32 (computed while writing, default) or "
        "sha256 (the Hub's LFS hash; re-reads every shard on one driver thread)",
        choices=CHECKSUMS,
    )

    def replace(self, **changes: Any) -> MergeOptions:
        """A copy with some options changed (``None`` values included)."""
        return dataclasses.replace(self, **changes)


def meta_of(f: dataclasses.Field) -> OptionMeta:
    """The ``OptionMeta`` of one ``MergeOptions`` field."""
    return f.metadata["distmerge"]


def option_fields(*groups: Group) -> list[dataclasses.Field]:
    """The fields of ``MergeOptions`` in these groups (all when none is named), in CLI order."""
    return [f for f in dataclasses.fields(MergeOptions) if not groups or meta_of(f).group in groups]


def flag_of(name: str) -> str:
    """The CLI flag of an option (``unit_size`` -> ``--unit-size``)."""
    return "--" + name.replace("_", "-")


def pair_weights(loras: list[str], weights: list[float] | None) -> list[tuple[str, float]]:
    """``--lora`` paths with their ``--weight`` values, in order (1.0 each when none is given).

    >>> pair_weights(["a.pth", "b.pth"], [0.5, -1.0])
    [('a.pth', 0.5), ('b.pth', -1.0)]
    >>> pair_weights(["a.pth"], None)
    [('a.pth', 1.0)]

    Raises:
        UsageError: as many weights as LoRAs are needed, or none.
    """
    if weights and len(weights) != len(loras):
        from distmerge.errors import UsageError

        raise UsageError(
            f"got {len(loras)} --lora but {len(weights)} --weight; give one "
            "--weight per --lora, in the same order, or none"
        )
    return list(zip(loras, weights or [1.0] * len(loras)))


def from_args(args: Any) -> MergeOptions:
    """The ``MergeOptions`` of parsed ``distmerge merge`` arguments."""
    return MergeOptions(**{f.name: getattr(args, f.name) for f in option_fields()})
