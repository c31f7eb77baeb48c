"""Execute one work unit: read the unit's base byte ranges and LoRA factors, merge, write bytes.

This is the body of every Ray task, but it knows nothing about Ray: tests call it directly.
Tensors no delta touches are copied file-to-file in the kernel without being decoded; converted
tensors are decoded and re-encoded; merged tensors go through ``merge.merge_tensor`` on the unit's
device, and are checked to be finite before they are written.

Example:
    >>> # given a plan from distmerge.plan.make_plan and a prepared part file:
    >>> # result = run_unit(plan.units[0], "/out/.model-00001-of-00001.safetensors.part")
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .dtypes import to_torch
from .errors import DistmergeError, ShardWriteError
from .lora import Delta
from .lorafile import LoraReader
from .mergemath import Term, merge_tensor
from .plan import PlannedTensor, WorkUnit
from .writer import copy_range, pwrite_all, tensor_bytes

__all__ = ["UnitResult", "run_unit", "read_tensor", "load_terms"]


@dataclass(frozen=True)
class UnitResult:
    """What a task sends back: small metadata only, never tensors."""

    index: int
    shard: str
    nbytes: int
    seconds: float
    device: str
    merged: int  #: tensors that received deltas
    node_id: str = ""


def read_tensor(fd: int, t: PlannedTensor) -> torch.Tensor:
    """Read one base tensor's bytes with ``preadv`` into a fresh buffer (no mmap, no extra copy)."""
    buf = bytearray(t.src_nbytes)
    view, off = memoryview(buf), t.src_offset
    while view:
        n = os.preadv(fd, [view], off)
        if n == 0:
            raise OSError(5, f"unexpected end of file at byte {off}")
        view, off = view[n:], off + n
    return torch.frombuffer(buf, dtype=to_torch(t.src_dtype)).reshape(t.shape)


def load_terms(deltas: Sequence[Delta], read: Callable[[str, str], torch.Tensor]) -> list[Term]:
    """Load each delta's factors with ``read(path, key)``; replacements (``set``) come first."""
    terms = []
    for d in sorted(deltas, key=lambda d: d.kind != "set"):
        try:
            factors = tuple(read(f.path, f.key) for f in d.factors)
        except DistmergeError:
            raise
        except Exception as e:  # a factor that existed at plan time but cannot be read now
            raise ShardWriteError(f"{d.source}: cannot read factor for '{d.target}' "
                                  f"({type(e).__name__}: {e})") from None
        terms.append(Term(d.kind, d.coef, factors, tuple(f.role for f in d.factors), d.transpose,
                          d.dora, d.strength))
    return terms


def _merged(t: PlannedTensor, w: torch.Tensor, reader: LoraReader, device: torch.device) -> torch.Tensor:
    terms = load_terms(t.deltas, reader.read)
    out = merge_tensor(w.to(device), terms, out_dtype=to_torch(t.out_dtype), inplace=True)
    if not bool(torch.isfinite(out).all()):
        sources = ", ".join(sorted({d.source for d in t.deltas}))
        raise ShardWriteError(f"merged tensor '{t.key}' has NaN/Inf values after adding deltas from "
                              f"{sources} (check the LoRA factors and --weight/--alpha)")
    return out.cpu()


def run_unit(unit: WorkUnit, dest: str, *, device: str = "cpu", threads: int | None = None) -> UnitResult:
    """Fill ``unit``'s tensors of the prepared output file ``dest``, then fsync it.

    Args:
        unit: from the plan.
        dest: the part file the driver created with ``writer.create_file``.
        device: ``cpu`` or ``cuda`` (the task's visible GPU).
        threads: torch intra-op threads for CPU math (the task's CPUs).

    Raises:
        ShardWriteError: an input could not be read, the output could not be written, or a merged
            tensor is not finite. The message names the file and key.
    """
    start = time.perf_counter()
    if threads:
        torch.set_num_threads(max(1, int(threads)))
    dev = torch.device(device)
    reader = LoraReader()
    fds: dict[str, int] = {}
    merged = 0
    key, path = "", dest
    try:
        dst = os.open(dest, os.O_WRONLY)
        fds[dest] = dst
        for t in unit.tensors:
            key, path = t.key, t.src_path
            src = fds.get(t.src_path)
            if src is None:
                src = fds[t.src_path] = os.open(t.src_path, os.O_RDONLY)
            if t.out_nbytes == 0:
                continue
            if t.action == "copy":
                copy_range(src, t.src_offset, dst, t.out_offset, t.src_nbytes)
                continue
            w = read_tensor(src, t)
            if t.action == "merge":
                out = _merged(t, w, reader, dev)
                merged += 1
            else:
                out = w.to(to_torch(t.out_dtype))
            path = dest
            pwrite_all(dst, tensor_bytes(out), t.out_offset)
            del w, out
        path, key = dest, ""
        os.fsync(dst)
    except DistmergeError:
        raise
    except OSError as e:
        where = f"{path}: '{key}'" if key else path
        raise ShardWriteError(f"{where}: {e.strerror or e}") from None
    finally:
        for fd in fds.values():
            os.close(fd)
    return UnitResult(unit.index, unit.shard, unit.nbytes, time.perf_counter() - start, dev.type, merged)
