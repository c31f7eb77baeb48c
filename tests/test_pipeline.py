"""The task I/O pipeline: direct reads into placed buffers, the page-cache probe, buffer reuse,
reads and writes in flight, and the unit sizes that keep workers busy to the end."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from distmerge.inputs.lorafile import LoraReader
from distmerge.plan.merge_plan import READ_DEPTH, WRITE_BACKLOG, make_plan
from distmerge.plan.units import MAX_UNIT_BYTES, partition_units, target_unit_bytes
from distmerge.tasks import pipeline
from distmerge.tasks.directio import DIRECT_ALIGN, read_direct, resident_fraction
from distmerge.tasks.pieces import piece_bytes
from distmerge.tasks.pipeline import BufferPool, Ring, run_pipeline
from distmerge.tasks.reading import OpenFiles, read_placed
from tests.helpers import direct_io_works


def _file(tmp_path, nbytes: int, name: str = "f.bin") -> tuple[str, bytes]:
    data = os.urandom(nbytes)
    path = str(tmp_path / name)
    with open(path, "wb") as f:
        f.write(data)
    return path, data


def _drop(path: str) -> None:
    """Evict ``path``'s clean pages from the page cache (what a cold read finds)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_resident_fraction_tells_cached_from_cold_without_reading(tmp_path):
    path, _ = _file(tmp_path, 64 * 4096)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert resident_fraction(fd, 100, 10_000) == 1.0  # just written
        _drop(path)
        cold = resident_fraction(fd, 0, 64 * 4096)
        assert cold < 0.5
        assert resident_fraction(fd, 0, 64 * 4096) == cold  # asking read nothing in
        os.pread(fd, 8 * 4096, 0)
        assert resident_fraction(fd, 0, 8 * 4096) == 1.0
        assert resident_fraction(fd, 0, 0) == 1.0
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    "offset,nbytes",
    [(0, 4096), (1, 10), (4095, 2), (5000, 3 * 4096 + 7), (0, 20 * 4096 + 123), (20 * 4096 + 100, 23)],
)
def test_direct_reads_land_exactly_in_placed_slots(tmp_path, offset, nbytes):
    """Any offset and length, the file's unaligned last bytes too: the slot holds exactly the
    file's bytes, read with O_DIRECT (the memory around the slot takes the rest of the blocks)."""
    if not direct_io_works(tmp_path):
        pytest.skip("this filesystem has no O_DIRECT")
    path, data = _file(tmp_path, 20 * 4096 + 123)
    _drop(path)
    ring = Ring(nbytes, 1)
    slot = ring.slot(nbytes, offset)
    assert slot.direct and (slot.data().data_ptr() - offset) % DIRECT_ALIGN == 0
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        read_direct(fd, slot.buf.numpy().data.cast("B"), slot.start, offset, nbytes)
    finally:
        os.close(fd)
    assert bytes(slot.data().numpy()) == data[offset : offset + nbytes]


def test_direct_read_past_the_end_of_the_file_is_an_io_error(tmp_path):
    if not direct_io_works(tmp_path):
        pytest.skip("this filesystem has no O_DIRECT")
    path, _ = _file(tmp_path, 3 * 4096 + 10)
    slot = Ring(8192, 1).slot(8192, 8192)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        with pytest.raises(OSError, match="unexpected end of file at byte 12298"):
            read_direct(fd, slot.buf.numpy().data.cast("B"), slot.start, 8192, 8192)
    finally:
        os.close(fd)


