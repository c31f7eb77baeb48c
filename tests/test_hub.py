"""Hugging Face cache references (``distmerge.hub``) on a cache built on disk: no network, no Ray."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from distmerge.app.cli import main
from distmerge.app.synth import write_lora
from distmerge.errors import FormatError
from distmerge.inputs.checkpoint import open_base
from distmerge.inputs.hub import local_path, resolve
from distmerge.inputs.lorafile import open_lora

WAN = "Wan-AI/Wan2.2-I2V-A14B"
LIGHTNING = "lightx2v/Wan2.2-Lightning"
LORA_FILE = "Wan2.2-I2V-A14B-4steps-lora-rank64/high_noise_model.safetensors"
COMMIT = "a" * 40
OLD_COMMIT = "b" * 40


def cache_repo(
    cache: str, repo_id: str, files: dict[str, str], *, commit: str = COMMIT, ref: str | None = "main"
) -> str:
    """Put ``files`` (path in repo -> local file) into ``cache`` as ``hf download`` does; returns the snapshot.

    Blobs are named by their sha256 under ``blobs/``; the snapshot holds relative links to them;
    ``refs/<ref>`` holds the commit.
    """
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(repo, "snapshots", commit)
    os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
    for rel, src in files.items():
        with open(src, "rb") as f:
            blob = os.path.join(repo, "blobs", hashlib.sha256(f.read()).hexdigest())
        shutil.copyfile(src, blob)
        link = os.path.join(snapshot, *rel.split("/"))
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    if ref is not None:
        os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
        with open(os.path.join(repo, "refs", ref), "w") as f:
            f.write(commit)  # no newline, as huggingface_hub writes it
    return snapshot


def folder_files(folder: str, under: str) -> dict[str, str]:
    return {f"{under}/{n}": os.path.join(folder, n) for n in sorted(os.listdir(folder))}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection attempt (by huggingface_hub or anything else) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> str:
    c = str(tmp_path / "hf-cache")
    os.makedirs(c)
    monkeypatch.setenv("HF_HUB_CACHE", c)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # resolution is offline either way
    return c


@pytest.fixture(scope="module")
def wan_folder(tiny_base) -> str:
    """The tiny 3-shard Wan base (read-only), as the folder a download would hold."""
    return tiny_base


@pytest.fixture(scope="module")
def lora_src(tmp_path_factory, tiny_factors) -> str:
    path = str(tmp_path_factory.mktemp("src") / "high_noise_model.safetensors")
    write_lora(path, tiny_factors, layout="seko", alpha=4.0)
    return path


def test_base_folder_reference_reads_through_blob_links(cache, wan_folder):
    snapshot = cache_repo(cache, WAN, folder_files(wan_folder, "high_noise_model"))
    r = resolve(f"{WAN}/high_noise_model")
    assert r == type(r)(os.path.join(snapshot, "high_noise_model"), f"{WAN}/high_noise_model", COMMIT)
    base = open_base(f"{WAN}/high_noise_model")  # header sizes are checked through the links
    assert all(os.path.islink(f) for f in base.files)
    assert base.path == r.local and base.stem == "diffusion_pytorch_model" and len(base.files) == 3
    assert list(base.tensors) == list(open_base(wan_folder).tensors)


def test_lora_file_reference_with_open_lora(cache, lora_src):
    snapshot = cache_repo(cache, LIGHTNING, {LORA_FILE: lora_src})
    lf = open_lora(f"{LIGHTNING}/{LORA_FILE}")
    assert lf.path == os.path.join(snapshot, *LORA_FILE.split("/")) and lf.kind == "safetensors"
    assert lf.tensors == open_lora(lora_src).tensors
    folder = open_lora(f"hf://{LIGHTNING}/{os.path.dirname(LORA_FILE)}")  # a folder holding one file
    assert folder.path == lf.path


def test_revision_picks_that_snapshot(cache, lora_src, tmp_path):
    old = tmp_path / "old.safetensors"
    old.write_bytes(b"")  # only its presence matters
    cache_repo(cache, LIGHTNING, {LORA_FILE: lora_src})
    cache_repo(cache, LIGHTNING, {LORA_FILE: str(old)}, commit=OLD_COMMIT, ref="v1")
    assert resolve(f"{LIGHTNING}/{LORA_FILE}").commit == COMMIT
    for spelled in (
        f"hf://{LIGHTNING}@v1/{LORA_FILE}",
        f"{LIGHTNING}@v1/{LORA_FILE}",
        f"hf://{LIGHTNING}@{OLD_COMMIT}/{LORA_FILE}",
    ):
        r = resolve(spelled)
        assert r.commit == OLD_COMMIT and os.path.getsize(r.local) == 0, spelled
    with pytest.raises(FormatError) as e:
        resolve(f"hf://{LIGHTNING}@v2/{LORA_FILE}")
    assert f"download it first: hf download {LIGHTNING} --revision v2 {LORA_FILE}" in str(e.value)


def test_local_path_of_the_same_spelling_wins(cache, lora_src, tmp_path, monkeypatch):
    cache_repo(cache, LIGHTNING, {LORA_FILE: lora_src})
    monkeypatch.chdir(tmp_path)
    local = tmp_path / LIGHTNING / LORA_FILE
    local.parent.mkdir(parents=True)
    shutil.copyfile(lora_src, local)
    assert resolve(f"{LIGHTNING}/{LORA_FILE}").reference is None
    assert open_lora(f"{LIGHTNING}/{LORA_FILE}").path == f"{LIGHTNING}/{LORA_FILE}"
    assert resolve(f"hf://{LIGHTNING}/{LORA_FILE}").reference is not None  # explicit: the cache


def test_not_cached_names_the_download_command(cache):
    with pytest.raises(FormatError) as e:
        open_base(f"{WAN}/high_noise_model")
    msg = str(e.value)
    assert msg.startswith(f"{WAN}/high_noise_model: not found: no such file or folder (")
    assert msg.endswith(
        f"and no {WAN} in the Hugging Face cache ({cache}); if it is a Hub repo, download it first: "
        f"hf download {WAN} --include 'high_noise_model/*'"
    )
    with pytest.raises(FormatError, match=rf"download it first: hf download {LIGHTNING} {LORA_FILE}$"):
        open_lora(f"{LIGHTNING}/{LORA_FILE}")


def test_mistyped_local_path_is_not_a_reference(cache, tmp_path, monkeypatch):
    """``wan/nope.safetensors`` next to a ``wan/`` folder is a local path with a typo: "not found"
    naming what that folder holds, at once, and no advice to download it."""
    import time

    monkeypatch.chdir(tmp_path)
    (tmp_path / "wan").mkdir()
    (tmp_path / "wan" / "model.safetensors").write_bytes(b"")
    start = time.perf_counter()
    assert resolve("wan/nope.safetensors").reference is None
    with pytest.raises(FormatError) as e:
        open_base("wan/nope.safetensors")
    msg = str(e.value)
    assert "download" not in msg and "not found" in msg
    assert f"no such file or folder in {tmp_path / 'wan'} (it holds model.safetensors)" in msg
    with pytest.raises(FormatError, match="LoRA file not found: no such file or folder in"):
        open_lora("wan/lora.safetensors")
    assert time.perf_counter() - start < 1.0


def test_sub_path_missing_from_the_snapshot(cache, wan_folder):
    snapshot = cache_repo(cache, WAN, folder_files(wan_folder, "high_noise_model"))
    with pytest.raises(FormatError) as e:
        open_base(f"{WAN}/low_noise_model")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(
        f"{WAN}/low_noise_model: expected 'low_noise_model' in the cached snapshot {snapshot}"
    )
    assert msg.endswith(f"no such file or folder; download it first: hf download {WAN} --include 'low_noise_model/*'")


def test_partial_download_is_named_by_the_base_checks(cache, wan_folder, lora_src):
    snapshot = cache_repo(cache, WAN, folder_files(wan_folder, "high_noise_model"))
    shards = sorted(n for n in os.listdir(wan_folder) if n.endswith("-of-00003.safetensors"))
    folder = os.path.join(snapshot, "high_noise_model")
    os.remove(os.path.join(folder, shards[1]))  # a link never made
    with pytest.raises(FormatError, match=rf"names shard '{shards[1]}', which does not exist"):
        open_base(f"{WAN}/high_noise_model")
    blob = os.path.realpath(os.path.join(folder, shards[0]))
    os.symlink(os.path.relpath(blob, folder), os.path.join(folder, shards[1]))
    os.remove(os.path.realpath(os.path.join(folder, shards[2])))  # a link to a blob never finished
    with pytest.raises(FormatError, match=rf"names shard '{shards[2]}', which does not exist"):
        open_base(f"{WAN}/high_noise_model")
    lora_snap = cache_repo(cache, LIGHTNING, {LORA_FILE: lora_src})
    os.remove(os.path.realpath(os.path.join(lora_snap, LORA_FILE)))
    with pytest.raises(FormatError, match="a link to a missing blob"):
        open_lora(f"{LIGHTNING}/{LORA_FILE}")


def test_cached_file_listing_checks_only_the_asked_sub_path(cache, wan_folder):
    """``hf download`` (huggingface_hub >= 1.x) caches the repo's file listing next to the snapshot;
    huggingface_hub then calls a snapshot missing listed files incomplete. A user who downloaded
    only ``high_noise_model/*`` must still resolve it, and a shard missing from it must be named
    by the base checks, not reported as "not in the cache"."""
    snapshot = cache_repo(cache, WAN, folder_files(wan_folder, "high_noise_model"))
    listed = [*folder_files(wan_folder, "high_noise_model"), "low_noise_model/model.safetensors"]
    trees = os.path.join(os.path.dirname(os.path.dirname(snapshot)), "trees")
    os.makedirs(trees)
    with open(os.path.join(trees, COMMIT + ".json"), "w") as f:  # the format its docstring documents
        json.dump({"format_version": 1, "files": {p: {"size": 1, "blob_id": "0" * 40} for p in listed}}, f)
    assert open_base(f"{WAN}/high_noise_model").path == os.path.join(snapshot, "high_noise_model")
    shard = min(n for n in os.listdir(wan_folder) if n.endswith("-of-00003.safetensors"))
    os.remove(os.path.join(snapshot, "high_noise_model", shard))
    with pytest.raises(FormatError, match=rf"names shard '{shard}', which does not exist"):
        open_base(f"{WAN}/high_noise_model")


@pytest.mark.parametrize("offline", ["1", "0"])
def test_never_downloads_whatever_hf_hub_offline_says(cache, monkeypatch, offline, lora_src):
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    with pytest.raises(FormatError, match="in the Hugging Face cache"):  # no_network: no request
        resolve(f"{LIGHTNING}/{LORA_FILE}")
    cache_repo(cache, LIGHTNING, {LORA_FILE: lora_src})
    assert resolve(f"{LIGHTNING}/{LORA_FILE}").commit == COMMIT


def test_cache_location_follows_hf_home(tmp_path, monkeypatch, lora_src):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    snapshot = cache_repo(str(tmp_path / "home" / "hub"), LIGHTNING, {LORA_FILE: lora_src})
    assert local_path(f"{LIGHTNING}/{LORA_FILE}") == os.path.join(snapshot, LORA_FILE)


@pytest.mark.parametrize(
    "spelled",
    [
        "/abs/Wan-AI/x",
        "./Wan-AI/x",
        "../Wan-AI/x",
        "~/Wan-AI/x",
        "C:/models/x",
        "one-name",
        "a--b/repo",
        "-a/repo",
        "owner/repo@",
    ],
)
def test_not_references_keep_the_not_found_errors(cache, spelled):
    assert resolve(spelled).reference is None
    with pytest.raises(FormatError, match="base checkpoint not found"):
        open_base(spelled)


def test_cli_inspect_on_cached_references(cache, wan_folder, lora_src, capsys):
    cache_repo(cache, WAN, folder_files(wan_folder, "high_noise_model"))
    cache_repo(cache, LIGHTNING, {LORA_FILE: lora_src})
    assert main(["inspect", "--lora", f"{LIGHTNING}/{LORA_FILE}", "--base", f"{WAN}/high_noise_model"]) == 0
    out = capsys.readouterr().out
    assert "layout: diffusion_model" in out and "20 target tensors matched" in out
    assert main(["inspect", "--lora", f"{LIGHTNING}/nope.safetensors"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.endswith(f"hf download {LIGHTNING} nope.safetensors")


def test_missing_huggingface_hub_is_one_line(cache, monkeypatch, wan_folder):
    cache_repo(cache, WAN, folder_files(wan_folder, "high_noise_model"))  # in the cache: the hub is needed
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import raises ImportError
    with pytest.raises(FormatError, match=r"needs huggingface_hub, which is not installed"):
        open_base(f"{WAN}/high_noise_model")


def test_local_paths_never_import_huggingface_hub(wan_folder, lora_src):
    code = (
        "import sys; from distmerge.inputs.checkpoint import open_base; from distmerge.inputs.lorafile import "
        f"open_lora; open_base({wan_folder!r}); open_lora({lora_src!r}); "
        "assert 'huggingface_hub' not in sys.modules, 'imported'"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
