"""open_base: single files, sharded folders with an index, one-file folders, and every bad layout."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct

import pytest
import torch
from safetensors.torch import save_file

from distmerge.app.synth import wan_shapes
from distmerge.errors import FormatError
from distmerge.inputs.checkpoint import open_base

from .helpers import TINY


def _offsets_by_hand(path: str) -> dict[str, int]:
    """key -> absolute data offset, parsed here independently of distmerge.header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        hdr = json.loads(f.read(n))
    hdr.pop("__metadata__", None)
    return {k: 8 + n + v["data_offsets"][0] for k, v in hdr.items()}


def _index(folder, wmap: dict[str, str], name="model.safetensors.index.json") -> None:
    (folder / name).write_text(json.dumps({"metadata": {}, "weight_map": wmap}))


def _expect(path, *fragments) -> str:
    with pytest.raises(FormatError) as ei:
        open_base(path)
    msg = str(ei.value)
    for frag in fragments:
        assert frag in msg, (frag, msg)
    return msg


@pytest.fixture
def two_shards(tmp_path):
    """Folder with two shards a/b (no index yet): s1 = {x, y}, s2 = {z}."""
    d = tmp_path / "m"
    d.mkdir()
    save_file({"y": torch.zeros(3), "x": torch.ones(2, 2)}, str(d / "s1.safetensors"))
    save_file({"z": torch.zeros(5)}, str(d / "s2.safetensors"))
    return d


# ------------------------------------------------------------------------------------------ valid


def test_single_file_stem_from_name(tmp_path):
    p = tmp_path / "my_model.v2.safetensors"
    save_file({"a.weight": torch.zeros(4, 4), "a.bias": torch.zeros(4, dtype=torch.float16)}, str(p))
    base = open_base(str(p))
    assert base.stem == "my_model.v2"
    assert base.path == str(p)
    assert base.files == (str(p),)
    assert set(base.tensors) == {"a.weight", "a.bias"}
    assert base.total_bytes == 4 * 4 * 4 + 4 * 2
    assert len(base.headers) == 1


