"""benchmarks/bench_s3.py end to end on a tiny generated base: a SeaweedFS server on loopback, every
method (upload, download, distmerge-s3, distmerge-s3-s3, distmerge-local) runs, the table and the
paired ratios are reported, the GETs of the bucket merges and the uploads of distmerge-s3-s3 are
counted, the three merges write the same tensors, and the server, the output objects and the
scratch files are gone afterwards. (Speed itself is never asserted.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import BENCHMARKS

BENCH_S3 = os.path.join(BENCHMARKS, "bench_s3.py")
TINY = ["--dim", "128", "--ffn", "256", "--text-dim", "64", "--blocks", "1", "--rank", "4"]
METHODS = ["upload", "download", "distmerge-s3", "distmerge-s3-s3", "distmerge-local"]


def _tensor_files(folder) -> dict[str, bytes]:
    """Every output file's bytes, but the recipe (``distmerge.json``) and the index's
    ``metadata.distmerge``, which record where the inputs were (a bucket or a folder)."""
    out = {}
    for p in sorted(folder.iterdir()):
        data = p.read_bytes()
        if p.name.endswith(".index.json"):
            index = json.loads(data)
            index["metadata"].pop("distmerge")
            out[p.name] = json.dumps(index, sort_keys=True).encode()
        elif p.name != "distmerge.json":
            out[p.name] = data
    return out


@pytest.mark.slow
@pytest.mark.ray
def test_tiny_run_reports_every_method_and_both_merges_write_the_same_bytes(tmp_path):
    work, keep, out = tmp_path / "work", tmp_path / "keep", tmp_path / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["DISTMERGE_INLINE_UNITS"] = "0"  # every unit a Ray task: the workers read the bucket too
    argv = [sys.executable, BENCH_S3, "--workdir", str(work), "--repeats", "1", "--keep-outputs", str(keep)]
    proc = subprocess.run([*argv, "--json", str(out), *TINY], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())

    # the table and the paired ratios
    header = "| method | median wall s | GB/s | × upload | × download | × distmerge-local | peak tree RSS GB |"
    assert header in proc.stdout
    assert doc["table_md"] in proc.stdout
    for m in METHODS:
        s = doc["summary"][m]
        assert s["runs_ok"] == 1 and s["wall_s_median"] > 0 and s["throughput_gb_s"] is not None, m
        assert f"| {m} | " in doc["table_md"] and s["peak_rss_gb_median"] > 0, m
    for key in (
        "distmerge_s3_over_download_time",
        "distmerge_s3_over_distmerge_local_time",
        "distmerge_s3_s3_over_upload_time",
        "distmerge_s3_s3_over_download_time",
    ):
        assert doc["ratios"][key] > 0, key
        assert doc["ratios"]["per_round"][0][key] == doc["ratios"][key]
    assert "distmerge-s3 / download (time):" in proc.stdout
    assert "distmerge-s3-s3 / upload (time):" in proc.stdout and "distmerge-s3-s3 / download (time):" in proc.stdout
    assert doc["summary"]["download"]["over_download_time"] == 1.0
    assert doc["summary"]["upload"]["over_upload_time"] == 1.0

    # the commands: the merge from the bucket and the same merge from the local files
    runs = {r["method"]: r for r in doc["runs"]}
    s3_argv, local_argv = runs["distmerge-s3"]["extra"]["argv"], runs["distmerge-local"]["extra"]["argv"]
    assert s3_argv[s3_argv.index("merge") :][:3] == ["merge", "--base", "s3://bench/base"]
    assert local_argv[local_argv.index("merge") :][:3] == ["merge", "--base", doc["inputs"]["base"]]
    s3s3_argv = runs["distmerge-s3-s3"]["extra"]["argv"]
    assert s3s3_argv[s3s3_argv.index("--base") + 1] == "s3://bench/base"
    assert s3s3_argv[s3s3_argv.index("--output") + 1] == "s3://bench/out-s3-s3-r1"

    # the GETs, counted in every process of the run (the driver and the Ray workers)
    gets = runs["distmerge-s3"]["extra"]["gets"]
    assert gets["not_2xx"] == 0 and gets["gets_base"] > 0 and gets["processes"] >= 2
    assert gets["base_get_bytes"] >= doc["inputs"]["base_bytes"]  # every byte at least once
    assert gets["other_get_bytes"] == os.path.getsize(doc["inputs"]["lora"])  # the LoRA, once
    assert doc["ratios"]["base_get_over_base_bytes"] == gets["base_get_over_base_bytes"]
    gets = runs["distmerge-s3-s3"]["extra"]["gets"]
    assert gets["not_2xx"] == 0 and gets["base_get_bytes"] >= doc["inputs"]["base_bytes"]

    # the uploads of the merge into the bucket: every part from a Ray task, each byte sent about once
    s3s3 = runs["distmerge-s3-s3"]["extra"]
    puts = s3s3["puts"]
    assert puts["not_2xx"] == 0 and puts["parts"] > 0 and puts["puts"] > 0, puts
    assert puts["output_bytes"] == s3s3["output_bytes"] >= doc["inputs"]["base_bytes"] // 2
    assert 1.0 <= puts["uploaded_over_output_bytes"] <= 1.1, puts
    assert doc["ratios"]["uploaded_over_output_bytes"] == puts["uploaded_over_output_bytes"]
    assert s3s3["open_uploads"] == 0 and s3s3["scratch_files_left"] == 0
    assert "distmerge-s3-s3 uploaded / output bytes:" in proc.stdout

    # the three merges wrote the same tensors
    assert doc["ratios"]["outputs_identical"] is True
    assert doc["ratios"]["outputs_identical_by_method"] == {"distmerge-s3": True, "distmerge-s3-s3": True}
    want = _tensor_files(keep / "distmerge-local-r1")
    for m in ("distmerge-s3", "distmerge-s3-s3"):
        got = _tensor_files(keep / f"{m}-r1")
        assert any(n.endswith(".safetensors") for n in got) and got == want, m
        (lora,) = json.loads((keep / f"{m}-r1" / "distmerge.json").read_text())["loras"]
        assert lora["reference"] == f"s3://bench/{os.path.basename(doc['inputs']['lora'])}", m

    # nothing is left behind: no scratch folder (server data, downloads, caches), no server
    assert sorted(p.name for p in work.iterdir() if p.name.startswith("s3-scratch")) == []
    assert "SeaweedFS at http://127.0.0.1:" in proc.stdout
