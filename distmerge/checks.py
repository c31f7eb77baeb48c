"""The task side of ``distmerge verify``: compare groups of output tensors with base + LoRA.

Pure of Ray: ``check_group`` runs inside a Ray task (``verify.verify`` dispatches it) and returns
small metadata. ULP distances use the monotonic integer line of each float format.

Example:
    >>> import torch
    >>> ulp_distance(torch.tensor([1.0]), torch.nextafter(torch.tensor([1.0]), torch.tensor([2.0]))).tolist()
    [1]
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .dtypes import itemsize, to_torch
from .fp8 import FP8_MAX, quantize
from .header import TensorInfo
from .lora import Delta
from .lorafile import LoraReader
from .mergemath import Term, merge_tensor
from .checksum import file_digest
from .unit import load_terms, read_bytes

__all__ = ["ulp_distance", "check_group", "CheckGroup", "GroupResult", "TensorCheck"]

#: bytes of float64 (or of raw data) handled at once by a task
_CHUNK = 32 << 20
#: failures each task reports in full (the rest are only counted)
_MAX_FAILURES = 8
#: candidate bad elements kept per chunk while the ``max|ref|`` of the tensor is not known yet
_KEEP = 256
#: near-cancellation allowance: |out - ref| <= _NEAR * max|ref| of the tensor
_NEAR = 1e-6
#: failure ranks, most serious first (the verdict lists failures in this order)
_STRUCTURE, _NONFINITE, _VALUE, _UNTOUCHED, _CHECKSUM = range(5)

_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise distance in units in the last place between two float tensors of one dtype.

    Bit patterns are mapped to a monotonic integer line (``i`` if ``i >= 0`` else ``INT_MIN - i``
    for the signed integer of the same width), so ``+0``/``-0`` are 0 apart and the smallest
    positive and negative subnormals 2 apart. Returns int64.

    >>> x = torch.tensor([0.0, 1.0, -0.0], dtype=torch.bfloat16)
    >>> y = torch.tensor([-0.0, 1.0078125, 0.0], dtype=torch.bfloat16)
    >>> ulp_distance(x, y).tolist()
    [0, 1, 0]
    """
    if a.dtype != b.dtype:
        raise ValueError(f"ulp_distance needs one dtype, got {a.dtype} and {b.dtype}")
    return (_ordered(a) - _ordered(b)).abs()


def _ordered(x: torch.Tensor) -> torch.Tensor:
    size = x.element_size()
    i = x.contiguous().view(_INT_VIEW[size]).to(torch.int64)
    lowest = -(1 << (8 * size - 1))
    return torch.where(i >= 0, i, lowest - i)


def _tolerance(code: str) -> int:
    return 16 if itemsize(code) >= 4 else 1


def _finite(x: torch.Tensor) -> torch.Tensor:
    """``isfinite`` for any float dtype (torch has no fp8 kernel: fp8 is upcast, exactly)."""
    return torch.isfinite(x.to(torch.float32) if x.element_size() == 1 else x)


# ----------------------------------------------------------------------------------------------
# Task side


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


@dataclass(frozen=True)
class CheckGroup:
    """The work of one task: hash ``hash_path`` (if set) and check ``checks``."""

    index: int
    checks: tuple[TensorCheck, ...] = ()
    hash_path: str = ""
    hash_algo: str = "sha256"  #: ``crc32`` or ``sha256``
    rows: int = 32  #: sampled rows per merged tensor (ignored with ``full``)
    full: bool = False
    seed: int = 0


@dataclass(frozen=True)
class GroupResult:
    """What a task sends back: small metadata only."""

    index: int
    tensors: int = 0
    merged: int = 0
    rows_compared: int = 0
    worst_ulp: int = 0
    worst_key: str = ""
    failures: tuple[tuple[int, int, str], ...] = ()  #: (rank, ulp, message), the first few
    n_failures: int = 0  #: tensors that failed (including those not listed)
    digest: str = ""  #: hex checksum of ``hashed`` (``CheckGroup.hash_algo``)
    hashed: str = ""  #: the file hashed


