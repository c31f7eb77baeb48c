"""A new user's first hour (issue #21): every path a run will write is checked before any work,
nothing after publishing turns a success into a failure, and a mistyped path says what is there."""

from __future__ import annotations

import json
import logging
import os
import textwrap

import pytest

import distmerge
from distmerge.app.jobfile import check_job, parse_job
from distmerge.app.report import save_report
from distmerge.errors import UsageError

pytestmark = pytest.mark.ray


def test_report_into_missing_folders_is_written(tiny_base, lora, tmp_path, ray_local):
    """``--report nodir/sub/r.json``: the folders are made, as for a folder output (this published
    the output and then failed with FileNotFoundError before)."""
    report = tmp_path / "nodir" / "sub" / "r.json"
    rep = distmerge.merge(tiny_base, [lora], str(tmp_path / "out"), report=str(report))
    assert json.loads(report.read_text())["pairs_merged"] == rep.pairs_merged > 0


@pytest.mark.parametrize("where", ["folder", "under_file"])
def test_unwritable_report_refused_before_work(where, tiny_base, lora, tmp_path, ray_local):
    (tmp_path / "plain").write_text("x")
    report = {"folder": tmp_path, "under_file": tmp_path / "plain" / "r.json"}[where]
    out = tmp_path / "out"
    with pytest.raises(UsageError, match=r"^--report .*: (is a folder|cannot write there)"):
        distmerge.merge(tiny_base, [lora], str(out), report=str(report))
    assert not out.exists()


def test_job_checks_every_report_before_the_first_merge(tiny_base, lora, tmp_path):
    """A job whose second merge cannot write its report fails before the first merge runs."""
    (tmp_path / "plain").write_text("x")
    text = textwrap.dedent(
        f"""
        merges:
          - name: one
            base: {tiny_base}
            loras: [{lora}]
            output: {tmp_path / "out1"}
            report: {tmp_path / "reports" / "one.json"}
          - name: two
            base: {tiny_base}
            loras: [{lora}]
            output: {tmp_path / "out2"}
            report: {tmp_path / "plain" / "two.json"}
        """
    )
    job = parse_job(text, source="job.yaml", base_dir=str(tmp_path))
    with pytest.raises(UsageError, match=r"^merge 'two': --report .*plain/two.json: cannot write there"):
        check_job(job)
    assert not (tmp_path / "out1").exists() and not (tmp_path / "reports").exists()


def test_report_failure_after_publish_is_a_warning(tmp_path, caplog):
    (tmp_path / "plain").write_text("x")
    with caplog.at_level(logging.WARNING, logger="distmerge"):
        assert save_report({"a": 1}, str(tmp_path / "plain" / "r.json")) is False
    assert "the report could not be written" in caplog.text and "published" in caplog.text
    assert save_report({"a": 1}, str(tmp_path / "x" / "r.json")) is True
    assert json.loads((tmp_path / "x" / "r.json").read_text()) == {"a": 1}
    assert os.path.isfile(tmp_path / "plain")
