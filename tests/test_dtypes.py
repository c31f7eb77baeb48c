"""Every dtype code in DTYPES survives write_safetensors -> read_header / safe_open unchanged."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open

from distmerge.errors import FormatError
from distmerge.inputs.dtypes import is_float, itemsize
from distmerge.inputs.header import read_header
from distmerge.inputs.torch_dtypes import DTYPES, code_of, to_torch
from distmerge.tasks.writer import write_safetensors


def _sample(code: str) -> torch.Tensor:
    """A small 2x3 tensor of ``code`` with distinct, exactly representable values."""
    dt = to_torch(code)
    if code == "BOOL":
        return torch.tensor([[True, False, True], [False, False, True]])
    if code in ("F8_E4M3", "F8_E5M2"):
        return torch.tensor([[0.5, -1.0, 2.0], [0.0, 4.0, -0.25]]).to(dt)
    if dt.is_floating_point:
        return torch.tensor([[0.5, -1.5, 3.25], [0.0, 100.0, -7.0]], dtype=dt)
    if code.startswith("U"):
        return torch.tensor([[0, 1, 2], [7, 100, 200]], dtype=torch.int64).to(dt)
    return torch.tensor([[0, -1, 2], [-7, 100, -100]], dtype=dt)


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("code", sorted(DTYPES))
def test_dtype_round_trip(tmp_path, code):
    t = _sample(code)
    assert code_of(t.dtype) == code
    path = str(tmp_path / f"{code}.safetensors")
    write_safetensors(path, {"x": t})

    h = read_header(path)
    info = h.tensors["x"]
    assert info.dtype == code
    assert info.shape == (2, 3)
    assert info.nbytes == 6 * itemsize(code) == 6 * t.element_size()

    with safe_open(path, framework="pt") as f:
        back = f.get_tensor("x")
    assert back.dtype == t.dtype
    assert tuple(back.shape) == (2, 3)
    assert _raw(back) == _raw(t)  # bit-exact, also for dtypes without torch comparison kernels

    with open(path, "rb") as f:
        f.seek(info.offset)
        assert f.read(info.nbytes) == _raw(t)


def test_all_dtypes_in_one_file(tmp_path):
    tensors = {f"t_{code}": _sample(code) for code in sorted(DTYPES)}
    path = str(tmp_path / "all.safetensors")
    write_safetensors(path, tensors)
    h = read_header(path)
    assert {k: v.dtype for k, v in h.tensors.items()} == {f"t_{c}": c for c in DTYPES}
    with safe_open(path, framework="pt") as f:
        for k, t in tensors.items():
            back = f.get_tensor(k)
            assert back.dtype == t.dtype and _raw(back) == _raw(t), k


def test_float_codes_are_floats():
    for code, (dt, size) in DTYPES.items():
        assert dt.itemsize == size, code
        assert is_float(code) == dt.is_floating_point, code


def test_unknown_dtype_rejected_by_read_header(tmp_path):
    header = {
        "__metadata__": {"format": "pt"},
        "good": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "weird.key": {"dtype": "Q4_K", "shape": [2], "data_offsets": [8, 10]},
    }
    raw = json.dumps(header).encode()
    path = tmp_path / "q4.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 10)
    with pytest.raises(FormatError) as ei:
        read_header(path)
    msg = str(ei.value)
    assert str(path) in msg
    assert "weird.key" in msg
    assert "Q4_K" in msg
