"""What a LoRA becomes, whatever its layout: ``Delta`` values (add ``coef·ΔW`` to one base tensor)
whose factors are ``FactorRef``s (a stored tensor, or ``Piece`` blocks of several), and the rule
that a delta fits its base tensor (``check_delta``). Plain data, no torch: the plan carries it to
the tasks, which read the factors.

Example:
    >>> a = FactorRef("l.safetensors", "x.lora_A.weight", "BF16", (4, 16), "down")
    >>> b = FactorRef("l.safetensors", "x.lora_B.weight", "BF16", (8, 4), "up")
    >>> d = Delta("x.weight", DeltaKind.LORA, (a, b), 0.5, 2.0, "l.safetensors")
    >>> d.coef, d.rank, d.row_local, a.nbytes
    (1.0, 4, True, 128)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from distmerge.errors import MatchError
from distmerge.formats.kinds import FULL_KINDS, DeltaKind, Role
from distmerge.formats.shapes import TensorLike, delta_shape_error
from distmerge.inputs.dtypes import is_float, itemsize

__all__ = ["Piece", "FactorRef", "Delta", "Unmatched", "NormalizedLora", "check_delta", "moved"]


@dataclass(frozen=True)
class Piece:
    """A block of a factor assembled from several stored tensors: ``key`` in ``path`` sliced to
    ``rows`` and ``cols`` (``(start, stop, step)``, None: all), placed at ``at`` (row, column) of
    the factor. Megatron's tensor-parallel shards and PEFT's fused expert factors are read this way.
    """

    path: str
    key: str
    rows: tuple[int, int, int] | None = None
    cols: tuple[int, int, int] | None = None
    at: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class FactorRef:
    """One LoRA tensor a task must read: ``key`` in ``path``, playing ``role``; or, with
    ``pieces``, a 2-D factor of ``shape`` assembled from those blocks (``path``/``key`` then name
    the first piece, for messages)."""

    path: str
    key: str
    dtype: str
    shape: tuple[int, ...]
    role: str = ""  #: a ``Role`` (normalize always sets one)
    pieces: tuple[Piece, ...] = ()

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


@dataclass(frozen=True)
class Delta:
    """``W[target] += coef · ΔW`` where ΔW comes from ``factors`` according to ``kind``.

    ``kind``: ``lora`` (roles down, up, optional mid), ``loha``, ``lokr``, ``diff`` (a full ΔW) or
    ``set`` (a replacement; strength ignored). ``transpose`` applies ΔWᵀ (PEFT embeddings,
    ``fan_in_fan_out``). ``dora`` is ``peft`` (``lora_magnitude_vector``) or ``lycoris``
    (``dora_scale``) when the factors include a magnitude. ``coef = scale · strength``: ``scale`` is the
    format's ``c`` (α/r, or 1), ``strength`` the user's per-LoRA weight times the global ``--alpha``.
    """

    target: str
    kind: DeltaKind
    factors: tuple[FactorRef, ...]
    scale: float
    strength: float
    source: str
    module: str = ""
    transpose: bool = False
    dora: str = ""
    experts: int = 0  #: ``experts`` kind: the number of experts E (the target is ``(E, out, in)``)

    @property
    def coef(self) -> float:
        return self.scale * self.strength

    @property
    def row_local(self) -> bool:
        """True when row i of ΔW depends only on row i of one factor (plain LoRA pairs, full diffs,
        replacements), so a tensor can be merged in row chunks with exactly the same result."""
        return self.kind in FULL_KINDS or (
            self.kind == DeltaKind.LORA
            and not self.transpose
            and not self.dora
            and all(f.role in (Role.DOWN, Role.UP) for f in self.factors)
        )

    @property
    def rank(self) -> int | None:
        roles = {f.role: f for f in self.factors}
        if self.kind == DeltaKind.LORA:
            return roles[Role.DOWN].shape[0]
        if self.kind == DeltaKind.EXPERTS:
            return roles[Role.DOWN].shape[0] // max(1, self.experts)
        if self.kind == DeltaKind.LOHA:
            return roles[Role.HADA_W1_B].shape[0]
        return None


@dataclass(frozen=True)
class Unmatched:
    key: str
    reason: str


@dataclass
class NormalizedLora:
    path: str
    layout: str
    deltas: list[Delta] = field(default_factory=list)
    unmatched: list[Unmatched] = field(default_factory=list)

    def place(self, d: Delta, base: Mapping[str, TensorLike] | None, missing: Callable[[str], str]) -> None:
        """Keep ``d`` once it fits its base tensor (``check_delta``); a target the base lacks makes
        each of its factors ``Unmatched`` with ``missing(target)`` as the reason."""
        if base is not None and d.target not in base:
            self.unmatched += [Unmatched(f.key, missing(d.target)) for f in d.factors]
            return
        check_delta(self.path, base, d)
        self.deltas.append(d)


def check_delta(path: str, base: Mapping[str, TensorLike] | None, d: Delta) -> None:
    """Refuse a delta that cannot merge into its base tensor (dtypes, shapes, DoRA magnitudes).

    Raises:
        MatchError: naming the LoRA file, the factors and the base tensor.
    """
    if base is None:
        return
    w = base[d.target]
    if not is_float(w.dtype):
        raise MatchError(
            f"{path}: '{d.factors[0].key}' targets '{d.target}', which is {w.dtype}: "
            "quantized or integer base tensors are not supported (merge into a float base)"
        )
    for f in d.factors:
        if not is_float(f.dtype):
            raise MatchError(f"{path}: '{f.key}' has dtype {f.dtype}, expected a float type")
    shapes = {f.role: f.shape for f in d.factors if f.role not in (Role.MAGNITUDE, Role.DORA_SCALE)}
    why = delta_shape_error(d.kind, shapes, tuple(w.shape), transpose=d.transpose)
    if why is None and d.dora:
        mag = next(f for f in d.factors if f.role in (Role.MAGNITUDE, Role.DORA_SCALE))
        if d.dora == "peft":  # one magnitude per output feature
            need: tuple[int, ...] = (w.shape[1] if d.transpose else w.shape[0],)
        else:  # LyCORIS dora_scale: per output row ([out, 1, …]) or per input column ([1, in, …])
            need = (w.shape[0], math.prod(w.shape[1:]) if len(w.shape) > 1 else -1)
        if math.prod(mag.shape) not in need:
            why = (
                f"DoRA magnitude {mag.shape} does not match {tuple(w.shape)} "
                f"(needs {' or '.join(map(str, need))} values)"
            )
    if why:
        names = " and ".join(f"'{f.key}' {f.shape}" for f in d.factors)
        raise MatchError(f"{path}: {names} cannot merge into base '{d.target}' {tuple(w.shape)}: {why}")


def moved(deltas: Sequence[Delta], roots: Mapping[str, str]) -> list[Delta]:
    """``deltas`` with every file below a ``roots`` key (a local copy) named below its value instead
    (where it came from: an ``s3://`` URL that each node's tasks fetch for themselves).

    >>> f = FactorRef("/cache/x/lora.safetensors", "a", "F32", (1, 1), "down")
    >>> d = Delta("w", DeltaKind.LORA, (f,), 1.0, 1.0, "/cache/x/lora.safetensors")
    >>> moved([d], {"/cache/x": "s3://b/lora"})[0].factors[0].path
    's3://b/lora/lora.safetensors'
    """

    def where(path: str) -> str:
        for local, url in roots.items():
            if path == local:
                return url
            if path.startswith(local.rstrip("/") + "/"):
                return url.rstrip("/") + "/" + path[len(local.rstrip("/")) + 1 :]
        return path

    def factor(f: FactorRef) -> FactorRef:
        pieces = tuple(replace(p, path=where(p.path)) for p in f.pieces)
        return replace(f, path=where(f.path), pieces=pieces)

    if not roots:
        return list(deltas)
    return [replace(d, factors=tuple(factor(f) for f in d.factors), source=where(d.source)) for d in deltas]
