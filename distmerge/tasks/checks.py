"""The task side of ``distmerge verify``: compare groups of output tensors with base + LoRA.

Pure of Ray: ``check_group`` runs inside a Ray task (``verify.verify`` dispatches it) and returns
small metadata; the arithmetic of the comparisons is ``tasks.ulp``'s.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from distmerge.formats.normalize import Delta
from distmerge.inputs.dtypes import itemsize
from distmerge.inputs.header import TensorInfo
from distmerge.inputs.lorafile import LoraReader
from distmerge.inputs.torch_dtypes import to_torch
from distmerge.plan.fp8 import INPUT_SCALE
from distmerge.plan.merge_plan import CHUNK_BYTES  # bytes of float64 (or raw data) handled at once
from distmerge.plan.units import TASK_OVERHEAD_BYTES
from distmerge.tasks.checksum import file_digest
from distmerge.tasks.compare import (
    CHECKSUM,
    NONFINITE,
    STRUCTURE,
    UNTOUCHED,
    VALUE,
    Compare,
    ValueStats,
    Worst,
    geometry,
    read_rows,
    reference_rows,
    sample_rows,
    where,
)
from distmerge.tasks.fp8 import FP8_MAX, quantize
from distmerge.tasks.mergemath import merge_tensor
from distmerge.tasks.reading import OpenFiles, read_bytes, read_scalar
from distmerge.tasks.terms import load_terms
from distmerge.tasks.ulp import error_text, finite, show_value, ulp_distance

__all__ = [
    "CheckGroup",
    "GroupResult",
    "TensorCheck",
    "ValueStats",
    "check_group",
    "show_value",
    "ulp_distance",
]

#: failures each task reports in full (the rest are only counted)
_MAX_FAILURES = 8


@dataclass(frozen=True)
class TensorCheck:
    """One tensor to check: where it is in the base and in the merged output, and its deltas."""

    key: str
    base: TensorInfo
    out: TensorInfo
    deltas: tuple[Delta, ...] = ()
    quant: str = ""  #: ``scaled``: the output is scaled fp8 with a fresh scale in ``scale``
    scale: TensorInfo | None = None  #: the output's scale of a ``scaled`` tensor
    base_scale: TensorInfo | None = None  #: the base's scale (dequantizes a scaled-fp8 base)
    input_scale: TensorInfo | None = None  #: the output's new input scale (``fp8.INPUT_SCALE``)


@dataclass(frozen=True)
class CheckGroup:
    """The work of one task: hash ``hash_path`` (if set) and check ``checks``."""

    index: int
    checks: tuple[TensorCheck, ...] = ()
    hash_path: str = ""
    hash_algo: str = "sha256"  #: ``crc32`` or ``sha256``
    hash_size: int = 0  #: bytes of ``hash_path`` (an ``s3://`` object's from its listing)
    rows: int = 32  #: sampled rows per merged tensor (ignored with ``full``)
    full: bool = False
    seed: int = 0

    @property
    def nbytes(self) -> int:
        """Bytes read: the file hashed, or both copies of every tensor checked."""
        if self.hash_path:
            return self.hash_size or os.path.getsize(self.hash_path)
        return sum(c.out.nbytes + c.base.nbytes for c in self.checks)

    @property
    def memory(self) -> int:
        """Ray memory to ask for: a few chunks, or a whole float64 tensor where the deltas are not
        row-local (or the output is scaled fp8: its largest value, the converted bytes)."""
        peak = 0 if self.hash_path else 4 * CHUNK_BYTES
        for c in self.checks:
            if c.quant or not all(d.row_local for d in c.deltas):
                peak = max(peak, 4 * CHUNK_BYTES + 3 * 8 * c.base.numel)
        return TASK_OVERHEAD_BYTES + peak


@dataclass(frozen=True)
class GroupResult:
    """What a task sends back: small metadata only."""

    index: int
    tensors: int = 0
    merged: int = 0
    rows_compared: int = 0
    stats: ValueStats = ValueStats()  #: over the merged tensors of the group
    failures: tuple[tuple[int, int, str], ...] = ()  #: (rank, ulp, message), the first few
    n_failures: int = 0  #: tensors that failed (including those not listed)
    digest: str = ""  #: hex checksum of ``hashed`` (``CheckGroup.hash_algo``)
    hashed: str = ""  #: the file hashed


def check_group(group: CheckGroup) -> GroupResult:
    """Run one verify task (the body of each Ray task; knows nothing about Ray).

    Raises:
        DistmergeError: a LoRA factor cannot be read (an input problem, not a finding).
    """
    files = OpenFiles()
    reader = LoraReader()
    failures: list[tuple[int, int, str]] = []
    n_failures = merged = rows_compared = 0
    stats = ValueStats()
    digest = ""
    try:
        if group.hash_path:
            try:
                digest = file_digest(group.hash_path, group.hash_algo)
            except OSError as e:
                n_failures += 1
                failures.append((CHECKSUM, 0, (f"{group.hash_path}: cannot read to checksum ({e.strerror or e})")))
        for c in group.checks:
            try:
                if c.quant and not c.deltas:
                    found = _check_quantized(c, files)
                elif c.deltas:
                    merged += 1
                    check = _check_scaled if c.quant else _check_merged
                    found, one, nrows = check(c, group, files, reader)
                    rows_compared += nrows
                    stats = stats.merge(one)
                else:
                    found = _check_untouched(c, files)
                found += _check_input_scale(c, files)
            except OSError as e:
                found = [(STRUCTURE, 0, (f"{c.out.path}: '{c.key}': cannot read ({e.strerror or e})"))]
            if found:
                n_failures += 1
                failures += found
    finally:
        files.close()
    failures.sort(key=lambda f: (f[0], -f[1]))
    return GroupResult(
        group.index,
        len(group.checks),
        merged,
        rows_compared,
        stats,
        tuple(failures[:_MAX_FAILURES]),
        n_failures,
        digest,
        group.hash_path,
    )


def _check_merged(
    c: TensorCheck, g: CheckGroup, files: OpenFiles, reader: LoraReader
) -> tuple[list[tuple[int, int, str]], ValueStats, int]:
    """Finite check over all values, then sampled rows against the float64 reference.
    Returns (failures, statistics, rows compared)."""
    b, o = c.base, c.out
    n, per = geometry(b.shape)
    if n * per == 0:
        return [], ValueStats(), 0
    name = os.path.basename(o.path)
    out_fd, base_fd = files.source(o.path), files.source(b.path)
    sample = sample_rows(c.key, n, g.rows, g.seed, g.full)
    terms = load_terms(c.deltas, reader.read, reader.read_rows)
    full_ref = None
    if not all(d.row_local for d in c.deltas):  # DoRA, LoHa, LoKr, …: whole tensor in float64
        w = read_rows(base_fd, b, per, range(n)).reshape(b.shape)
        full_ref = merge_tensor(w.to(torch.float64), terms, out_dtype=torch.float64).reshape(n, per)
    cmp = Compare(o.dtype, c.key)
    failures: list[tuple[int, int, str]] = []
    step = max(1, CHUNK_BYTES // max(1, per * 8))
    s = 0
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        out = read_rows(out_fd, o, per, range(r0, r1))
        if not failures:
            failures += _nonfinite(c, out, r0, per, name)
        e = s
        while e < len(sample) and sample[e] < r1:
            e += 1
        rows = sample[s:e]
        s = e
        if not rows:
            continue
        out_rows = out.index_select(0, torch.tensor([r - r0 for r in rows], dtype=torch.long))
        if full_ref is not None:
            ref = full_ref.index_select(0, torch.tensor(rows, dtype=torch.long))
        else:
            ref = reference_rows(read_rows(base_fd, b, per, rows), terms, n, per, rows)
        cmp.add(out_rows, ref, rows)
    return failures + cmp.failure(b.shape, name), cmp.result()[0], len(sample)


def _nonfinite(c: TensorCheck, out: torch.Tensor, r0: int, per: int, name: str) -> list[tuple[int, int, str]]:
    """The first non-finite value of a chunk of output rows starting at row ``r0``, as a failure."""
    bad = ~finite(out)
    if not bool(bad.any()):
        return []
    flat = int(bad.reshape(-1).nonzero()[0])
    value = float(out.reshape(-1)[flat])
    return [(NONFINITE, 0, f"{c.key} {where(c.base.shape, r0 + flat // per)}: {value} is not finite ({name})")]


def _check_scaled(
    c: TensorCheck, g: CheckGroup, files: OpenFiles, reader: LoraReader
) -> tuple[list[tuple[int, int, str]], ValueStats, int]:
    """A merged scaled-fp8 tensor: finite, a fresh scale (its largest code is ±fp8_max), and sampled
    rows of ``(W·s0 + Σ coef·ΔW) / s`` (float64) within 1 fp8 ulp of the output codes."""
    out = _ScaledOutput.read(c, files)
    found = out.structure()
    if found:
        return found, ValueStats(), 0
    sample = sample_rows(c.key, out.n, g.rows, g.seed, g.full)
    if not sample:
        return [], ValueStats(), 0
    ref = _scaled_reference(c, files, reader, out, sample)
    cmp = Compare(c.out.dtype, c.key)
    cmp.add(out.q.index_select(0, torch.tensor(sample, dtype=torch.long)), ref, sample)
    stats, worst, nbad = cmp.result()
    if worst is None:
        return [], stats, len(sample)
    return [out.value_failure(worst, nbad, stats.values)], stats, len(sample)


@dataclass(frozen=True)
class _ScaledOutput:
    """A merged scaled-fp8 output tensor as read back: its codes, its scale and the base's."""

    c: TensorCheck
    fmax: float  #: the largest fp8 code of the output dtype
    s: float  #: the output's (fresh) scale
    scale_text: str  #: ``s`` as ``show_value`` prints it in the scale's dtype
    s0: torch.Tensor | None  #: the base's scale (float32 0-d), if the base is scaled fp8
    q: torch.Tensor  #: the codes, ``[n, per]``
    n: int
    per: int

    @classmethod
    def read(cls, c: TensorCheck, files: OpenFiles) -> _ScaledOutput:
        assert c.scale is not None
        n, per = geometry(c.base.shape)
        fmax = FP8_MAX[c.out.dtype]
        s = read_scalar(files.source(c.scale.path), c.scale.offset, c.scale.dtype, c.scale.nbytes)
        bs = c.base_scale
        s0 = read_scalar(files.source(bs.path), bs.offset, bs.dtype, bs.nbytes) if bs is not None else None
        q = read_rows(files.source(c.out.path), c.out, per, range(n))
        return cls(c, fmax, float(s), show_value(float(s), c.scale.dtype), s0, q, n, per)

    @property
    def name(self) -> str:
        return os.path.basename(self.c.out.path)

    def structure(self) -> list[tuple[int, int, str]]:
        """A non-finite value or scale, or a scale that is not fresh, as a failure (else empty)."""
        c, qf, fmax = self.c, self.q.to(torch.float32), self.fmax
        if not bool(torch.isfinite(qf).all()) or not (math.isfinite(self.s) and self.s > 0):
            flat = int((~torch.isfinite(qf)).reshape(-1).nonzero()[0]) if not bool(torch.isfinite(qf).all()) else 0
            return [
                (
                    NONFINITE,
                    0,
                    (
                        f"{c.key} {where(c.base.shape, flat // self.per)}: value {float(qf.reshape(-1)[flat])} "
                        f"× scale {self.scale_text} is not finite ({self.name})"
                    ),
                )
            ]
        top = float(qf.abs().max()) if qf.numel() else 0.0
        if top != fmax and not (top == 0.0 and self.s == 1.0):
            return [
                (
                    VALUE,
                    0,
                    (
                        f"{c.key}: largest |code| is {top:g}, expected {fmax:g} (a fresh scale "
                        f"amax/{fmax:g}; the scale is {self.scale_text}) ({self.name})"
                    ),
                )
            ]
        return []

    def value_failure(self, w: Worst, nbad: int, values: int) -> tuple[int, int, str]:
        """The failure of the worst code ``w`` (``nbad`` of ``values`` compared codes fail)."""
        c, code, sf = self.c, self.c.out.dtype, self.s
        return (
            VALUE,
            w.ulp,
            (
                f"{c.key} {where(c.base.shape, w.row)}: code {show_value(w.out, code)} vs expected "
                f"{show_value(w.ref, code)} at scale {self.scale_text}, i.e. {w.out * sf:.9g} vs "
                f"{w.ref * sf:.9g} ({error_text(w.ulp, w.out, w.ref, 'fp8 ulp')}; {nbad} of "
                f"{values} compared values beyond tolerance) ({self.name})"
            ),
        )


