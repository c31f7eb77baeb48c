"""Job files: several merges described in one YAML file and run as one Ray job (``distmerge run``).

A Wan2.2 A14B checkpoint has two experts (``high_noise_model`` and ``low_noise_model``), each
trained with its own LoRA(s); one job file merges both, in order, inside a single Ray session
(started locally, joined with ``ray.address`` / ``--address``, or the one already running in this
process), so a cluster is started or joined once for all merges. Example::

    # wan22-experts.yaml -- relative paths are relative to this file's folder
    ray:                         # optional; every key may be omitted
      address: auto              # null/omitted: embedded local Ray (or RAY_ADDRESS if set)
      num_workers: 16            # tasks in flight (default: all CPUs, or all GPUs)
      device: auto               # auto | cpu | cuda
    defaults:                    # optional; any merge option, overridden per merge
      dtype: bf16                # keep | bf16 | fp16 | fp32 | fp8_e4m3fn | fp8_e5m2
      max_shard_size: 5GB
    merges:
      - name: high_noise_model
        base: Wan2.2-T2V-A14B/high_noise_model
        loras:
          - path: loras/high_noise_style.safetensors
            weight: 0.8
          - loras/high_noise_motion.pth          # a plain path: weight 1.0
        output: merged/high_noise_model
      - name: low_noise_model
        base: Wan2.2-T2V-A14B/low_noise_model
        loras: [loras/low_noise_style.safetensors]
        output: merged/low_noise_model
        alpha: 0.5                               # overrides the defaults for this merge only
        report: merged/low_noise_model.report.json

Merge options (in ``defaults:`` or in a merge): ``alpha``, ``dtype``, ``max_shard_size``,
``skip_unmatched``, ``overwrite``, ``unit_size``, ``max_retries``, ``resume``, ``checksum``; a merge may also
name a JSON ``report`` file. Unknown keys, wrong types, a missing field, duplicate merge names,
two merges writing the same output, or an output that is (or lies inside) a base or a LoRA of
any merge are refused before anything runs, with the file and line::

    jobs/wan22.yaml:14: merges[1].loras[0].weight: Input should be a valid number, … (got 'high')

Python API::

    job = load_job("wan22-experts.yaml")          # validated, paths absolute
    reports = run_job(job)                        # one MergeReport per merge, in order
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal, cast

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model

from distmerge.app.flags import add_run_parser
from distmerge.app.options import MergeOptions as Options
from distmerge.app.options import meta_of, option_fields
from distmerge.errors import DistmergeError, FormatError, PlanError
from distmerge.inputs.hub import local_path
from distmerge.inputs.paths import inside
from distmerge.plan.merge_plan import parse_size

__all__ = [
    "LoraSpec",
    "RayOptions",
    "MergeOptions",
    "MergeSpec",
    "JobFile",
    "Job",
    "parse_job",
    "load_job",
    "run_job",
    "add_run_parser",
    "cmd_run",
]

_CFG = ConfigDict(frozen=True, extra="forbid")

ProgressFn = Callable[[int, int, int, int], None]

if TYPE_CHECKING:
    from distmerge.cluster import RaySession


def _size(v: object) -> object:
    """``5GB``/``500MiB``/a byte count, checked with ``plan.parse_size``; kept as text."""
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise ValueError("expected a size such as 5GB, 500MB, 2GiB or a byte count")
    parse_size(v)  # PlanError is a ValueError -> a pydantic "Value error, …"
    return str(v)


def _lora_item(v: object) -> object:
    return {"path": v} if isinstance(v, str) else v


Size = Annotated[str, BeforeValidator(_size)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
NonEmpty = Annotated[str, Field(min_length=1)]


class LoraSpec(BaseModel):
    """One LoRA of a merge: ``{path: ..., weight: 0.8}`` or just ``"path"`` (weight 1.0)."""

    model_config = _CFG
    path: NonEmpty
    weight: Finite = 1.0


def _schema_type(f: dataclasses.Field) -> Any:
    """The pydantic type of one ``options.MergeOptions`` field, from its ``OptionMeta``."""
    m = meta_of(f)
    if m.choices:
        t: Any = Literal[m.choices]  # type: ignore[valid-type]
    else:
        t = {
            "float": Finite,
            "bool": bool,
            "size": Size,
            "int": Annotated[int, Field(ge=m.minimum)] if m.minimum is not None else int,
        }.get(m.kind, str)
    return t | None if f.default is None else t


def _schema(name: str, doc: str, group: str, **defaults: Any) -> type[BaseModel]:
    fields = {f.name: (_schema_type(f), defaults.get(f.name, f.default)) for f in option_fields(group)}  # type: ignore[arg-type]
    model = create_model(name, __config__=_CFG, __doc__=doc, **fields)  # type: ignore[call-overload]
    return cast("type[BaseModel]", model)


if TYPE_CHECKING:  # built at run time from ``options.MergeOptions``
    RayOptions = Any
    MergeOptions = Any
else:
    #: The ``ray:`` section: how the one Ray session of the job is started or joined.
    RayOptions = _schema(
        "RayOptions", "The ``ray:`` section: how the job's one Ray session is started or joined.", "ray"
    )
    #: Options of ``distmerge.merge`` that a job file may set in ``defaults:`` or per merge.
    MergeOptions = _schema(
        "MergeOptions", "Options of ``distmerge.merge`` that a job file may set in ``defaults:`` or per merge.", "merge"
    )

_OPTION_FIELDS = tuple(MergeOptions.model_fields)


class MergeSpec(MergeOptions):
    """One merge: a base, its LoRAs, an output, and merge options (defaults folded in)."""

    name: NonEmpty
    base: NonEmpty
    loras: Annotated[tuple[Annotated[LoraSpec, BeforeValidator(_lora_item)], ...], Field(min_length=1)]
    output: NonEmpty
    report: NonEmpty | None = None

    def merge_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``distmerge.api.merge`` (besides the Ray ones)."""
        return {k: getattr(self, k) for k in _OPTION_FIELDS} | {"report": self.report}

    def options(self, ray: BaseModel) -> Options:
        """This merge's ``options.MergeOptions``, with the job's ``ray:`` settings."""
        return Options(**self.merge_kwargs(), **ray.model_dump())