def check_group(group: CheckGroup) -> GroupResult:
    """Run one verify task (the body of each Ray task; knows nothing about Ray).

    Raises:
        DistmergeError: a LoRA factor cannot be read (an input problem, not a finding).
    """
    fds: dict[str, int] = {}
    reader = LoraReader()
    failures: list[tuple[int, int, str]] = []
    n_failures = merged = rows_compared = worst = 0
    worst_key = ""
    digest = ""
    try:
        if group.hash_path:
            try:
                digest = file_digest(group.hash_path, group.hash_algo)
            except OSError as e:
                n_failures += 1
                failures.append((_CHECKSUM, 0, f"{group.hash_path}: cannot read to checksum "
                                               f"({e.strerror or e})"))
        for c in group.checks:
            try:
                if c.quant and not c.deltas:
                    found = _check_quantized(c, fds)
                elif c.deltas:
                    merged += 1
                    check = _check_scaled if c.quant else _check_merged
                    found, ulp, nrows = check(c, group, fds, reader)
                    rows_compared += nrows
                    if ulp >= worst and (ulp > worst or not worst_key):
                        worst, worst_key = ulp, c.key
                else:
                    found = _check_untouched(c, fds)
            except OSError as e:
                found = [(_STRUCTURE, 0, f"{c.out.path}: '{c.key}': cannot read "
                                         f"({e.strerror or e})")]
            if found:
                n_failures += 1
                failures += found
    finally:
        for fd in fds.values():
            os.close(fd)
    failures.sort(key=lambda f: (f[0], -f[1]))
    return GroupResult(group.index, len(group.checks), merged, rows_compared, worst, worst_key,
                       tuple(failures[:_MAX_FAILURES]), n_failures, digest,
                       group.hash_path)


def _fd(fds: dict[str, int], path: str) -> int:
    if path not in fds:
        fds[path] = os.open(path, os.O_RDONLY)
    return fds[path]


