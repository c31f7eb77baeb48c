"""The exceptions distmerge raises on purpose.

Every error distmerge raises for bad input or a failed merge is a ``DistmergeError``. The CLI
prints its message as a single line and exits non-zero; anything else is a bug. Each class also
subclasses the matching built-in type, so callers that catch ``ValueError``/``OSError`` keep
working. Messages name the file (and key), what was expected and what was found.

Example:
    >>> try:
    ...     raise FormatError("lora.safetensors: key 'x' has dtype 'Q4', expected a float type")
    ... except ValueError as e:
    ...     print(type(e).__name__, "-", e)
    FormatError - lora.safetensors: key 'x' has dtype 'Q4', expected a float type
"""

from __future__ import annotations

__all__ = [
    "DistmergeError",
    "FormatError",
    "MatchError",
    "PlanError",
    "UsageError",
    "OutputError",
    "ShardWriteError",
    "ClusterError",
]


class DistmergeError(Exception):
    """Base class: a problem distmerge detected and can explain in one line."""

    def __init__(self, message: str) -> None:  # a single positional arg keeps it picklable
        super().__init__(message)

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class FormatError(DistmergeError, ValueError):
    """An input file is malformed or in a layout distmerge does not read."""


class MatchError(DistmergeError, ValueError):
    """LoRA tensors that cannot be placed on the base (no target, missing factor, bad shape)."""


class PlanError(DistmergeError, ValueError):
    """Options that cannot be planned (bad sizes, bad output location, impossible resources)."""


class UsageError(PlanError):
    """An option or number the user gave that cannot mean anything (a NaN weight, a count of
    weights that does not match the LoRAs); the CLI exits 2 for it, as for argparse's errors."""


class OutputError(DistmergeError, OSError):
    """The output location cannot be used (exists, is the input, is not writable)."""


class ShardWriteError(DistmergeError, OSError):
    """A work unit failed while reading its inputs or writing its bytes."""


class ClusterError(DistmergeError, RuntimeError):
    """Ray could not be started, joined, or lost the work."""