class JobFile(BaseModel):
    """The YAML document as written (before defaults are folded in and paths resolved)."""

    model_config = _CFG
    ray: RayOptions = RayOptions()
    defaults: MergeOptions = MergeOptions()
    merges: Annotated[tuple[MergeSpec, ...], Field(min_length=1)]


class Job(BaseModel):
    """A validated job: absolute paths, every merge with its effective options."""

    model_config = _CFG
    source: str  #: the job file (or ``<string>``)
    ray: RayOptions
    merges: tuple[MergeSpec, ...]

    def select(self, names: Sequence[str]) -> Job:
        """Only the merges named (in job order).

        Raises:
            PlanError: a name that is not in the job.
        """
        known = [m.name for m in self.merges]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise PlanError(
                f"{self.source}: no merge named {unknown[0]!r}; the job has {', '.join(repr(n) for n in known)}"
            )
        return self.model_copy(update={"merges": tuple(m for m in self.merges if m.name in names)})

    def with_ray(self, **overrides: Any) -> Job:
        """The same job with some ``ray:`` settings replaced (``None`` values are ignored)."""
        upd = {k: v for k, v in overrides.items() if v is not None}
        try:
            ray_opts = RayOptions.model_validate(self.ray.model_dump() | upd)
        except ValidationError as e:
            err = e.errors(include_url=False)[0]
            raise PlanError(f"ray.{_loc_str(err['loc'])}: {_one_line(err['msg'])} (got {err.get('input')!r})") from None
        return self.model_copy(update={"ray": ray_opts})


# --- locating errors in the YAML ------------------------------------------------------------------


