"""The safetensors dtype codes: element sizes, float codes and the ``--dtype`` spellings (no torch).

Example:
    >>> itemsize("F32"), is_float("BF16"), is_float("I64")
    (4, True, False)
"""

from __future__ import annotations

from collections.abc import Collection

from distmerge.errors import UsageError

__all__ = [
    "ITEMSIZES",
    "TORCH_NAMES",
    "FLOAT_CODES",
    "FP8_CODES",
    "CLI_DTYPES",
    "DTYPE_FLAGS",
    "code_of_torch_name",
    "dtype_code",
    "flag_of_code",
    "itemsize",
    "is_float",
]

# code -> (torch dtype name, bytes per element): the one table of codes; ``ITEMSIZES`` and
# ``TORCH_NAMES`` are its columns (``torch_dtypes`` maps the names to torch dtypes).
_TABLE: dict[str, tuple[str, int]] = {
    "BOOL": ("bool", 1),
    "U8": ("uint8", 1),
    "I8": ("int8", 1),
    "I16": ("int16", 2),
    "U16": ("uint16", 2),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I32": ("int32", 4),
    "U32": ("uint32", 4),
    "F32": ("float32", 4),
    "F64": ("float64", 8),
    "I64": ("int64", 8),
    "U64": ("uint64", 8),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}

#: code -> bytes per element
ITEMSIZES: dict[str, int] = {code: size for code, (_, size) in _TABLE.items()}
#: code -> the name of its torch dtype (``torch_dtypes`` maps the names to the dtypes of this torch)
TORCH_NAMES: dict[str, str] = {code: name for code, (name, _) in _TABLE.items()}

#: codes whose tensors LoRA deltas may be added to (and ``--dtype`` converts)
FLOAT_CODES = frozenset({"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"})
#: the float8 codes (merged through float32; ``--dtype`` to them writes scaled fp8, see ``fp8``)
FP8_CODES = frozenset({"F8_E4M3", "F8_E5M2"})

#: ``--dtype`` spellings -> safetensors code (``keep`` -> None)
CLI_DTYPES: dict[str, str | None] = {
    "keep": None,
    "bf16": "BF16",
    "bfloat16": "BF16",
    "fp16": "F16",
    "float16": "F16",
    "fp32": "F32",
    "float32": "F32",
    "fp8_e4m3fn": "F8_E4M3",
    "float8_e4m3fn": "F8_E4M3",
    "fp8_e5m2": "F8_E5M2",
    "float8_e5m2": "F8_E5M2",
    # GGML block types, for a .gguf output (``ggml``, ``plan.gguf``)
    "q8_0": "Q8_0",
    "q5_1": "Q5_1",
    "q5_0": "Q5_0",
    "q4_1": "Q4_1",
    "q4_0": "Q4_0",
}
#: code -> its ``--dtype`` spelling: the first that ``CLI_DTYPES`` gives it (``keep`` for None)
_FLAG_OF: dict[str | None, str] = {
    code: next(flag for flag, c in CLI_DTYPES.items() if c == code) for code in dict.fromkeys(CLI_DTYPES.values())
}
#: the ``--dtype`` spellings users see, one per code (``keep``, ``bf16``, ``fp16`` … ``fp8_e5m2``)
DTYPE_FLAGS: tuple[str, ...] = tuple(_FLAG_OF.values())


def code_of_torch_name(name: str) -> str | None:
    """The code of a torch dtype from its name (``str(torch.bfloat16)``), without torch.

    >>> code_of_torch_name("torch.bfloat16"), code_of_torch_name("torch.complex64")
    ('BF16', None)
    """
    name = name.removeprefix("torch.")
    return next((code for code, n in TORCH_NAMES.items() if n == name), None)


def dtype_code(flag: str, *, allowed: Collection[str | None] | None = None, command: str = "") -> str | None:
    """The safetensors code a ``--dtype`` spelling names (``keep``: None), one of ``allowed`` (default:
    any); ``command`` names who refuses the others.

    >>> dtype_code("bf16"), dtype_code("Float32"), dtype_code("keep")
    ('BF16', 'F32', None)
    >>> dtype_code("fp8_e5m2", allowed=("BF16", "F16", "F32"), command="extract")
    Traceback (most recent call last):
    distmerge.errors.UsageError: --dtype 'fp8_e5m2' is not supported by extract; use bf16, fp16 or fp32
    """
    codes = list(dict.fromkeys(CLI_DTYPES.values())) if allowed is None else list(allowed)
    code = CLI_DTYPES.get(str(flag).lower(), "?")
    if code == "?" or code not in codes:
        names = [flag_of_code(c) for c in codes]
        by = f" by {command}" if command else ""
        raise UsageError(f"--dtype {flag!r} is not supported{by}; use {', '.join(names[:-1])} or {names[-1]}")
    return code


def flag_of_code(code: str | None) -> str:
    """The ``--dtype`` spelling of a safetensors code (``keep`` for None; any other code in lower case).

    >>> [flag_of_code(c) for c in (None, "BF16", "F16", "F32", "F8_E4M3", "F8_E5M2", "F64", "Q8_0")]
    ['keep', 'bf16', 'fp16', 'fp32', 'fp8_e4m3fn', 'fp8_e5m2', 'f64', 'q8_0']
    """
    return _FLAG_OF[code] if code in _FLAG_OF else str(code).lower()


def itemsize(code: str) -> int:
    """Bytes per element of a safetensors code (``KeyError`` if unknown)."""
    return ITEMSIZES[code]


def is_float(code: str) -> bool:
    """True for floating-point codes, the only ones a delta can be added to (GGUF's block-quantized
    types too: ``ggml``)."""
    if code in ITEMSIZES:
        return code in FLOAT_CODES
    from distmerge.inputs.ggml import is_quant  # gguf-py is imported only for a code it names

    return is_quant(code)
