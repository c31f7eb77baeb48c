"""Hugging Face cache references: ``owner/repo[/sub/path]`` and ``hf://owner/repo[@rev]/sub/path``.

This module owns turning a ``--base`` / ``--lora`` string into a local path. A path that exists
locally always wins, and so does one whose first folder exists here (``wan/nope.safetensors`` with a
``wan/`` folder is a mistyped local path, never a repo). Otherwise a string spelled like a Hub repo
id, optionally followed by a path inside the repo (and ``@revision`` after the repo name), or any
``hf://`` reference, is looked up in the local Hugging Face cache, **offline**: nothing is ever
downloaded at merge time, and a repo with no folder in the cache is refused at once. A
reference that is not cached is a one-line ``FormatError`` naming the ``hf download`` command to
run. Anything else is returned unchanged, so the callers' own "not found" errors stay as they are.
``huggingface_hub`` is imported only when a reference is actually looked up.

The result is the snapshot path (``models--owner--repo/snapshots/<commit>/sub/path``), whose files
are links into ``blobs/``; everything downstream reads through them. A revision is a branch, tag
or commit without ``/`` (``main`` when none is given).

Example:
    >>> parse_reference("hf://lightx2v/Wan2.2-Lightning@v1/high/lora.safetensors")
    HubRef(repo_id='lightx2v/Wan2.2-Lightning', subpath='high/lora.safetensors', revision='v1')
    >>> parse_reference("Wan-AI/Wan2.2-I2V-A14B/high_noise_model").subpath
    'high_noise_model'
    >>> parse_reference("/data/model") is None, parse_reference("model.safetensors") is None
    (True, True)
    >>> download_command(parse_reference("Wan-AI/Wan2.2-I2V-A14B/high_noise_model"))
    "hf download Wan-AI/Wan2.2-I2V-A14B --include 'high_noise_model/*'"
    >>> resolve("/no/such/place")  # not a reference: returned as given
    Resolved(local='/no/such/place', reference=None, commit=None)
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass

from distmerge.errors import FormatError
from distmerge.inputs.objstore import is_s3
from distmerge.inputs.paths import missing, refuse_url

__all__ = ["HubRef", "Resolved", "cache_dir", "download_command", "local_path", "parse_reference", "resolve"]

SCHEME = "hf://"
#: a repo id segment as the Hub allows it: letters, digits, ``-_.``; no leading/trailing ``-``/``.``
_SEGMENT = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?", re.ASCII)
_REVISION = re.compile(r"[A-Za-z0-9_.-]+", re.ASCII)
#: last path parts that name a file (the ``hf download`` command differs for files and folders)
_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".json", ".gguf")


@dataclass(frozen=True)
class HubRef:
    """A parsed reference: which repo, which path inside it, which revision."""

    repo_id: str  #: ``owner/repo``
    subpath: str  #: ``sub/path`` inside the repo; ``""`` for the repo root
    revision: str = "main"


@dataclass(frozen=True)
class Resolved:
    """What a ``--base``/``--lora`` string turned into, for reading and for the report."""

    local: str  #: the path to read (the string itself when it was not a reference)
    reference: str | None = None  #: the reference as given, when it was resolved from the cache
    commit: str | None = None  #: the cached snapshot's commit, when it was a reference


def parse_reference(spelled: str) -> HubRef | None:
    """Parse ``owner/repo[@rev][/sub/path]`` (or ``hf://`` + that); ``None`` if it is not one.

    Only the spelling is checked; whether a local path of that name exists is :func:`resolve`'s
    business. Absolute, ``./``/``../``, ``~`` and Windows-style paths are never references.
    """
    body = spelled.removeprefix(SCHEME)
    if not body or body.startswith(("/", "~")) or "\\" in body or ":" in body:
        return None
    parts = body.rstrip("/").split("/")
    if len(parts) < 2 or any(p in ("", ".", "..") for p in parts):
        return None
    owner, name = parts[0], parts[1]
    name, _, revision = name.partition("@")
    if "@" in parts[1] and not _REVISION.fullmatch(revision):
        return None
    repo_id = f"{owner}/{name}"
    if (
        not (_SEGMENT.fullmatch(owner) and _SEGMENT.fullmatch(name))
        or "--" in repo_id
        or ".." in repo_id
        or len(repo_id) > 96
    ):
        return None
    return HubRef(repo_id, "/".join(parts[2:]), revision or "main")


def cache_dir() -> str:
    """The hub cache folder, read from the environment now, with ``huggingface_hub``'s rules.

    ``HF_HUB_CACHE``, else ``HUGGINGFACE_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``. (``huggingface_hub``
    reads these once, at import; reading them per call keeps a changed environment honoured.)
    """
    env = os.environ
    home = env.get("HF_HOME", os.path.join(env.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface"))
    home = os.path.expandvars(os.path.expanduser(home))
    legacy = env.get("HUGGINGFACE_HUB_CACHE", os.path.join(home, "hub"))
    return os.path.expandvars(os.path.expanduser(env.get("HF_HUB_CACHE", legacy)))


def download_command(ref: HubRef, is_file: bool | None = None) -> str:
    """The ``hf download`` command that puts ``ref`` into the cache (``is_file`` guessed if None)."""
    cmd = f"hf download {ref.repo_id}"
    if ref.revision != "main":
        cmd += f" --revision {shlex.quote(ref.revision)}"
    if not ref.subpath:
        return cmd
    if is_file is None:
        is_file = ref.subpath.endswith(_FILE_SUFFIXES)
    if is_file:
        return f"{cmd} {shlex.quote(ref.subpath)}"
    return f"{cmd} --include {shlex.quote(ref.subpath + '/*')}"


def resolve(path: str | os.PathLike[str]) -> Resolved:
    """Turn a ``--base``/``--lora`` string into the local path to read.

    An existing local path (even a dangling link) is returned as is; so is anything not spelled
    like a reference. A reference is looked up in the cache without any network access.

    Raises:
        FormatError: a reference whose repo, revision or sub path is not in the cache.
    """
    spelled = os.fspath(path)
    if is_s3(spelled):
        return Resolved(spelled)  # object storage: read where it is (``objstore``), never a local path
    refuse_url(spelled)
    explicit = spelled.startswith(SCHEME)
    if not explicit and os.path.lexists(spelled):
        return Resolved(spelled)
    ref = parse_reference(spelled)
    if ref is None:
        if explicit:
            raise FormatError(
                f"{spelled}: expected hf://owner/repo[@revision][/path/in/repo], found an invalid repo id or path"
            )
        return Resolved(spelled)
    if not explicit and os.path.isdir(spelled.split("/", 1)[0]):
        return Resolved(spelled)  # its first folder is here: a local path (the readers say what is missing)
    if not os.path.isdir(os.path.join(cache_dir(), "models--" + ref.repo_id.replace("/", "--"))):
        where = "" if explicit else f"{missing(spelled)}, and "
        raise FormatError(
            f"{spelled}: not found: {where}no {ref.repo_id} in the Hugging Face cache ({cache_dir()}); "
            f"if it is a Hub repo, download it first: {download_command(ref)}"
        )
    return _from_cache(spelled, ref)


def local_path(path: str | os.PathLike[str]) -> str:
    """:func:`resolve`'s local path; what the readers open."""
    return resolve(path).local


def _from_cache(spelled: str, ref: HubRef) -> Resolved:
    snapshot = _snapshot(spelled, ref)
    local = os.path.join(snapshot, *ref.subpath.split("/")) if ref.subpath else snapshot
    if not os.path.exists(local):
        found = (
            "a link to a missing blob (an interrupted download?)"
            if os.path.lexists(local)
            else "no such file or folder"
        )
        raise FormatError(
            f"{spelled}: expected '{ref.subpath}' in the cached snapshot {snapshot} of "
            f"{ref.repo_id} (revision {ref.revision}), found {found}; download it "
            f"first: {download_command(ref)}"
        )
    return Resolved(local, spelled, os.path.basename(snapshot))


def _snapshot(spelled: str, ref: HubRef) -> str:
    """The cached snapshot folder of ``ref``'s repo and revision (offline; never downloads)."""
    try:
        import huggingface_hub
        from huggingface_hub import errors
    except ImportError:
        raise FormatError(
            f"{spelled}: not a local path; reading it from the Hugging Face cache "
            "needs huggingface_hub, which is not installed (pip install huggingface_hub)"
        ) from None
    incomplete = getattr(errors, "IncompleteSnapshotError", ())  # newer huggingface_hub only
    cache = cache_dir()
    patterns = [ref.subpath, ref.subpath + "/*"] if ref.subpath else None
    try:
        return huggingface_hub.snapshot_download(
            ref.repo_id, revision=ref.revision, cache_dir=cache, local_files_only=True, allow_patterns=patterns
        )
    except incomplete as e:  # files missing: the base/LoRA checks name which one, in our words
        return str(e.snapshot_path)
    except (errors.LocalEntryNotFoundError, errors.HFValidationError):
        raise FormatError(
            f"{spelled}: not a local path and not in the Hugging Face cache ({cache}); "
            f"download it first: {download_command(ref)}"
        ) from None