def _scaled_reference(
    c: TensorCheck, files: OpenFiles, reader: LoraReader, out: _ScaledOutput, sample: Sequence[int]
) -> torch.Tensor:
    """``(W·s0 + Σ coef·ΔW) / s`` in float64 for the rows ``sample``, clamped to ±fp8_max."""
    b, n, per = c.base, out.n, out.per
    terms = load_terms(c.deltas, reader.read, reader.read_rows)
    local = all(d.row_local for d in c.deltas)
    w = read_rows(files.source(b.path), b, per, sample if local else range(n))
    w = w.to(torch.float32) * out.s0 if out.s0 is not None else w.to(torch.float32)  # ComfyUI's dequantization
    if local:
        ref = reference_rows(w, terms, n, per, sample)
    else:
        full = merge_tensor(w.reshape(b.shape).to(torch.float64), terms, out_dtype=torch.float64)
        ref = full.reshape(n, per).index_select(0, torch.tensor(sample, dtype=torch.long))
    return (ref / out.s).clamp(-out.fmax, out.fmax)


def _check_quantized(c: TensorCheck, files: OpenFiles) -> list[tuple[int, int, str]]:
    """A tensor ``--dtype fp8_*`` quantized without deltas: weight and scale bytes equal the base
    quantized (deterministic round-to-nearest, fresh scale)."""
    b, o = c.base, c.out
    assert c.scale is not None
    n, per = geometry(b.shape)
    w = read_rows(files.source(b.path), b, per, range(n)).to(torch.float32)
    want_q, want_s = quantize(w, o.dtype, scale_dtype=to_torch(c.scale.dtype))
    got = read_bytes(files.source(o.path), o.offset, o.nbytes)
    got_s = read_bytes(files.source(c.scale.path), c.scale.offset, c.scale.nbytes)
    if bytes(got_s) != want_s.reshape(-1).view(torch.uint8).numpy().tobytes():
        sd = c.scale.dtype
        got_v = float(torch.frombuffer(got_s, dtype=to_torch(sd))[0].item())
        return [
            (
                UNTOUCHED,
                0,
                (
                    f"{c.scale.key}: scale {show_value(got_v, sd)} vs expected "
                    f"{show_value(float(want_s.reshape(-1)[0]), sd)} (amax/{FP8_MAX[o.dtype]:g} of the "
                    f"base '{c.key}') ({os.path.basename(c.scale.path)})"
                ),
            )
        ]
    want = bytearray(want_q.reshape(-1).view(torch.uint8).numpy().tobytes())
    found = _first_difference(got, want, o.dtype)
    if found is None:
        return []
    elem, text = found
    return [
        (
            UNTOUCHED,
            0,
            (
                f"{c.key} {where(b.shape, elem // max(1, per))}: code {text}: differs from the base "
                f"quantized to {o.dtype} ({os.path.basename(o.path)})"
            ),
        )
    ]