def _loc_str(loc: Sequence[object]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _line_of(root: yaml.Node | None, loc: Sequence[object]) -> int:
    """1-based line of the deepest YAML node on ``loc`` (the key's line for a mapping entry)."""
    if root is None:
        return 1
    node, line = root, root.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            hit = next(((k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == str(part)), None)
            if hit is None:
                break
            line, node = hit[0].start_mark.line + 1, hit[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _check_duplicate_keys(node: yaml.Node, source: str, path: tuple = ()) -> None:
    """YAML loaders silently keep the last of two equal keys; refuse them instead."""
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for k, v in node.value:
            key = k.value if isinstance(k, yaml.ScalarNode) else None
            if key is not None and key in seen:
                raise PlanError(f"{source}:{k.start_mark.line + 1}: {_loc_str((*path, key))}: duplicate key")
            if key is not None:
                seen.add(key)
            _check_duplicate_keys(v, source, (*path, key))
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _check_duplicate_keys(v, source, (*path, i))


def _one_line(s: str) -> str:
    return " ".join(str(s).split())


def _pydantic_error(e: ValidationError, root: yaml.Node | None, source: str) -> PlanError:
    errs = e.errors(include_url=False)
    # a container whose item failed is also reported "too short": keep only the item's error
    errs = [
        x
        for x in errs
        if not (
            x["type"] == "too_short"
            and any(len(y["loc"]) > len(x["loc"]) and tuple(y["loc"][: len(x["loc"])]) == tuple(x["loc"]) for y in errs)
        )
    ]
    errs.sort(key=lambda x: _line_of(root, tuple(x["loc"])))  # report the topmost one
    first = errs[0]
    loc = tuple(first["loc"])
    msg = _one_line(first["msg"])
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if first["type"] == "too_short":
        ctx = first.get("ctx", {})
        msg = f"needs at least {ctx.get('min_length', 1)} item(s), got {ctx.get('actual_length', 0)}"
    if first["type"] not in ("missing", "extra_forbidden") and "input" in first:
        shown = repr(first["input"])
        msg += f" (got {shown if len(shown) <= 60 else shown[:57] + '...'})"
    if first["type"] == "missing":
        msg += " (this mapping lacks it)"
    more = f" (and {len(errs) - 1} more error{'s' if len(errs) > 2 else ''})" if len(errs) > 1 else ""
    return PlanError(f"{source}:{_line_of(root, loc)}: {_loc_str(loc)}: {msg}{more}")


# --- parsing and resolution -----------------------------------------------------------------------


def _resolve(path: str, folder: str) -> str:
    return os.path.normpath(os.path.join(folder, os.path.expanduser(path)))


def parse_job(text: str, *, source: str = "<string>", base_dir: str | os.PathLike[str] = ".") -> Job:
    """Validate a job file's text; relative paths resolve against ``base_dir``.

    >>> job = parse_job('''
    ... defaults: {dtype: bf16}
    ... merges:
    ...   - name: low_noise_model
    ...     base: base/low_noise_model
    ...     loras: [{path: a.safetensors, weight: 0.5}, b.pth]
    ...     output: out/low_noise_model
    ... ''', base_dir="/shared")
    >>> m = job.merges[0]
    >>> m.base, [(l.path, l.weight) for l in m.loras], m.dtype, m.alpha
    ('/shared/base/low_noise_model', [('/shared/a.safetensors', 0.5), ('/shared/b.pth', 1.0)], 'bf16', 1.0)
    >>> parse_job("merges:\\n  - name: x\\n    base: b\\n    loras: [l]\\n    output: o\\n    dtipe: bf16\\n")
    Traceback (most recent call last):
    distmerge.errors.PlanError: <string>:6: merges[0].dtipe: Extra inputs are not permitted

    Raises:
        FormatError: not YAML.
        PlanError: the schema or a cross-merge rule is violated (file, line and field named).
    """
    folder = os.path.abspath(os.fspath(base_dir))
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.load(text, Loader=yaml.SafeLoader)  # noqa: S506 (SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise FormatError(f"{source}{line}: not a valid YAML file: {_one_line(problem)}") from None
    if root is not None:
        _check_duplicate_keys(root, source)
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise PlanError(f"{source}:1: a job file must be a mapping with a 'merges:' list, got {kind}")
    try:
        raw = JobFile.model_validate(data)
    except ValidationError as e:
        raise _pydantic_error(e, root, source) from None

    defaults = raw.defaults.model_dump(exclude_unset=True)
    merges: list[MergeSpec] = []
    for m in raw.merges:
        values = m.model_dump()
        values.update({k: v for k, v in defaults.items() if k not in m.model_fields_set})
        values["base"] = _resolve(m.base, folder)
        values["output"] = _resolve(m.output, folder)
        values["report"] = _resolve(m.report, folder) if m.report else None
        values["loras"] = [{"path": _resolve(lo.path, folder), "weight": lo.weight} for lo in m.loras]
        merges.append(MergeSpec.model_validate(values))
    _check_cross(merges, root, source)
    return Job(source=source, ray=raw.ray, merges=tuple(merges))


def _check_cross(merges: list[MergeSpec], root: yaml.Node | None, source: str) -> None:
    """Names unique; outputs unique, not nested, not a base/LoRA (or inside one) of any merge."""

    def fail(i: int, field: str, msg: str) -> PlanError:
        loc = ("merges", i, field)
        return PlanError(f"{source}:{_line_of(root, loc)}: {_loc_str(loc)}: {msg}")

    names: dict[str, int] = {}
    for i, m in enumerate(merges):
        if m.name in names:
            raise fail(i, "name", f"duplicate merge name {m.name!r} (also merges[{names[m.name]}])")
        names[m.name] = i
    real_out = [os.path.realpath(m.output) for m in merges]
    for i, out in enumerate(real_out):
        for j in range(i):
            if inside(out, real_out[j]) or inside(real_out[j], out):
                same = "the same output as" if out == real_out[j] else "an output nested with that of"
                raise fail(
                    i,
                    "output",
                    f"{merges[i].output} is {same} merges[{j}] ({merges[j].name!r}); every merge needs its own output",
                )
        for j, other in enumerate(merges):
            b = os.path.realpath(other.base)  # a folder base holds its files: nothing may go inside
            if out == b or (not b.endswith(".safetensors") and inside(out, b)):
                raise fail(
                    i,
                    "output",
                    f"{merges[i].output} is the base of merges[{j}] "
                    f"({other.name!r}) or inside it; outputs must not touch any base",
                )
            for lo in other.loras:
                lr = os.path.realpath(lo.path)
                if out == lr or inside(out, lr) or inside(lr, out):
                    raise fail(
                        i, "output", f"{merges[i].output} overlaps the LoRA {lo.path} of merges[{j}] ({other.name!r})"
                    )


def load_job(path: str | os.PathLike[str]) -> Job:
    """Read and validate a job file; relative paths resolve against the file's folder.

    Raises:
        PlanError: unreadable file, or a schema/cross-merge error (``FILE:LINE: field: what``).
        FormatError: the file is not YAML.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise PlanError(f"{path}: cannot read the job file: {reason}") from None
    return parse_job(text, source=path, base_dir=os.path.dirname(os.path.abspath(path)))


# --- running ----------------------------------------------------------------------------------------


def check_job(job: Job) -> None:
    """Check every merge of ``job`` as ``merge`` does before Ray starts (paths, LoRA keys and
    shapes, numbers, output rules, free space), without Ray and without writing anything.

    Raises:
        DistmergeError: of the first failing merge's type, prefixed with ``merge 'NAME': ``.
    """
    from distmerge.app.api import check

    for m in job.merges:  # every missing file first: the cheapest mistake to report
        for what, p in [("base", m.base), *(("LoRA", lo.path) for lo in m.loras)]:
            if not os.path.exists(local_path(p)):  # a Hugging Face cache reference: its snapshot
                raise PlanError(f"merge {m.name!r}: {what} {p} not found (checked before running any merge)")
    for m in job.merges:
        try:
            check(m.base, [(lo.path, lo.weight) for lo in m.loras], m.output, options=m.options(job.ray))
        except DistmergeError as e:
            raise type(e)(f"merge {m.name!r}: {_in_job_words(str(e))}") from e


def _in_job_words(message: str) -> str:
    """A merge's error as a job file's user fixes it: flags become the job file's keys.

    >>> _in_job_words("out: folder is not empty; pass --overwrite to write into it")
    "out: folder is not empty; set 'overwrite: true' (for this merge, or under defaults:) to write into it"
    """
    for flag, key in (
        ("--overwrite", "overwrite: true"),
        ("--resume", "resume: true"),
        ("--skip-unmatched", "skip_unmatched: true"),
    ):
        message = message.replace(f"pass {flag}", f"set '{key}' (for this merge, or under defaults:)")
    return message


def run_job(
    job: Job,
    *,
    progress: ProgressFn | None = None,
    on_start: Callable[[int, MergeSpec], None] | None = None,
    on_done: Callable[[int, MergeSpec, Any], None] | None = None,
    session: RaySession | None = None,
) -> list:
    """Run every merge of ``job`` in order inside one Ray session; stop at the first failure.

    The session is ``session`` (the caller's), else one this runner starts for the job: the one
    already initialized in this process (kept running), the cluster at ``job.ray.address`` (or
    ``RAY_ADDRESS``), or an embedded local Ray shut down at the end. Either way each merge is
    handed that session, so a failing merge ends the job at once and its session with it.
    Every base and LoRA path is checked to exist before the first merge starts. Merges finished
    before a failure stay published. ``progress`` gets each merge's
    ``(units_done, units_total, bytes_done, bytes_total)``; its ``close()`` (if any) is called
    after each merge. ``on_start(i, merge)`` / ``on_done(i, merge, report)`` run around each merge.

    Returns:
        One ``MergeReport`` per merge, in job order.

    Raises:
        DistmergeError: of the failing merge's type, its message prefixed with ``merge 'NAME': ``.
    """
    from distmerge.app.api import merge
    from distmerge.cluster import RaySession

    check_job(job)  # fail before the first merge, not after hours of merging
    own = session is None
    ses = session or RaySession(job.ray.address, num_cpus=job.ray.num_cpus)
    reports = []
    try:
        ses.start()
        for i, m in enumerate(job.merges):
            if on_start:
                on_start(i, m)
            try:
                rep = merge(
                    m.base,
                    [(lo.path, lo.weight) for lo in m.loras],
                    m.output,
                    options=m.options(job.ray),
                    session=ses,
                    progress=progress,
                )
            except DistmergeError as e:
                raise type(e)(f"merge {m.name!r}: {_in_job_words(str(e))}") from e
            finally:
                close = getattr(progress, "close", None)
                if callable(close):
                    close()
            reports.append(rep)
            if on_done:
                on_done(i, m, rep)
    finally:
        if own:
            ses.close()
    return reports


# --- command line -----------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace, progress: ProgressFn | None) -> int:
    """Run ``distmerge run`` for parsed arguments; one summary line per merge on stdout; 0 if all ran.

    Raises:
        DistmergeError: a bad job file, or the first failing merge (``merge 'NAME': …``).
    """
    job = load_job(args.job)
    if args.only:
        job = job.select(args.only)
    job = job.with_ray(address=args.address, num_cpus=args.num_cpus, num_workers=args.num_workers, device=args.device)
    quiet = getattr(args, "quiet", False)
    n = len(job.merges)
    if args.check:
        check_job(job)
        for m in job.merges:
            loras = ", ".join(f"{lo.path}×{lo.weight:g}" for lo in m.loras)
            print(f"{m.name}: {m.base} + [{loras}] -> {m.output} (dtype {m.dtype}, alpha {m.alpha:g})")
        print(
            f"distmerge: {job.source}: {n} merge{'s' if n != 1 else ''} OK (inputs, LoRA keys and outputs "
            "checked; nothing run)"
        )
        return 0

    def on_start(i: int, m: MergeSpec) -> None:
        if not quiet:
            print(f"distmerge: merge {i + 1}/{n} {m.name!r}: {m.base} -> {m.output}", file=sys.stderr, flush=True)

    def on_done(i: int, m: MergeSpec, rep: Any) -> None:
        if rep.unmatched:
            print(
                f"distmerge: merge {m.name!r}: skipped {len(rep.unmatched)} unmatched LoRA key(s)"
                f"{' (see ' + m.report + ')' if m.report else ''}",
                file=sys.stderr,
            )
        print(f"{m.name}: {rep.summary_line()}", flush=True)

    from distmerge.cluster import RaySession

    session = RaySession(job.ray.address, num_cpus=job.ray.num_cpus, fast_exit=getattr(args, "fast_exit", False))
    try:
        run_job(job, progress=progress, on_start=on_start, on_done=on_done, session=session)
    finally:
        session.close()
    return 0
