"""distmerge: fold LoRA adapters into base checkpoints with Ray tasks, streaming, in float32.

Example:
    >>> import distmerge
    >>> # distmerge.merge("base_dir", ["lora.safetensors", ("other.pth", 0.5)], "out_dir", dtype="bf16")
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import (ClusterError, DistmergeError, FormatError, MatchError, OutputError, PlanError,
                     ShardWriteError)
from .report import MergeReport
from .api import merge
from .compat import load_state_dict_from_safetensors, merge_lora_into_state_dict

__all__ = [
    "__version__",
    "merge",
    "MergeReport",
    "load_state_dict_from_safetensors",
    "merge_lora_into_state_dict",
    "DistmergeError",
    "FormatError",
    "MatchError",
    "PlanError",
    "OutputError",
    "ShardWriteError",
    "ClusterError",
]
