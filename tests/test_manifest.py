"""The resume manifest: atomic rewrites without fsync (an fsync on ext4 would flush the part files'
gigabytes on every finished unit), and a damaged or foreign manifest means nothing to resume."""

from __future__ import annotations

import os

from distmerge.output import atomic as output
from distmerge.output.manifest import Manifest


def test_save_is_atomic_and_never_fsyncs_while_publishing_writes_do(tmp_path, monkeypatch):
    calls: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    path = str(tmp_path / ".distmerge-manifest.json")
    m = Manifest({"base": "x"}, 4096, path=path)
    m.record(0, {"crc32": 0xDEADBEEF, "bytes": 4096})
    m.save()
    m.record(1, {"crc32": 7, "bytes": 10})
    m.save()
    assert calls == []
    assert not os.path.exists(path + ".tmp")
    back = Manifest.load(path)
    assert back is not None and back.units == {0: {"crc32": 0xDEADBEEF, "bytes": 4096}, 1: {"crc32": 7, "bytes": 10}}
    assert back.unit_size == 4096 and back.fingerprint == {"base": "x"}
    output.write_atomic(str(tmp_path / "index.json"), "{}\n")  # what publish writes: durable
    assert len(calls) == 1 and open(tmp_path / "index.json").read() == "{}\n"


def test_damaged_manifest_means_nothing_to_resume(tmp_path):
    path = tmp_path / "m.json"
    for text in ("", "{", '{"version": 999}', '{"version": 1, "units": {"0": {}}}', "[]"):
        path.write_text(text)
        assert Manifest.load(str(path)) is None, text
    assert Manifest.load(str(tmp_path / "absent.json")) is None