def _check_input_scale(c: TensorCheck, files: OpenFiles) -> list[tuple[int, int, str]]:
    """A new input scale (``--dtype fp8_*``) holds exactly ``INPUT_SCALE``."""
    s = c.input_scale
    if s is None:
        return []
    got = float(read_scalar(files.source(s.path), s.offset, s.dtype, s.nbytes))
    if got == INPUT_SCALE:
        return []
    want = f"expected {INPUT_SCALE:g} (the input scale of '{c.key}')"
    return [(VALUE, 0, f"{s.key}: {show_value(got, s.dtype)}, {want} ({os.path.basename(s.path)})")]


def _first_difference(got: bytearray, want: bytearray, code: str) -> tuple[int, str] | None:
    """The first element (of dtype ``code``) where two equal-length buffers differ, as ``(index,
    "GOT vs expected WANT (N ulp, …)")``; None when they are equal."""
    diff = torch.frombuffer(got, dtype=torch.uint8) != torch.frombuffer(want, dtype=torch.uint8)
    if not bool(diff.any()):
        return None
    size = itemsize(code)
    elem = int(diff.nonzero()[0]) // size
    g = torch.frombuffer(got, dtype=to_torch(code))[elem : elem + 1]
    w = torch.frombuffer(want, dtype=to_torch(code))[elem : elem + 1]
    gv, wv = float(g.to(torch.float64)), float(w.to(torch.float64))
    u = int(ulp_distance(g, w))
    unit = "fp8 ulp" if size == 1 else "ulp"
    return elem, f"{show_value(gv, code)} vs expected {show_value(wv, code)} ({error_text(u, gv, wv, unit)})"


