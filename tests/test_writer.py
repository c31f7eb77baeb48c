"""layout_shard header bytes and alignment; write_safetensors; copy_range (kernel and fallback)."""

from __future__ import annotations

import errno
import json
import os
import struct

import pytest
import torch
from safetensors import safe_open

from distmerge.inputs.dtypes import itemsize
from distmerge.inputs.header import read_header
from distmerge.plan.layout import layout_shard
from distmerge.tasks import writer
from distmerge.tasks.writer import copy_range, create_file, pwrite_all, write_safetensors

from .helpers import direct_io_works

# ----------------------------------------------------------------------------------- layout_shard


def test_layout_exact_header_bytes():
    entries = [("b", "BF16", (3,)), ("a", "F32", (2,)), ("c", "U8", (5,)), ("d", "F64", (1,)), ("e", "F32", (1, 2))]
    lay = layout_shard(entries, metadata={"format": "pt"})
    # by hand: sorted by itemsize desc, stable (a before e); offsets accumulate
    # d: 8 bytes [0,8]; a: 8 [8,16]; e: 8 [16,24]; b: 6 [24,30]; c: 5 [30,35]
    js = (
        b'{"__metadata__":{"format":"pt"},'
        b'"d":{"dtype":"F64","shape":[1],"data_offsets":[0,8]},'
        b'"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]},'
        b'"e":{"dtype":"F32","shape":[1,2],"data_offsets":[16,24]},'
        b'"b":{"dtype":"BF16","shape":[3],"data_offsets":[24,30]},'
        b'"c":{"dtype":"U8","shape":[5],"data_offsets":[30,35]}}'
    )
    padded = js + b" " * ((8 - (8 + len(js)) % 8) % 8)
    assert len(padded) % 8 == 0 and 0 <= len(padded) - len(js) < 8
    expected = struct.pack("<Q", len(padded)) + padded
    assert lay.header == expected
    assert lay.data_start == len(expected)
    assert lay.size == len(expected) + 35
    assert [(e.key, e.dtype, e.shape, e.offset - lay.data_start, e.nbytes) for e in lay.entries] == [
        ("d", "F64", (1,), 0, 8),
        ("a", "F32", (2,), 8, 8),
        ("e", "F32", (1, 2), 16, 8),
        ("b", "BF16", (3,), 24, 6),
        ("c", "U8", (5,), 30, 5),
    ]


def test_layout_without_metadata_has_no_metadata_key():
    lay = layout_shard([("x", "F16", (2, 2))])
    (n,) = struct.unpack("<Q", lay.header[:8])
    assert json.loads(lay.header[8 : 8 + n]) == {"x": {"dtype": "F16", "shape": [2, 2], "data_offsets": [0, 8]}}
    assert lay.header[8:].rstrip(b" ") == b'{"x":{"dtype":"F16","shape":[2,2],"data_offsets":[0,8]}}'


def test_layout_docstring_example_size():
    lay = layout_shard([("b", "BF16", (3,)), ("a", "F32", (2,))], metadata={"format": "pt"})
    js = (
        b'{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
        b'"b":{"dtype":"BF16","shape":[3],"data_offsets":[8,14]}}'
    )
    assert lay.header[8:].rstrip(b" ") == js
    assert lay.size == lay.data_start + 14


@pytest.mark.parametrize(
    "entries",
    [
        [("u8", "U8", (3,)), ("f16", "F16", (5,)), ("f32", "F32", (7,)), ("f64", "F64", (3,))],
        [
            ("a", "U8", (1,)),
            ("b", "F64", (1,)),
            ("c", "BOOL", (3,)),
            ("d", "I16", (1,)),
            ("e", "I64", (2,)),
            ("f", "BF16", (3,)),
            ("g", "F8_E4M3", (7,)),
            ("h", "U32", (1,)),
        ],
        [("k" * n, "F32", (n,)) for n in range(1, 9)] + [("odd", "I8", (13,))],
    ],
)
@pytest.mark.parametrize("meta", [None, {"format": "pt"}, {"format": "pt", "x": "yy"}])
def test_layout_alignment(entries, meta):
    lay = layout_shard(entries, metadata=meta)
    assert lay.data_start % 8 == 0
    assert len(lay.header) == lay.data_start
    pos = lay.data_start
    for e in lay.entries:
        assert e.offset % itemsize(e.dtype) == 0, e
        assert e.offset == pos  # contiguous, no gaps
        pos += e.nbytes
    assert pos == lay.size
    sizes = [itemsize(e.dtype) for e in lay.entries]
    assert sizes == sorted(sizes, reverse=True)
    assert sorted(e.key for e in lay.entries) == sorted(k for k, _, _ in entries)


