"""Job files' schema and parsing: the YAML a ``distmerge run`` job file holds, validated (types,
cross-merge rules) and with relative paths resolved; every error names the file, line and field.

The merge options of the schema come from ``options.MergeOptions`` (``defaults:`` and each merge take
the ``merge`` group, ``ray:`` the ``ray`` group). ``jobfile`` runs what ``load_job`` returns.

Example:
    >>> job = parse_job("merges: [{name: a, base: b, loras: [l.pth], output: o}]", base_dir="/jobs")
    >>> job.merges[0].output, job.merges[0].dtype, job.ray.device
    ('/jobs/o', 'keep', 'auto')
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal, cast

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model

from distmerge.app.options import MergeOptions as Options
from distmerge.app.options import meta_of, option_fields
from distmerge.errors import FormatError, PlanError
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
]

_CFG = ConfigDict(frozen=True, extra="forbid")


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
    if "://" in path:  # a URL (s3:// inputs; any other is refused by the merge's checks, in one line)
        return path
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
