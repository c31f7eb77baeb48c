"""distmerge: fold LoRA adapters into base checkpoints with Ray tasks, streaming, in float32.

Example (prose, not run: it needs real checkpoints)::

    import distmerge
    distmerge.merge("base_dir", ["lora.safetensors", ("other.pth", 0.5)], "out_dir", dtype="bf16")
"""

from __future__ import annotations

__version__ = "0.1.0"

import importlib
from typing import Any

from distmerge.errors import (
    ClusterError,
    DistmergeError,
    FormatError,
    MatchError,
    OutputError,
    PlanError,
    ShardWriteError,
)

# The front ends import torch; loaded on first use so the torch-free stages (``inputs.header``,
# ``plan``) load without it.
_LAZY = {
    "merge": "distmerge.app.api",
    "MergeReport": "distmerge.app.report",
    "MergeOptions": "distmerge.app.options",
    "RaySession": "distmerge.cluster",
    "extract": "distmerge.app.extract",
    "ExtractReport": "distmerge.app.extract",
    "verify": "distmerge.app.verify",
    "verify_output": "distmerge.app.verify",
    "VerifyReport": "distmerge.app.verify",
    "inspect_lora": "distmerge.app.inspect",
    "load_state_dict_from_safetensors": "distmerge.app.compat",
    "merge_lora_into_state_dict": "distmerge.app.compat",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'distmerge' has no attribute {name!r}")


#: the exceptions users catch (``errors.UsageError`` is the command line's own)
_ERRORS = (DistmergeError, FormatError, MatchError, PlanError, OutputError, ShardWriteError, ClusterError)

__all__ = ["__version__", *_LAZY, *(e.__name__ for e in _ERRORS)]