def test_layout_header_is_what_read_header_reads(tmp_path):
    entries = [("b", "BF16", (3, 2)), ("a", "F32", (2,)), ("z", "U8", (0,))]
    lay = layout_shard(entries, metadata={"format": "pt"})
    p = tmp_path / "l.safetensors"
    create_file(str(p), lay.header, lay.size)
    assert p.stat().st_size == lay.size
    assert p.read_bytes()[: lay.data_start] == lay.header
    h = read_header(p)
    assert h.data_start == lay.data_start
    assert {k: (t.dtype, t.shape, t.offset, t.nbytes) for k, t in h.tensors.items()} == {
        e.key: (e.dtype, e.shape, e.offset, e.nbytes) for e in lay.entries
    }


# ------------------------------------------------------------------------------ write_safetensors


def _mixed() -> dict[str, torch.Tensor]:
    return {
        "h": torch.tensor([1.5, -2.0, 3.0], dtype=torch.bfloat16),
        "w": torch.arange(12, dtype=torch.float32).reshape(3, 4) / 8,
        "m": torch.tensor([True, False, True]),
        "d": torch.tensor([[1e-300, 2.0]], dtype=torch.float64),
        "i": torch.tensor([-5, 7, 9], dtype=torch.int64),
        "e": torch.zeros(0, 3),
        "t": torch.arange(6, dtype=torch.int16).reshape(2, 3).t(),  # non-contiguous
    }


def _check_file(path: str, tensors: dict[str, torch.Tensor], metadata=None) -> None:
    with safe_open(path, framework="pt") as f:
        assert set(f.keys()) == set(tensors)
        if metadata is not None:
            assert f.metadata() == metadata
        for k, t in tensors.items():
            back = f.get_tensor(k)
            assert back.dtype == t.dtype and back.shape == t.shape, k
            assert torch.equal(back, t), k


def test_write_mapping(tmp_path):
    p = str(tmp_path / "m.safetensors")
    tensors = _mixed()
    lay = write_safetensors(p, tensors)
    assert os.path.getsize(p) == lay.size
    _check_file(p, tensors, {"format": "pt"})
    read_header(p)  # also valid for our own strict reader


def test_write_custom_metadata(tmp_path):
    p = str(tmp_path / "m.safetensors")
    write_safetensors(p, {"x": torch.ones(2)}, metadata={"format": "pt", "who": "me"})
    _check_file(p, {"x": torch.ones(2)}, {"format": "pt", "who": "me"})


def test_write_generator_with_specs(tmp_path):
    tensors = _mixed()
    specs = [
        (
            k,
            {
                torch.bfloat16: "BF16",
                torch.float32: "F32",
                torch.bool: "BOOL",
                torch.float64: "F64",
                torch.int64: "I64",
                torch.int16: "I16",
            }[t.dtype],
            tuple(t.shape),
        )
        for k, t in tensors.items()
    ]
    produced = []

    def gen():
        for k in reversed(list(tensors)):  # arrival order differs from spec order
            produced.append(k)
            yield k, tensors[k]

    p = str(tmp_path / "g.safetensors")
    write_safetensors(p, gen(), specs=specs)
    assert len(produced) == len(tensors)
    _check_file(p, tensors)


def test_write_generator_without_specs(tmp_path):
    with pytest.raises(ValueError):
        write_safetensors(str(tmp_path / "x.safetensors"), iter([("a", torch.ones(1))]))


@pytest.mark.parametrize("bad", [torch.ones(2, dtype=torch.float16), torch.ones(3)])
def test_write_generator_spec_mismatch(tmp_path, bad):
    with pytest.raises(ValueError, match="a"):
        write_safetensors(str(tmp_path / "x.safetensors"), iter([("a", bad)]), specs=[("a", "F32", (2,))])


def test_pwrite_all_handles_short_writes(tmp_path, monkeypatch):
    real = os.pwrite
    calls = []

    def short(fd, data, off):
        calls.append(off)
        return real(fd, bytes(memoryview(data)[:3]), off)

    monkeypatch.setattr(os, "pwrite", short)
    p = tmp_path / "s.bin"
    p.write_bytes(b"." * 20)
    fd = os.open(p, os.O_WRONLY)
    try:
        pwrite_all(fd, b"abcdefghij", 5)
    finally:
        os.close(fd)
    assert p.read_bytes() == b"....." + b"abcdefghij" + b"....."
    assert calls == [5, 8, 11, 14]


# ------------------------------------------------------------------------------------- copy_range


@pytest.fixture
def src_dst(tmp_path):
    payload = bytes((i * 37 + 11) % 256 for i in range(5000))
    src, dst = tmp_path / "src.bin", tmp_path / "dst.bin"
    src.write_bytes(payload)
    dst.write_bytes(b"\xee" * 6000)
    sfd, dfd = os.open(src, os.O_RDONLY), os.open(dst, os.O_RDWR)
    yield payload, sfd, dfd, dst
    os.close(sfd)
    os.close(dfd)


