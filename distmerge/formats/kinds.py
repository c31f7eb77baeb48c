"""The named values of a LoRA's deltas: delta kinds and factor roles, as ``str`` enums.

Each member is its string value (``DeltaKind.LORA == "lora"``, same hash), so members compare
with plain strings, key the same dict entries, go through Ray's pickling, and print as the
value in messages and JSON, on every Python (``str()`` and ``format()`` are the value: a plain
``(str, Enum)`` prints ``DeltaKind.LORA`` in f-strings on some versions).

Example:
    >>> import json
    >>> DeltaKind.LORA == "lora", f"{Role.DOWN} / {DeltaKind.SET:>4}", json.dumps([DeltaKind.DIFF])
    (True, 'down /  set', '["diff"]')
    >>> DeltaKind("loha") is DeltaKind.LOHA, {"up": 1}[Role.UP]
    (True, 1)
"""

from __future__ import annotations

from enum import Enum

__all__ = ["DeltaKind", "FULL_KINDS", "Role", "TextEnum"]


class TextEnum(str, Enum):
    """A ``str`` enum whose members print as their value (``enum.StrEnum`` is Python 3.11+)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class DeltaKind(TextEnum):
    """What a delta's factors are (the arithmetic of each is in ``tasks.mergemath``)."""

    LORA = "lora"  #: low-rank pair: down (A), up (B), optional mid
    EXPERTS = "experts"  #: one low-rank pair per expert of a fused 3-D tensor (A rows, B columns by expert)
    LOHA = "loha"  #: LoHa: Hadamard product of two low-rank pairs
    LOKR = "lokr"  #: LoKr: Kronecker product of two factors
    DIFF = "diff"  #: a full ΔW
    SET = "set"  #: a replacement of the base tensor


#: the kinds whose one factor is a whole tensor of the target's shape (members match plain strings too)
FULL_KINDS = frozenset({DeltaKind.DIFF, DeltaKind.SET})


class Role(TextEnum):
    """What one LoRA tensor is to its module (named by its key suffix, ``normalize.SUFFIXES``)."""

    DOWN = "down"
    UP = "up"
    UP_BIAS = "up_bias"
    MID = "mid"
    EMB_DOWN = "emb_down"
    EMB_UP = "emb_up"
    MAGNITUDE = "magnitude"  #: PEFT DoRA ``lora_magnitude_vector``
    DORA_SCALE = "dora_scale"  #: LyCORIS DoRA
    HADA_W1_A = "hada_w1_a"
    HADA_W1_B = "hada_w1_b"
    HADA_W2_A = "hada_w2_a"
    HADA_W2_B = "hada_w2_b"
    HADA_T1 = "hada_t1"
    HADA_T2 = "hada_t2"
    LOKR_W1_A = "lokr_w1_a"
    LOKR_W1_B = "lokr_w1_b"
    LOKR_W2_A = "lokr_w2_a"
    LOKR_W2_B = "lokr_w2_b"
    LOKR_W1 = "lokr_w1"
    LOKR_W2 = "lokr_w2"
    LOKR_T2 = "lokr_t2"
    ALPHA = "alpha"
    DIFF = "diff"
    DIFF_B = "diff_b"
    DIFF_M = "diff_m"
    W_NORM = "w_norm"
    B_NORM = "b_norm"
    SET_WEIGHT = "set_weight"
    SET = "set"  #: a whole base tensor under its own name (a replacement)
