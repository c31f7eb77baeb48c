"""A merge's output in an S3-compatible bucket: each shard one multipart upload, the index last.

``resolve_bucket_output`` checks an ``s3://`` output before any work, one line each: the bucket
exists and these credentials may use it and write below the prefix (an upload started and aborted
at once), the prefix holds no model (or ``--overwrite``), and no upload of an interrupted run is
open there (or ``--resume``/``--overwrite``, which abort them: parts of a multipart upload are not
kept across runs). ``BucketStaging`` is the ``Staging`` the driver writes through: ``prepare`` starts
one upload per shard, each unit's task uploads its part (``tasks.upload``), ``publish`` completes the
uploads in shard order, puts the model folder's files and the recipe, and writes the index (or a
single file's checksum sidecar) last, so nothing under the prefix looks like a finished model before
it is one; ``abort`` aborts every upload of the run and deletes what it had stored.

Example:
    >>> t = OutputTarget("s3://models/wan/merged", None)
    >>> t.index_path("diffusion_pytorch_model")
    's3://models/wan/merged/diffusion_pytorch_model.safetensors.index.json'
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

from distmerge.errors import FormatError, OutputError
from distmerge.inputs import objstore, objwrite
from distmerge.inputs.objwrite import PartTarget
from distmerge.inputs.paths import is_file_output
from distmerge.output.durable import shard_crc32s
from distmerge.output.manifest import Manifest, Payload
from distmerge.output.publish import OutputTarget
from distmerge.output.staging import ModelOutput
from distmerge.plan.merge_plan import MergePlan, WorkUnit

__all__ = ["BucketStaging", "resolve_bucket_output"]

logger = logging.getLogger("distmerge.output")

_MARK = "distmerge"


def resolve_bucket_output(output: str, *, overwrite: bool = False, resume: bool = False) -> OutputTarget:
    """Where an ``s3://`` output goes, checked before any work (see the module docstring).

    Raises:
        UsageError: no object key (a bucket is not a model folder).
        FormatError: a missing bucket, refused credentials, no right to write.
        OutputError: a model already there without ``--overwrite``, open uploads without a flag.
    """
    url = output.rstrip("/")
    bucket, key = objstore.split(url)
    if not key:
        raise OutputError(f"{output}: name a folder in the bucket (s3://{bucket}/<folder>), not the bucket itself")
    objwrite.check_bucket(url)
    single = is_file_output(url)
    directory, name = url.rsplit("/", 1) if single else (url, "")
    if single:
        if objstore.exists(url) and not overwrite:
            raise OutputError(f"{url}: already exists; pass --overwrite to replace it")
    else:
        held = objstore.list_objects(url)
        if held and not overwrite:
            raise OutputError(
                f"{url}: holds {len(held)} object(s) (e.g. {held[0].url.rsplit('/', 1)[1]}); pass --overwrite to "
                "write into it (only objects distmerge writes are replaced)"
            )
    stale = objwrite.open_uploads(url, exact=single)
    if stale and not (resume or overwrite):
        raise OutputError(
            f"{url}: {len(stale)} upload(s) of an unfinished run are open there (e.g. {stale[0].url}); pass "
            "--resume or --overwrite to abort them and merge again (open uploads are billed storage)"
        )
    objwrite.check_writable(directory)
    return OutputTarget(directory, name or None, overwrite)


class BucketStaging(ModelOutput):
    """A merge's checkpoint written to a bucket (see the module docstring): the shards, the model
    folder's ``files`` and ``texts``, the index with ``metadata``; the checksums are CRC-32s joined
    from the tasks' CRCs (``crc32`` only: a SHA-256 would read every shard back)."""

    manifest_path = ""  # an upload's parts are not kept across runs: nothing to resume from

    def __init__(self, target: OutputTarget, **model: Any) -> None:
        super().__init__(target, **model)
        self.uploads: dict[str, str] = {}  #: shard name -> upload id
        self.parts: dict[int, PartTarget] = {}  #: unit index -> its part
        self.stored: list[str] = []  #: objects this run has stored (removed again by ``abort``)
        self.published = False

    def url(self, name: str) -> str:
        return f"{self.target.directory}/{name}"

    def prepare(self, plan: MergePlan, *, resume: bool = False) -> None:
        """Abort the uploads an interrupted run left open, then start one upload per shard and
        number every unit's part."""
        where = self.url(self.target.single_file) if self.target.single_file else self.target.directory
        stale = objwrite.open_uploads(where, exact=bool(self.target.single_file))
        for upload in stale:
            objwrite.abort_upload(upload.url, upload.upload_id)
        if stale:
            logger.warning("%s: aborted %d upload(s) an interrupted run left open", where, len(stale))
        headers = {s.name: s.header for s in plan.shards}
        for s in plan.shards:
            self.uploads[s.name] = objwrite.create_upload(self.url(s.name))
        numbers: dict[str, int] = {}
        for u in sorted(plan.units, key=lambda u: u.tensors[0].out_offset if u.tensors else 0):
            n = numbers[u.shard] = numbers.get(u.shard, 0) + 1
            start = 0 if n == 1 else u.tensors[0].out_offset
            header = headers[u.shard] if n == 1 else b""
            self.parts[u.index] = PartTarget(self.url(u.shard), self.uploads[u.shard], n, start, header)

    def dest(self, unit: WorkUnit) -> str:
        return self.url(unit.shard)

    def part(self, unit: WorkUnit) -> PartTarget:
        return self.parts[unit.index]

    def reusable(self, plan: MergePlan, previous: Manifest, run: Any) -> dict[int, Any]:
        return {}

    def unit_done(self, unit: WorkUnit, result: Any) -> Payload:
        return {"crc32": result.crc32, "bytes": result.nbytes, "etag": result.etag}

    def publish(self, plan: MergePlan, results: Mapping[int, Any]) -> list[str]:
        """Complete every shard's upload (its parts' ETags in order), store the folder's files, then
        the index (a single file: its ``.crc32`` sidecar) last. Returns the shard names."""
        sums = shard_crc32s(plan, {i: int(r.crc32) for i, r in results.items()})
        previous = self._previous_model(plan)
        for s in plan.shards:
            etags = [results[u.index].etag for u in self._units_of(plan, s.name)]
            self.stored.append(self.url(s.name))
            objwrite.complete_upload(self.url(s.name), self.uploads[s.name], etags)
        for name, src in self.files.items():
            self._put(name, src=src)
        for name, text in self.texts.items():
            self._put(name, data=text.encode("utf-8"))
        names = [s.name for s in plan.shards]
        if self.target.single_file:
            name = self.target.single_file
            self._put(f"{name}.crc32", data=f"{sums[name]}  {name}\n".encode())
        else:
            index = {
                "metadata": {"total_size": plan.total_size, _MARK: {**self.metadata, "crc32": sums}},
                "weight_map": plan.weight_map,
            }
            self._put(
                os.path.basename(self.target.index_path(plan.stem)), data=(json.dumps(index, indent=2) + "\n").encode()
            )
        self.published = True
        stale = [self.url(n) for n in previous if n not in names]
        try:  # shards of the model this one replaced that it does not use
            objwrite.delete_objects(stale)
        except FormatError as e:  # the model is published: a leftover is said, not a failed run
            logger.warning("%s; the merged model is published", e)
        return names

    def _units_of(self, plan: MergePlan, shard: str) -> list[WorkUnit]:
        return sorted((u for u in plan.units if u.shard == shard), key=lambda u: self.parts[u.index].number)

    def _put(self, name: str, *, src: str = "", data: bytes = b"") -> None:
        url = self.url(name)
        self.stored.append(url)
        if src:
            objwrite.put_file(url, src)
        else:
            objwrite.put_bytes(url, data)

    def _previous_model(self, plan: MergePlan) -> list[str]:
        """The shards an earlier distmerge index at the output names; that index is deleted first,
        so from now on the prefix does not look finished."""
        if self.target.single_file:
            return []
        index = self.target.index_path(plan.stem)
        if not objstore.exists(index):
            return []
        try:
            idx = json.loads(objstore.read_range(index, 0, objstore.stat(index).size))
            shards = sorted(set(idx["weight_map"].values())) if _MARK in idx.get("metadata", {}) else []
        except (ValueError, AttributeError, KeyError, TypeError):
            shards = []
        objwrite.delete_objects([index])
        return shards

    def abort(self) -> None:
        """Abort every upload of the run and delete what it stored (before the index, nothing of
        the run is a model); after the index is written, only the uploads are left to abort."""
        failures: list[str] = []
        for name, uid in self.uploads.items():
            try:
                objwrite.abort_upload(self.url(name), uid)
            except FormatError as e:
                failures.append(str(e))
        if not self.published:
            try:
                objwrite.delete_objects(self.stored)
            except FormatError as e:
                failures.append(str(e))
        try:  # a part that landed while its upload was aborted: abort it again
            for name, uid in self.uploads.items():
                for u in objwrite.open_uploads(self.url(name), exact=True):
                    if u.upload_id == uid:
                        objwrite.abort_upload(u.url, uid)
        except FormatError as e:
            failures.append(str(e))
        for f in failures:
            logger.warning("%s", f)
