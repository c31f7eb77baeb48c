"""Path rules shared by the input, output and job-file checks.

Example:
    >>> inside("/data/out/a", "/data/out"), inside("/data/outer", "/data/out"), inside("/data", "/data")
    (True, False, True)
    >>> is_file_output("out/Merged.SAFETENSORS"), is_file_output("wan-Q8_0.gguf"), is_file_output("out/low_noise")
    (True, True, False)
    >>> missing("/no/such/model.safetensors")
    'no such file or folder (nothing of it exists below /)'
"""

from __future__ import annotations

import os
import re

from distmerge.errors import UsageError
from distmerge.inputs.gguffile import GGUF_SUFFIX
from distmerge.inputs.s3client import is_s3

__all__ = ["absolute", "inside", "missing", "is_file_output", "refuse_url", "FILE_SUFFIXES", "OTHER_WEIGHT_SUFFIXES"]

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")

#: the names of one-file outputs: safetensors, or GGUF (a Wan model for ComfyUI-GGUF)
FILE_SUFFIXES = (".safetensors", GGUF_SUFFIX)
#: weight-file extensions an output cannot be written as (distmerge writes safetensors or GGUF): an
#: output named like one is refused instead of silently becoming a folder of that name
OTHER_WEIGHT_SUFFIXES = (".sft", ".st", ".safetensor", ".bin", ".pt", ".pth", ".ckpt", ".pkl")


def absolute(path: str | os.PathLike[str]) -> str:
    """``path`` as Ray's workers (and a caller's later ``os.chdir``) read it: an ``s3://`` URL as it
    is, a local path made absolute.

    >>> absolute("s3://models/wan/base"), absolute("/data/../data/base")
    ('s3://models/wan/base', '/data/base')
    """
    p = os.fspath(path)
    return p if is_s3(p) else os.path.abspath(p)


def inside(child: str, parent: str) -> bool:
    """``child`` is ``parent`` or lies below it (plain string paths, compared as given)."""
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def missing(path: str) -> str:
    """Why ``path`` cannot be read, naming the nearest folder of it that exists and what that
    folder holds that looks like what was meant (a typo is then seen at a glance)."""
    p = os.path.abspath(path)
    parent = os.path.dirname(p)
    while not os.path.isdir(parent):
        parent = os.path.dirname(parent)
    if parent == os.path.dirname(p):
        wanted = os.path.basename(p).lower()
        try:
            names = sorted(os.listdir(parent))
        except OSError:
            names = []
        close = [n for n in names if n.lower()[:3] == wanted[:3]] or names
        shown = ", ".join(close[:5]) + (", …" if len(close) > 5 else "")
        return f"no such file or folder in {parent}" + (f" (it holds {shown})" if shown else " (an empty folder)")
    return f"no such file or folder (nothing of it exists below {parent})"


def refuse_url(path: str | os.PathLike[str], flag: str = "", *, s3: bool = False) -> None:
    """Refuse a URL where distmerge takes a local path (any scheme but ``s3://`` for an input; with
    ``s3``, an ``s3://`` output or report is taken too): it would otherwise become a local folder
    named ``s3:``.

    >>> refuse_url("s3://bucket/wan/out", "--output", s3=True)
    >>> try:
    ...     refuse_url("s3://bucket/wan/lora.safetensors", "--output")
    ... except UsageError as e:
    ...     print(str(e)[:81])
    --output s3://bucket/wan/lora.safetensors: this command writes local or mounted p
    """
    m = _URL.match(os.fspath(path))
    if not m or m.group(1).lower() == "hf" or (s3 and m.group(1).lower() == "s3"):
        return
    where = f"{flag} {os.fspath(path)}" if flag else os.fspath(path)
    if m.group(1).lower() == "s3":
        raise UsageError(
            f"{where}: this command writes local or mounted paths only (merge writes s3:// outputs); "
            "write locally and upload, or mount the bucket (e.g. mountpoint-s3, s3fs)"
        )
    raise UsageError(
        f"{where}: distmerge takes local or mounted paths and s3:// URLs, not {m.group(1)}:// ones; "
        "mount the bucket (e.g. gcsfuse) or use its S3 API"
    )


def is_file_output(path: str) -> bool:
    """An output named ``….safetensors`` or ``….gguf`` (in any case) is one file; any other name is
    a model folder."""
    return os.fspath(path).rstrip(os.sep).lower().endswith(FILE_SUFFIXES)