def _check_untouched(c: TensorCheck, files: OpenFiles) -> list[tuple[int, int, str]]:
    """Byte compare with the base (converted to the output dtype when it differs)."""
    b, o = c.base, c.out
    if o.nbytes == 0:
        return []
    out_fd, base_fd = files.source(o.path), files.source(b.path)
    _n, per = geometry(b.shape)
    src_size, out_size = itemsize(b.dtype), itemsize(o.dtype)
    step = max(1, CHUNK_BYTES // max(src_size, out_size, 1))  # elements per chunk
    total = b.numel if b.shape else 1
    for e0 in range(0, total, step):
        cnt = min(step, total - e0)
        got = read_bytes(out_fd, o.offset + e0 * out_size, cnt * out_size)
        raw = read_bytes(base_fd, b.offset + e0 * src_size, cnt * src_size)
        if b.dtype == o.dtype:
            want = raw
        else:
            want = bytearray(
                torch.frombuffer(raw, dtype=to_torch(b.dtype))
                .to(to_torch(o.dtype))
                .contiguous()
                .view(torch.uint8)
                .numpy()
                .tobytes()
            )
        found = None if got == want else _first_difference(got, want, o.dtype)
        if found is None:
            continue
        elem, text = found
        r = (e0 + elem) // max(1, per)
        what = "the base" if b.dtype == o.dtype else f"the base converted to {o.dtype}"
        return [
            (
                UNTOUCHED,
                0,
                (
                    f"{c.key} {where(b.shape, r)}: {text}: untouched tensor differs from {what} "
                    f"({os.path.basename(o.path)})"
                ),
            )
        ]
    return []
