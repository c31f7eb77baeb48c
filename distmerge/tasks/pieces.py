"""The pieces a work unit is processed in: row chunks of big tensors, byte chunks of copies.

A LoRA delta's rows only need the matching rows of B, so a big tensor is streamed in row chunks
of about ``CHUNK_BYTES`` of float32 and a task never holds more than a few of them, whatever the
model size. Chunk boundaries depend only on the tensor's shape, so the bytes written never depend
on how the work was split. A tensor copied as it is goes in byte pieces of ``COPY_CHUNK``.

Example:
    >>> row_chunks((40, 4), chunk_bytes=256)
    [(0, 16), (16, 32), (32, 40)]
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from distmerge.formats.kinds import DeltaKind, Role
from distmerge.inputs.ggml import row_nbytes
from distmerge.inputs.lorafile import LoraReader
from distmerge.plan.merge_plan import CHUNK_BYTES, COPY_CHUNK, Action, PlannedTensor, WorkUnit
from distmerge.tasks.mergemath import Term
from distmerge.tasks.terms import load_terms

__all__ = ["CHUNK_BYTES", "Piece", "piece_bytes", "row_chunks", "tensor_pieces", "unit_pieces"]

#: at least this many rows per chunk, so the GEMM never degenerates to a matrix-vector kernel
_MIN_ROWS = 16


def row_chunks(shape: tuple[int, ...], chunk_bytes: int | None = None) -> list[tuple[int, int]]:
    """Row ranges ``[r0, r1)`` covering ``shape[0]`` with about ``chunk_bytes`` of float32 each.

    >>> row_chunks((40, 4), chunk_bytes=256)
    [(0, 16), (16, 32), (32, 40)]
    """
    if len(shape) < 2 or shape[0] == 0:
        return [(0, shape[0] if shape else 1)]
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    per = max(_MIN_ROWS, chunk_bytes // (4 * math.prod(shape[1:])))
    return [(r, min(r + per, shape[0])) for r in range(0, shape[0], per)]


def _chunkable(t: PlannedTensor) -> bool:
    """True when rows of every ΔW depend only on the same rows of one factor (so row chunks are
    exact): plain LoRA pairs, full diffs and replacements on a tensor of 2 or more dimensions."""
    return len(t.shape) >= 2 and not t.whole


def _slice_rows(t: Term, r0: int, r1: int) -> Term:
    if t.kind == DeltaKind.LORA:
        up, down = t.factor(Role.UP).flatten(1)[r0:r1], t.factor(Role.DOWN)
        return Term(DeltaKind.LORA, t.coef, (down, up), (Role.DOWN, Role.UP), strength=t.strength)
    (d,) = t.factors
    return Term(t.kind, t.coef, (d[r0:r1],), t.roles, strength=t.strength)


@dataclass(frozen=True)
class Piece:
    """One piece of output: rows ``[r0, r1)`` of tensor ``t`` (or the whole tensor) with the
    tensor's delta terms sliced to those rows, or bytes ``[r0, r1)`` of a tensor copied as is."""

    t: PlannedTensor
    r0: int
    r1: int
    terms: tuple[Term, ...] = ()
    tail: int = 0  #: zero bytes after the piece that are the unit's (after a tensor's last piece: its pad)

    def byte_range(self, *, out: bool) -> tuple[int, int]:
        """(offset, length) of the piece's bytes in the output file, or with ``out=False`` in its source."""
        t = self.t
        start = t.out_offset if out else t.src_offset
        if t.action == Action.COPY:  # pieces of a copied tensor are byte ranges
            return start + self.r0, self.r1 - self.r0
        if len(t.shape) < 2:
            return (t.out_offset, t.out_nbytes) if out else (t.src_offset, t.src_nbytes)
        row = row_nbytes(t.out_dtype if out else t.src_dtype, t.shape)
        return start + self.r0 * row, (self.r1 - self.r0) * row


def tensor_pieces(t: PlannedTensor) -> list[tuple[int, int]]:
    """The row ranges tensor ``t`` is processed in (byte ranges of ``COPY_CHUNK`` for a copied
    tensor; one range when it cannot be chunked)."""
    if t.action == Action.COPY and t.src_nbytes:
        return [(b, min(b + COPY_CHUNK, t.src_nbytes)) for b in range(0, t.src_nbytes, COPY_CHUNK)]
    if t.out_nbytes == 0 or t.action.passthrough or not _chunkable(t):
        return [(0, t.shape[0] if t.shape else 1)]
    return row_chunks(t.shape)


def unit_pieces(unit: WorkUnit, reader: LoraReader) -> Iterator[Piece]:
    """Every piece of ``unit`` in file order, with its delta terms loaded (once per tensor)."""
    for t in unit.tensors:
        terms: tuple[Term, ...] = ()
        if t.deltas and t.action != Action.COPY:  # factors upcast once per tensor, not once per chunk
            cdt = torch.float64 if t.src_dtype == "F64" else torch.float32
            terms = tuple(
                replace(x, factors=tuple(f.to(cdt) for f in x.factors))
                for x in load_terms(t.deltas, reader.read, reader.read_rows)
            )
        pieces = tensor_pieces(t)
        for r0, r1 in pieces:
            sliced = tuple(_slice_rows(x, r0, r1) for x in terms) if len(pieces) > 1 else terms
            yield Piece(t, r0, r1, sliced, t.out_pad if r1 == pieces[-1][1] else 0)


def piece_bytes(unit: WorkUnit) -> tuple[int, int, int]:
    """Largest (source, output, accumulator) bytes of any piece of ``unit``."""
    src = out = acc = 0
    for t in unit.tensors:
        if t.action == Action.DERIVED or t.out_nbytes == 0:
            continue
        if t.action == Action.COPY:
            src, out = max(src, min(t.src_nbytes, COPY_CHUNK)), max(out, min(t.src_nbytes, COPY_CHUNK))
            continue
        r0, r1 = max(tensor_pieces(t), key=lambda p: p[1] - p[0])
        rows = (r1 - r0) if len(t.shape) >= 2 else 1
        per_row = math.prod(t.shape[1:]) if len(t.shape) >= 2 else math.prod(t.shape)
        src = max(src, rows * row_nbytes(t.src_dtype, t.shape))
        out = max(out, rows * row_nbytes(t.out_dtype, t.shape))
        acc = max(acc, rows * per_row * (8 if t.src_dtype == "F64" else 4))
    return src, out, acc