@pytest.mark.parametrize("direct_env", ["0", "1"])
def test_read_placed_gives_the_same_bytes_cold_or_cached_direct_or_not(tmp_path, monkeypatch, direct_env):
    monkeypatch.setenv("DISTMERGE_DIRECT_IO", direct_env)
    path, data = _file(tmp_path, 300_000)
    ring = Ring(100_000, 3)
    files = OpenFiles()
    try:
        for cold in (False, True):
            if cold:
                _drop(path)
            for off, n in ((0, 100_000), (12_345, 99_999), (299_000, 1000)):
                slot = ring.slot(n, off, itemsize=1)
                read_placed(files, path, off, slot.buf, slot.start, n, direct=slot.direct)
                assert bytes(slot.data().numpy()) == data[off : off + n]
        expect_direct = direct_env == "1" and direct_io_works(tmp_path)
        assert (files.direct_bytes > 0) == expect_direct  # only the cold reads went direct
        assert files.direct_bytes <= 200_999
    finally:
        files.close()


def test_a_slot_for_an_offset_its_dtype_cannot_view_is_not_placed():
    ring = Ring(64, 2)
    assert not ring.slot(8, 6, itemsize=4).direct  # 6 is not a multiple of 4
    placed = ring.slot(8, 8, itemsize=4)
    assert placed.direct and placed.view(torch.float32, (2,)).shape == (2,)


def test_buffer_pool_hands_back_the_same_buffers_and_keeps_at_most_its_limit():
    pool = BufferPool(limit=3000)
    a, b = pool.take(1000), pool.take(2500)
    pool.give([a, b])  # 3500 bytes: only the largest that fit under the limit are kept
    again = pool.take(900)
    assert again.data_ptr() == b.data_ptr()  # the 2500-byte one fits; the 1000-byte one was dropped
    assert pool.take(900).data_ptr() not in (a.data_ptr(), b.data_ptr())


def test_ring_buffers_are_reused_between_units():
    pool = BufferPool()
    first = Ring(10_000, 2, pool=pool)
    ptrs = {s.buf.data_ptr() for s in (first.slot(10), first.slot(10))}
    first.release()
    second = Ring(10_000, 2, pool=pool)
    assert {s.buf.data_ptr() for s in (second.slot(10), second.slot(10))} == ptrs


def test_pipeline_keeps_reads_in_flight_and_writes_beside_them():
    """Reads run ``depth`` at a time while the main thread computes; writes go on their own thread
    and never more than ``backlog`` + 1 are pending; results are written in order."""
    active, peak, lock = [0], [0], threading.Lock()
    written: list[int] = []

    def read(job: int):
        def go() -> int:
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            time.sleep(0.02)
            with lock:
                active[0] -= 1
            return job

        return go

    def write(job: int, out: int) -> None:
        assert threading.current_thread().name.startswith("distmerge-write")
        time.sleep(0.01)
        written.append(out)

    waits = run_pipeline(iter(range(12)), read=read, compute=lambda j, r: r * 2, write=write, depth=3)
    assert written == [2 * j for j in range(12)]
    assert peak[0] == 3
    assert waits.read_s > 0 and waits.compute_s >= 0 and waits.write_s >= 0


def test_pipeline_raises_the_first_error_after_stopping():
    def read(job: int):
        def go() -> int:
            if job == 4:
                raise OSError(5, "Input/output error")
            return job

        return go

    done: list[int] = []
    with pytest.raises(OSError, match="Input/output error"):
        run_pipeline(iter(range(10)), read=read, compute=lambda j, r: r, write=lambda j, o: done.append(o))
    assert done == [0, 1, 2, 3]


def test_big_jobs_are_cut_in_units_of_at_most_512_mib_with_a_short_tail():
    assert target_unit_bytes(100 << 20, workers=2) == 100 << 20 >> 3  # small jobs as before
    assert target_unit_bytes(100 << 30, workers=2) == MAX_UNIT_BYTES
    assert target_unit_bytes(100 << 30, workers=2, unit_size="2GiB") == 2 << 30
    assert partition_units([4] * 8, 16, tail=(100, 4)) == [(0, 4), (4, 8)]  # a tail beyond the end: none