def _expected(payload: bytes, src_off: int, dst_off: int, n: int) -> bytes:
    out = bytearray(b"\xee" * 6000)
    out[dst_off : dst_off + n] = payload[src_off : src_off + n]
    return bytes(out)


@pytest.mark.parametrize("src_off,dst_off,n", [(0, 0, 5000), (123, 777, 4000), (4999, 0, 1), (10, 10, 0)])
def test_copy_range_kernel(src_dst, src_off, dst_off, n):
    payload, sfd, dfd, dst = src_dst
    copy_range(sfd, src_off, dfd, dst_off, n)
    assert dst.read_bytes() == _expected(payload, src_off, dst_off, n)


@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_copy_range_fallback_on_exdev(src_dst, monkeypatch, chunk):
    payload, sfd, dfd, dst = src_dst
    calls = []

    def refuse(*a, **k):
        calls.append(a)
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    monkeypatch.setattr(writer, "_COPY_CHUNK", chunk)
    copy_range(sfd, 321, dfd, 55, 4321)
    assert len(calls) == 1  # tried once, then stayed on the fallback
    assert dst.read_bytes() == _expected(payload, 321, 55, 4321)


def test_copy_range_without_copy_file_range(src_dst, monkeypatch):
    payload, sfd, dfd, dst = src_dst
    monkeypatch.delattr(os, "copy_file_range", raising=False)
    copy_range(sfd, 1, dfd, 2, 4999)
    assert dst.read_bytes() == _expected(payload, 1, 2, 4999)


def test_copy_range_partial_kernel_copies(src_dst, monkeypatch):
    payload, sfd, dfd, dst = src_dst
    real = os.copy_file_range
    monkeypatch.setattr(os, "copy_file_range", lambda s, d, n, so, do: real(s, d, min(n, 333), so, do))
    copy_range(sfd, 100, dfd, 200, 4500)
    assert dst.read_bytes() == _expected(payload, 100, 200, 4500)


def test_copy_range_other_errors_propagate(src_dst, monkeypatch):
    _, sfd, dfd, _ = src_dst

    def boom(*a):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "copy_file_range", boom, raising=False)
    with pytest.raises(OSError) as ei:
        copy_range(sfd, 0, dfd, 0, 10)
    assert ei.value.errno == errno.EIO


@pytest.mark.parametrize("kernel", [True, False])
def test_copy_range_past_end_of_source(src_dst, monkeypatch, kernel):
    _, sfd, dfd, _ = src_dst
    if not kernel:
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    with pytest.raises(OSError) as ei:
        copy_range(sfd, 4990, dfd, 0, 20)
    assert ei.value.errno == errno.EIO


def test_create_file_reserves_the_data_area_and_keeps_the_header(tmp_path):
    """The part file has its final size with its blocks allocated where the filesystem supports
    fallocate (so a full disk fails before any task runs); the header bytes are intact."""
    path = str(tmp_path / "part")
    header = b"\x10\x00\x00\x00\x00\x00\x00\x00" + b'{"a":1}' + b" " * 9
    create_file(path, header, 1 << 20)
    st = os.stat(path)
    assert st.st_size == 1 << 20
    with open(path, "rb") as f:
        assert f.read(len(header)) == header
    fd = os.open(path, os.O_WRONLY)
    try:
        reserved = writer.reserve(fd, 2 << 20)
    finally:
        os.close(fd)
    assert os.path.getsize(path) == 2 << 20
    if reserved:  # ext4/xfs/tmpfs here: the space is really allocated, not a sparse hole
        assert os.stat(path).st_blocks * 512 >= 2 << 20


def test_reserve_falls_back_to_a_sparse_length_without_fallocate(tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "_FALLOCATE", None)
    path = str(tmp_path / "sparse")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        assert writer.reserve(fd, 123457) is False
    finally:
        os.close(fd)
    assert os.path.getsize(path) == 123457


def test_reserve_reports_a_full_disk(tmp_path, monkeypatch):
    import ctypes

    def enospc(fd, mode, off, n):
        ctypes.set_errno(errno.ENOSPC)
        return -1

    monkeypatch.setattr(writer, "_FALLOCATE", enospc)
    fd = os.open(str(tmp_path / "f"), os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError) as e:
            writer.reserve(fd, 1 << 30)
        assert e.value.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_start_writeback_leaves_the_bytes_alone(tmp_path):
    path = str(tmp_path / "w")
    data = os.urandom(3 << 20)
    with open(path, "wb") as f:
        f.write(data)
    fd = os.open(path, os.O_WRONLY)
    try:
        writer.start_writeback(fd, 4096, 2 << 20)
        writer.start_writeback(fd, 0, 0)
    finally:
        os.close(fd)
    assert open(path, "rb").read() == data


