"""``distmerge verify``: check a merged checkpoint against its base and LoRA(s), as Ray tasks.

What is checked:

* structure (headers only, on the driver): the same key set, shapes and dtypes as the base (float
  tensors in the expected output ``dtype`` when one is given);
* untouched tensors: byte-identical to the base (or to the base converted to ``dtype``);
* merged tensors: every value finite, and a seeded random sample of rows (all rows with
  ``full=True``) recomputed in float64 from the base and the LoRA factors, rounded once to the output
  dtype, and compared in ulps. An element passes if it is within 1 ulp (bf16/fp16/fp8) or 16 ulp
  (fp32/fp64) of that reference, or within ``1e-6 · max|ref|`` of it (where W and ΔW cancel; such
  elements do not count toward the reported worst ulp);
* checksums: when the index records ``metadata.distmerge.sha256`` (a single-file output: a
  ``<file>.sha256`` sidecar in ``sha256sum`` format), every shard's sha256 must match, which catches
  a changed byte outside the sampled rows too. Missing checksums are noted, not a failure.

The work runs as Ray tasks through ``cluster.run_calls``: one task per shard to hash, and
byte-balanced groups of tensors to compare; each task returns small metadata only.

Example:
    >>> # import distmerge.verify as v
    >>> # rep = v.verify("Wan2.2/low_noise_model", ["diffusion_module.pth"], "merged/low_noise_model",
    >>> #                dtype="bf16")
    >>> # print(rep.verdict)   # verify: OK — 1095 tensors, 400 merged (sampled 32 rows each), …
    >>> import torch
    >>> ulp_distance(torch.tensor([1.0]), torch.nextafter(torch.tensor([1.0]), torch.tensor([2.0]))).tolist()
    [1]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .checkpoint import INDEX_SUFFIX, BaseCheckpoint, open_base
from .dtypes import itemsize, to_torch
from .errors import DistmergeError, FormatError, PlanError
from .header import TensorInfo
from .lora import Delta
from .lorafile import LoraReader
from .mergemath import Term, merge_tensor
from .unit import load_terms, read_bytes

__all__ = ["VerifyReport", "verify", "ulp_distance", "check_group", "CheckGroup", "GroupResult",
           "add_verify_parser", "cmd_verify"]

logger = logging.getLogger(__name__)

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


# ----------------------------------------------------------------------------------------------
# Task side


@dataclass(frozen=True)
class TensorCheck:
    """One tensor to check: where it is in the base and in the merged output, and its deltas."""

    key: str
    base: TensorInfo
    out: TensorInfo
    deltas: tuple[Delta, ...] = ()


@dataclass(frozen=True)
class CheckGroup:
    """The work of one task: hash ``hash_path`` (if set) and check ``checks``."""

    index: int
    checks: tuple[TensorCheck, ...] = ()
    hash_path: str = ""
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
    sha256: str = ""
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
                digest = _sha256_file(group.hash_path)
            except OSError as e:
                n_failures += 1
                failures.append((_CHECKSUM, 0, f"{group.hash_path}: cannot read to checksum "
                                               f"({e.strerror or e})"))
        for c in group.checks:
            try:
                if c.deltas:
                    merged += 1
                    found, ulp, nrows = _check_merged(c, group, fds, reader)
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


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(16 << 20)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


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


def _row_sliceable(t: Term) -> bool:
    if t.kind in ("diff", "set"):
        return True
    return t.kind == "lora" and not t.transpose and not t.dora and t.get("mid") is None


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
        finite = torch.isfinite(out)
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
    if not all(_row_sliceable(t) for t in terms):  # DoRA, LoHa, LoKr, …: whole tensor in float64
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
            bad = ~torch.isfinite(out)
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


# ----------------------------------------------------------------------------------------------
# Driver side


@dataclass
class VerifyReport:
    """The outcome of ``verify``: ``ok`` and the one-line ``verdict`` (what the CLI prints)."""

    ok: bool
    verdict: str
    worst_ulp: int = 0
    worst_key: str = ""
    tensors: int = 0  #: tensors of the base
    merged: int = 0  #: tensors with deltas (recomputed)
    failures: list[str] = field(default_factory=list)  #: most serious first
    checksums: str = "missing"  #: ``match``, ``missing`` or ``mismatch``
    shards: int = 0  #: files of the merged checkpoint
    rows_compared: int = 0


def _lora_specs(loras: Sequence[object]) -> list[tuple[str, float]]:
    out = []
    for item in loras:
        if isinstance(item, (tuple, list)):
            path, weight = item
            out.append((os.fspath(path), float(weight)))
        else:
            out.append((os.fspath(item), 1.0))  # type: ignore[arg-type]
    if not out:
        raise PlanError("no LoRA given; pass at least one --lora")
    return out


def _expected_dtype(src: str, out_code: str | None) -> str:
    from .dtypes import is_float

    return out_code if (out_code and is_float(src)) else src


def _structure(base: BaseCheckpoint, out: BaseCheckpoint, out_code: str | None) -> list[tuple[int, int, str]]:
    fails = []
    for k, b in base.tensors.items():
        o = out.tensors.get(k)
        if o is None:
            fails.append((_STRUCTURE, 0, f"{out.path}: key '{k}' of the base is missing"))
            continue
        if o.shape != b.shape:
            fails.append((_STRUCTURE, 0, f"{o.path}: '{k}' has shape {list(o.shape)}, expected "
                                         f"{list(b.shape)} as in the base"))
        want = _expected_dtype(b.dtype, out_code)
        if o.dtype != want:
            fails.append((_STRUCTURE, 0, f"{o.path}: '{k}' has dtype {o.dtype}, expected {want}"))
    for k, o in out.tensors.items():
        if k not in base.tensors:
            fails.append((_STRUCTURE, 0, f"{o.path}: extra key '{k}' is not in the base"))
    return fails


_SIDECAR_RE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")


def _recorded_checksums(out: BaseCheckpoint) -> tuple[dict[str, str] | None, list[tuple[int, int, str]]]:
    """shard name -> hex recorded with the merged checkpoint, or None when nothing is recorded."""
    names = [os.path.basename(f) for f in out.files]
    folder = out.path if os.path.isdir(out.path) else os.path.dirname(out.path)
    index = [n for n in sorted(os.listdir(folder)) if n.endswith(INDEX_SUFFIX)] if os.path.isdir(out.path) else []
    if index:
        path = os.path.join(folder, index[0])
        try:
            with open(path, "rb") as f:
                meta = json.loads(f.read().decode("utf-8")).get("metadata") or {}
        except (OSError, ValueError, AttributeError) as e:
            return None, [(_CHECKSUM, 0, f"{path}: cannot read the index ({type(e).__name__})")]
        sums = (meta.get("distmerge") or {}).get("sha256") if isinstance(meta, dict) and isinstance(
            meta.get("distmerge") or {}, dict) else None
        if sums is None:
            return None, []
        if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
            return {}, [(_CHECKSUM, 0, f"{path}: metadata.distmerge.sha256 must map shard names to hex "
                                       "digests")]
        return {k: v.lower() for k, v in sums.items()}, []
    side = out.files[0] + ".sha256"
    if len(names) != 1 or not os.path.isfile(side):
        return None, []
    try:
        with open(side, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        return {}, [(_CHECKSUM, 0, f"{side}: cannot read ({type(e).__name__})")]
    sums = {}
    for ln in lines:
        m = _SIDECAR_RE.match(ln)
        if not m:
            return {}, [(_CHECKSUM, 0, f"{side}: expected 'HEX  NAME' (sha256sum format), found {ln[:80]!r}")]
        sums[os.path.basename(m.group(2))] = m.group(1).lower()
    return sums, []


def _groups(checks: list[TensorCheck], target: int) -> list[list[TensorCheck]]:
    """Consecutive tensors in groups of about ``target`` bytes read."""
    groups: list[list[TensorCheck]] = []
    cur: list[TensorCheck] = []
    used = 0
    for c in checks:
        n = c.out.nbytes + c.base.nbytes
        if cur and used + n > target:
            groups.append(cur)
            cur, used = [], 0
        cur.append(c)
        used += n
    if cur:
        groups.append(cur)
    return groups


def _memory(checks: Sequence[TensorCheck]) -> int:
    """Ray memory to ask for: a few chunks, or a whole float64 tensor for non-row-local deltas."""
    peak = 4 * _CHUNK
    for c in checks:
        if c.deltas and not all(d.kind in ("diff", "set") or (d.kind == "lora" and not d.transpose
                                                                and not d.dora and len(d.factors) == 2)
                                for d in c.deltas):
            peak = max(peak, 4 * _CHUNK + 3 * 8 * c.base.numel)
    return (64 << 20) + peak


def verify(base: str | os.PathLike[str], loras: Sequence[object], merged: str | os.PathLike[str], *,
           alpha: float = 1.0, dtype: str | torch.dtype | None = None, full: bool = False, rows: int = 32,
           seed: int = 0, address: str | None = None, num_workers: int | None = None,
           num_cpus: int | None = None, skip_unmatched: bool = False,
           group_size: int | str | None = None) -> VerifyReport:
    """Check that ``merged`` is ``base`` with ``loras`` merged in (see the module docstring).

    Args:
        base, loras, alpha, dtype, skip_unmatched: as given to ``distmerge.merge``.
        merged: the merge output (folder with an index, or a ``.safetensors`` file).
        full: recompute every row of every merged tensor, not a sample.
        rows: rows sampled per merged tensor (seeded by ``seed`` and the key).
        address, num_workers, num_cpus: Ray session and concurrency, as for ``merge``; an
            initialized Ray session is reused and left running.
        group_size: target bytes read per check task (default: total / (4 · workers)).

    Returns:
        A ``VerifyReport``; findings about ``merged`` (including a merged checkpoint that cannot be
        opened) make ``ok`` False, they are not raised.

    Raises:
        DistmergeError: the base or a LoRA cannot be read or matched, bad options, Ray problems.

    Example:
        >>> # rep = verify("base_dir", [("a.pth", 0.7)], "merged_dir", dtype="bf16")
        >>> # rep.ok, rep.verdict
    """
    from .api import collect_deltas, resolve_dtype

    if rows < 0:
        raise PlanError(f"--rows must be >= 0, got {rows}")
    base_ck = open_base(base)
    specs = _lora_specs(loras)
    gathered = collect_deltas(base_ck, specs, alpha=alpha, skip_unmatched=skip_unmatched)
    out_code = resolve_dtype(dtype)
    report = VerifyReport(ok=False, verdict="", tensors=len(base_ck.tensors))
    try:
        out_ck = open_base(merged)
    except FormatError as e:
        return _finish(report, [(_STRUCTURE, 0, str(e))], full=full, rows=rows)
    report.shards = len(out_ck.files)
    found = _structure(base_ck, out_ck, out_code)
    recorded, csum_fails = _recorded_checksums(out_ck)
    found += csum_fails
    by_target: dict[str, list[Delta]] = {}
    for d in gathered.deltas:
        by_target.setdefault(d.target, []).append(d)
    checks = []
    for k, o in out_ck.tensors.items():  # merged-file order: each task reads forward
        b = base_ck.tensors.get(k)
        if b is None or o.shape != b.shape or o.dtype != _expected_dtype(b.dtype, out_code):
            continue
        checks.append(TensorCheck(k, b, o, tuple(by_target.get(k, ()))))
    report.merged = sum(1 for c in checks if c.deltas)

    from .cluster import Call, RaySession, run_calls  # Ray is imported only when there is work

    with RaySession(address, num_cpus=num_cpus) as session:
        settings = session.settings(device="cpu", num_workers=num_workers)
        total = sum(c.out.nbytes + c.base.nbytes for c in checks)
        target = (parse_group_size(group_size) if group_size else
                  max(1, math.ceil(total / max(1, 4 * settings.workers))))
        groups: list[CheckGroup] = []
        if recorded is not None:
            for f in out_ck.files:
                groups.append(CheckGroup(len(groups), hash_path=f))
        for part in _groups(checks, target):
            groups.append(CheckGroup(len(groups), tuple(part), rows=rows, full=full, seed=seed))
        calls = [Call((g,), f"verify group {g.index}" if not g.hash_path else
                      f"checksum of {os.path.basename(g.hash_path)}",
                      memory=(64 << 20) if g.hash_path else _memory(g.checks),
                      size=(os.path.getsize(g.hash_path) if g.hash_path else
                            sum(c.out.nbytes + c.base.nbytes for c in g.checks)))
                 for g in groups]
        logger.info("verify: %d tensors in %d check task(s), %d shard(s) to hash on %s",
                    len(checks), sum(1 for g in groups if not g.hash_path),
                    sum(1 for g in groups if g.hash_path), session.mode)
        results = [res for _, res in run_calls(check_group, calls, settings=settings)]

    extra = 0
    for r in results:
        found += list(r.failures)
        extra += max(0, r.n_failures - len(r.failures))
        report.rows_compared += r.rows_compared
        if r.worst_key and (r.worst_ulp > report.worst_ulp or not report.worst_key):
            report.worst_ulp, report.worst_key = r.worst_ulp, r.worst_key
    if recorded is None:
        report.checksums = "missing"
    else:
        digests = {os.path.basename(r.hashed): r.sha256 for r in results if r.hashed and r.sha256}
        bad = False
        for f in out_ck.files:
            name = os.path.basename(f)
            want = recorded.get(name)
            if want is None:
                bad = True
                found.append((_CHECKSUM, 0, f"{f}: no sha256 recorded for this shard"))
            elif name in digests and digests[name] != want:
                bad = True
                found.append((_CHECKSUM, 0, f"{f}: sha256 {digests[name][:12]}… does not match the "
                                            f"recorded {want[:12]}…"))
        for name in recorded:
            if name not in {os.path.basename(f) for f in out_ck.files}:
                bad = True
                found.append((_CHECKSUM, 0, f"{out_ck.path}: a sha256 is recorded for '{name}', which "
                                            "is not a shard of this checkpoint"))
        report.checksums = "mismatch" if (bad or csum_fails) else "match"
    return _finish(report, found, full=full, rows=rows, extra=extra)


def parse_group_size(size: int | str) -> int:
    """``64MB``, ``1GiB`` or a byte count, as ``--unit-size``."""
    from .plan import parse_size

    n = parse_size(size)
    if n <= 0:
        raise PlanError(f"group size must be positive, got {size!r}")
    return n


def _one_line(s: str) -> str:
    return " ".join(s.split())


def _finish(report: VerifyReport, found: list[tuple[int, int, str]], *, full: bool, rows: int,
            extra: int = 0) -> VerifyReport:
    found = sorted(found, key=lambda f: (f[0], -f[1]))
    report.failures = [_one_line(m) for _, _, m in found]
    report.ok = not found
    if report.ok:
        sample = "all rows" if full else f"sampled {rows} rows each"
        worst = (f", worst {report.worst_ulp} ulp ({report.worst_key})" if report.worst_key else "")
        if report.checksums == "match":
            n = report.shards
            csum = f"{n} shard checksum{'s match' if n != 1 else ' matches'}"
        else:
            csum = ("no shard checksums recorded (values outside the compared rows not checked)"
                    if not full else "no shard checksums recorded")
        report.verdict = (f"verify: OK — {report.tensors} tensors, {report.merged} merged ({sample})"
                          f"{worst}, {csum}")
    else:
        more = len(found) - 3 + extra
        shown = "; ".join(report.failures[:3])
        report.verdict = f"verify: FAILED — {shown}" + (f"; … {more} more" if more > 0 else "")
    return report


# ----------------------------------------------------------------------------------------------
# Command line


def add_verify_parser(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser
                      ) -> argparse.ArgumentParser:
    """Add ``distmerge verify`` to ``subparsers`` (with the ``common`` -q/-v options).

    >>> p = argparse.ArgumentParser(); sub = p.add_subparsers(dest="command")
    >>> _ = add_verify_parser(sub, argparse.ArgumentParser(add_help=False))
    >>> a = p.parse_args(["verify", "--base", "b", "--lora", "l.pth", "--merged", "m", "--full"])
    >>> a.command, a.lora, a.full, a.rows, a.dtype
    ('verify', ['l.pth'], True, 32, 'keep')
    """
    p = subparsers.add_parser(
        "verify", parents=[common],
        help="check a merged checkpoint against its base and LoRA(s): structure, untouched bytes, "
             "recomputed rows, finiteness, shard checksums")
    p.add_argument("--base", "--base_model_path", "--base-model-path", dest="base", required=True,
                   metavar="PATH", help="the base checkpoint the merge started from")
    p.add_argument("--lora", "--lora_path", "--lora-path", dest="lora", action="append", required=True,
                   metavar="PATH", help="LoRA file as given to merge; repeat for several LoRAs")
    p.add_argument("--weight", dest="weight", action="append", type=float, metavar="W",
                   help="weight of each --lora, in order, as given to merge (default 1.0 each)")
    p.add_argument("--merged", required=True, metavar="PATH",
                   help="the merge output: folder with an index, or a .safetensors file")
    p.add_argument("--alpha", type=float, default=1.0, help="global multiplier given to merge (default 1.0)")
    p.add_argument("--dtype", choices=["keep", "bf16", "fp16", "fp32"], default="keep",
                   help="output dtype given to merge (default: keep the base's)")
    p.add_argument("--full", action="store_true",
                   help="recompute every row of every merged tensor (default: a sample of rows)")
    p.add_argument("--rows", type=int, default=32, metavar="N",
                   help="rows sampled per merged tensor (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the row sample (default 0)")
    p.add_argument("--skip-unmatched", action="store_true",
                   help="as given to merge: ignore LoRA keys that have no target in the base")
    p.add_argument("--address", default=None, metavar="ADDR",
                   help="join a Ray cluster: 'auto' or HOST:PORT (default: embedded local Ray, "
                        "or RAY_ADDRESS if set)")
    p.add_argument("--num-workers", type=int, default=None, metavar="N",
                   help="Ray tasks in flight (default: all CPUs)")
    p.add_argument("--num-cpus", type=int, default=None, metavar="N",
                   help="CPUs for the embedded local Ray (default: all)")
    return p


def cmd_verify(args: argparse.Namespace) -> int:
    """Run ``verify`` for parsed ``distmerge verify`` arguments; print the verdict line; 0 if OK, 1 if not.

    Raises:
        DistmergeError: bad inputs or options (the CLI prints it as one line and exits 1).

    Example:
        >>> # code = cmd_verify(parser.parse_args(["verify", "--base", "b", "--lora", "l", "--merged", "m"]))
    """
    weights = args.weight or []
    if weights and len(weights) != len(args.lora):
        raise DistmergeError(f"got {len(args.lora)} --lora but {len(weights)} --weight; give one "
                             "--weight per --lora, in the same order, or none")
    loras = list(zip(args.lora, weights or [1.0] * len(args.lora)))
    rep = verify(args.base, loras, args.merged, alpha=args.alpha, dtype=args.dtype, full=args.full,
                 rows=args.rows, seed=args.seed, address=args.address, num_workers=args.num_workers,
                 num_cpus=args.num_cpus, skip_unmatched=getattr(args, "skip_unmatched", False))
    print(rep.verdict)
    return 0 if rep.ok else 1