def test_plan_of_a_big_base_ends_with_quarter_size_units(tmp_path, monkeypatch):
    """Past the unit cap, the last ``workers`` units' worth of bytes is cut in quarter-size units
    (the cap scaled down here: 1 MiB instead of 512 MiB)."""
    from distmerge.inputs.checkpoint import open_base
    from distmerge.plan import merge_plan, units
    from distmerge.tasks.writer import write_safetensors

    monkeypatch.setattr(units, "MAX_UNIT_BYTES", 1 << 20)
    monkeypatch.setattr(merge_plan, "MAX_UNIT_BYTES", 1 << 20)
    base = str(tmp_path / "b.safetensors")  # 80 tensors of 128 KiB: 10 MiB, 1.25 MiB per unit uncapped
    write_safetensors(base, {f"w{i}": torch.zeros(256, 256, dtype=torch.bfloat16) for i in range(80)})
    plan = make_plan(open_base(base), [], single_file="out.safetensors", workers=2)
    sizes = [u.nbytes for u in plan.units]
    assert sum(sizes) == 80 << 17
    assert sizes == [1 << 20] * 8 + [1 << 18] * 8  # the last 2 MiB (one unit per worker) in quarters
    explicit = make_plan(open_base(base), [], single_file="out.safetensors", workers=2, unit_size="1MiB")
    assert [u.nbytes for u in explicit.units] == [1 << 20] * 10  # --unit-size is kept exactly


def test_memory_asked_of_ray_covers_the_task_rings(tiny_base, tiny_factors, tmp_path):
    from distmerge.app.api import collect_deltas
    from distmerge.app.synth import write_lora
    from distmerge.inputs.checkpoint import open_base

    lora = str(tmp_path / "l.pth")
    write_lora(lora, tiny_factors)
    base = open_base(tiny_base)
    plan = make_plan(base, collect_deltas(base, [(lora, 1.0)]).deltas, workers=2)
    for u in plan.units:
        src, out, acc = piece_bytes(u)
        assert u.memory >= (READ_DEPTH + 1) * src + acc + (WRITE_BACKLOG + 2) * out


def test_a_pickled_lora_index_is_loaded_once_per_process_until_the_file_changes(tmp_path, monkeypatch):
    from distmerge.inputs import lorafile

    path = str(tmp_path / "l.pth")
    torch.save({"a": torch.ones(2)}, path)
    calls: list[str] = []
    real = lorafile.load_pickle
    monkeypatch.setattr(lorafile, "load_pickle", lambda p: calls.append(p) or real(p))
    monkeypatch.setattr(LoraReader, "_shared", type(LoraReader._shared)())
    assert LoraReader().read(path, "a").tolist() == [1.0, 1.0]
    assert LoraReader().read(path, "a").tolist() == [1.0, 1.0]
    assert len(calls) == 1
    torch.save({"a": torch.zeros(2)}, path)
    os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert LoraReader().read(path, "a").tolist() == [0.0, 0.0]
    assert len(calls) == 2


def test_pipeline_module_has_no_constants_of_its_own():
    """The ring sizes the plan's memory estimate assumes are the ones the tasks use."""
    assert pipeline.READ_DEPTH == READ_DEPTH and pipeline.WRITE_BACKLOG == WRITE_BACKLOG


def test_a_worker_gives_back_its_pages_of_a_pickled_lora_but_never_written_ones(tmp_path):
    from distmerge.inputs.mapped import drop_mapped_pages

    path = str(tmp_path / "l.pth")
    torch.save({"a": torch.arange(1 << 20, dtype=torch.float32)}, path)  # 4 MiB
    sd = LoraReader._shared_pickle(path)
    total = float(sd["a"].sum())
    assert drop_mapped_pages(path) >= 4 << 20  # the mapping is given back (clean pages only)
    assert float(sd["a"].sum()) == total  # mapped again from the file, same values
    sd["a"][0] = -1.0  # a page of the mapping's own: never dropped, its change kept
    assert drop_mapped_pages(path) == 0
    assert float(sd["a"][0]) == -1.0
    LoraReader._shared.clear()