def test_index_folder(tiny_base):
    base = open_base(tiny_base)
    assert base.stem == "diffusion_pytorch_model"
    with open(os.path.join(tiny_base, "diffusion_pytorch_model.safetensors.index.json")) as fh:
        wmap = json.load(fh)["weight_map"]
    names = [os.path.basename(f) for f in base.files]
    n = len(names)
    assert n > 1
    assert names == [f"diffusion_pytorch_model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert names == sorted(set(wmap.values()))
    assert base.files == tuple(os.path.join(tiny_base, n) for n in names)

    shapes = wan_shapes(TINY)
    # every key exactly once, with its shape; total bytes = Σ numel·4 (fp32)
    assert {k: v.shape for k, v in base.tensors.items()} == dict(shapes)
    assert base.total_bytes == sum(4 * math.prod(s) for _, s in shapes)

    # order: shard order, then offset within the shard (computed here from the raw headers)
    expected = []
    for f in base.files:
        offs = _offsets_by_hand(f)
        expected += [(k, f, o) for k, o in sorted(offs.items(), key=lambda kv: kv[1])]
    assert [(k, t.path, t.offset) for k, t in base.tensors.items()] == expected
    assert {k: os.path.basename(t.path) for k, t in base.tensors.items()} == wmap


def test_folder_with_one_file(tmp_path):
    d = tmp_path / "single"
    d.mkdir()
    save_file({"w": torch.zeros(2, 3)}, str(d / "model.safetensors"))
    (d / "config.json").write_text("{}")
    (d / "README.md").write_text("hi")
    base = open_base(str(d))
    assert base.stem == "model"
    assert base.path == str(d)
    assert base.files == (str(d / "model.safetensors"),)
    assert list(base.tensors) == ["w"] and base.total_bytes == 24


def test_index_folder_small(two_shards):
    _index(two_shards, {"x": "s1.safetensors", "y": "s1.safetensors", "z": "s2.safetensors"})
    base = open_base(two_shards)
    assert base.stem == "model"
    assert list(base.tensors) == [
        k for k, _ in sorted(_offsets_by_hand(str(two_shards / "s1.safetensors")).items(), key=lambda kv: kv[1])
    ] + ["z"]


def test_shard_order_follows_index_not_names(two_shards):
    _index(two_shards, {"z": "s2.safetensors", "x": "s1.safetensors", "y": "s1.safetensors"})
    base = open_base(two_shards)
    assert [os.path.basename(f) for f in base.files] == ["s2.safetensors", "s1.safetensors"]
    assert list(base.tensors)[0] == "z"


# ------------------------------------------------------------------------------------------ errors


def test_several_files_no_index(two_shards):
    _expect(str(two_shards), str(two_shards), "index", "s1.safetensors")


def test_empty_folder(tmp_path):
    _expect(str(tmp_path), str(tmp_path), "no .safetensors")


def test_missing_path(tmp_path):
    _expect(str(tmp_path / "nope"), "not found")


def test_file_with_wrong_extension(tmp_path):
    p = tmp_path / "model.bin"
    p.write_bytes(b"x" * 16)
    _expect(str(p), str(p), ".bin")


def test_index_names_missing_shard(two_shards):
    _index(two_shards, {"x": "s1.safetensors", "y": "s1.safetensors", "z": "s3.safetensors"})
    _expect(str(two_shards), "s3.safetensors", "does not exist")


@pytest.mark.parametrize(
    "bad",
    [
        "../x.safetensors",
        "/abs.safetensors",
        "sub/x.safetensors",
        "sub\\x.safetensors",
        "C:x.safetensors",
        "s1.bin",
        "..",
    ],
)
def test_index_with_unsafe_shard_name(two_shards, bad):
    # make the targets exist, so only the name itself can be the reason for the refusal
    shutil.copy(two_shards / "s2.safetensors", two_shards.parent / "x.safetensors")
    (two_shards / "sub").mkdir()
    shutil.copy(two_shards / "s2.safetensors", two_shards / "sub" / "x.safetensors")
    _index(two_shards, {"x": "s1.safetensors", "y": "s1.safetensors", "z": bad})
    msg = _expect(str(two_shards), "'z'", repr(bad))
    assert "model.safetensors.index.json" in msg


def test_index_key_listed_in_wrong_shard(two_shards):
    _index(two_shards, {"x": "s2.safetensors", "y": "s1.safetensors", "z": "s2.safetensors"})
    _expect(str(two_shards), "'x'", "s2.safetensors")


def test_index_key_not_in_any_shard(two_shards):
    _index(two_shards, {"x": "s1.safetensors", "y": "s1.safetensors", "z": "s2.safetensors", "ghost": "s2.safetensors"})
    _expect(str(two_shards), "'ghost'")


def test_duplicate_key_across_shards(two_shards):
    save_file({"z": torch.zeros(5), "x": torch.zeros(1)}, str(two_shards / "s2.safetensors"))
    _index(two_shards, {"x": "s1.safetensors", "y": "s1.safetensors", "z": "s2.safetensors"})
    msg = _expect(str(two_shards), "'x'", "s1.safetensors", "s2.safetensors")
    assert "exactly one shard" in msg


def test_tensor_missing_from_weight_map(two_shards):
    _index(two_shards, {"x": "s1.safetensors", "z": "s2.safetensors"})
    _expect(str(two_shards), "missing from 'weight_map'", "'y'")


def test_two_index_files(two_shards):
    wmap = {"x": "s1.safetensors", "y": "s1.safetensors", "z": "s2.safetensors"}
    _index(two_shards, wmap, "a.safetensors.index.json")
    _index(two_shards, wmap, "b.safetensors.index.json")
    _expect(str(two_shards), "2 index files", "a.safetensors.index.json", "b.safetensors.index.json")


@pytest.mark.parametrize("content", [b"{not json", b"[]", b'{"weight_map": {}}', b'{"weight_map": []}', b"\xff\xfe"])
def test_bad_index_content(two_shards, content):
    (two_shards / "model.safetensors.index.json").write_bytes(content)
    _expect(str(two_shards), "model.safetensors.index.json")


def test_bad_shard_header_propagates(two_shards):
    (two_shards / "s2.safetensors").write_bytes(b"\x00\x01")
    _index(two_shards, {"x": "s1.safetensors", "y": "s1.safetensors", "z": "s2.safetensors"})
    _expect(str(two_shards), str(two_shards / "s2.safetensors"))


def test_base_without_tensors(tmp_path):
    p = tmp_path / "empty.safetensors"
    save_file({}, str(p))
    _expect(str(p), "no tensors")


# --- fuzzing: random and mutated index files never crash the reader -------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=12), kids, max_size=4),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    index=st.one_of(
        _JSON,
        st.fixed_dictionaries({"weight_map": st.dictionaries(st.text(max_size=30), _JSON, max_size=6)}),
        st.fixed_dictionaries(
            {
                "weight_map": st.dictionaries(
                    st.sampled_from(["x", "y", "z", "a.weight", ""]),
                    st.sampled_from(
                        [
                            "s1.safetensors",
                            "s2.safetensors",
                            "../s1.safetensors",
                            "/s1.safetensors",
                            "sub/s1.safetensors",
                            "missing.safetensors",
                            "s1.bin",
                            "",
                        ]
                    ),
                    max_size=4,
                )
            }
        ),
    )
)
def test_random_index_files_only_raise_format_error(two_shards, index):
    d = two_shards
    path = os.path.join(d, "model.safetensors.index.json")
    with open(path, "w") as f:
        json.dump(index, f)
    try:
        base = open_base(d)
    except FormatError as e:
        assert str(e)
    else:  # accepted: then it must describe the real shards exactly
        assert set(base.tensors) == set(index["weight_map"])


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=0, max_value=400), junk=st.binary(max_size=20))
def test_mutated_index_bytes_only_raise_format_error(two_shards, cut, junk):
    path = os.path.join(two_shards, "model.safetensors.index.json")
    good = json.dumps(
        {
            "metadata": {"total_size": 36},
            "weight_map": {"x": "s1.safetensors", "y": "s1.safetensors", "z": "s2.safetensors"},
        },
        indent=2,
    ).encode()
    with open(path, "wb") as f:
        f.write(good[:cut] + junk + good[cut + len(junk) :])
    try:
        base = open_base(two_shards)
    except FormatError:
        pass
    else:
        assert set(base.tensors) == {"x", "y", "z"}