def _geometry(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, elements per row): rows are the first axis; a 0-d tensor is one row of one."""
    if not shape:
        return 1, 1
    return shape[0], math.prod(shape[1:])


def _where(shape: tuple[int, ...], row: int) -> str:
    return "value" if not shape else f"element {row}" if len(shape) == 1 else f"row {row}"


def _sample(key: str, n: int, rows: int, seed: int, full: bool) -> list[int]:
    """Sorted row indices to recompute: all with ``full``, else ``rows`` drawn with a generator
    seeded from ``seed`` and the key (so the sample does not depend on how tensors are grouped)."""
    if full or rows >= n:
        return list(range(n))
    if rows <= 0:
        return []
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (1 << 63))
    return sorted(torch.randperm(n, generator=g)[:rows].tolist())


def _read_rows(fd: int, info: TensorInfo, per: int, rows: Sequence[int]) -> torch.Tensor:
    """Rows ``rows`` (sorted) of ``info`` as a ``[len(rows), per]`` tensor of its dtype; runs of
    consecutive rows are read at once."""
    row_bytes = per * itemsize(info.dtype)
    parts: list[bytearray] = []
    i = 0
    while i < len(rows):
        j = i
        while j + 1 < len(rows) and rows[j + 1] == rows[j] + 1:
            j += 1
        parts.append(read_bytes(fd, info.offset + rows[i] * row_bytes, (j - i + 1) * row_bytes))
        i = j + 1
    if not parts or row_bytes == 0:
        return torch.empty((len(rows), per), dtype=to_torch(info.dtype))
    raw = parts[0] if len(parts) == 1 else bytearray(b"".join(parts))
    return torch.frombuffer(raw, dtype=to_torch(info.dtype)).reshape(len(rows), per)


def _reference_rows(w: torch.Tensor, terms: Sequence[Term], n: int, per: int,
                    rows: Sequence[int]) -> torch.Tensor:
    """``W + Σ coef·ΔW`` for ``rows`` in float64, computed independently of ``mergemath`` (plain
    LoRA, ``diff`` and ``set`` terms, whose rows depend only on the same rows of one factor)."""
    idx = torch.tensor(list(rows), dtype=torch.long)
    acc = w.to(torch.float64)
    for t in terms:  # load_terms puts replacements first
        if t.kind == "set":
            acc = t.factors[0].reshape(n, per).index_select(0, idx).to(torch.float64)
        elif t.kind == "diff":
            acc = acc + t.coef * t.factors[0].reshape(n, per).index_select(0, idx).to(torch.float64)
        else:
            b = t.get("up").flatten(1).index_select(0, idx).to(torch.float64)
            a = t.get("down").flatten(1).to(torch.float64)
            acc = acc + t.coef * (b @ a)
    return acc


class _Compare:
    """Accumulates the comparison of one merged tensor, chunk by chunk.

    ``max|ref|`` of the tensor (for the near-cancellation allowance) is only known at the end, so
    each chunk keeps its ``_KEEP`` elements beyond the ulp tolerance with the largest ``|out-ref|``:
    whether any element fails is then exact, and the one reported is the worst kept.
    """

    def __init__(self, code: str) -> None:
        self.tol = _tolerance(code)
        self.ref_max = 0.0
        self.small = 0  #: worst ulp among elements within the ulp tolerance
        self.cand: list[tuple[float, int, int, float, float]] = []  # (diff, ulp, row, out, ref)

    def add(self, out: torch.Tensor, ref64: torch.Tensor, rows: Sequence[int]) -> None:
        if out.numel() == 0:
            return
        ref = ref64.to(out.dtype)
        finite = _finite(out)
        ulp = ulp_distance(out, ref)
        rf = ref.to(torch.float64)
        fin = rf[torch.isfinite(rf)]
        if fin.numel():
            self.ref_max = max(self.ref_max, float(fin.abs().max()))
        ok = (ulp <= self.tol) & finite
        if bool(ok.any()):
            self.small = max(self.small, int(ulp[ok].max()))
        bad = (~ok) & finite  # non-finite outputs are reported by the finite pass
        if not bool(bad.any()):
            return
        diff = (out.to(torch.float64) - rf).abs()
        diff = torch.where(bad & torch.isfinite(rf), diff, torch.where(bad, math.inf, -1.0))
        k = min(_KEEP, int(bad.sum()))
        top = torch.topk(diff.reshape(-1), k)
        per = out.shape[1]
        for d, flat in zip(top.values.tolist(), top.indices.tolist()):
            r, col = divmod(flat, per)
            self.cand.append((d, int(ulp[r, col]), rows[r], float(out[r, col]), float(rf[r, col])))
        if len(self.cand) > 4 * _KEEP:
            self.cand = sorted(self.cand, reverse=True)[:_KEEP]

    def result(self) -> tuple[int, tuple[int, int, float, float] | None]:
        """(worst ulp, the worst failing element (ulp, row, out, ref) or None). Elements that pass
        only by the near-cancellation allowance do not count toward the worst ulp."""
        thr = _NEAR * self.ref_max
        failing = [c for c in self.cand if c[0] > thr]
        if not failing:
            return self.small, None
        d, u, r, o, e = max(failing, key=lambda c: (c[1], c[0]))
        return max(self.small, u), (u, r, o, e)


def _check_merged(c: TensorCheck, g: CheckGroup, fds: dict[str, int],
                  reader: LoraReader) -> tuple[list[tuple[int, int, str]], int, int]:
    """Finite check over all values, then sampled rows against the float64 reference.
    Returns (failures, worst effective ulp, rows compared)."""
    b, o = c.base, c.out
    n, per = _geometry(b.shape)
    if n * per == 0:
        return [], 0, 0
    name = os.path.basename(o.path)
    out_fd, base_fd = _fd(fds, o.path), _fd(fds, b.path)
    sample = _sample(c.key, n, g.rows, g.seed, g.full)
    terms = load_terms(c.deltas, reader.read)
    full_ref = None
    if not all(d.row_local for d in c.deltas):  # DoRA, LoHa, LoKr, …: whole tensor in float64
        w = _read_rows(base_fd, b, per, range(n)).reshape(b.shape)
        full_ref = merge_tensor(w.to(torch.float64), terms, out_dtype=torch.float64).reshape(n, per)
    cmp = _Compare(o.dtype)
    failures: list[tuple[int, int, str]] = []
    step = max(1, _CHUNK // max(1, per * 8))
    s = 0
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        out = _read_rows(out_fd, o, per, range(r0, r1))
        if not failures:
            bad = ~_finite(out)
            if bool(bad.any()):
                flat = int(bad.reshape(-1).nonzero()[0])
                r = r0 + flat // per
                failures.append((_NONFINITE, 0, f"{c.key} {_where(b.shape, r)}: "
                                                f"{float(out.reshape(-1)[flat])} is not finite ({name})"))
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
            ref = _reference_rows(_read_rows(base_fd, b, per, rows), terms, n, per, rows)
        cmp.add(out_rows, ref, rows)
    worst, bad_elem = cmp.result()
    if bad_elem is not None:
        u, r, ov, ev = bad_elem
        failures.append((_VALUE, u, f"{c.key} {_where(b.shape, r)}: {ov:.6g} vs expected {ev:.6g} "
                                    f"({u} ulp) ({name})"))
    return failures, worst, len(sample)


def _read_scalar(fds: dict[str, int], info: TensorInfo) -> torch.Tensor:
    """A one-element tensor as a float32 0-d tensor."""
    raw = read_bytes(_fd(fds, info.path), info.offset, info.nbytes)
    return torch.frombuffer(raw, dtype=to_torch(info.dtype)).to(torch.float32).reshape(())


def _check_scaled(c: TensorCheck, g: CheckGroup, fds: dict[str, int],
                  reader: LoraReader) -> tuple[list[tuple[int, int, str]], int, int]:
    """A merged scaled-fp8 tensor: finite, a fresh scale (its largest code is ±fp8_max), and sampled
    rows of ``(W·s0 + Σ coef·ΔW) / s`` (float64) within 1 fp8 ulp of the output codes."""
    b, o = c.base, c.out
    assert c.scale is not None
    n, per = _geometry(b.shape)
    name = os.path.basename(o.path)
    fmax = FP8_MAX[o.dtype]
    s = _read_scalar(fds, c.scale)
    s0 = _read_scalar(fds, c.base_scale) if c.base_scale is not None else None
    q = _read_rows(_fd(fds, o.path), o, per, range(n))
    qf = q.to(torch.float32)
    if not bool(torch.isfinite(qf).all()) or not (math.isfinite(float(s)) and float(s) > 0):
        flat = int((~torch.isfinite(qf)).reshape(-1).nonzero()[0]) if not bool(torch.isfinite(qf).all()) else 0
        return [(_NONFINITE, 0, (f"{c.key} {_where(b.shape, flat // per)}: value {float(qf.reshape(-1)[flat])} "
                                 f"× scale {float(s)} is not finite ({name})"))], 0, 0
    top = float(qf.abs().max()) if qf.numel() else 0.0
    if top != fmax and not (top == 0.0 and float(s) == 1.0):
        return [(_VALUE, 0, (f"{c.key}: largest |code| is {top:g}, expected {fmax:g} (a fresh scale "
                             f"amax/{fmax:g}; the scale is {float(s):.6g}) ({name})"))], 0, 0
    sample = _sample(c.key, n, g.rows, g.seed, g.full)
    if not sample:
        return [], 0, 0
    terms = load_terms(c.deltas, reader.read)
    w = _read_rows(_fd(fds, b.path), b, per, range(n) if not all(d.row_local for d in c.deltas) else sample)
    w = w.to(torch.float32) * s0 if s0 is not None else w.to(torch.float32)  # ComfyUI's dequantization
    if all(d.row_local for d in c.deltas):
        ref = _reference_rows(w, terms, n, per, sample)
    else:
        full = merge_tensor(w.reshape(b.shape).to(torch.float64), terms, out_dtype=torch.float64)
        ref = full.reshape(n, per).index_select(0, torch.tensor(sample, dtype=torch.long))
    ref = (ref / float(s)).clamp(-fmax, fmax)
    cmp = _Compare(o.dtype)
    cmp.add(q.index_select(0, torch.tensor(sample, dtype=torch.long)), ref, sample)
    worst, bad = cmp.result()
    if bad is None:
        return [], worst, len(sample)
    u, r, ov, ev = bad
    return [(_VALUE, u, (f"{c.key} {_where(b.shape, r)}: {ov * float(s):.6g} vs expected {ev * float(s):.6g} "
                         f"({u} fp8 ulp at scale {float(s):.6g}) ({name})"))], worst, len(sample)


def _check_quantized(c: TensorCheck, fds: dict[str, int]) -> list[tuple[int, int, str]]:
    """A tensor ``--dtype fp8_*`` quantized without deltas: weight and scale bytes equal the base
    quantized (deterministic round-to-nearest, fresh scale)."""
    b, o = c.base, c.out
    assert c.scale is not None
    n, per = _geometry(b.shape)
    w = _read_rows(_fd(fds, b.path), b, per, range(n)).to(torch.float32)
    want_q, want_s = quantize(w, o.dtype, scale_dtype=to_torch(c.scale.dtype))
    got = read_bytes(_fd(fds, o.path), o.offset, o.nbytes)
    got_s = read_bytes(_fd(fds, c.scale.path), c.scale.offset, c.scale.nbytes)
    if bytes(got_s) != want_s.reshape(-1).view(torch.uint8).numpy().tobytes():
        got_v = torch.frombuffer(got_s, dtype=to_torch(c.scale.dtype))[0].item()
        return [(_UNTOUCHED, 0, (f"{c.scale.key}: scale {got_v:.6g} vs expected {float(want_s):.6g} (amax/"
                                 f"{FP8_MAX[o.dtype]:g} of the base '{c.key}') ({os.path.basename(c.scale.path)})"))]
    want = want_q.reshape(-1).view(torch.uint8)
    diff = torch.frombuffer(got, dtype=torch.uint8) != want
    if not bool(diff.any()):
        return []
    elem = int(diff.nonzero()[0])
    ov = torch.frombuffer(got, dtype=to_torch(o.dtype))[elem].to(torch.float32).item()
    ev = want_q.reshape(-1)[elem].to(torch.float32).item()
    return [(_UNTOUCHED, 0, (f"{c.key} {_where(b.shape, elem // max(1, per))}: code {ov:.6g} vs expected "
                             f"{ev:.6g}: differs from the base quantized to {o.dtype} ({os.path.basename(o.path)})"))]


def _check_untouched(c: TensorCheck, fds: dict[str, int]) -> list[tuple[int, int, str]]:
    """Byte compare with the base (converted to the output dtype when it differs)."""
    b, o = c.base, c.out
    if o.nbytes == 0:
        return []
    out_fd, base_fd = _fd(fds, o.path), _fd(fds, b.path)
    n, per = _geometry(b.shape)
    src_size, out_size = itemsize(b.dtype), itemsize(o.dtype)
    step = max(1, _CHUNK // max(src_size, out_size, 1))  # elements per chunk
    total = b.numel if b.shape else 1
    for e0 in range(0, total, step):
        cnt = min(step, total - e0)
        got = read_bytes(out_fd, o.offset + e0 * out_size, cnt * out_size)
        raw = read_bytes(base_fd, b.offset + e0 * src_size, cnt * src_size)
        if b.dtype == o.dtype:
            want = raw
        else:
            want = bytearray(torch.frombuffer(raw, dtype=to_torch(b.dtype)).to(to_torch(o.dtype))
                             .contiguous().view(torch.uint8).numpy().tobytes())
        if got == want:
            continue
        diff = (torch.frombuffer(got, dtype=torch.uint8) != torch.frombuffer(want, dtype=torch.uint8))
        elem = int(diff.nonzero()[0]) // out_size
        out_dt = to_torch(o.dtype)
        ov = torch.frombuffer(got, dtype=out_dt)[elem].item()
        ev = torch.frombuffer(want, dtype=out_dt)[elem].item()
        r = (e0 + elem) // max(1, per)
        what = "the base" if b.dtype == o.dtype else f"the base converted to {o.dtype}"
        return [(_UNTOUCHED, 0, f"{c.key} {_where(b.shape, r)}: {ov:.6g} vs expected {ev:.6g}: untouched "
                                f"tensor differs from {what} ({os.path.basename(o.path)})")]
    return []