# ----------------------------------------------------------------------------------- direct I/O


def test_direct_span_takes_exactly_the_whole_blocks_inside_the_range():
    from distmerge.tasks.writer import direct_span

    assert direct_span(0, 8192, 0) == (0, 8192)
    assert direct_span(1, 8192, 1) == (4096, 8192)  # head and tail stay cached
    assert direct_span(4095, 4098, 4095) == (4096, 8192)
    assert direct_span(4095, 4096, 4095) is None  # no whole block inside
    assert direct_span(100, 10_000, 101) is None  # buffer and file not in step
    assert direct_span(100, 10_000, 100 + 3 * 4096) == (4096, 8192)
    for off, n, addr in [(5000, 20000, 904), (12288, 4096, 0), (7, 100_000, 7 + 4096 * 9)]:
        start, end = direct_span(off, n, addr)
        assert start % 4096 == 0 and end % 4096 == 0 and off <= start < end <= off + n
        assert start - off < 4096 and off + n - end < 4096  # maximal


def _aligned_source(nbytes: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random bytes in a buffer placed at ``offset``'s position within a 4 KiB block."""
    big = torch.randint(0, 256, (nbytes + 8192,), dtype=torch.uint8)
    shift = (offset - big.data_ptr()) % 4096
    return big, big[shift : shift + nbytes]


@pytest.mark.parametrize("env", ["1", "0"])
def test_output_file_writes_adjacent_ranges_exactly(tmp_path, monkeypatch, env):
    """Ranges that share partial blocks, written in any order, give exactly the expected bytes;
    whole blocks go direct where the filesystem allows it and ``DISTMERGE_DIRECT_IO`` is not 0."""
    monkeypatch.setenv("DISTMERGE_DIRECT_IO", env)
    cuts = [0, 37, 5000, 5001, 70_000, 70_100, 200_003, 300_000]
    path = str(tmp_path / "part")
    with open(path, "wb") as f:
        f.truncate(cuts[-1])
    expected = bytearray(cuts[-1])
    out = writer.OutputFile(path)
    keep = []
    for a, b in reversed(list(zip(cuts, cuts[1:]))):
        big, src = _aligned_source(b - a, a)
        keep.append(big)
        expected[a:b] = bytes(src.numpy())
        out.write(memoryview(src.numpy()), a, src.data_ptr())
    direct = out.direct_bytes
    out.close()
    assert open(path, "rb").read() == bytes(expected)
    if env == "1" and direct_io_works(tmp_path):
        assert direct == (69632 - 8192) + (196608 - 73728) + (299008 - 200704)  # the whole blocks
    else:
        assert direct == 0


def test_output_file_falls_back_when_a_direct_write_is_refused(tmp_path, monkeypatch):
    """A buffer that is not where the caller says (so the kernel refuses O_DIRECT with EINVAL)
    is written through the page cache instead, and so is everything after it."""
    monkeypatch.setenv("DISTMERGE_DIRECT_IO", "1")
    if not direct_io_works(tmp_path):
        pytest.skip("this filesystem has no O_DIRECT; the refusal path needs one that has")
    path = str(tmp_path / "part")
    with open(path, "wb") as f:
        f.truncate(3 * 8192)
    big, src = _aligned_source(8192, 1)  # placed for offset 1 ...
    out = writer.OutputFile(path)
    out.write(memoryview(src.numpy()), 0, 0)  # ... but claimed at an aligned address
    assert out.direct_fd is None and out.direct_bytes == 0
    big2, src2 = _aligned_source(8192, 8192)
    out.write(memoryview(src2.numpy()), 8192, src2.data_ptr())
    assert out.direct_bytes == 0
    out.close()
    data = open(path, "rb").read()
    assert data[:8192] == bytes(src.numpy()) and data[8192:16384] == bytes(src2.numpy())


def test_auto_direct_io_only_on_local_block_filesystems(tmp_path, monkeypatch):
    """Unset ``DISTMERGE_DIRECT_IO`` means: O_DIRECT on ext4/xfs/btrfs/f2fs only. A tmpfs mounted
    at a path with a space (``\\040`` in /proc/self/mounts) is found and written through the cache."""
    import subprocess

    monkeypatch.delenv("DISTMERGE_DIRECT_IO", raising=False)
    mnt = tmp_path / "with space"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        assert writer.filesystem_type(str(mnt / "part")) == "tmpfs"
        for folder in (mnt, tmp_path):
            path = str(folder / "part")
            with open(path, "wb") as f:
                f.truncate(16384)
            out = writer.OutputFile(path)
            local = writer.filesystem_type(path) in writer.DIRECT_FILESYSTEMS
            assert (out.direct_fd is not None) == (local and direct_io_works(folder))
            assert (folder == mnt) <= (out.direct_fd is None)
            out.close()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
