"""The numbers and choices a user gives, checked before anything runs (and without torch).

Example:
    >>> validate_options(weights=[1.0, -0.5], alpha=2.0, dtype="bf16")
    'BF16'
    >>> try:
    ...     validate_options(weights=[float("nan")], alpha=1.0)
    ... except UsageError as e:
    ...     print(e)
    --weight nan is not a finite number; give each LoRA a weight like 1.0, 0.5 or -1.0
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from distmerge.app.options import DEVICES, MergeOptions
from distmerge.errors import PlanError, UsageError
from distmerge.inputs.dtypes import CLI_DTYPES, DTYPE_FLAGS, FP8_CODES, code_of_torch_name, dtype_code, flag_of_code
from distmerge.inputs.ggml import WRITABLE
from distmerge.inputs.gguffile import is_gguf_name
from distmerge.inputs.objstore import is_s3
from distmerge.inputs.paths import OTHER_WEIGHT_SUFFIXES, refuse_url
from distmerge.plan.gguf import GGUF_TYPES
from distmerge.plan.merge_plan import parse_size
from distmerge.tasks.checksum import ALGORITHMS

__all__ = [
    "F32_MAX",
    "check_counts",
    "check_device",
    "check_limits",
    "check_options",
    "lora_specs",
    "resolve_dtype",
    "validate_options",
]

#: the largest finite float32: every coefficient is applied in float32
F32_MAX = 3.4028234663852886e38


def resolve_dtype(dtype: Any) -> str | None:
    """``None``/``keep`` -> None; ``bf16``/``fp16``/``fp32`` or a torch dtype -> safetensors code."""
    if dtype is None:
        return None
    if not isinstance(dtype, str):  # a torch dtype
        code = code_of_torch_name(str(dtype))
        if code is None or code not in CLI_DTYPES.values():
            raise UsageError(f"--dtype {dtype} is not supported; use {', '.join(DTYPE_FLAGS[1:])} or keep")
        return code
    return dtype_code(dtype)


def lora_specs(loras: Sequence[object] | str | os.PathLike[str]) -> list[tuple[str, float]]:
    """``[path | (path, weight), …]`` (or one path alone) -> ``[(path, weight), …]`` (weight 1.0 by default).

    >>> lora_specs(["a.pth", ("b.safetensors", -0.5)]), lora_specs("c.pth")
    ([('a.pth', 1.0), ('b.safetensors', -0.5)], [('c.pth', 1.0)])
    """
    if isinstance(loras, (str, os.PathLike)):
        loras = [loras]  # one LoRA given alone, not a list of its characters
    out = []
    for item in loras:
        if isinstance(item, (tuple, list)):
            path, weight = item
            out.append((os.fspath(path), float(weight)))
        else:
            out.append((os.fspath(item), 1.0))  # type: ignore[call-overload]
    if not out:
        raise UsageError("no LoRA given; pass at least one --lora")
    return out


def _finite(name: str, value: float, hint: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise UsageError(f"{name} {value} is not a finite number; {hint}")
    if abs(value) > F32_MAX:
        raise UsageError(
            f"{name} {value:g} overflows float32 (largest {F32_MAX:.4g}), in which every delta "
            "is added; use a weight of ordinary size"
        )


def check_counts(opts: Any) -> None:
    """The Ray counts of a job's options (``MergeOptions``, ``RunOptions``): ``max_retries`` >= 0,
    ``num_workers`` and ``num_cpus`` >= 1 when given.

    >>> check_counts(MergeOptions(num_workers=0))
    Traceback (most recent call last):
    distmerge.errors.UsageError: --num-workers must be an integer >= 1 (got --num-workers 0)
    """
    for name, low in (("max_retries", 0), ("num_workers", 1), ("num_cpus", 1)):
        value = getattr(opts, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{flag} must be an integer >= {low} (got {flag} {value!r})")


def check_device(device: str) -> None:
    """``auto``, ``cpu`` or ``cuda``.

    >>> check_device("gpu")
    Traceback (most recent call last):
    distmerge.errors.UsageError: --device 'gpu' is not supported; use auto, cpu or cuda
    """
    if device not in DEVICES:
        raise UsageError(f"--device {device!r} is not supported; use {', '.join(DEVICES[:-1])} or {DEVICES[-1]}")


def check_report_path(path: str | os.PathLike[str] | None, flag: str = "--report") -> None:
    """Refuse a report path that cannot be written, before any work: an existing folder, or a
    place whose nearest existing folder is not writable (missing folders are created when the
    report is written, as for a folder output).

    >>> check_report_path("/etc/hostname/r.json", "-r")
    Traceback (most recent call last):
    distmerge.errors.UsageError: -r /etc/hostname/r.json: cannot write there (/etc/hostname is a file, not a folder)
    """
    if not path:
        return
    refuse_url(path, flag, s3=True)
    if is_s3(path):
        return  # written once the output is published, with one PUT
    p = os.path.abspath(os.fspath(path))
    if os.path.isdir(p):
        raise UsageError(
            f"{flag} {path}: is a folder; give a file name, e.g. {os.path.join(os.fspath(path), 'report.json')}"
        )
    parent = os.path.dirname(p)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {path}: cannot write there ({parent} is a file, not a folder)")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{flag} {path}: cannot write there ({parent} is not writable)")


def check_output_name(
    output: str | os.PathLike[str], flag: str = "--output", *, out_code: str | None = None, checksum: str = "crc32"
) -> None:
    """Refuse an output named like a weight file distmerge does not write (``merged.sft``,
    ``model.bin``), which would otherwise become a folder of that name, and a ``--dtype`` (code
    ``out_code``) the output's format cannot hold: GGML block types need a ``.gguf`` output, fp8 a
    safetensors one.

    >>> try:
    ...     check_output_name("merged.sft")
    ... except UsageError as e:
    ...     print(str(e)[:72])
    --output merged.sft: distmerge writes safetensors or GGUF; name a single
    >>> try:
    ...     check_output_name("wan.safetensors", out_code="Q8_0")
    ... except UsageError as e:
    ...     print(str(e)[:70])
    --dtype q8_0 is a GGUF block type: name a .gguf output (e.g. wan.gguf)
    """
    refuse_url(output, flag, s3=True)
    if is_s3(output) and checksum != "crc32":
        raise UsageError(
            f"--checksum {checksum}: an s3:// output records crc32 (joined from the tasks' CRCs; a SHA-256 "
            "would read every shard back from the bucket); drop --checksum"
        )
    name = os.fspath(output).rstrip(os.sep)
    stem, ext = os.path.splitext(os.path.basename(name))
    if ext.lower() in OTHER_WEIGHT_SUFFIXES:
        raise UsageError(
            f"{flag} {output}: distmerge writes safetensors or GGUF; name a single-file output "
            f"'….safetensors' (e.g. {stem}.safetensors) or '….gguf', or give a folder name for a model folder"
        )
    gguf = is_gguf_name(name)
    if out_code in WRITABLE and not gguf:
        raise UsageError(
            f"--dtype {out_code.lower()} is a GGUF block type: name a .gguf output (e.g. {stem}.gguf), "
            "or use bf16, fp16 or fp32 for safetensors"
        )
    if gguf and out_code in FP8_CODES:
        raise UsageError(
            f"--dtype {flag_of_code(out_code)} writes scaled-fp8 safetensors; a .gguf output takes keep, "
            f"{', '.join(flag_of_code(c) for c in GGUF_TYPES)}"
        )


def check_options(opts: MergeOptions, specs: Sequence[tuple[str, float]]) -> str | None:
    """Every number and choice of a whole ``MergeOptions`` and the LoRAs' weights, and the report's
    path; return the output dtype's code (None: keep).

    Raises:
        UsageError: as ``check_report_path``, ``validate_options`` and ``check_limits`` say, in that order.
    """
    check_report_path(opts.report)
    out_code = validate_options(weights=[w for _, w in specs], alpha=opts.alpha, dtype=opts.dtype)
    check_limits(opts)
    return out_code


def validate_options(*, weights: Sequence[float], alpha: float, dtype: Any = None) -> str | None:
    """Check the weights, alpha and dtype a user gives; return the output dtype's code (None: keep).

    Raises:
        UsageError: a NaN/Inf/overflowing weight or alpha (alone or multiplied), or a bad dtype. One
            line each; the CLI exits 2.
    """
    _finite("--alpha", alpha, "the global multiplier is usually 1.0")
    for w in weights:
        _finite("--weight", w, "give each LoRA a weight like 1.0, 0.5 or -1.0")
        _finite(f"--weight {w:g} x --alpha", w * alpha, "lower one of them")
    return resolve_dtype(dtype)


def check_limits(opts: MergeOptions) -> None:
    """Check the sizes, counts and choices of ``opts`` besides its numbers: ``max_shard_size`` and
    ``unit_size``, ``max_retries``, ``num_workers`` and ``num_cpus``, ``checksum`` and ``device``.

    >>> check_limits(MergeOptions(num_workers=0))
    Traceback (most recent call last):
    distmerge.errors.UsageError: --num-workers must be an integer >= 1 (got --num-workers 0)

    Raises:
        UsageError: a bad size, count, checksum or device (one line; the CLI exits 2).
    """
    for name, size in (("--max-shard-size", opts.max_shard_size), ("--unit-size", opts.unit_size)):
        if size is not None:
            try:
                parse_size(size)
            except PlanError as e:
                raise UsageError(f"{name}: {e}") from None
    check_counts(opts)
    if opts.checksum not in ALGORITHMS:
        raise UsageError(f"--checksum {opts.checksum!r} is not supported; use {' or '.join(ALGORITHMS)}")
    check_device(opts.device)
