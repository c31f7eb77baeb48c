"""read_header / parse_header_bytes: valid files parse; every malformed file is a FormatError naming it."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distmerge.errors import FormatError
from distmerge.inputs.header import MAX_HEADER_BYTES, parse_header_bytes, read_header


def _file(path, header: object, data_len: int, *, raw: bytes | None = None) -> str:
    """Write ``u64 len`` + JSON(header) + ``data_len`` bytes by hand; return the path as str."""
    body = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(
        struct.pack("<Q", len(body)) + body + bytes(range(256)) * (data_len // 256) + bytes(data_len % 256)
    )
    return str(path)


def _expect(path: str, *fragments: str) -> str:
    with pytest.raises(FormatError) as ei:
        read_header(path)
    msg = str(ei.value)
    assert path in msg
    for frag in fragments:
        assert frag in msg, (frag, msg)
    return msg


GOOD = {
    "__metadata__": {"format": "pt"},
    "w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
    "b": {"dtype": "F16", "shape": [3], "data_offsets": [24, 30]},
}


def test_valid_file_absolute_offsets(tmp_path):
    path = _file(tmp_path / "ok.safetensors", GOOD, 30)
    n = len(json.dumps(GOOD).encode())
    h = read_header(path)
    assert h.path == path
    assert h.data_start == 8 + n
    assert h.file_size == 8 + n + 30
    assert h.metadata == {"format": "pt"}
    assert list(h.tensors) == ["w", "b"]  # file (offset) order
    w, b = h.tensors["w"], h.tensors["b"]
    assert (w.dtype, w.shape, w.offset, w.nbytes, w.path) == ("F32", (2, 3), 8 + n, 24, path)
    assert (b.dtype, b.shape, b.offset, b.nbytes) == ("F16", (3,), 8 + n + 24, 6)
    assert w.numel == 6 and b.numel == 3


def test_offsets_sorted_regardless_of_json_order(tmp_path):
    hdr = {
        "late": {"dtype": "U8", "shape": [4], "data_offsets": [4, 8]},
        "early": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
    }
    path = _file(tmp_path / "o.safetensors", hdr, 8)
    h = read_header(path)
    assert list(h.tensors) == ["early", "late"]
    assert h.tensors["late"].offset - h.tensors["early"].offset == 4


def test_empty_header_object_and_zero_sized_tensor(tmp_path):
    path = _file(tmp_path / "empty.safetensors", {}, 0)
    assert read_header(path).tensors == {}
    hdr = {"z": {"dtype": "F32", "shape": [0, 5], "data_offsets": [0, 0]}}
    h = read_header(_file(tmp_path / "zero.safetensors", hdr, 0))
    assert h.tensors["z"].nbytes == 0


def test_file_shorter_than_8_bytes(tmp_path):
    p = tmp_path / "short.safetensors"
    p.write_bytes(b"\x01\x02\x03")
    _expect(str(p), "3 bytes")


def test_empty_file(tmp_path):
    p = tmp_path / "empty.safetensors"
    p.write_bytes(b"")
    _expect(str(p))


def test_header_length_past_end(tmp_path):
    p = tmp_path / "long.safetensors"
    p.write_bytes(struct.pack("<Q", 1000) + b"{}")
    _expect(str(p), "1000")


def test_header_length_huge(tmp_path):
    p = tmp_path / "huge.safetensors"
    p.write_bytes(struct.pack("<Q", 2**63) + b"{}")
    _expect(str(p))


def test_not_json(tmp_path):
    _expect(_file(tmp_path / "nj.safetensors", None, 0, raw=b"{not json"), "JSON")


def test_not_utf8(tmp_path):
    _expect(_file(tmp_path / "nu.safetensors", None, 0, raw=b'{"\xff": 1}'))


@pytest.mark.parametrize("obj", [[1, 2], "text", 3, None])
def test_json_not_an_object(tmp_path, obj):
    _expect(_file(tmp_path / "arr.safetensors", obj, 0), "object")


def test_entry_not_an_object(tmp_path):
    _expect(_file(tmp_path / "e.safetensors", {"k1": [1, 2]}, 0), "'k1'")


def test_bad_metadata(tmp_path):
    _expect(_file(tmp_path / "m.safetensors", {"__metadata__": {"a": 1}}, 0), "__metadata__")


@pytest.mark.parametrize("meta", [[], 0, False, ""])
def test_metadata_must_be_an_object(tmp_path, meta):
    _expect(_file(tmp_path / "m.safetensors", {"__metadata__": meta}, 0), "__metadata__")


def test_metadata_null_or_empty_is_fine(tmp_path):
    for meta in (None, {}):
        assert read_header(_file(tmp_path / "m.safetensors", {"__metadata__": meta}, 0)).metadata == {}


def test_header_over_limit(tmp_path):
    p = tmp_path / "big.safetensors"
    n = MAX_HEADER_BYTES + 1
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", n))
        f.truncate(8 + n + 8)  # sparse: the length check must fire before anything is read
    _expect(str(p), "limit")


def test_deeply_nested_json(tmp_path):
    depth = 200_000
    _expect(_file(tmp_path / "deep.safetensors", None, 0, raw=b"[" * depth + b"]" * depth))
    _expect(_file(tmp_path / "deep2.safetensors", None, 0, raw=b'{"a":' * depth + b"1" + b"}" * depth))


def test_unknown_dtype(tmp_path):
    hdr = {"the.key": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}
    _expect(_file(tmp_path / "dt.safetensors", hdr, 1), "'the.key'", "F4")


@pytest.mark.parametrize("shape", [[2, -1], "23", [2.0, 3], [True], None, [[2]]])
def test_bad_shape(tmp_path, shape):
    hdr = {"bad.shape": {"dtype": "U8", "shape": shape, "data_offsets": [0, 2]}}
    _expect(_file(tmp_path / "sh.safetensors", hdr, 2), "'bad.shape'", "shape")


@pytest.mark.parametrize("offs", [[0], [4, 0], [-2, 2], "0-4", [0, 4.0], None])
def test_malformed_offsets(tmp_path, offs):
    hdr = {"o.key": {"dtype": "U8", "shape": [4], "data_offsets": offs}}
    _expect(_file(tmp_path / "of.safetensors", hdr, 4), "'o.key'", "data_offsets")


def test_shape_with_huge_dims(tmp_path):
    hdr = {"big": {"dtype": "F64", "shape": [2**62, 2**62], "data_offsets": [0, 8]}}
    _expect(_file(tmp_path / "big.safetensors", hdr, 8), "'big'")


def test_span_does_not_match_numel_times_itemsize(tmp_path):
    hdr = {"span.key": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}
    _expect(_file(tmp_path / "sp.safetensors", hdr, 20), "'span.key'", "24")


def test_overlapping_offsets(tmp_path):
    hdr = {
        "a": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]},
        "over": {"dtype": "U8", "shape": [8], "data_offsets": [4, 12]},
    }
    _expect(_file(tmp_path / "ov.safetensors", hdr, 12), "'over'", "overlap")


def test_identical_offsets_overlap(tmp_path):
    hdr = {
        "a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
        "b": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
    }
    _expect(_file(tmp_path / "same.safetensors", hdr, 8), "overlap")


def test_gap_between_tensors(tmp_path):
    hdr = {
        "a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
        "after.gap": {"dtype": "U8", "shape": [4], "data_offsets": [6, 10]},
    }
    _expect(_file(tmp_path / "gap.safetensors", hdr, 10), "'after.gap'", "gap")


def test_gap_at_start(tmp_path):
    hdr = {"first": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}}
    _expect(_file(tmp_path / "gap0.safetensors", hdr, 6), "'first'", "gap")


def test_truncated_file(tmp_path):
    path = _file(tmp_path / "trunc.safetensors", GOOD, 29)
    _expect(path, "truncated")


def test_trailing_bytes(tmp_path):
    path = _file(tmp_path / "trail.safetensors", GOOD, 31)
    _expect(path, "trailing")


def test_missing_file(tmp_path):
    _expect(str(tmp_path / "nope.safetensors"), "not found")


def test_directory_given(tmp_path):
    d = tmp_path / "dir.safetensors"
    d.mkdir()
    _expect(str(d), "directory")


def test_accepts_pathlike(tmp_path):
    p = tmp_path / "ok.safetensors"
    _file(p, GOOD, 30)
    assert read_header(p).path == str(p)


# ---------------------------------------------------------------------------------------- fuzzing

_VALID_RAW = json.dumps(GOOD).encode()
_VALID_SIZE = 8 + len(_VALID_RAW) + 30


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=300), size=st.integers(min_value=0, max_value=10_000))
def test_fuzz_random_bytes_only_format_error(raw, size):
    try:
        h = parse_header_bytes("fuzz.safetensors", raw, size)
    except FormatError as e:
        assert "fuzz.safetensors" in str(e)
    else:
        # anything accepted must be self-consistent: tensors tile the buffer up to the file size
        end = max((t.offset + t.nbytes for t in h.tensors.values()), default=h.data_start)
        assert end == size


_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-5, 100), st.floats(allow_nan=True), st.text(max_size=6))
_json_val = st.recursive(
    _json_leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4), max_leaves=10
)


@st.composite
def _mutated_header(draw):
    hdr = json.loads(_VALID_RAW)
    key = draw(st.sampled_from(["__metadata__", "w", "b", "new"]))
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets", None]))
    value = draw(_json_val)
    if field is None or key == "__metadata__" or key not in hdr:
        hdr[key] = value
    else:
        hdr[key][field] = value
    return json.dumps(hdr).encode()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=_mutated_header(), extra=st.integers(-40, 40))
def test_fuzz_mutated_headers_only_format_error(raw, extra):
    size = 8 + len(raw) + max(0, 30 + extra)
    try:
        parse_header_bytes("m.safetensors", raw, size)
    except FormatError as e:
        assert "m.safetensors" in str(e)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.binary(max_size=200),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4),
    cut=st.integers(0, 400),
)
def test_fuzz_read_header_on_corrupted_files(tmp_path, data, flips, cut):
    blob = bytearray(struct.pack("<Q", len(_VALID_RAW)) + _VALID_RAW + bytes(30))
    for pos, val in flips:
        blob[pos % len(blob)] = val
    blob = blob[: len(blob) - cut % 60] + data if cut % 2 else blob + data
    p = tmp_path / "c.safetensors"
    p.write_bytes(bytes(blob))
    try:
        read_header(p)
    except FormatError as e:
        assert str(p) in str(e)


def test_fuzz_baseline_is_valid():
    h = parse_header_bytes("x", _VALID_RAW, _VALID_SIZE)
    assert set(h.tensors) == {"w", "b"}
